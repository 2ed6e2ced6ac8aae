"""``seesr-export triton``: a Triton Inference Server model repository for a bundle (torch-free).

    OUT/
      .seesr-triton-repository      marker: this directory was written here (safe to replace)
      seesr/
        config.pbtxt                Python backend; inputs, outputs (seesr_runtime.triton), instances, parameters
        2/model.py                  seesr_runtime/triton/model.py: the runtime, loaded once per instance
        2/bundle/                   the bundle, hard-linked or copied (absent with reference_bundle)

The version directory is the request format's version (``seesr_runtime.triton.SERVICE_VERSION``).

The repository is written into a hidden sibling and renamed into place, and it only ever
replaces an empty directory or a repository this command wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from seesr_runtime import __version__ as runtime_version
from seesr_runtime import options as option_table
from seesr_runtime.errors import OptionError
from seesr_runtime.filemodes import give_tree_umask_modes
from seesr_runtime.manifest import BundleError, Manifest
from seesr_runtime.networks import graph_for_precision
from seesr_runtime.openvino_backend import PRECISIONS as OPENVINO_PRECISIONS
from seesr_runtime.ort_backend import IO_BINDING_MODES
from seesr_runtime.triton import (
    AUTO_PRECISION,
    BACKEND_PARAMETERS,
    INPUTS,
    MODEL_FILE,
    OUTPUTS,
    SERVICE_VERSION,
    TensorSpec,
)
from seesr_runtime.verification import STAMP

from .atomic import swap_into_place
from .errors import SeeSRExportError

MARKER = ".seesr-triton-repository"
KINDS = ("cpu", "gpu")
BACKENDS = tuple(BACKEND_PARAMETERS)  # onnxruntime, tensorrt, openvino
# The precisions of the ONNX Runtime and TensorRT backends; OpenVINO's are its backend's (bf16, int8-bf16...).
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_CHOICES = (*GRAPH_PRECISIONS, *(p for p in OPENVINO_PRECISIONS if p not in GRAPH_PRECISIONS), AUTO_PRECISION)
# Input pixels per request: a quarter of the library's limit (the output has 16x as many), since a server
# holds several requests' images at once.
DEFAULT_MAX_PIXELS = option_table.default("max_pixels") // 4


class TritonRepoError(SeeSRExportError):
    """The repository cannot be written as asked; the message says why."""


@dataclass
class TritonOptions:
    instances: int = 1
    kind: str = "cpu"
    backend: str = "onnxruntime"
    # default: openvino "auto" (bf16 or f32, decided on the serving CPU); else fp32 on CPU, fp16 on GPU when the
    # bundle has it
    precision: str | None = None
    providers: tuple[str, ...] | None = None  # onnxruntime; default: cpu, or cuda then cpu on GPU
    threads: int | None = None  # onnxruntime/openvino threads per instance; None: cores / instances
    # The GPU options of `seesr upscale`, passed to each instance's pipeline (onnxruntime; cuda_graph: tensorrt too)
    static_shapes: bool = False
    cuda_graph: bool = False
    io_binding: str = "auto"  # IO_BINDING_MODES
    max_pixels: int = DEFAULT_MAX_PIXELS
    pipeline_options: dict = field(default_factory=dict)  # per-model defaults (process_size, tiles...)
    reference_bundle: bool = False  # store the bundle's absolute path instead of a copy
    model_name: str = "seesr"


def write_repository(bundle: Path, out: Path, options: TritonOptions) -> Path:
    """Write the repository for ``bundle`` at ``out``; returns the model directory."""
    manifest = _load_bundle(bundle)
    options = resolve_options(manifest, options)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model_dir = work / options.model_name
        version_dir = model_dir / str(SERVICE_VERSION)
        version_dir.mkdir(parents=True)
        shutil.copyfile(MODEL_FILE, version_dir / "model.py")
        if options.reference_bundle:
            bundle_param = str(manifest.root.resolve())
        else:
            _link_or_copy_tree(manifest.root, version_dir / "bundle")
            give_tree_umask_modes(version_dir / "bundle", files=False)  # copytree copies the folders' modes
            bundle_param = "bundle"
        (model_dir / "config.pbtxt").write_text(model_config(options, bundle_param))
        (work / MARKER).write_text(
            json.dumps(
                {"bundle": str(manifest.root.resolve()), "model": options.model_name, "seesr_runtime": runtime_version},
                indent=1,
            )
            + "\n"
        )
        swap_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / options.model_name


def _load_bundle(bundle: Path) -> Manifest:
    try:
        return Manifest.load(bundle)
    except BundleError as exc:
        raise TritonRepoError(f"--bundle: {exc}") from None


def resolve_options(manifest: Manifest, options: TritonOptions) -> TritonOptions:
    """Fill the defaults that depend on the kind and the bundle; refuse what cannot run."""
    if options.kind not in KINDS:
        raise TritonRepoError(f"--kind must be one of {KINDS}, got {options.kind!r}")
    if options.backend not in BACKENDS:
        raise TritonRepoError(f"--backend must be one of {BACKENDS}, got {options.backend!r}")
    if options.instances < 1:
        raise TritonRepoError(f"--instances must be at least 1, got {options.instances}")
    if options.threads is not None and options.threads < 1:
        raise TritonRepoError(f"--threads must be at least 1, got {options.threads}")
    if not options.model_name.replace("_", "").replace("-", "").isalnum():
        raise TritonRepoError(f"--model-name {options.model_name!r}: use letters, digits, '-' and '_'")
    _check_pipeline_options(manifest, options)
    gpu = options.kind == "gpu"
    if options.backend == "tensorrt" and not gpu:
        raise TritonRepoError("--backend tensorrt runs TensorRT engines on GPUs: use --kind gpu")
    if options.backend == "openvino":
        _check_openvino(options)
    precision = options.precision or _default_precision(manifest, options.backend, gpu)
    _check_precision(options.backend, precision)
    providers = tuple(options.providers or (("cuda", "cpu") if gpu else ("cpu",)))
    _check_gpu_options(options, providers)
    _check_bundle_has(manifest, options.backend, precision)
    return TritonOptions(**{**options.__dict__, "precision": precision, "providers": providers})


def _check_openvino(options: TritonOptions) -> None:
    if options.kind != "cpu":
        raise TritonRepoError("--backend openvino serves Triton CPU instances: use --kind cpu")
    if options.providers:
        raise TritonRepoError("--providers selects onnxruntime execution providers, not openvino's device (CPU)")


def _check_precision(backend: str, precision: str) -> None:
    allowed = [*OPENVINO_PRECISIONS, AUTO_PRECISION] if backend == "openvino" else list(GRAPH_PRECISIONS)
    if precision not in allowed:
        raise TritonRepoError(f"--precision {precision} is not one of --backend {backend}'s: {allowed}")


def _check_gpu_options(options: TritonOptions, providers: tuple[str, ...]) -> None:
    """The GPU options are the backend's own: refused where they would be ignored."""
    accepted = BACKEND_PARAMETERS[options.backend]
    asked = {
        "static_shapes": options.static_shapes,
        "io_binding": options.io_binding != "auto",
        "cuda_graph": options.cuda_graph,
    }
    for name, given in asked.items():
        if given and name not in accepted:
            raise TritonRepoError(f"--{name.replace('_', '-')} is not an option of --backend {options.backend}")
    if options.io_binding not in IO_BINDING_MODES:
        raise TritonRepoError(f"--io-binding must be one of {list(IO_BINDING_MODES)}, got {options.io_binding!r}")
    if options.cuda_graph and options.kind != "gpu":
        raise TritonRepoError("--cuda-graph captures CUDA graphs on GPUs: use --kind gpu")
    if options.cuda_graph and options.backend == "onnxruntime" and "cuda" not in providers:
        raise TritonRepoError(f"--cuda-graph needs onnxruntime's CUDA provider (--providers {' '.join(providers)})")


