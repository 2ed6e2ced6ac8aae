"""Exporting the networks of one build: the torch models (loaded lazily, dropped early), each network's
graphs (fp32, fp16, GPU graph, tiled-VAE segments) with their parity check, serially or in processes."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import cached_property
from pathlib import Path

import torch

from seesr_runtime.manifest import GPU_GRAPH, sha256_file
from seesr_runtime.networks import NETWORK_TABLE, ModelDims, networks_by_size, networks_of_model
from seesr_runtime.tiled_vae import GROUP_NORM_EPS, TiledVaeLayout

from .export import ExportOptions, convert_fp16, export_onnx, graph_module, model_dims, run_torch, sample_feeds
from .flops import network_flops
from .gpu_graph import OPTIMIZER_MODEL_TYPES, write_cpu_fused_graph, write_gpu_graph
from .graph_format import TRACE_ENV, VERIFY_ENV
from .layout import SeeSRPaths
from .models.dape import load_dape
from .models.denoiser import SeeSRControlNet, load_seesr_controlnet, load_seesr_unet, read_config
from .models.sd2 import load_text_encoder, load_tokenizer, load_vae
from .parity import check_parity, compare_graph
from .progress import Progress
from .tiled_vae import segment_graphs, segment_groups, split_segments, vae_tasks
from .turbo import compose_turbo_unet

TILED_VAE_HALVES = {"vae_encoder": "encoder", "vae_decoder": "decoder"}  # networks with tiled-VAE segments


class TorchModels:
    """Torch models loaded on first use and dropped after their last graph: a fully cached
    build loads none, and a full-size build holds one big network at a time."""

    def __init__(self, paths: SeeSRPaths, turbo: bool = False):
        self.paths = paths
        self.turbo = turbo  # SeeSR-turbo: ``paths.sd2`` is sd-turbo, the UNet is composed (seesr_export.turbo)
        self.turbo = turbo  # SeeSR-turbo: ``paths.sd2`` is sd-turbo, the UNet is composed (seesr_export.turbo)

    @cached_property
    def dape(self):
        return load_dape(self.paths.ram, self.paths.dape)

    @cached_property
    def text_encoder(self):
        return load_text_encoder(self.paths.sd2)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.paths.sd2)

    @cached_property
    def vae(self):
        return load_vae(self.paths.sd2)

    @cached_property
    def unet(self):
        if self.turbo:
            return compose_turbo_unet(self.paths.sd2 / "unet", self.paths.unet)
        return load_seesr_unet(self.paths.unet)

    @cached_property
    def controlnet(self):
        return load_seesr_controlnet(self.paths.controlnet)

    def dims(self) -> ModelDims:
        with torch.device("meta"):  # the structure alone; no weights read or allocated
            skeleton = SeeSRControlNet(read_config(self.paths.controlnet, "SeeSR ControlNet"))
        latent_channels = read_config(self.paths.unet, "SeeSR UNet").get("in_channels", 4)
        return model_dims(self.dape, self.text_encoder, skeleton, latent_channels)

    def drop(self, *names: str) -> None:
        for name in names:
            self.__dict__.pop(name, None)

    def drop_unused(self, remaining) -> None:
        """Drop every network model none of the ``remaining`` networks is traced from."""
        for model, networks in networks_of_model().items():
            if not any(n in remaining for n in networks):
                self.drop(model)

    def release_if_unused(self, name: str, remaining) -> None:
        """Drop the model of network ``name`` unless one of the ``remaining`` networks needs it too."""
        model = NETWORK_TABLE[name].model
        if not any(n in remaining for n in networks_of_model()[model]):
            self.drop(model)


def export_networks(names, specs, models: TorchModels, paths: SeeSRPaths, work: Path, options, progress) -> dict:
    """The manifest entries of ``names``, exported one after the other or in ``options.jobs`` processes."""
    if options.jobs > 1 and len(names) > 1:
        models.drop(*networks_of_model())
        return _export_parallel(names, specs, paths, work, options, progress)
    entries = {}
    for i, name in enumerate(names):
        entries[name] = export_network(name, specs[name], models, work, options, progress, names[i + 1 :])
        models.release_if_unused(name, names[i + 1 :])
    return entries


def export_network(name, spec, models: TorchModels, work: Path, options, progress, remaining=()) -> dict:
    """One network's graphs and their manifest entry; the torch model is released once traced."""
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
        models.release_if_unused(name, remaining)

    written = {"fp32": export_onnx(module, spec, TRACE_ENV, fp32_dir / f"{name}.onnx", export_options, release)}
    if "fp16" in options.graph_precisions():
        progress.stage(f"{name}: fp16 copy (attention scores and softmax kept in fp32)")
        fp16_dir = work / "onnx" / "fp16"
        fp16_dir.mkdir(parents=True, exist_ok=True)
        written["fp16"] = convert_fp16(written["fp32"][0], fp16_dir / f"{name}.onnx", options.external_data_threshold)
    gpu_facts = {}
    if GPU_GRAPH in options.graph_precisions() and name in OPTIMIZER_MODEL_TYPES:
        progress.stage(f"{name}: GPU graph (onnxruntime fusions on fp32, then fp16)")
        (work / "onnx" / GPU_GRAPH).mkdir(parents=True, exist_ok=True)
        written[GPU_GRAPH], gpu_facts = write_gpu_graph(
            written["fp32"][0],
            work / "onnx" / GPU_GRAPH / f"{name}.onnx",
            OPTIMIZER_MODEL_TYPES[name],
            options.external_data_threshold,
        )
        gpu_facts["parity_tolerance"] = options.tolerance(name, GPU_GRAPH)
    for precision, files in written.items():
        entry["files"][precision] = {
            **graph_files_entry(work, files, precision),
            **(gpu_facts if precision == GPU_GRAPH else {}),
        }
    if options.verify:
        progress.stage(f"{name}: checking ONNX against torch")
        entry["parity"] = {
            p: compare_graph(work / entry["files"][p]["onnx"], spec, feeds, expected) for p in written if p != GPU_GRAPH
        }  # the GPU graph has CUDA-only kernels
        if GPU_GRAPH in written:
            entry["parity"]["fused_fp32"] = _fused_parity(name, written["fp32"][0], spec, feeds, expected)
        check_parity(name, entry["parity"], options.tolerance)
    return entry


