"""A bundle's ``manifest.json``: the one contract between exporter, runtime, TensorRT, Triton and C++.

Reading it needs only the standard library; ``validate`` checks the structure
(without the jsonschema package) and ``verify_files`` the sha256 of every file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import options as option_table
from .errors import BundleError
from .networks import NETWORK_NAMES, ModelDims, NetworkSpec

SCHEMA_VERSION = 1
FORMAT = "seesr-bundle"
MANIFEST = "manifest.json"
GPU_GRAPH = "fp16_gpu"  # fp16 with onnxruntime's CUDA-only fused ops; "providers" in its file entry
PRECISIONS = ("fp32", "fp16", "int8", GPU_GRAPH)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_REQUIRED = {
    "schema_version": int, "format": str, "name": str, "dims": dict, "networks": dict,
    "pipeline": dict, "tagger": dict, "text": dict, "provenance": dict,
}


def validate(data: dict, source: str = MANIFEST) -> None:
    """Raise BundleError naming every structural problem of a manifest."""
    problems = [f"missing or mistyped field {k!r} (expected {t.__name__})"
                for k, t in _REQUIRED.items() if not isinstance(data.get(k), t)]
    if not problems:
        if data["format"] != FORMAT:
            problems.append(f"format is {data['format']!r}, expected {FORMAT!r}")
        if data["schema_version"] != SCHEMA_VERSION:
            problems.append(f"schema_version {data['schema_version']} is not {SCHEMA_VERSION}")
        for name, entry in data["networks"].items():
            if name not in NETWORK_NAMES:
                problems.append(f"unknown network {name!r}")
            for precision, files in entry.get("files", {}).items():
                if precision not in PRECISIONS:
                    problems.append(f"{name}: unknown precision {precision!r}")
                if not isinstance(files.get("onnx"), str) or not isinstance(files.get("sha256"), dict):
                    problems.append(f"{name}/{precision}: needs 'onnx' (path) and 'sha256' (file -> hash)")
            if "spec" not in entry:
                problems.append(f"{name}: missing 'spec'")
        tagger = data["tagger"]
        if len(tagger.get("tags", [])) != len(tagger.get("thresholds", [None])):
            problems.append("tagger: tags and thresholds differ in length")
        if "options" in data["pipeline"]:  # absent in bundles built before it was recorded
            problems += option_table.description_problems(data["pipeline"]["options"])
    if problems:
        raise BundleError(f"{source}: invalid manifest:\n  " + "\n  ".join(problems))


def entry_files(entry: dict) -> dict[str, str]:
    """Every file one network entry pins (its graphs and its tiled-VAE segments), path -> sha256."""
    pinned = {}
    for owner in (entry, *entry.get("tiled", {}).get("segments", [])):
        for files in owner.get("files", {}).values():
            pinned.update(files["sha256"])
    return pinned


@dataclass
class Manifest:
    root: Path
    data: dict

    @classmethod
    def load(cls, bundle: Path | str) -> "Manifest":
        root = Path(bundle)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root}: not a SeeSR bundle (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise BundleError(f"{path}: not valid JSON: {exc}") from exc
        validate(data, str(path))
        return cls(root, data)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_json(self.data["dims"])

    def entry(self, network: str) -> dict:
        """The manifest entry of a network, or of one tiled-VAE segment (``"vae_decoder#3"``)."""
        parent, _, segment = network.partition("#")
        try:
            entry = self.data["networks"][parent]
            return entry["tiled"]["segments"][int(segment)] if segment else entry
        except (KeyError, IndexError, ValueError):
            raise BundleError(f"{self.root}: the bundle has no network {network!r}") from None

    def tiled_vae(self, network: str) -> dict | None:
        """The ``tiled`` entry of ``vae_encoder``/``vae_decoder`` (segment graphs for the official tiled
        VAE), or None for bundles built without them."""
        return self.data["networks"].get(network, {}).get("tiled")

    def options(self) -> list[dict]:
        """The upscale options as this bundle describes them (``pipeline.options``); for bundles built
        before that was recorded, the runtime's table with the bundle's defaults."""
        pipeline = self.data["pipeline"]
        return pipeline.get("options") or option_table.describe(option_table.defaults_from_manifest(pipeline))

    def spec(self, network: str) -> NetworkSpec:
        return NetworkSpec.from_json(self.entry(network)["spec"])

    def graph_path(self, network: str, precision: str = "fp32") -> Path:
        entry = self.entry(network)
        if "#" in network and precision not in entry["files"]:
            precision = "fp32"  # segments are fp32 only: they run once per image, at full precision
        try:
            files = entry["files"][precision]
        except KeyError:
            have = {n: sorted(e.get("files", {})) for n, e in self.data["networks"].items()}
            raise BundleError(f"{self.root}: no {precision} graph for {network!r} (bundle has {have})") from None
        return self.root / files["onnx"]

    def all_files(self) -> dict[str, str]:
        """Every file the manifest pins, relative path -> sha256."""
        pinned = {}
        for entry in self.data["networks"].values():
            pinned.update(entry_files(entry))
        pinned.update(self.data.get("files", {}))
        return pinned

    def verify_files(self) -> None:
        """Raise BundleError naming every missing or altered file."""
        problems = []
        for rel, expected in self.all_files().items():
            path = self.root / rel
            if not path.is_file():
                problems.append(f"missing {rel}")
            elif sha256_file(path) != expected:
                problems.append(f"sha256 mismatch for {rel}")
        if problems:
            raise BundleError(f"{self.root}: bundle files do not match the manifest:\n  " + "\n  ".join(problems))
