"""GPU graphs: the fp32 export, fused by onnxruntime's transformer optimizer, then converted to fp16.

onnxruntime's own Stable Diffusion recipe (``models/stable_diffusion/optimize_pipeline.py``): the fusions
(MultiHeadAttention with packed QKV/KV, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv,
SkipLayerNormalization) match fp32 patterns, so they run on the fp32 graph first; fp16 comes after.
Several fused ops exist only as CUDA kernels, so the result is a GPU-only graph. The same fusions
without the CUDA-only ones give a CPU-runnable fp32 graph, which is how the fusions are checked
against torch where no GPU is.

Precision choices (why they differ from the bundle's plain fp16 graph):
- no fp32 attention islands where attention fuses: SD2-base (and so SeeSR) has ``upcast_attention:
  false``, and the fused attention kernels accumulate in fp32 anyway; attention left unfused (the VAE's)
  keeps its scores and softmax in fp32, as in the plain fp16 graphs;
- the timestep embedding (Sin/Cos and everything feeding them) stays fp32: t reaches 999 where fp16
  spacing is 0.5, and diffusers computes it in fp32 too;
- inputs and outputs stay fp32, as the numpy side expects.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import tqdm
from onnx import TensorProto, helper
from onnxruntime.transformers import optimizer
from onnxruntime.transformers.fusion_options import FusionOptions

from .export import (
    _drop_fp16_round_trips,
    _name_unnamed_nodes,
    _remove_dead_nodes,
    attention_fp32_nodes,
    save_onnx,
    toposort,
)

# The onnxruntime model type whose fusions fit each network; networks not listed get no GPU graph.
# The VAE gets GroupNorm and NhwcConv (its attention does not fuse and stays fp32 as in the plain fp16
# graph). The text encoder is left out: the "clip" fusions do not fuse its attention on our trace.
OPTIMIZER_MODEL_TYPES = {"unet": "unet", "controlnet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}
# Fusion switches of onnxruntime's FusionOptions whose fused ops have CUDA kernels only.
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
GPU_PROVIDERS = ["CUDAExecutionProvider"]
FUSED_DOMAIN = "com.microsoft"


def fusion_options(model_type: str, cuda_only_fusions: bool):
    options = FusionOptions(model_type)
    for switch in CUDA_ONLY_FUSIONS:
        if hasattr(options, switch):
            setattr(options, switch, cuda_only_fusions and getattr(options, switch))
    return options


def _num_heads_of(fusion, reshape_q, is_torch2: bool = False) -> int:
    """onnxruntime's ``FusionAttentionUnet.get_num_heads`` without ``int()`` of a 1-element array,
    which numpy >= 2.4 refuses (TypeError: only 0-dimensional arrays can be converted)."""
    if is_torch2:
        parent = fusion.model.get_parent(reshape_q, 1)
        if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
            return 0
        value = fusion.model.get_constant_value(parent.input[2])
    else:
        shape = fusion.model.get_constant_value(reshape_q.input[1])
        value = shape[2] if isinstance(shape, np.ndarray) and shape.shape == (4,) else None
    if value is None or np.size(value) != 1:
        return 0
    heads = int(np.asarray(value).reshape(-1)[0])
    return heads if heads > 0 else 0


@contextlib.contextmanager
def patched_methods(classes: tuple[tuple[str, str], ...], method: str, replace):
    """While the block runs, each class of ``classes`` ((module, class name) pairs) has ``replace(original)`` as
    its ``method``. onnxruntime imports its transformer modules both as ``onnxruntime.transformers.X`` and as
    top-level ``X`` (it puts its folder on sys.path when it is imported), so callers list both copies; a module
    or class that a release lacks is skipped."""
    saved = {}
    for module, name in classes:
        with contextlib.suppress(ImportError, AttributeError):
            cls = getattr(importlib.import_module(module), name)
            saved.setdefault(cls, cls.__dict__[method])
    try:
        for cls, original in saved.items():
            setattr(cls, method, replace(original))
        yield
    finally:
        for cls, original in saved.items():
            setattr(cls, method, original)


def _both_copies(module: str, name: str, package: str = "onnxruntime.transformers") -> tuple[tuple[str, str], ...]:
    return ((f"{package}.{module}", name), (module, name))


def numpy2_safe_optimizer():
    """Swap in ``_num_heads_of`` for the optimizer's own while it runs."""
    classes = _both_copies("fusion_attention_unet", "FusionAttentionUnet")
    return patched_methods(classes, "get_num_heads", lambda _: _num_heads_of)


# Fusions whose ``fuse`` only reads the graph's nodes (new nodes go to ``nodes_to_add``, removals to
# ``nodes_to_remove``, both applied after the whole pass), yet rebuild the whole graph's name maps on every
# candidate node: 60% of the tiny UNet's optimisation time. (module, class) as onnxruntime 1.2x names them.
MAP_REBUILDING_FUSIONS = (
    ("fusion_group_norm", "FusionGroupNorm"),
    ("fusion_attention_unet", "FusionAttentionUnet"),
    ("fusion_quickgelu", "FusionQuickGelu"),
)


def fusions_reuse_pass_maps():
    """While one of ``MAP_REBUILDING_FUSIONS`` examines a node, the model's ``input_name_to_nodes()`` and
    ``output_name_to_node()`` return the maps its pass computed at the start. The nodes are unchanged until
    the pass ends, so these are the maps a rebuild would return: the graphs are byte for byte the same."""
    classes = tuple(c for module, name in MAP_REBUILDING_FUSIONS for c in _both_copies(module, name))
    return patched_methods(classes, "fuse", _with_pass_maps)


