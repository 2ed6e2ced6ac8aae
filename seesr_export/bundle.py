"""``seesr-export build``: a SeeSR checkout in, one self-describing bundle out.

The bundle is built in a hidden sibling directory and renamed into place at the
end, so an interrupted build never leaves a half bundle. Each network's graphs
are keyed on the hashes of its source files and the export options; a rebuild
reuses (hard-links) the graphs of the previous bundle whose key is unchanged.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from seesr_runtime.filemodes import give_tree_umask_modes
from seesr_runtime.manifest import FORMAT, GPU_GRAPH, MANIFEST, SCHEMA_VERSION, BundleError, Manifest, entry_files, sha256_file
from seesr_runtime.networks import NETWORK_NAMES, ModelDims, network_specs
from seesr_runtime.options import bundle_defaults, describe

from . import __version__
from .atomic import swap_into_place
from .errors import SeeSRExportError
from .export import GRAPHS, graph_module
from .flops import network_flops
from .gpu_graph import OPTIMIZER_MODEL_TYPES, write_cpu_fused_graph, write_gpu_graph
from .layout import SeeSRPaths
from .reference import (DAPE_SIZE, DEFAULT_ADDED_PROMPT, DEFAULT_NEGATIVE_PROMPT, IMAGENET_MEAN, IMAGENET_STD,
                        START_STEP)

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnx", "tensorrt")
TRACE_ENV = {"B": 2, "h": 16, "w": 24}  # small and non-square: axis mix-ups fail loudly
VERIFY_ENV = {"B": 1, "h": 8, "w": 16}  # another shape than the trace's, checked at build time
TILED_VAE_HALVES = {"vae_encoder": "encoder", "vae_decoder": "decoder"}  # networks with tiled-VAE segments
EXPORT_CODE_VERSION = 3  # bump when a change to the exporter changes its graphs

# Which source files each network is traced from (the cache key hashes them).
NETWORK_SOURCES = {
    "dape": ("ram", "dape"),
    "text_encoder": ("text_encoder",),
    "controlnet": ("controlnet",),
    "unet": ("unet",),
    "vae_encoder": ("vae",),
    "vae_decoder": ("vae",),
}


# Which networks use each torch model (a model is dropped once none is left to export).
_USERS = {"dape": ("dape",), "text_encoder": ("text_encoder",), "controlnet": ("controlnet",), "unet": ("unet",),
          "vae": ("vae_encoder", "vae_decoder")}


class BuildError(SeeSRExportError):
    pass


@dataclass
class BuildOptions:
    precision: str = "fp32"
    backend: str = "onnx"
    networks: tuple = NETWORK_NAMES
    opset: int = 17
    external_data_threshold: int = 2 * 1024 ** 3
    verify: bool = True  # ONNX vs torch on sample inputs, recorded in the manifest
    name: str | None = None
    calib_images: tuple = ()  # int8: real LR images the sampler runs on to record calibration inputs
    calib_size: int = 4
    calib_steps: int = 4
    quant_method: str = "auto"  # int8: "modelopt" (SmoothQuant, primary), "onnxruntime" (fallback), "auto"
    int8_image_attention_fp32: bool = False  # int8: keep the image cross-attention projections in fp32
    int8_conv_percentile: float = 99.99  # int8 (ModelOpt): conv input range at this percentile; 100 = max
    jobs: int = 1  # networks exported at once, each in its own process (each needs up to ~12 GB at SD2 size)
    parity_tolerances: dict = field(default_factory=dict)  # {network: {graph: max rel L2}} over PARITY_TOLERANCES

    def graph_precisions(self) -> tuple[str, ...]:
        # fp32 graphs are always written: onnxruntime on CPU wants them, and they are
        # the baseline the lower precisions are measured against.
        # fp16 builds add the GPU graphs (UNet, ControlNet, VAE; see gpu_graph.py); int8 builds keep fp16 graphs
        # for the networks they do not quantize.
        return {"fp32": ("fp32",), "fp16": ("fp32", "fp16", GPU_GRAPH)}.get(self.precision, ("fp32", "fp16"))

    def tolerance(self, network: str, graph: str) -> float:
        from .export import PARITY_TOLERANCES

        return self.parity_tolerances.get(network, {}).get(graph, PARITY_TOLERANCES[network][graph])


@dataclass
class BuildReport:
    bundle: Path
    exported: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # int8: error and PSNR against fp32


def check_request(options: BuildOptions) -> None:
    """Refuse, up front and in one message, what this build cannot produce."""
    if options.precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {PRECISIONS}, got {options.precision!r}")
    if options.backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {BACKENDS}, got {options.backend!r}")
    unknown = [n for n in options.networks if n not in NETWORK_NAMES]
    if unknown:
        raise BuildError(f"unknown network(s) {unknown}; choose from {list(NETWORK_NAMES)}")
    if options.backend == "tensorrt":
        missing = _tensorrt_missing()
        if missing:
            raise BuildError(f"--backend tensorrt is not available here: {missing}. "
                             "Use --backend onnx (the bundle's ONNX graphs build engines later on a GPU machine).")
    if options.precision == "int8":
        if not options.calib_images:
            raise BuildError("--precision int8 needs --calib-images DIR: real LR images that the SeeSR sampler "
                             "runs on to record calibration inputs (random tensors calibrate badly)")
        missing = [n for n in ("unet", "controlnet") if n not in options.networks]
        if missing or not set(NETWORK_NAMES) <= set(options.networks):
            raise BuildError("--precision int8 calibrates through the whole sampler: build all networks "
                             "(leave out --networks)")


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the 'tensorrt' Python package is not installed (pip install 'seesr-export[tensorrt]')"
    if not (Path("/dev/nvidiactl").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return "no NVIDIA GPU is visible"
    return None


# ---------------------------------------------------------------- sources


def source_files(paths: SeeSRPaths) -> dict[str, list[Path]]:
    """The files behind each role, for hashing (configs included: they shape the graphs)."""
    def folder(p: Path) -> list[Path]:
        return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else []

    return {
        "ram": [paths.ram], "dape": [paths.dape],
        "tag_list": [paths.tag_list], "tag_thresholds": [paths.tag_thresholds],
        "text_encoder": folder(paths.sd2 / "text_encoder"), "tokenizer": folder(paths.sd2 / "tokenizer"),
        "vae": folder(paths.sd2 / "vae"), "scheduler": folder(paths.sd2 / "scheduler"),
        "unet": folder(paths.unet), "controlnet": folder(paths.controlnet),
    }


def hash_sources(paths: SeeSRPaths) -> dict[str, dict[str, str]]:
    """role -> {file name: sha256}; names, not paths, so a moved checkout still hits the cache."""
    return {role: {f.name: sha256_file(f) for f in files} for role, files in source_files(paths).items()}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    versions = {"seesr_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    for name in ("diffusers", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


# ---------------------------------------------------------------- build


class _Models:
    """Torch models loaded on first use and dropped after their last graph: a fully cached
    build loads none, and a full-size build holds one big network at a time."""

    def __init__(self, paths: SeeSRPaths):
        self.paths = paths

    @cached_property
    def dape(self):
        from .models.dape import load_dape

        return load_dape(self.paths.ram, self.paths.dape)

    @cached_property
    def text_encoder(self):
        from .models.sd2 import load_text_encoder

        return load_text_encoder(self.paths.sd2)

    @cached_property
    def tokenizer(self):
        from .models.sd2 import load_tokenizer

        return load_tokenizer(self.paths.sd2)

    @cached_property
    def vae(self):
        from .models.sd2 import load_vae

        return load_vae(self.paths.sd2)

    @cached_property
    def unet(self):
        from .models.denoiser import load_seesr_unet

        return load_seesr_unet(self.paths.unet)

    @cached_property
    def controlnet(self):
        from .models.denoiser import load_seesr_controlnet

        return load_seesr_controlnet(self.paths.controlnet)

    def dims(self) -> ModelDims:
        import torch

        from .export import model_dims
        from .models.denoiser import SeeSRControlNet, read_config

        with torch.device("meta"):  # the structure alone; no weights read or allocated
            skeleton = SeeSRControlNet(read_config(self.paths.controlnet, "SeeSR ControlNet"))
        latent_channels = read_config(self.paths.unet, "SeeSR UNet").get("in_channels", 4)
        return model_dims(self.dape, self.text_encoder, skeleton, latent_channels)

    def drop(self, *names: str) -> None:
        for name in names:
            self.__dict__.pop(name, None)


def build_bundle(paths: SeeSRPaths, out: Path, options: BuildOptions, progress=None) -> BuildReport:
    from .cli import Progress

    progress = progress or Progress(quiet=True)
    check_request(options)
    out = Path(out)
    previous = _previous_bundle(out)
    paths.check()
    progress.stage("hashing source checkpoints")
    sources = hash_sources(paths)
    versions = _tool_versions()
    models = _Models(paths)
    report = BuildReport(bundle=out)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        dims, text_files = _write_text_and_tagger(paths, work, models, sources, previous, progress)
        for attribute, users in _USERS.items():  # loaded for the text stage but not exported now
            if not any(n in options.networks for n in users):
                models.drop(attribute)
        specs = network_specs(dims)
        keys = {name: _key(name, options.graph_precisions(), options.opset, options.external_data_threshold,
                           EXPORT_CODE_VERSION, versions, [sources[r] for r in NETWORK_SOURCES[name]])
                for name in options.networks}
        networks = {}
        for name in options.networks:
            entry = _reuse(previous, name, keys[name], work)
            if entry is not None:
                progress.stage(f"{name}: unchanged, reusing the previous graphs")
                report.reused.append(name)
                if "flops" not in entry:  # bundles written before FLOPs were counted
                    entry["flops"] = network_flops(graph_module(name, models), specs[name])
                networks[name] = entry
        todo = [n for n in options.networks if n not in networks]
        if options.jobs > 1 and len(todo) > 1:
            models.drop(*_USERS)
            networks.update(_export_parallel(todo, specs, paths, work, options, progress))
        else:
            for i, name in enumerate(todo):
                networks[name] = _export_network(name, specs[name], models, work, options, progress, todo[i + 1:])
                _release_if_unused(models, name, todo[i + 1:])
        report.exported.extend(todo)
        networks = {name: networks[name] for name in options.networks}
        for name, entry in networks.items():
            entry["cache_key"] = keys[name]
            if "parity" in entry:
                report.parity[name] = entry["parity"]
        manifest = _manifest(options.name or out.name, dims, networks, paths, sources, versions, text_files)
        manifest["files"] = {n: sha256_file(work / n) for n in ("tokenizer.json", "negative_prompt_embeds.npy")}
        manifest["provenance"]["checkout"] = {f: str(getattr(paths, f)) for f in paths.__dataclass_fields__}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if options.precision == "int8":
            report.quality = _add_int8(work, manifest, options, progress, models)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if options.backend == "tensorrt":
            _add_engines(work, manifest, options, progress)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        give_tree_umask_modes(work)  # onnx writes external data 0600; before the stamp records ctimes
        Manifest.load(work, verify="always")  # every file hashed; leaves the stamp the first load trusts
        swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress.stage(f"bundle ready: {out} (exported {report.exported or 'none'}, reused {report.reused or 'none'})")
    return report


def _previous_bundle(out: Path) -> Manifest | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise BuildError(f"--out {out} exists and is not a SeeSR bundle (no {MANIFEST}); "
                             "choose another directory or remove it")
        return None
    try:
        return Manifest.load(out, verify="never")  # _reuse hashes the files it reuses
    except BundleError:
        return None  # a damaged bundle is rebuilt from scratch, then replaced


def _remove_stale_partials(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _reuse(previous: Manifest | None, name: str, key: str, work: Path) -> dict | None:
    """Hard-link the previous bundle's graphs for ``name`` if they were built from the same inputs."""
    from .export import copy_files

    if previous is None:
        return None
    entry = previous.data["networks"].get(name)
    if not entry or entry.get("cache_key") != key:
        return None
    pinned = entry_files(entry)
    if not all(previous.file(rel).is_file() and sha256_file(previous.file(rel)) == sha
               for rel, sha in pinned.items()):
        return None
    for rel in pinned:
        copy_files([previous.file(rel)], (work / rel).parent)
    return json.loads(json.dumps(entry))


