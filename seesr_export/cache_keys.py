"""What a rebuild may reuse: source hashes, per-network cache keys, and the previous bundle's graphs.

Each network's graphs are keyed on the hashes of its source files and the export options; a
rebuild hard-links the graphs of the previous bundle whose key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from pathlib import Path

import diffusers
import onnx
import onnxruntime
import torch
import transformers

from seesr_runtime.manifest import MANIFEST, BundleError, Manifest, entry_files, sha256_file
from seesr_runtime.networks import NETWORK_TABLE

from . import __version__
from .errors import BuildError
from .export import copy_files
from .layout import SeeSRPaths

log = logging.getLogger(__name__)

EXPORT_CODE_VERSION = 3  # bump when a change to the exporter changes its graphs


def source_files(paths: SeeSRPaths) -> dict[str, list[Path]]:
    """The files behind each role, for hashing (configs included: they shape the graphs)."""

    def folder(p: Path) -> list[Path]:
        return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else []

    return {
        "ram": [paths.ram],
        "dape": [paths.dape],
        "tag_list": [paths.tag_list],
        "tag_thresholds": [paths.tag_thresholds],
        "text_encoder": folder(paths.sd2 / "text_encoder"),
        "tokenizer": folder(paths.sd2 / "tokenizer"),
        "vae": folder(paths.sd2 / "vae"),
        "scheduler": folder(paths.sd2 / "scheduler"),
        "unet": folder(paths.unet),
        "controlnet": folder(paths.controlnet),
    }


def hash_sources(paths: SeeSRPaths) -> dict[str, dict[str, str]]:
    """role -> {file name: sha256}; names, not paths, so a moved checkout still hits the cache."""
    return {role: {f.name: sha256_file(f) for f in files} for role, files in source_files(paths).items()}


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def network_keys(options, versions: dict, sources: dict) -> dict[str, str]:
    """The cache key of each network the build exports: its source files' hashes and the export options."""
    return {
        name: cache_key(
            name,
            options.graph_precisions(),
            options.opset,
            options.external_data_threshold,
            EXPORT_CODE_VERSION,
            versions,
            [sources[r] for r in NETWORK_TABLE[name].sources],
        )
        for name in options.networks
    }


def tool_versions() -> dict[str, str]:
    return {
        "seesr_export": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def previous_bundle(out: Path) -> Manifest | None:
    """The bundle ``out`` already holds (its graphs may be reused), None if there is none to reuse."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise BuildError(
                f"--out {out} exists and is not a SeeSR bundle (no {MANIFEST}); choose another directory or remove it"
            )
        return None
    try:
        return Manifest.load(out, verify="never")  # reuse hashes the files it reuses
    except BundleError:
        return None  # a damaged bundle is rebuilt from scratch, then replaced


def remove_stale_partials(out: Path) -> None:
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def reuse(previous: Manifest | None, name: str, key: str, work: Path) -> dict | None:
    """Hard-link the previous bundle's graphs for ``name`` if they were built from the same inputs."""
    if previous is None:
        return None
    entry = previous.data["networks"].get(name)
    if not entry or entry.get("cache_key") != key:
        log.debug("%s: not reusable (%s)", name, "changed inputs or options" if entry else "not in the previous bundle")
        return None
    pinned = entry_files(entry)
    if not all(previous.file(rel).is_file() and sha256_file(previous.file(rel)) == sha for rel, sha in pinned.items()):
        log.debug("%s: not reusable (a previous graph file is missing or changed)", name)
        return None
    for rel in pinned:
        copy_files([previous.file(rel)], (work / rel).parent)
    return json.loads(json.dumps(entry))
