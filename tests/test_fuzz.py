"""Fuzzing the runtime's untrusted inputs: image files and bundles (manifest and graph bytes).

The invariant: whatever the bytes, only the documented errors come out. ``load_lr_image`` returns an
RGB image or raises ImageRejected (for a file that exists); ``Manifest.load``, ``spec`` and
``graph_path`` return or raise BundleError. Any other exception, a crash or a hang is a bug. Examples
per target come from $SEESR_FUZZ's profile (``tests/fuzz_inputs.py``); ``make fuzz`` runs the long one.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import pytest
from fuzz_inputs import fuzz_settings, image_files, mutated, mutated_manifests
from hypothesis import assume, example, given
from hypothesis import strategies as st
from image_bytes import png_header

from seesr_runtime import options as option_table
from seesr_runtime.cli import main
from seesr_runtime.errors import BundleError, ImageRejected
from seesr_runtime.inputs import IMAGE_SUFFIXES, load_lr_image, load_lr_image_bytes
from seesr_runtime.manifest import MANIFEST, Manifest
from seesr_runtime.pipeline import as_rgb

# ---------------------------------------------------------------- images


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _check_image_file(folder, suffix: str, blob: bytes) -> None:
    path = folder / f"input{suffix}"
    path.write_bytes(blob)
    max_pixels = option_table.default("max_pixels")
    try:
        image, _note = load_lr_image(path, max_pixels)
    except ImageRejected as refused:
        with pytest.raises(ImageRejected) as from_bytes:  # the Triton model's entry point: the same verdict
            load_lr_image_bytes(blob, max_pixels)
        assert str(from_bytes.value) == str(refused)
        return
    same, _note = load_lr_image_bytes(blob, max_pixels)
    assert (same.size, same.tobytes()) == (image.size, image.tobytes())
    assert image.mode == "RGB"
    option_table.check_image_size(*image.size, max_pixels)  # what load_lr_image accepted, the pipeline accepts
    assert as_rgb(image, max_pixels).size == image.size


@fuzz_settings(scale=4)
@given(file=image_files())
@example(file=(".png", png_header(60000, 60000)))  # a decompression bomb: refused before decoding
@example(file=(".png", png_header(2**31 - 1, 1)))
@example(file=(".png", png_header(0, 0)))
@example(file=(".gif", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00" * 7))
@example(file=(".jpg", b""))
def test_image_files_raise_only_image_rejected(scratch, file):
    _check_image_file(scratch, *file)


def test_a_compressed_bomb_is_refused_without_decoding(tmp_path):
    """A 6000x6000 PNG of zeros is about 100 kilobytes: refused from its header, never decoded."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 6000 * 3)
    compressed = b"".join(packer.compress(row) for _ in range(6000)) + packer.flush()
    header = png_header(6000, 6000)
    idat = (
        struct.pack(">I", len(compressed)) + b"IDAT" + compressed + struct.pack(">I", zlib.crc32(b"IDAT" + compressed))
    )
    bomb = header[:33] + idat + header[-12:]  # signature + IHDR, the big IDAT, IEND
    assert len(bomb) < 2_000_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(ImageRejected, match="over the limit"):
        load_lr_image(path)


# ---------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle_copy(runtime_bundle, tmp_path_factory):
    """A private copy of the tiny bundle (its graphs may be overwritten), its original manifest and the
    smallest graph: (network, precision, path in the bundle, its bytes)."""
    folder = tmp_path_factory.mktemp("fuzz-bundle") / "bundle"
    shutil.copytree(runtime_bundle, folder)
    data = json.loads((folder / MANIFEST).read_text())
    graphs = [
        (network, precision, files["onnx"])
        for network, entry in data["networks"].items()
        for precision, files in entry.get("files", {}).items()
    ]
    network, precision, rel = min(graphs, key=lambda graph: (folder / graph[2]).stat().st_size)
    return folder, data, (network, precision, rel, (folder / rel).read_bytes())


def _load_every_network(folder) -> None:
    """Load the bundle and every network's spec and graphs: returns, or raises BundleError."""
    manifest = Manifest.load(folder, verify="never")
    for network, entry in manifest.data["networks"].items():
        manifest.spec(network)
        for precision in entry.get("files", {}):
            manifest.graph_path(network, precision)


def _load_tolerating_bundle_error(folder) -> None:
    try:
        _load_every_network(folder)
    except BundleError:
        pass


