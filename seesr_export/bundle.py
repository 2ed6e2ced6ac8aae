"""``seesr-export build``: a SeeSR checkout in, one self-describing bundle out.

The bundle is built in a hidden sibling directory and renamed into place at the
end, so an interrupted build never leaves a half bundle. The stages live beside
this module: the request (``build_request``), what a rebuild may reuse
(``cache_keys``), the export of each network (``export_networks``) and its parity
gate (``parity``), int8 (``int8_build``), TensorRT engines (``trt_engines``), and
the text files and manifest (``manifest_writer``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from seesr_runtime.filemodes import give_tree_umask_modes
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import network_specs

from .atomic import swap_into_place
from .build_request import BuildOptions, BuildReport, check_request
from .cache_keys import hash_sources, network_keys, previous_bundle, remove_stale_partials, reuse, tool_versions
from .errors import BuildError
from .export import graph_module
from .export_networks import TorchModels, export_networks
from .flops import network_flops
from .int8_build import add_int8
from .layout import SeeSRPaths
from .manifest_writer import assemble_manifest, write_manifest, write_text_files
from .progress import Progress
from .trt_engines import add_engines
from .turbo_build import batch_one_profiles, reusable, turbo_checkout, turbo_manifest, turbo_sources

__all__ = ["BuildError", "BuildOptions", "BuildReport", "add_flops", "build_bundle"]


def build_bundle(paths: SeeSRPaths, out: Path, options: BuildOptions, progress=None) -> BuildReport:
    progress = progress or Progress(quiet=True)
    check_request(options)
    out = Path(out)
    previous = reusable(previous_bundle(out), options)
    paths = turbo_checkout(paths, options).check()
    turbo = options.sd_turbo is not None
    progress.stage("hashing source checkpoints")
    sources = turbo_sources(paths) if turbo else hash_sources(paths)
    versions = tool_versions()
    models = TorchModels(paths, turbo=turbo)
    report = BuildReport(bundle=out)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        dims, text = write_text_files(paths, work, models, sources, previous, progress)
        models.drop_unused(options.networks)  # loaded for the text files but not exported now
        specs = batch_one_profiles(network_specs(dims)) if turbo else network_specs(dims)
        networks = _networks(paths, work, options, progress, models, specs, versions, sources, previous, report)
        manifest = assemble_manifest(options.name or out.name, dims, networks, paths, sources, versions, text, work)
        if turbo:
            turbo_manifest(manifest, paths)
        if options.precision == "int8":
            report.quality = add_int8(work, manifest, options, progress, models)
        if options.backend == "tensorrt":
            add_engines(work, manifest, options.precision, progress)
        write_manifest(work, manifest)
        give_tree_umask_modes(work)  # onnx writes external data 0600; before the stamp records ctimes
        Manifest.load(work, verify="always")  # every file hashed; leaves the stamp the first load trusts
        swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress.stage(f"bundle ready: {out} (exported {report.exported or 'none'}, reused {report.reused or 'none'})")
    return report


def _networks(paths, work, options, progress, models, specs, versions, sources, previous, report) -> dict:
    """Every requested network's manifest entry: the previous bundle's where its cache key is unchanged,
    freshly exported otherwise."""
    keys = network_keys(options, versions, sources)
    networks = {}
    for name in options.networks:
        entry = reuse(previous, name, keys[name], work)
        if entry is not None:
            progress.stage(f"{name}: unchanged, reusing the previous graphs")
            report.reused.append(name)
            if "flops" not in entry:  # bundles written before FLOPs were counted
                entry["flops"] = network_flops(graph_module(name, models), specs[name])
            networks[name] = entry
    todo = [n for n in options.networks if n not in networks]
    networks.update(export_networks(todo, specs, models, paths, work, options, progress))
    report.exported.extend(todo)
    networks = {name: networks[name] for name in options.networks}
    for name, entry in networks.items():
        entry["cache_key"] = keys[name]
        if "parity" in entry:
            report.parity[name] = entry["parity"]
    return networks


def add_flops(bundle: Path, paths: SeeSRPaths, progress=None) -> dict:
    """Count FLOPs for a bundle built before they were recorded; rewrites only manifest.json."""
    progress = progress or Progress(quiet=True)
    manifest = Manifest.load(bundle)
    models = TorchModels(paths)
    data = json.loads(json.dumps(manifest.data))
    for name in data["networks"]:
        progress.stage(f"{name}: counting FLOPs")
        data["networks"][name]["flops"] = network_flops(graph_module(name, models), manifest.spec(name))
        models.release_if_unused(name, ())
    write_manifest(bundle, data)
    return {n: e["flops"] for n, e in data["networks"].items()}