def _check_pipeline_options(manifest: Manifest, options: TritonOptions) -> None:
    """--max-pixels and every --option value against the options table (with the bundle's defaults)."""
    unknown = sorted(set(options.pipeline_options) - set(option_table.NAMES))
    if unknown:
        raise TritonRepoError(f"--option {unknown}: unknown pipeline option(s); known: {list(option_table.NAMES)}")
    if "max_pixels" in options.pipeline_options:
        raise TritonRepoError("--option max_pixels: the model's pixel limit is --max-pixels")
    try:
        option_table.check("max_pixels", options.max_pixels)
    except OptionError as exc:
        raise TritonRepoError(f"--max-pixels: {exc}") from None
    try:
        option_table.resolve(options.pipeline_options, option_table.defaults_from_manifest(manifest.data["pipeline"]))
    except OptionError as exc:
        raise TritonRepoError(f"--option: {exc}") from None


def _default_precision(manifest: Manifest, backend: str, gpu: bool) -> str:
    if backend == "tensorrt":
        return "fp16"
    if backend == "openvino":
        return AUTO_PRECISION
    has_fp16 = all("fp16" in entry["files"] for entry in manifest.data["networks"].values())
    return "fp16" if gpu and has_fp16 else "fp32"


def _check_bundle_has(manifest: Manifest, backend: str, precision: str) -> None:
    networks = manifest.data["networks"]
    if backend == "tensorrt":
        missing = [n for n, entry in networks.items() if precision not in entry.get("engines", {})]
        what = f"{precision} TensorRT engines (seesr-export build --backend tensorrt)"
    elif backend == "openvino":
        graphs = OPENVINO_PRECISIONS[precision][0] if precision != AUTO_PRECISION else "fp32"
        missing = [n for n, entry in networks.items() if graphs not in entry["files"]]
        what = f"{graphs} ONNX graphs (OpenVINO precision {precision})"
        if graphs == "int8":  # the OpenVINO backend runs fp32 graphs for the networks without int8 ones
            missing = [] if any("int8" in entry["files"] for entry in networks.values()) else ["unet", "controlnet"]
    else:
        missing = [
            n for n, entry in networks.items() if graph_for_precision(entry["files"], precision) not in entry["files"]
        ]
        what = f"{precision} ONNX graphs"
    if missing:
        raise TritonRepoError(f"--bundle {manifest.root}: no {what} for {missing}")