@fuzz_settings()
@given(data=st.data())
def test_mutated_manifests_raise_only_bundle_error(bundle_copy, data):
    folder, original, _ = bundle_copy
    manifest = data.draw(mutated_manifests(original))
    (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=data.draw(st.booleans())), errors="surrogatepass")
    _load_tolerating_bundle_error(folder)


@fuzz_settings(scale=0.3)
@given(data=st.data())
def test_mutated_manifest_text_raises_only_bundle_error(bundle_copy, data):
    folder, original, _ = bundle_copy
    text = json.dumps(original).encode()
    (folder / MANIFEST).write_bytes(data.draw(mutated(text)))
    _load_tolerating_bundle_error(folder)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 50_000 + "1" + "}" * 50_000,
        "1" * 5000,
        "\xff\xfe",
        "NaN",
        "null",
        '"manifest"',
    ],
)
def test_odd_manifest_documents_raise_bundle_error(bundle_copy, text):
    folder, _, _ = bundle_copy
    (folder / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError):
        Manifest.load(folder, verify="never")


@fuzz_settings(scale=0.5)
@given(data=st.data())
def test_mutated_graph_bytes_raise_only_bundle_error(bundle_copy, data):
    folder, original, (network, precision, rel, pristine) = bundle_copy
    (folder / MANIFEST).write_text(json.dumps(original))
    (folder / rel).write_bytes(data.draw(mutated(pristine)))
    try:
        Manifest.load(folder, verify="never").graph_path(network, precision)
    except BundleError:
        pass
    finally:
        (folder / rel).write_bytes(pristine)  # the other tests load this bundle copy too


def _set(path, value):
    def mutate(data):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value

    return mutate


def _first_network(data):
    return next(iter(data["networks"]))


# What the fuzzing found, pinned: each once escaped as another exception (TypeError, AttributeError,
# KeyError, ValueError, UnicodeEncodeError).
FOUND = {
    "network entry null": lambda d: _set(("networks", _first_network(d)), None)(d),
    "files a list": lambda d: _set(("networks", _first_network(d), "files"), [1])(d),
    "graph files a string": lambda d: _set(("networks", _first_network(d), "files", "fp32"), "x.onnx")(d),
    "tiled a number": lambda d: _set(("networks", _first_network(d), "tiled"), 3)(d),
    "engine entry a string": lambda d: _set(("networks", _first_network(d), "engines"), {"fp16": "e.plan"})(d),
    "tags a number": lambda d: _set(("tagger", "tags"), 7)(d),
    "top-level files a list": lambda d: _set(("files",), ["a"])(d),
    "spec null": lambda d: _set(("networks", _first_network(d), "spec"), None)(d),
    "spec without outputs": lambda d: d["networks"][_first_network(d)]["spec"].pop("outputs"),
    "graph path a lone surrogate": lambda d: _set(("networks", _first_network(d), "files", "fp32", "onnx"), "\ud800")(
        d
    ),
    "tensor dtype null": lambda d: _set(("networks", _first_network(d), "spec", "inputs", 0, "dtype"), None)(d),
}


@pytest.mark.parametrize("mutate", FOUND.values(), ids=FOUND.keys())
def test_found_manifest_mutations_raise_bundle_error(bundle_copy, mutate):
    folder, original, _ = bundle_copy
    data = json.loads(json.dumps(original))
    mutate(data)
    (folder / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError):
        _load_every_network(folder)


# ---------------------------------------------------------------- the CLI


@fuzz_settings(scale=0.1)
@given(files=st.lists(image_files(), min_size=1, max_size=24))
def test_cli_names_every_rejected_file_and_goes_on(runtime_bundle, scratch, capsys, files):
    """``seesr upscale`` over a folder of fuzzed files that the loader rejects: each is reported by name,
    the batch ends with exit code 1 and no traceback. (Accepted files are left out: upscaling is slow.)"""
    folder = scratch / "cli-in"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    rejected = []
    for i, (suffix, blob) in enumerate(files):
        path = folder / f"{i:02d}{suffix if suffix in IMAGE_SUFFIXES else '.png'}"  # GIF: not a batch suffix
        path.write_bytes(blob)
        try:
            load_lr_image(path)
            path.unlink()
        except ImageRejected:
            rejected.append(path)
    assume(rejected)
    capsys.readouterr()
    code = main(
        ["upscale", str(folder), "-o", str(scratch / "cli-out"), "--bundle", str(runtime_bundle), "--no-verify", "-q"]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    for path in rejected:
        assert f"error: {path}: " in err
    assert f"0 upscaled, 0 skipped, {len(rejected)} failed" in err