def graph_files_entry(work: Path, files: list[Path], precision: str) -> dict:
    """The manifest's record of one graph: its .onnx, its external data (if any) and their hashes."""
    rels = [str(f.relative_to(work)) for f in files]
    return {
        "onnx": rels[0],
        "external_data": rels[1] if len(rels) > 1 else None,
        "sha256": {rel: sha256_file(work / rel) for rel in rels},
        "precision": precision,
    }


def _fused_parity(name, fp32_graph: Path, spec, feeds, expected) -> dict:
    """The GPU graph's fusions, minus the CUDA-only ones, in fp32 on the CPU, against torch."""
    with tempfile.TemporaryDirectory(prefix="seesr-fused-", dir=fp32_graph.parent) as scratch:
        fused = write_cpu_fused_graph(fp32_graph, Path(scratch) / f"{name}.onnx", OPTIMIZER_MODEL_TYPES[name])
        return compare_graph(fused, spec, feeds, expected)


def _export_vae_segments(name: str, models, work: Path, options, progress) -> dict:
    """The segment graphs of the official tiled VAE (``seesr_export.tiled_vae``), fp32, each
    checked against torch at a tile other than the traced one."""
    half = TILED_VAE_HALVES[name]
    export_options = ExportOptions(opset=options.opset, external_data_threshold=options.external_data_threshold)
    # Inputs at another tile size than the traced one, for the check against torch.
    checks = [feeds for *_, feeds in segment_graphs(models.vae, half, size=12, seed=1)] if options.verify else []
    graphs = segment_graphs(models.vae, half)
    progress.stage(f"{name}: {len(graphs)} tiled-VAE segment graphs (fp32)")
    folder = work / "onnx" / "fp32" / f"{name}_tiled"
    folder.mkdir(parents=True, exist_ok=True)
    segments, errors = [], []
    for k, (_, spec, module, _) in enumerate(graphs):
        files = export_onnx(module, spec, {"B": 1, "h": 16, "w": 16}, folder / f"segment_{k:02d}.onnx", export_options)
        names = [t.name for t in spec.inputs]
        segments.append(
            {
                "spec": spec.to_json(),
                "files": {"fp32": graph_files_entry(work, files, "fp32")},
                "takes_residual": "residual" in names,
                "hands_residual": "residual_out" in spec.output_names,
            }
        )
        if options.verify:
            feeds = checks[k]
            expected = run_torch(module, spec, feeds)
            errors.append(
                compare_graph(work / segments[-1]["files"]["fp32"]["onnx"], spec, feeds, expected)["max_rel_l2"]
            )
    groups = segment_groups(split_segments(vae_tasks(models.vae, half)))
    tiled = {"pad": TiledVaeLayout.for_half(half).pad, "groups": groups, "eps": GROUP_NORM_EPS, "segments": segments}
    if errors:
        tiled["parity"] = {"max_rel_l2": max(errors), "tile": 12}
    return tiled


def _export_parallel(names, specs, paths: SeeSRPaths, work: Path, options, progress) -> dict:
    """Export ``names`` in ``options.jobs`` worker processes (big machines: the trace and the ONNX
    passes are mostly single-threaded, so networks in parallel cut the wall time)."""
    jobs = min(options.jobs, len(names))
    progress.stage(f"exporting {', '.join(names)} in {jobs} processes")
    order = networks_by_size(names)  # largest first, so the UNet does not start last
    threads = max(1, (os.cpu_count() or 1) // jobs)
    entries = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(_export_worker, name, specs[name], paths, work, options, threads): name for name in order
        }
        for future in as_completed(futures):
            name = futures[future]
            entries[name], seconds = future.result()
            progress.stage(f"{name}: exported ({seconds:.0f} s)")
    return entries


def _export_worker(name, spec, paths, work, options, threads):
    torch.set_num_threads(threads)
    start = time.perf_counter()
    models = TorchModels(paths, turbo=options.sd_turbo is not None)
    entry = export_network(name, spec, models, Path(work), options, Progress(quiet=True))
    return entry, time.perf_counter() - start