def model_config(options: TritonOptions, bundle_param: str) -> str:
    """config.pbtxt: no server-side batching (images differ in size), optional sampling inputs."""
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    backend_values = {
        "precision": options.precision,
        "providers": ",".join(options.providers or ()),
        "threads": "auto" if options.threads is None else str(options.threads),
        "static_shapes": json.dumps(options.static_shapes),
        "io_binding": options.io_binding,
        "cuda_graph": json.dumps(options.cuda_graph),
    }
    parameters = {
        "bundle": bundle_param,
        "backend": options.backend,
        **{name: backend_values[name] for name in BACKEND_PARAMETERS[options.backend]},
        "max_pixels": str(options.max_pixels),
        "pipeline_options": json.dumps(options.pipeline_options, sort_keys=True),
        "seesr_runtime_version": runtime_version,
        "service_version": str(SERVICE_VERSION),
    }
    lines = [
        f'name: "{options.model_name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [",
        ",\n".join(tensor_entry(spec) for spec in INPUTS),
        "]",
        "output [",
        ",\n".join(tensor_entry(spec) for spec in OUTPUTS),
        "]",
        f"instance_group [ {{ count: {options.instances} kind: {kind} }} ]",
    ]
    lines += [
        f'parameters: {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
        for key, value in parameters.items()
    ]
    return "\n".join(lines) + "\n"


def tensor_entry(spec: TensorSpec) -> str:
    """One tensor of config.pbtxt's input or output list."""
    dims = ", ".join(str(size) for size in spec.dims)
    optional = " optional: true" if spec.optional else ""
    return f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {dims} ]{optional} }}'


def _check_target(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise TritonRepoError(f"--out {out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER).exists():
        raise TritonRepoError(
            f"--out {out} exists and is not a repository written by seesr-export triton "
            f"(no {MARKER}); choose another directory or remove it"
        )


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard links where source and target share a filesystem (bundles hold gigabytes), else copies."""

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(
        source, target, copy_function=link_or_copy, ignore=shutil.ignore_patterns(".*.partial-*", ".*.old-*", STAMP)
    )  # stamp: the source's files
