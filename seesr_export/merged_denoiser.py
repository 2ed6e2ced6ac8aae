"""The merged denoiser: a bundle's ControlNet and UNet graphs composed into one ONNX graph.

Per sampler step the pipeline calls the ControlNet, then the UNet with the ControlNet's 13 residuals. One
graph does both in one call: the residuals become internal values, and a CUDA graph captures the whole
step. Whether that beats two calls (each already replaying its own CUDA graph, residuals left on the
device) is a measurement, ``benchmarks/merged_denoiser.py``; the bundle does not carry this graph until
it is shown to be faster.

Composition, not re-export: the two graphs (any precision: fp32, plain fp16, the fused GPU graphs) are
joined as they are. Shared inputs (latent, timestep, text and image embeddings) are fed once; every other
name of each graph is prefixed with its network's name, so the two graphs' internal names cannot clash.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from seesr_runtime.manifest import Manifest

from .export import save_onnx

PARTS = ("controlnet", "unet")  # call order: the ControlNet's outputs are the UNet's residual inputs


def merge_denoiser(manifest: Manifest, precision: str, out: Path, external_data_threshold: int | None = None) -> Path:
    """Write ``out`` (plus ``out.data`` when large): the bundle's ControlNet and UNet graphs of
    ``precision`` as one graph with the UNet's outputs. Returns ``out``."""
    control, unet = (onnx.load(str(manifest.graph_path(n, precision))) for n in PARTS)
    merged = compose(control, unet, manifest.spec("controlnet").output_names)
    kwargs = {} if external_data_threshold is None else {"external_data_threshold": external_data_threshold}
    save_onnx(merged, Path(out), **kwargs)
    return Path(out)


def compose(control: onnx.ModelProto, unet: onnx.ModelProto, residuals: list[str]) -> onnx.ModelProto:
    """One model: ``control``'s outputs ``residuals`` feed ``unet``'s inputs of the same names."""
    unet_inputs = {i.name for i in unet.graph.input}
    missing = [r for r in residuals if r not in unet_inputs or r not in {o.name for o in control.graph.output}]
    if missing:
        raise ValueError(f"residuals {missing} are not both a ControlNet output and a UNet input")
    shared = {i.name for i in control.graph.input} & unet_inputs
    _check_same_types(control.graph.input, unet.graph.input, shared)
    control_graph = _prefixed(control.graph, "controlnet/", keep={i.name for i in control.graph.input} | set(residuals))
    unet_graph = _prefixed(unet.graph, "unet/", keep=unet_inputs | {o.name for o in unet.graph.output})
    inputs = list(control_graph.input) + [i for i in unet_graph.input if i.name not in shared | set(residuals)]
    graph = helper.make_graph(
        list(control_graph.node) + list(unet_graph.node),
        "seesr_denoiser",
        inputs,
        list(unet_graph.output),
        initializer=list(control_graph.initializer) + list(unet_graph.initializer),
        value_info=list(control_graph.value_info) + list(unet_graph.value_info),
    )
    model = helper.make_model(graph, opset_imports=_opsets(control, unet), producer_name="seesr-export")
    model.ir_version = max(control.ir_version, unet.ir_version)
    return model


def _prefixed(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> onnx.GraphProto:
    """A copy of ``graph`` with every node and value name not in ``keep`` prefixed."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError(f"{graph.name}: subgraphs (If/Loop/Scan) are not supported by the merge")
    out = onnx.GraphProto()
    out.CopyFrom(graph)

    def rename(name: str) -> str:
        return name if not name or name in keep else prefix + name

    for node in out.node:
        node.name = prefix + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for values in (out.input, out.output, out.value_info, out.initializer):
        for value in values:
            value.name = rename(value.name)
    return out


def _check_same_types(a, b, names: set[str]) -> None:
    types_a = {v.name: v.type for v in a}
    for value in b:
        if value.name in names and types_a[value.name].tensor_type.elem_type != value.type.tensor_type.elem_type:
            raise ValueError(f"shared input {value.name!r} has different element types in the two graphs")


def _opsets(*models: onnx.ModelProto) -> list:
    """Each domain once, at the highest version either graph imports."""
    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]
