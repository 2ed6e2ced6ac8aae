"""Tracing SeeSR's networks to ONNX with the interface declared in ``seesr_runtime.networks``.

Each network gets a thin wrapper whose ``forward`` takes and returns exactly
the tensors of its ``NetworkSpec``, in order; the spec also names the dynamic
axes. Then: the full ONNX checker (external-data aware), shape inference and
constant folding, and optionally an fp16 copy with attention kept in fp32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from onnx import TensorProto
from onnx_graphsurgeon.logger import G_LOGGER
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from seesr_runtime.networks import NETWORK_NAMES, NETWORK_TABLE, ModelDims, NetworkSpec, dummy_feeds

from .graph_format import EXTERNAL_DATA_THRESHOLD, OPSET, PROTOBUF_LIMIT

# ---------------------------------------------------------------- wrappers


class DapeGraph(nn.Module):
    def __init__(self, dape):
        super().__init__()
        self.dape = dape

    def forward(self, image):
        return self.dape(image)


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class ControlNetGraph(nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, image_embeds, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, image_embeds, controlnet_cond, conditioning_scale
        )
        return (*down, mid)


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, image_embeds, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states, image_embeds, list(residuals[:-1]), residuals[-1])


class VaeEncoderGraph(nn.Module):
    """Posterior moments; the sampling (and its noise) stays in the runtime."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.quant_conv(self.vae.encoder(image))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decoder(self.vae.post_quant_conv(latent))


# The wrapper of each network graph (the torch model it wraps: NETWORK_TABLE[name].model).
GRAPH_WRAPPERS = {
    "dape": DapeGraph,
    "text_encoder": TextEncoderGraph,
    "controlnet": ControlNetGraph,
    "unet": UNetGraph,
    "vae_encoder": VaeEncoderGraph,
    "vae_decoder": VaeDecoderGraph,
}


def graph_module(name: str, models) -> nn.Module:
    """The exportable graph of network ``name``; ``models`` has the torch models as attributes."""
    return GRAPH_WRAPPERS[name](getattr(models, NETWORK_TABLE[name].model)).eval()


def graph_modules(models) -> dict[str, nn.Module]:
    return {name: graph_module(name, models) for name in NETWORK_NAMES}


def residual_layout(controlnet) -> tuple[list[int], list[int]]:
    """Channels and stride of each ControlNet residual, in UNet skip order."""
    channels, strides, stride = [controlnet.conv_in.out_channels], [1], 1
    for block in controlnet.down_blocks:
        for resnet in block.resnets:
            channels.append(resnet.out_channels)
            strides.append(stride)
        for downsampler in block.downsamplers or []:
            stride *= 2
            channels.append(downsampler.out_channels)
            strides.append(stride)
    return channels, strides


def model_dims(dape, text_encoder, controlnet, latent_channels: int) -> ModelDims:
    """Read the interface dimensions off the networks (``controlnet`` may live on the meta device)."""
    channels, strides = residual_layout(controlnet)
    return ModelDims(
        text_dim=text_encoder.config.hidden_size,
        num_tags=dape.config.num_classes,
        residual_channels=tuple(channels),
        residual_strides=tuple(strides),
        mid_channels=controlnet.controlnet_mid_block.out_channels,
        latent_channels=latent_channels,
        image_tokens=dape.config.num_image_tokens,
        image_embed_dim=dape.config.image_embed_dim,
    )


# ---------------------------------------------------------------- inputs


