"""A bundle's ``manifest.json``: the one contract between exporter, runtime, TensorRT, Triton and C++.

Reading it needs only the standard library and numpy; ``validate`` checks the structure
(without the jsonschema package), ``bundle_path`` keeps every path the manifest names inside the
bundle, and ``Manifest.load`` checks the sha256 of every file (``verification.py``: cheaply, through a
stamp, unless told otherwise).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from . import options as option_table
from .checksums import sha256_file as sha256_file  # re-exported: the build side pins files with it
from .errors import BundleError
from .networks import NETWORK_NAMES, ModelDims, NetworkSpec
from .onnx_refs import NotProtobuf, external_data_locations
from .verification import Verification, verify_bundle, verify_mode

SCHEMA_VERSION = 1
FORMAT = "seesr-bundle"
MANIFEST = "manifest.json"
GPU_GRAPH = "fp16_gpu"  # fp16 with onnxruntime's CUDA-only fused ops; "providers" in its file entry
PRECISIONS = ("fp32", "fp16", "int8", GPU_GRAPH)


_REQUIRED = {
    "schema_version": int,
    "format": str,
    "name": str,
    "dims": dict,
    "networks": dict,
    "pipeline": dict,
    "tagger": dict,
    "text": dict,
    "provenance": dict,
}


def validate(data: object, source: str = MANIFEST) -> None:
    """Raise BundleError naming every structural problem of a manifest."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: invalid manifest: expected a JSON object, got {type(data).__name__}")
    problems = [
        f"missing or mistyped field {k!r} (expected {t.__name__})"
        for k, t in _REQUIRED.items()
        if not isinstance(data.get(k), t)
    ]
    if not problems:
        if data["format"] != FORMAT:
            problems.append(f"format is {data['format']!r}, expected {FORMAT!r}")
        if data["schema_version"] != SCHEMA_VERSION:
            problems.append(f"schema_version {data['schema_version']} is not {SCHEMA_VERSION}")
        if not isinstance(data.get("files", {}), dict):
            problems.append("'files' must map paths to sha256 hashes")
        for name, entry in data["networks"].items():
            problems += _network_problems(name, entry)
        tagger = data["tagger"]
        tags, thresholds = tagger.get("tags", []), tagger.get("thresholds", [None])
        if not isinstance(tags, list) or not isinstance(thresholds, list):
            problems.append("tagger: tags and thresholds must be lists")
        elif len(tags) != len(thresholds):
            problems.append("tagger: tags and thresholds differ in length")
        if "options" in data["pipeline"]:  # absent in bundles built before it was recorded
            problems += option_table.description_problems(data["pipeline"]["options"])
    if problems:
        raise BundleError(f"{source}: invalid manifest:\n  " + "\n  ".join(problems))


def _network_problems(name: str, entry: object) -> list[str]:
    """What is wrong with the structure of one ``networks`` entry (its graphs, segments and engines)."""
    if name not in NETWORK_NAMES:
        return [f"unknown network {name!r}"]
    if not isinstance(entry, dict):
        return [f"{name}: expected an object, got {type(entry).__name__}"]
    problems = [] if "spec" in entry else [f"{name}: missing 'spec'"]
    tiled = entry.get("tiled", {})
    segments = tiled.get("segments", []) if isinstance(tiled, dict) else None
    if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
        problems.append(f"{name}: 'tiled' must be an object whose 'segments' is a list of objects")
        segments = []
    for owner, holder in [(name, entry)] + [(f"{name}#{k}", s) for k, s in enumerate(segments)]:
        files_by_precision = holder.get("files", {})
        if not isinstance(files_by_precision, dict):
            problems.append(f"{owner}: 'files' must map precisions to graph files")
            continue
        for precision, files in files_by_precision.items():
            if precision not in PRECISIONS:
                problems.append(f"{owner}: unknown precision {precision!r}")
            if (
                not isinstance(files, dict)
                or not isinstance(files.get("onnx"), str)
                or not isinstance(files.get("sha256"), dict)
            ):
                problems.append(f"{owner}/{precision}: needs 'onnx' (path) and 'sha256' (file -> hash)")
    engines = entry.get("engines", {})
    if not isinstance(engines, dict) or not all(isinstance(e, dict) for e in engines.values()):
        problems.append(f"{name}: 'engines' must map precisions to objects naming a 'file'")
    return problems