def _release_if_unused(models: _Models, name: str, remaining) -> None:
    attribute = GRAPHS[name][0]
    if not any(n in remaining for n in _USERS[attribute]):
        models.drop(attribute)


def _export_network(name, spec, models, work: Path, options: BuildOptions, progress, remaining=()) -> dict:
    from .export import ExportOptions, convert_fp16, export_onnx, graph_module, run_torch, sample_feeds

    progress.stage(f"{name}: loading the torch model")
    module = graph_module(name, models)
    # Torch's answers first: the torch weights are freed as soon as the trace is done.
    feeds = sample_feeds(spec, VERIFY_ENV, seed=1)
    expected = run_torch(module, spec, feeds) if options.verify else None
    export_options = ExportOptions(opset=options.opset, external_data_threshold=options.external_data_threshold)
    entry = {"spec": spec.to_json(), "files": {}, "flops": network_flops(module, spec)}
    progress.stage(f"{name}: tracing to ONNX (fp32)")
    fp32_dir = work / "onnx" / "fp32"
    fp32_dir.mkdir(parents=True, exist_ok=True)

    if name in TILED_VAE_HALVES:  # before the trace below releases the VAE
        entry["tiled"] = _export_vae_segments(name, models, work, options, progress)

    def release():
        nonlocal module
        module = None
        _release_if_unused(models, name, remaining)

    written = {"fp32": export_onnx(module, spec, TRACE_ENV, fp32_dir / f"{name}.onnx", export_options, release)}
    if "fp16" in options.graph_precisions():
        progress.stage(f"{name}: fp16 copy (attention scores and softmax kept in fp32)")
        fp16_dir = work / "onnx" / "fp16"
        fp16_dir.mkdir(parents=True, exist_ok=True)
        written["fp16"] = convert_fp16(written["fp32"][0], fp16_dir / f"{name}.onnx",
                                       options.external_data_threshold)
    gpu_facts = {}
    if GPU_GRAPH in options.graph_precisions() and name in OPTIMIZER_MODEL_TYPES:
        progress.stage(f"{name}: GPU graph (onnxruntime fusions on fp32, then fp16)")
        (work / "onnx" / GPU_GRAPH).mkdir(parents=True, exist_ok=True)
        written[GPU_GRAPH], gpu_facts = write_gpu_graph(written["fp32"][0], work / "onnx" / GPU_GRAPH / f"{name}.onnx",
                                                        OPTIMIZER_MODEL_TYPES[name], options.external_data_threshold)
        gpu_facts["parity_tolerance"] = options.tolerance(name, GPU_GRAPH)
    for precision, files in written.items():
        rels = [str(f.relative_to(work)) for f in files]
        entry["files"][precision] = {
            "onnx": rels[0],
            "external_data": rels[1] if len(rels) > 1 else None,
            "sha256": {rel: sha256_file(work / rel) for rel in rels},
            "precision": precision,
            **(gpu_facts if precision == GPU_GRAPH else {}),
        }
    if options.verify:
        progress.stage(f"{name}: checking ONNX against torch")
        entry["parity"] = {p: compare_graph(work / entry["files"][p]["onnx"], spec, feeds, expected)
                           for p in written if p != GPU_GRAPH}  # the GPU graph has CUDA-only kernels
        if GPU_GRAPH in written:
            entry["parity"]["fused_fp32"] = _fused_parity(name, written["fp32"][0], spec, feeds, expected)
        check_parity(name, entry["parity"], options)
    return entry