def sample_feeds(spec: NetworkSpec, env: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """The build's sample inputs for ``spec`` (tracing, parity checks, FLOP counts): the runtime's
    ``dummy_feeds`` at a conditioning scale of 0.8, not the neutral 1.0, so that a ControlNet graph
    that lost the scale fails its parity check."""
    return dummy_feeds(spec, env, seed, conditioning_scale=0.8)


def run_torch(module: nn.Module, spec: NetworkSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [o.detach().numpy() for o in outputs]


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportOptions:
    opset: int = OPSET
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD


def export_onnx(
    module: nn.Module,
    spec: NetworkSpec,
    env: dict[str, int],
    path: Path,
    options: ExportOptions = ExportOptions(),
    release=None,
) -> list[Path]:
    """Trace ``module`` to ``path`` (+ ``path.data`` when large); returns the files written.

    ``release()``, if given, is called once the trace is done and before the graph is
    post-processed, so the caller can free the torch weights: at SD2 size a second and
    third copy of the UNet would not fit in memory.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="seesr-trace-", dir=path.parent) as scratch:
        traced = trace(module, spec, env, Path(scratch) / "traced.onnx", options.opset)
        del module
        if release is not None:
            release()
        return finalize(traced, path, options.external_data_threshold)


def trace(module: nn.Module, spec: NetworkSpec, env: dict[str, int], path: Path, opset: int = OPSET) -> Path:
    """torch.onnx.export (TorchScript tracer) with the spec's names and dynamic axes."""
    feeds = sample_feeds(spec, env)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-side shape check it folds; they are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )
    return path


def finalize(
    traced: Path, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, fold: bool = True
) -> list[Path]:
    """Clean up a traced graph and save it: one .onnx, plus one .onnx.data when large.

    ``fold=False`` for Q/DQ graphs: folding would evaluate Quantize/DequantizeLinear on the
    constant weights and leave fake-quantized fp32 weights without the Q/DQ that int8 engines need.
    """
    model = onnx.load(str(traced), load_external_data=True)
    if fold and _weights_bytes(model) < PROTOBUF_LIMIT:
        model = simplify(model)
    # Above 2 GB, graphsurgeon would hold two more copies of the weights; torch's exporter has
    # already folded the constants, so only the node order is checked.
    else:
        toposort(model)
    return save_onnx(model, path, external_data_threshold)


# onnxruntime's log severities (0 verbose .. 4 fatal); it has no getter, so folding restores its default.
ORT_LOG_WARNING, ORT_LOG_ERROR = 2, 3


@contextmanager
def quiet_folding() -> Iterator[None]:
    """Only errors from constant folding: graphsurgeon evaluates constant subgraphs in onnxruntime sessions,
    whose optimizer logs a warning for each Unsqueeze it cannot remove (over 100 lines for the tiny bundle,
    none of them about the exported graph), and logs notes of its own (no `colored` module, large folded
    tensors)."""
    previous = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(ORT_LOG_ERROR)
    try:
        yield
    finally:
        ort.set_default_logger_severity(ORT_LOG_WARNING)
        G_LOGGER.severity = previous


def simplify(model):
    """Shape inference, constant folding and dead-node removal (onnx-graphsurgeon)."""
    graph = gs.import_onnx(model)
    with quiet_folding():
        graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    return onnx.shape_inference.infer_shapes(model)


def toposort(model) -> None:
    """Reorder ``model.graph.node`` in place so producers precede consumers (no tensor copies).

    The order is by wave: wave 0 is every node whose inputs are graph inputs or initializers, wave k+1 every
    node whose inputs wave k completed; within a wave, the original order. A node's wave is one more than
    the latest wave among the earliest producers of its inputs, so one pass in dependency order finds them."""
    nodes = list(model.graph.node)
    given = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    producers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            producers.setdefault(name, []).append(index)
    waves = _node_waves(nodes, given, producers)
    order = sorted(range(len(nodes)), key=lambda i: waves[i])  # stable: original order within a wave
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


def _node_waves(nodes, given: set[str], producers: dict[str, list[int]]) -> list[int]:
    """Each node's wave (see ``toposort``), by an iterative depth-first walk over its inputs' producers."""
    waves: list[int | None] = [None] * len(nodes)
    on_path = [False] * len(nodes)
    for root in range(len(nodes)):
        stack = [root]
        while stack:
            index = stack[-1]
            if waves[index] is not None:
                stack.pop()
                continue
            on_path[index] = True
            waiting = [
                p
                for name in nodes[index].input
                if name not in given
                for p in _producers_of(name, nodes, index, producers)
                if waves[p] is None
            ]
            if waiting:
                cycle = next((p for p in waiting if on_path[p]), None)
                if cycle is not None:
                    raise ValueError(f"graph has a cycle or a dangling input near node {nodes[cycle].name!r}")
                stack.extend(waiting)
                continue
            stack.pop()
            on_path[index] = False
            waves[index] = max(
                (min(waves[p] for p in producers[name]) + 1 for name in nodes[index].input if name not in given),
                default=0,
            )
    return waves


def _producers_of(name: str, nodes, consumer: int, producers: dict[str, list[int]]) -> list[int]:
    if name not in producers:
        raise ValueError(f"graph has a cycle or a dangling input near node {nodes[consumer].name!r}")
    return producers[name]


def save_onnx(model, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    path = Path(path)
    data_name = path.name + ".data"
    large = _weights_bytes(model) > external_data_threshold
    for stale in (path, path.with_name(data_name)):
        if stale.exists():
            stale.unlink()
    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return [path, path.with_name(data_name)] if large else [path]


def _weights_bytes(model) -> int:
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.raw_data else 0
    return total


# ---------------------------------------------------------------- fp16


def attention_fp32_nodes(model) -> list[str]:
    """Names of the nodes computing attention scores and their softmax.

    SD2-family attention overflows fp16 (black or NaN images): each Softmax,
    the MatMul producing its scores and any scale between them stay in fp32.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    keep = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        keep.append(node.name)
        current = producers.get(node.input[0])
        while current is not None and current.op_type in ("Mul", "Div", "Add", "Reshape", "Cast", "MatMul"):
            keep.append(current.name)
            if current.op_type == "MatMul":
                break
            current = producers.get(current.input[0])
    return keep


def convert_fp16(src: Path, dst: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """An fp16 copy of ``src`` with fp32 inputs/outputs and attention scores kept in fp32."""
    model = onnx.load(str(src), load_external_data=True)
    _name_unnamed_nodes(model)
    keep = attention_fp32_nodes(model)
    model = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep, disable_shape_infer=_weights_bytes(model) >= PROTOBUF_LIMIT
    )
    _drop_fp16_round_trips(model)
    toposort(model)  # the converter appends its input casts last
    _remove_dead_nodes(model)
    return save_onnx(model, dst, external_data_threshold)


def _remove_dead_nodes(model) -> None:
    """Drop nodes whose outputs nobody reads (the bypassed fp16 round-trip casts)."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


def _drop_fp16_round_trips(model) -> int:
    """Bypass Cast(fp32->fp16) -> Cast(fp16->fp32) pairs the converter puts between two kept-fp32 nodes.

    Left in, the attention scores would still be rounded to fp16 (and overflow)
    on their way from the fp32 MatMul to the fp32 Softmax. Returns the pairs removed.
    """

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = {out: node for node in model.graph.node for out in node.output}
    replace = {}
    for node in model.graph.node:
        first = producers.get(node.input[0]) if cast_to(node) == TensorProto.FLOAT else None
        if first is not None and cast_to(first) == TensorProto.FLOAT16:
            replace[node.output[0]] = first.input[0]
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replace and name not in graph_outputs:
                node.input[i] = replace[name]
    return len(replace)


def _name_unnamed_nodes(model) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def copy_files(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / f.name
        try:
            os.link(f, target)  # same filesystem: no copy of gigabytes
        except OSError:
            shutil.copy2(f, target)
        out.append(target)
    return out