def _with_pass_maps(original_fuse):
    @functools.wraps(original_fuse)
    def fuse(self, node, input_name_to_nodes, output_name_to_node):
        model = self.model
        rebuild_inputs, rebuild_outputs = model.input_name_to_nodes, model.output_name_to_node
        model.input_name_to_nodes = lambda exclude_subgraphs=False: (
            rebuild_inputs(True) if exclude_subgraphs else input_name_to_nodes
        )
        model.output_name_to_node = lambda exclude_subgraphs=False: (
            rebuild_outputs(True) if exclude_subgraphs else output_name_to_node
        )
        try:
            return original_fuse(self, node, input_name_to_nodes, output_name_to_node)
        finally:
            del model.input_name_to_nodes, model.output_name_to_node

    return fuse


# Initializers that shape inference sees without their values: floating-point weights. It reads their dims and
# type; their values it reads only to fold arithmetic whose every input is constant, which for weights of this
# size never yields a shape. Shape arithmetic reads small integer tensors, which keep their values.
WEIGHT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
MIN_WEIGHT_ELEMENTS = 1024


def shape_inference_without_weights():
    """onnxruntime's symbolic shape inference starts by copying the whole model, weights included, and the
    optimizer runs it again and again (useless-cast removal, the fp16 conversion): at SD2 size each copy of the
    UNet is 4.5 GB, and its GPU graph took more than 24 GB. While this is active, it copies the model with its
    weights reduced to name, type and dims, and treats them as values it does not know (as it treats
    activations), so it infers the same shapes and types."""
    classes = _both_copies("symbolic_shape_infer", "SymbolicShapeInference", package="onnxruntime.tools")
    return patched_methods(classes, "_preprocess", _preprocess_without_weights)


def _preprocess_without_weights(original):
    @functools.wraps(original)
    def _preprocess(self, in_mp):
        light, weights = without_weights(in_mp)
        original(self, light)
        for name in weights:
            del self.initializers_[name]  # unknown values; their type and shape stay in known_vi_

    return _preprocess


def without_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose floating-point initializers of ``MIN_WEIGHT_ELEMENTS`` or more have no
    values (nothing else is copied twice), and the names of those initializers."""
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    weights = []
    for tensor in model.graph.initializer:
        if tensor.data_type in WEIGHT_TYPES and int(np.prod(tensor.dims)) >= MIN_WEIGHT_ELEMENTS:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            weights.append(tensor.name)
        else:
            graph.initializer.append(tensor)
    return light, weights


def fuse(src: Path, model_type: str, cuda_only_fusions: bool = True):
    """onnxruntime's fusions on the fp32 graph ``src``; returns the optimizer's OnnxModel."""
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with numpy2_safe_optimizer(), fusions_reuse_pass_maps(), shape_inference_without_weights(), _quiet_progress_bar():
        return optimizer.optimize_model(
            str(src),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=fusion_options(model_type, cuda_only_fusions),
            use_gpu=True,
            only_onnxruntime=False,
        )


@contextlib.contextmanager
def _quiet_progress_bar():
    """The optimizer draws a tqdm bar on stderr whenever tqdm is installed; silence it while it runs."""
    saved = tqdm.tqdm
    tqdm.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        tqdm.tqdm = saved


def timestep_embedding_nodes(model) -> list[str]:
    """Names of the Sin/Cos nodes and of every node feeding them (the sinusoidal timestep embedding)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    keep, pending = set(), [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    while pending:
        node = pending.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        pending.extend(producers[i] for i in node.input if i in producers)
    return sorted(keep)


def fused_op_counts(model) -> dict[str, int]:
    """How many nodes of each onnxruntime contrib op type (``com.microsoft``) a graph has."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node if n.domain == FUSED_DOMAIN).items()))


def write_gpu_graph(src: Path, dst: Path, model_type: str, external_data_threshold: int) -> tuple[list[Path], dict]:
    """The GPU graph of the fp32 graph ``src`` at ``dst``; returns its files and its manifest facts."""
    optimized = fuse(src, model_type, cuda_only_fusions=True)
    _name_unnamed_nodes(optimized.model)
    fp32_nodes = sorted(set(timestep_embedding_nodes(optimized.model)) | set(attention_fp32_nodes(optimized.model)))
    with shape_inference_without_weights():
        optimized.convert_float_to_float16(keep_io_types=True, node_block_list=fp32_nodes)
    model = optimized.model
    _import_fused_domain(model)
    _drop_fp16_round_trips(model)
    toposort(model)
    _remove_dead_nodes(model)
    files = save_onnx(model, dst, external_data_threshold)
    facts = {
        "fused_ops": fused_op_counts(model),
        "providers": GPU_PROVIDERS,
        "fp32_nodes": fp32_nodes,
        "recipe": f"onnxruntime transformers optimizer (model type {model_type}) on fp32, then fp16",
    }
    return files, facts


def write_cpu_fused_graph(src: Path, dst: Path, model_type: str) -> Path:
    """The same fusions minus the CUDA-only ones, in fp32: a graph the CPU runs, for parity checks."""
    optimized = fuse(src, model_type, cuda_only_fusions=False)
    _import_fused_domain(optimized.model)
    return save_onnx(optimized.model, dst)[0]


def _import_fused_domain(model) -> None:
    """Declare the contrib-op domain (the optimizer does it only in its own save method)."""
    if not any(o.domain == FUSED_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(FUSED_DOMAIN, 1))