def _fused_parity(name, fp32_graph: Path, spec, feeds, expected) -> dict:
    """The GPU graph's fusions, minus the CUDA-only ones, in fp32 on the CPU, against torch."""
    with tempfile.TemporaryDirectory(prefix="seesr-fused-", dir=fp32_graph.parent) as scratch:
        fused = write_cpu_fused_graph(fp32_graph, Path(scratch) / f"{name}.onnx", OPTIMIZER_MODEL_TYPES[name])
        return compare_graph(fused, spec, feeds, expected)


def check_parity(name: str, parity: dict, options: BuildOptions) -> None:
    """The parity gate: refuse the build when a graph is further from torch than its tolerance."""
    for graph, result in parity.items():
        tolerance = options.tolerance(name, graph)
        result["tolerance"] = tolerance
        if not result["max_rel_l2"] <= tolerance:  # NaN fails too
            raise BuildError(f"{name}: the {graph} graph differs from the torch fp32 reference by "
                             f"{result['max_rel_l2']:.3e} relative L2, over its tolerance {tolerance:.1e} "
                             f"(seesr_export.export.PARITY_TOLERANCES); the bundle was not written")


def _export_vae_segments(name: str, models, work: Path, options: BuildOptions, progress) -> dict:
    """The segment graphs of the official tiled VAE (``seesr_export.tiled_vae``), fp32, each
    checked against torch at a tile other than the traced one."""
    from seesr_runtime.tiled_vae import GROUP_NORM_EPS, TiledVaeLayout

    from .export import ExportOptions, export_onnx, run_torch
    from .tiled_vae import segment_graphs, segment_groups, split_segments, vae_tasks

    half = TILED_VAE_HALVES[name]
    export_options = ExportOptions(opset=options.opset, external_data_threshold=options.external_data_threshold)
    # Inputs at another tile size than the traced one, for the check against torch.
    checks = [feeds for *_, feeds in segment_graphs(models.vae, half, size=12, seed=1)] if options.verify else []
    graphs = segment_graphs(models.vae, half)
    progress.stage(f"{name}: {len(graphs)} tiled-VAE segment graphs (fp32)")
    folder = work / "onnx" / "fp32" / f"{name}_tiled"
    folder.mkdir(parents=True, exist_ok=True)
    segments, errors = [], []
    for k, (segment_name, spec, module, _) in enumerate(graphs):
        files = export_onnx(module, spec, {"B": 1, "h": 16, "w": 16}, folder / f"segment_{k:02d}.onnx", export_options)
        rels = [str(f.relative_to(work)) for f in files]
        names = [t.name for t in spec.inputs]
        segments.append({
            "spec": spec.to_json(),
            "files": {"fp32": {"onnx": rels[0], "external_data": rels[1] if len(rels) > 1 else None,
                               "sha256": {rel: sha256_file(work / rel) for rel in rels}, "precision": "fp32"}},
            "takes_residual": "residual" in names,
            "hands_residual": "residual_out" in spec.output_names,
        })
        if options.verify:
            feeds = checks[k]
            expected = run_torch(module, spec, feeds)
            errors.append(compare_graph(work / rels[0], spec, feeds, expected)["max_rel_l2"])
    groups = segment_groups(split_segments(vae_tasks(models.vae, half)))
    tiled = {"pad": TiledVaeLayout.for_half(half).pad, "groups": groups,
             "eps": GROUP_NORM_EPS, "segments": segments}
    if errors:
        tiled["parity"] = {"max_rel_l2": max(errors), "tile": 12}
    return tiled