def bundle_path(root: Path | str, rel: object, what: str) -> Path:
    """The file that the manifest path ``rel`` names inside the bundle ``root`` (resolved; it need not exist).

    A bundle may only name its own files: absolute paths, ``..`` climbing out of the bundle and symbolic
    links (anywhere along the path) that lead outside it are refused with a BundleError naming the
    bundle, ``what`` the path is for, the path and where it leads.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel or not _encodable(rel):
        raise BundleError(f"{root}: {what} {rel!r} is not a path (expected a path relative to the bundle)")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).root:
        raise BundleError(
            f"{root}: {what} {rel!r} is an absolute path; a bundle names its files relative to its own directory"
        )
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target == base:
        raise BundleError(f"{root}: {what} {rel!r} names the bundle directory itself, not a file in it")
    if base not in target.parents:
        climbs = os.path.normpath(rel).split(os.sep)[0] == ".."
        how = "climbs out of the bundle" if climbs else "leads outside the bundle through a symbolic link"
        raise BundleError(f"{root}: {what} {rel!r} {how} (to {target}); bundle paths must stay inside the bundle")
    return target


def _encodable(rel: str) -> bool:
    """Whether the file system can hold the name (JSON can spell lone surrogates, which no path holds)."""
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:
        return False
    return True


def named_paths(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(what it is, path) for every path a (validated) manifest names."""
    named = [(f"text {key}", data["text"].get(key)) for key in ("tokenizer", "negative_prompt_embeds")]
    named += [("file", rel) for rel in data.get("files", {})]
    for name, entry in data["networks"].items():
        segments = entry.get("tiled", {}).get("segments", [])
        for owner, files_by_precision in [(name, entry.get("files", {}))] + [
            (f"{name}#{k}", s.get("files", {})) for k, s in enumerate(segments)
        ]:
            for precision, files in files_by_precision.items():
                named.append((f"{owner} {precision} graph", files.get("onnx")))
                if files.get("external_data") is not None:
                    named.append((f"{owner} {precision} external data", files["external_data"]))
                named += [(f"{owner} {precision} file", rel) for rel in files.get("sha256", {})]
        named += [
            (f"{name} {precision} TensorRT engine", engine.get("file"))
            for precision, engine in entry.get("engines", {}).items()
        ]
    return named


