"""TensorRT engines from a bundle's ONNX graphs (TensorRT Python API, as NVIDIA's demo/Diffusion).

fp16 engines are built **strongly typed from the bundle's fp16 graphs**, not with the FP16
builder flag on fp32 graphs: a strongly typed network keeps every tensor at the type the
ONNX graph gives it, so the fp32 islands the exporter left around attention scores and
softmax (SD2-family attention overflows fp16) reach the engine unchanged. With the FP16
flag TensorRT would be free to pick fp16 for those layers.

Everything here except ``build_engine`` and ``add_engines`` is plain Python and is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seesr_runtime.lazy import lazy_import
from seesr_runtime.manifest import sha256_file
from seesr_runtime.networks import INT8_ENGINE_FALLBACK, NetworkSpec, Profile, graph_for_precision
from seesr_runtime.trt_backend import _cudart

trt = lazy_import("tensorrt", extra="tensorrt")
# The manifest writer imports the torch side: loaded when engines are built, so that the engine helpers
# here (and benchmarks/gpu_validate.py, which uses them) run without torch.
manifest_writer = lazy_import("seesr_export.manifest_writer", extra="export")


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"  # which bundle graphs to build from: "fp16" (strongly typed) or "fp32"
    optimization_level: int = 3  # TensorRT builder optimization level, 0..5
    workspace_gb: float = 8.0
    timing_cache: Path | None = None  # persistent across builds; created if missing
    profiles: tuple[str, ...] | None = None  # names from the manifest; None = all of them


def shapes_for(spec: NetworkSpec, profile: Profile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input of ``spec`` under one named-dimension profile."""
    shapes = {}
    for tensor in spec.inputs:
        if not tensor.shape:  # scalars (conditioning_scale) have no dynamic shape to profile
            continue
        shapes[tensor.name] = tuple(tensor.concrete_shape(env) for env in (profile.min, profile.opt, profile.max))
    return shapes


def optimization_profiles(spec: NetworkSpec, names: tuple[str, ...] | None = None) -> list[tuple[str, dict]]:
    """The manifest's profiles of ``spec`` as (name, input -> (min, opt, max)) pairs, in order."""
    chosen = [p for p in spec.profiles if names is None or p.name in names]
    missing = sorted(set(names or ()) - {p.name for p in spec.profiles})
    if missing:
        raise ValueError(f"{spec.name}: no profile(s) {missing}; the manifest has {[p.name for p in spec.profiles]}")
    for profile in chosen:
        for key in ("min", "opt", "max"):
            env = getattr(profile, key)
            if any(v < 1 for v in env.values()):
                raise ValueError(f"{spec.name}/{profile.name}: {key} has a dimension below 1: {env}")
        if any(not profile.min[d] <= profile.opt[d] <= profile.max[d] for d in profile.opt):
            raise ValueError(f"{spec.name}/{profile.name}: needs min <= opt <= max for every dimension")
    return [(p.name, shapes_for(spec, p)) for p in chosen]


def engine_filename(network: str, precision: str, trt_version: str, compute_capability: tuple[int, int]) -> str:
    """Engines are tied to a TensorRT version and GPU architecture: both are in the name."""
    major, minor = compute_capability
    return f"{network}.{precision}.trt{trt_version}.sm{major}{minor}.plan"


def engine_entry(
    network: str,
    spec: NetworkSpec,
    rel_path: str,
    sha256: str,
    options: EngineOptions,
    trt_version: str,
    compute_capability: tuple[int, int],
) -> dict:
    """What the manifest records about one engine (under networks.<name>.engines)."""
    return {
        "file": rel_path,
        "sha256": sha256,
        "precision": options.precision,
        "strongly_typed": options.precision == "fp16",
        "tensorrt": trt_version,
        "compute_capability": list(compute_capability),
        "optimization_level": options.optimization_level,
        "profiles": [name for name, _ in optimization_profiles(spec, options.profiles)],
    }


def build_engine(onnx_path: Path, spec: NetworkSpec, engine_path: Path, options: EngineOptions) -> Path:
    """Parse ``onnx_path`` (external data beside it is found by the parser) and build one engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if options.precision == "fp16" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    for _, shapes in optimization_profiles(spec, options.profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache = None
    if options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        options.timing_cache.write_bytes(bytes(cache.serialize()))
    return engine_path


def add_engines(work: Path, manifest: dict, precision: str, progress) -> None:
    """One TensorRT engine per network of the bundle being built in ``work``, recorded in ``manifest``:
    the ``precision`` graph, or the int8 policy's engine fallback for the networks int8 leaves alone."""
    cudart = _cudart()
    _, device = cudart.cudaGetDevice()
    _, major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device)
    _, minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device)
    bundle = manifest_writer.as_loaded(work, manifest)
    cache = work.parent / ".seesr-timing.cache"  # beside the bundles: survives rebuilds
    for name in manifest["networks"]:
        files = manifest["networks"][name]["files"]
        graph = graph_for_precision(files, precision, INT8_ENGINE_FALLBACK)
        engine_options = EngineOptions(precision=graph, timing_cache=cache)
        rel = f"trt/{engine_filename(name, graph, trt.__version__, (major, minor))}"
        progress.stage(f"{name}: TensorRT {graph} engine")
        build_engine(bundle.graph_path(name, graph), bundle.spec(name), work / rel, engine_options)
        entry = engine_entry(
            name, bundle.spec(name), rel, sha256_file(work / rel), engine_options, trt.__version__, (major, minor)
        )
        manifest["networks"][name].setdefault("engines", {})[precision] = entry
        manifest.setdefault("files", {})[rel] = entry["sha256"]