def _export_parallel(names, specs, paths: SeeSRPaths, work: Path, options: BuildOptions, progress) -> dict:
    """Export ``names`` in ``options.jobs`` worker processes (big machines: the trace and the ONNX
    passes are mostly single-threaded, so networks in parallel cut the wall time)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = min(options.jobs, len(names))
    progress.stage(f"exporting {', '.join(names)} in {jobs} processes")
    # Largest first, so the UNet does not start last.
    order = sorted(names, key=lambda n: ("unet", "controlnet", "text_encoder", "dape").index(n)
                   if n in ("unet", "controlnet", "text_encoder", "dape") else 9)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    entries = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_export_worker, name, specs[name], paths, work, options, threads): name
                   for name in order}
        for future in as_completed(futures):
            name = futures[future]
            entries[name], seconds = future.result()
            progress.stage(f"{name}: exported ({seconds:.0f} s)")
    return entries


def _export_worker(name, spec, paths, work, options, threads):
    import time

    import torch

    from .cli import Progress

    torch.set_num_threads(threads)
    start = time.perf_counter()
    entry = _export_network(name, spec, _Models(paths), Path(work), options, Progress(quiet=True))
    return entry, time.perf_counter() - start


def _add_int8(work: Path, manifest: dict, options: BuildOptions, progress, models: _Models) -> dict:
    """Calibrate through the sampler, write int8 UNet/ControlNet graphs, and measure them against fp32."""
    from PIL import Image

    from .export import graph_module
    from .quantize import (QUANTIZED_NETWORKS, QualityReport, QuantOptions, end_to_end_psnr, heldout_error,
                           modelopt_available, quantize_graph, quantize_module_modelopt, record_calibration_feeds)

    quant = QuantOptions(method=options.quant_method, calib_size=options.calib_size, calib_steps=options.calib_steps,
                         exclude_image_attention=options.int8_image_attention_fp32,
                         conv_input_percentile=None if options.int8_conv_percentile >= 100 else options.int8_conv_percentile)
    use_modelopt = quant.method == "modelopt" or (quant.method == "auto" and modelopt_available())
    if quant.method == "modelopt" and not modelopt_available():
        raise BuildError("--quant-method modelopt needs nvidia-modelopt: pip install 'seesr-export[quant]'")
    images = [Image.open(p).convert("RGB") for p in options.calib_images]
    bundle = Manifest.load(work, verify="never")  # unfinished: verified at the end of the build
    recorded = record_calibration_feeds(bundle, images, quant, progress)
    quality = QualityReport()
    (work / "onnx" / "int8").mkdir(parents=True, exist_ok=True)
    for name in QUANTIZED_NETWORKS:
        feeds = recorded[name]
        split = max(1, int(len(feeds) * (1 - quant.holdout)))
        calibration, heldout = feeds[:split], feeds[split:] or feeds[-1:]
        progress.stage(f"{name}: int8 Q/DQ ({'ModelOpt SmoothQuant' if use_modelopt else 'onnxruntime'}) "
                       f"from {len(calibration)} recorded calls")
        rel = f"onnx/int8/{name}.onnx"
        if use_modelopt:
            module = graph_module(name, models)
            quality.excluded[name] = quantize_module_modelopt(module, bundle.spec(name), calibration, work / rel,
                                                              TRACE_ENV, quant)
            del module
            models.drop(GRAPHS[name][0])
        else:
            quality.excluded[name] = quantize_graph(bundle.graph_path(name, "fp32"), work / rel, calibration, quant)
        quality.network_rel_l2[name] = heldout_error(bundle, name, work / rel, heldout)
        rels = [rel] + ([rel + ".data"] if (work / (rel + ".data")).exists() else [])
        manifest["networks"][name]["files"]["int8"] = {
            "onnx": rel, "external_data": rels[1] if len(rels) > 1 else None,
            "sha256": {r: sha256_file(work / r) for r in rels}, "precision": "int8"}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    progress.stage("int8: end-to-end PSNR against fp32 (same noise)")
    quality.psnr_vs_fp32_db = end_to_end_psnr(Manifest.load(work, verify="never"), images[-1], quant.calib_steps, seed=1234)
    settings = {"image_attention_fp32": quant.exclude_image_attention,
                "conv_input_percentile": quant.conv_input_percentile if use_modelopt else None}
    manifest["quality"] = {"int8": {**quality.to_json(), "method": "modelopt" if use_modelopt else "onnxruntime",
                                    "settings": settings}}
    return manifest["quality"]["int8"]


def _add_engines(work: Path, manifest: dict, options: BuildOptions, progress) -> None:
    """One TensorRT engine per network (the precision's graph; fp16 for the rest of an int8 build)."""
    import tensorrt as trt

    from .trt_engines import EngineOptions, build_engine, engine_entry, engine_filename

    from seesr_runtime.trt_backend import _cudart

    cudart = _cudart()

    _, device = cudart.cudaGetDevice()
    _, major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device)
    _, minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device)
    bundle = Manifest.load(work, verify="never")  # unfinished: verified at the end of the build
    cache = work.parent / ".seesr-timing.cache"  # beside the bundles: survives rebuilds
    for name in manifest["networks"]:
        files = manifest["networks"][name]["files"]
        precision = options.precision if options.precision in files else "fp16"
        engine_options = EngineOptions(precision=precision, timing_cache=cache)
        rel = f"trt/{engine_filename(name, precision, trt.__version__, (major, minor))}"
        progress.stage(f"{name}: TensorRT {precision} engine")
        build_engine(bundle.graph_path(name, precision), bundle.spec(name), work / rel, engine_options)
        entry = engine_entry(name, bundle.spec(name), rel, sha256_file(work / rel), engine_options, trt.__version__,
                             (major, minor))
        manifest["networks"][name].setdefault("engines", {})[options.precision] = entry
        manifest.setdefault("files", {})[rel] = entry["sha256"]