def entry_files(entry: dict[str, Any]) -> dict[str, str]:
    """Every file one network entry pins (its graphs and its tiled-VAE segments), path -> sha256."""
    pinned = {}
    for owner in (entry, *entry.get("tiled", {}).get("segments", [])):
        for files in owner.get("files", {}).values():
            pinned.update(files["sha256"])
    return pinned


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]
    verification: Verification | None = field(default=None, compare=False, repr=False)  # the load's ``Verification``
    _checked_graphs: set[Path] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def load(cls, bundle: Path | str, verify: str | bool = "auto") -> Manifest:
        """Read and check a bundle's manifest: its structure, that every path it names stays inside the
        bundle, and (``verify``) the sha256 of every file it pins:

        ``"auto"`` (default): files new or changed since they were last verified are hashed, the others
        are vouched for by the verification stamp (``verification.py``); ``"always"`` or True: hash
        every file; ``"never"`` or False: no hashing (for callers that verify the files otherwise).
        """
        mode = verify_mode(verify)
        root = Path(bundle)
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root}: not a SeeSR bundle (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
            raise BundleError(f"{path}: not valid JSON: {exc}") from exc
        validate(data, str(path))
        manifest = cls(root, data)
        manifest.check_paths()
        if mode != "never":
            manifest.verification = verify_bundle(manifest, mode)
        return manifest

    def file(self, rel: str, what: str = "file") -> Path:
        """The bundle file the manifest path ``rel`` names (see ``bundle_path``)."""
        return bundle_path(self.root, rel, what)

    def check_paths(self) -> None:
        """Refuse a manifest naming any path outside the bundle (BundleError naming the first)."""
        for what, rel in named_paths(self.data):
            self.file(rel, what)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_json(self.data["dims"])

    def entry(self, network: str) -> dict[str, Any]:
        """The manifest entry of a network, or of one tiled-VAE segment (``"vae_decoder#3"``)."""
        parent, _, segment = network.partition("#")
        try:
            entry: dict[str, Any] = self.data["networks"][parent]
            if segment:
                entry = entry["tiled"]["segments"][int(segment)]
            return entry
        except (KeyError, IndexError, ValueError):
            raise BundleError(f"{self.root}: the bundle has no network {network!r}") from None

    def tiled_vae(self, network: str) -> dict[str, Any] | None:
        """The ``tiled`` entry of ``vae_encoder``/``vae_decoder`` (segment graphs for the official tiled
        VAE), or None for bundles built without them."""
        tiled: dict[str, Any] | None = self.data["networks"].get(network, {}).get("tiled")
        return tiled

    def options(self) -> list[dict[str, Any]]:
        """The upscale options as this bundle describes them (``pipeline.options``); for bundles built
        before that was recorded, the runtime's table with the bundle's defaults."""
        pipeline = self.data["pipeline"]
        return pipeline.get("options") or option_table.describe(option_table.defaults_from_manifest(pipeline))

    def spec(self, network: str) -> NetworkSpec:
        try:
            return NetworkSpec.from_json(self.entry(network)["spec"])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(
                f"{self.root}: the spec of {network!r} in {MANIFEST} is malformed ({type(exc).__name__}: {exc})"
            ) from None

    def graph_path(self, network: str, precision: str = "fp32") -> Path:
        entry = self.entry(network)
        if "#" in network and precision not in entry.get("files", {}):
            precision = "fp32"  # segments are fp32 only: they run once per image, at full precision
        try:
            files = entry["files"][precision]
        except KeyError:
            have = {n: sorted(e.get("files", {})) for n, e in self.data["networks"].items()}
            raise BundleError(f"{self.root}: no {precision} graph for {network!r} (bundle has {have})") from None
        graph = self.file(files["onnx"], f"{network} {precision} graph")
        if graph not in self._checked_graphs:
            self._check_external_data(graph, files, f"{network} {precision} graph")
            self._checked_graphs.add(graph)
        return graph

    def _check_external_data(self, graph: Path, files: dict[str, Any], what: str) -> None:
        """Every external-data file the graph names must lie inside the bundle and be pinned by the
        graph's own manifest entry (so its sha256 is checked with the graph's). Checked here, before
        any engine opens the graph, from the graph's bytes (``onnx_refs``): the manifest alone cannot
        say what the file will make the engine read."""
        if not graph.is_file():
            raise BundleError(f"{self.root}: {what} {files['onnx']!r} is missing")
        try:
            locations = external_data_locations(graph)
        except NotProtobuf as exc:
            raise BundleError(f"{self.root}: {what} {files['onnx']!r} is not a readable ONNX file ({exc})") from None
        pinned = {self.file(rel) for rel in files["sha256"]}
        folder = Path(os.path.relpath(graph.parent, self.root.resolve()))  # engines resolve from the graph's folder
        for location in sorted(locations):
            label = f"external data {location!r} of graph {files['onnx']!r}"
            if PurePosixPath(location).is_absolute() or PureWindowsPath(location).drive:
                raise BundleError(
                    f"{self.root}: {label} is an absolute path; external data must be named relative to the graph"
                )
            target = self.file((folder / location).as_posix(), f"{label}, as bundle path")
            if target not in pinned:
                raise BundleError(
                    f"{self.root}: {label} is not one of the graph's files in the manifest "
                    f"({sorted(files['sha256'])}), so nothing vouches for its contents"
                )

    def all_files(self) -> dict[str, str]:
        """Every file the manifest pins, relative path -> sha256."""
        pinned = {}
        for entry in self.data["networks"].values():
            pinned.update(entry_files(entry))
        pinned.update(self.data.get("files", {}))
        return pinned

    def verify_files(self) -> Verification:
        """Hash every file the manifest pins (no stamp trusted); BundleError names every missing or
        altered one. Returns the ``Verification``."""
        self.verification = verify_bundle(self, "always")
        return self.verification