def compare_graph(onnx_path: Path, spec, feeds: dict, expected: list) -> dict:
    """Relative L2 error of every output, onnxruntime (CPU) against torch's ``expected``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(spec.output_names, feeds)
    errors = [relative_l2(g, e) for g, e in zip(got, expected)]
    return {"max_rel_l2": max(errors), "env": VERIFY_ENV}


def relative_l2(got: np.ndarray, expected: np.ndarray) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


# ---------------------------------------------------------------- text, tagger, manifest


def write_tokenizer_json(sd2_folder: Path, path: Path, max_length: int = 77, pad_id: int = 0) -> None:
    """SD2's CLIP tokenizer as one ``tokenizer.json`` the ``tokenizers`` library loads alone,
    with truncation to 77 and padding with id 0 (SD2's pad token "!") built in."""
    from tokenizers import Tokenizer

    from .models.sd2 import load_tokenizer

    slow_or_fast = load_tokenizer(sd2_folder)
    backend = getattr(slow_or_fast, "backend_tokenizer", None)
    if backend is None:  # transformers 4 with the slow tokenizer
        from transformers import CLIPTokenizerFast

        backend = CLIPTokenizerFast.from_pretrained(str(Path(sd2_folder) / "tokenizer")).backend_tokenizer
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    tokenizer.save(str(path))


def _write_text_and_tagger(paths, work: Path, models, sources, previous, progress):
    """tokenizer.json and the negative prompt's embedding (reused when their inputs are unchanged)."""
    key = _key("text", EXPORT_CODE_VERSION, sources["text_encoder"], sources["tokenizer"], DEFAULT_NEGATIVE_PROMPT,
               sources["ram"], sources["dape"], sources["unet"], sources["controlnet"])
    names = ("tokenizer.json", "negative_prompt_embeds.npy")
    if previous is not None and previous.data["text"].get("cache_key") == key and \
            all((previous.root / n).is_file() for n in names):
        from .export import copy_files

        copy_files([previous.root / n for n in names], work)
        return ModelDims.from_json(previous.data["dims"]), {"cache_key": key}
    from .reference import encode_prompt

    progress.stage("tokenizer.json and the negative prompt embedding")
    write_tokenizer_json(paths.sd2, work / "tokenizer.json")
    embeds = encode_prompt(models.tokenizer, models.text_encoder, DEFAULT_NEGATIVE_PROMPT)
    np.save(work / "negative_prompt_embeds.npy", embeds.numpy())
    return models.dims(), {"cache_key": key}


def _manifest(name, dims, networks, paths, sources, versions, text) -> dict:
    from .models.dape import load_tag_list
    from .models.sd2 import load_scheduler_config

    tags, thresholds = load_tag_list(paths.tag_list, paths.tag_thresholds, dims.num_tags)
    vae_config = json.loads((paths.sd2 / "vae" / "config.json").read_text())
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "name": name,
        "dims": dims.to_json(),
        "networks": networks,
        "pipeline": {
            "scheduler": {"type": "DDPMScheduler", **load_scheduler_config(paths.sd2)},
            "vae_scaling_factor": float(vae_config.get("scaling_factor", 0.18215)),
            "start_step": START_STEP,
            "prompt_template": "{tags}, {prompt},{added_prompt}",
            "added_prompt": DEFAULT_ADDED_PROMPT,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            "defaults": bundle_defaults(),
            "options": describe(),  # every option's type, default, range and help, for runtimes in other languages
        },
        "tagger": {
            "input_size": DAPE_SIZE, "resize": "bilinear, half-pixel centres, no antialias",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "tags": tags, "thresholds": [float(t) for t in thresholds],
            "rule": "sigmoid(tag_logits) > threshold, joined with ', ' in class order",
        },
        "text": {"tokenizer": "tokenizer.json", "max_length": dims.text_tokens, "pad_id": 0,
                 "negative_prompt_embeds": "negative_prompt_embeds.npy", **text},
        "provenance": {
            "sources": sources,
            "versions": versions,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def add_flops(bundle: Path, paths: SeeSRPaths, progress=None) -> dict:
    """Count FLOPs for a bundle built before they were recorded; rewrites only manifest.json."""
    from .cli import Progress

    progress = progress or Progress(quiet=True)
    manifest = Manifest.load(bundle)
    models = _Models(paths)
    data = json.loads(json.dumps(manifest.data))
    for name in data["networks"]:
        progress.stage(f"{name}: counting FLOPs")
        data["networks"][name]["flops"] = network_flops(graph_module(name, models), manifest.spec(name))
        _release_if_unused(models, name, ())
    tmp = Path(bundle) / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, Path(bundle) / MANIFEST)
    return {n: e["flops"] for n, e in data["networks"].items()}

