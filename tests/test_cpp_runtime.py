"""The native C++ runtime (runtime/cpp): built with CMake, held to the Python runtime's behaviour.

The build is shared by the session (runtime/cpp/build, incremental). Without cmake, a C++ compiler or one
of the libraries it builds against (nlohmann-json, utf8proc, OpenVINO) the tests skip, naming what to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesr_runtime import options as option_table
from seesr_runtime.errors import BundleError, OptionError
from seesr_runtime.manifest import Manifest

CPP = Path(__file__).resolve().parents[1] / "runtime" / "cpp"
sys.path.insert(0, str(CPP / "python"))  # the C ABI's ctypes declarations, shared with benchmarks/

import seesr_capi as capi  # noqa: E402
from seesr_capi import VERIFY_NEVER, SeeSRError, call, load_library  # noqa: E402

BUILD = CPP / "build"
STATUS = {
    "SEESR_OK": 0,
    "SEESR_ERROR_INVALID_ARGUMENT": 1,
    "SEESR_ERROR_BUNDLE": 2,
    "SEESR_ERROR_OPTION": 3,
    "SEESR_ERROR_IMAGE": 4,
    "SEESR_ERROR_ENGINE": 5,
    "SEESR_ERROR_CANCELLED": 6,
    "SEESR_ERROR_OUT_OF_MEMORY": 7,
    "SEESR_ERROR_NOT_IMPLEMENTED": 8,
    "SEESR_ERROR_INTERNAL": 9,
}


# What a failed configure names when a dependency is missing, and where that dependency comes from.
_DEPENDENCIES = {
    "nlohmann_json": "nlohmann-json3-dev (apt-get install nlohmann-json3-dev)",
    "UTF8PROC": "libutf8proc-dev (apt-get install libutf8proc-dev)",
    "OpenVINO not found": "OpenVINO (pip install openvino, or OpenVINO_DIR for a system install)",
}


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """runtime/cpp configured and built (incrementally) into runtime/cpp/build, against this Python's openvino."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ runtime needs {' and '.join(missing)} (apt-get install cmake g++)")
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(CPP),
            "-B",
            str(BUILD),
            "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
            f"-DSEESR_PYTHON={sys.executable}",
        ],
        capture_output=True,
        text=True,
    )
    if configure.returncode != 0:
        absent = [package for marker, package in _DEPENDENCIES.items() if marker in configure.stderr]
        if absent:
            pytest.skip(f"the C++ runtime needs {', '.join(absent)}")
        pytest.fail("configuring runtime/cpp failed:\n" + configure.stderr)
    jobs = os.environ.get("SEESR_CPP_JOBS", "2")
    build = subprocess.run(["cmake", "--build", str(BUILD), "-j", jobs], capture_output=True, text=True)
    assert build.returncode == 0, "building runtime/cpp failed:\n" + build.stdout[-6000:] + build.stderr[-6000:]
    return BUILD


# ---------------------------------------------------------------- the C ABI through ctypes


@pytest.fixture(scope="session")
def lib(cpp_build):
    return load_library(cpp_build / "libseesr.so")


def engine_options(lib, **fields):
    """The tests open bundles without hashing them (the tiny bundle is verified once per session)."""
    return capi.engine_options(lib, **{"verify": VERIFY_NEVER, **fields})


def open_pipeline(lib, bundle, **fields):
    return capi.open_pipeline(lib, bundle, **{"verify": VERIFY_NEVER, **fields})


@pytest.fixture
def pipeline(lib, runtime_bundle):
    handle = open_pipeline(lib, runtime_bundle)
    yield handle
    lib.seesr_pipeline_close(handle)


def test_versions_and_status_names(lib):
    from seesr_runtime import __version__

    assert lib.seesr_version().decode() == __version__
    assert lib.seesr_abi_version() == 1
    for name, value in STATUS.items():
        assert lib.seesr_status_name(value).decode() == name
    assert lib.seesr_status_name(99) == b"unknown status"


def test_bundle_queries(lib, pipeline, runtime_bundle):
    data = json.loads((Path(runtime_bundle) / "manifest.json").read_text())
    text, number = ctypes.c_char_p(), ctypes.c_int32()
    call(lib, "seesr_pipeline_bundle_name", pipeline, ctypes.byref(text))
    assert text.value.decode() == data["name"]
    call(lib, "seesr_pipeline_bundle_schema_version", pipeline, ctypes.byref(number))
    assert number.value == data["schema_version"]
    call(lib, "seesr_pipeline_bundle_exporter_version", pipeline, ctypes.byref(text))
    assert text.value.decode() == data["provenance"]["versions"]["seesr_export"]
    call(lib, "seesr_pipeline_options_json", pipeline, ctypes.byref(text))
    assert json.loads(text.value) == Manifest.load(runtime_bundle, verify="never").options()


def test_bad_arguments_are_errors_not_crashes(lib, pipeline, runtime_bundle):
    out = ctypes.c_void_p()
    with pytest.raises(SeeSRError) as null_path:
        call(lib, "seesr_pipeline_open", None, None, ctypes.byref(out))
    assert null_path.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert "bundle_path is NULL" in null_path.value.message

    short = engine_options(lib, struct_size=8)
    with pytest.raises(SeeSRError) as too_short:
        call(lib, "seesr_pipeline_open", str(runtime_bundle).encode(), ctypes.byref(short), ctypes.byref(out))
    assert too_short.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert "struct_size is 8" in too_short.value.message

    with pytest.raises(SeeSRError) as engine:
        open_pipeline(lib, runtime_bundle, engine=b"tensorflow")
    assert engine.value.status == STATUS["SEESR_ERROR_ENGINE"] and "'tensorflow'" in engine.value.message

    with pytest.raises(SeeSRError) as threads:
        open_pipeline(lib, runtime_bundle, threads=-2)
    assert threads.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"] and "got -2" in threads.value.message

    with pytest.raises(SeeSRError) as verify:
        open_pipeline(lib, runtime_bundle, verify=3)
    assert verify.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert "SEESR_VERIFY_AUTO, _ALWAYS or _NEVER, got 3" in verify.value.message

    image = (ctypes.c_uint8 * (16 * 16 * 3))()
    for args, status, words in [
        ((None, 16, 16, 48), "SEESR_ERROR_INVALID_ARGUMENT", "rgb is NULL"),
        ((image, 0, 16, 48), "SEESR_ERROR_IMAGE", "got 0x16"),
        ((image, 16, 16, 47), "SEESR_ERROR_IMAGE", "3 * width = 48 bytes, got 47"),
        ((image, 7, 16, 48), "SEESR_ERROR_IMAGE", "7x16 is too small (at least 8x8 pixels)"),
    ]:
        with pytest.raises(SeeSRError) as failed:
            call(lib, "seesr_upscale", pipeline, *args, None, ctypes.byref(out))
        assert (failed.value.status, words in failed.value.message) == (STATUS[status], True), failed.value.message
        assert out.value is None
    assert lib.seesr_last_error() == b"7x16 is too small (at least 8x8 pixels)"  # kept until the next call
    call(lib, "seesr_pipeline_bundle_name", pipeline, ctypes.byref(ctypes.c_char_p()))
    assert lib.seesr_last_error() == b""  # a success clears the thread's message


OPTION_CASES = [
    ("steps", 20),
    ("steps", 0),
    ("steps", 1001),
    ("steps", 2.5),
    ("steps", True),
    ("steps", "20"),
    ("guidance", 7),
    ("guidance", -0.5),
    ("guidance", float("nan")),
    ("guidance", float("inf")),
    ("guidance", 1e300),
    ("conditioning_scale", 0.0),
    ("color_fix", "wavelet"),
    ("color_fix", "sharpen"),
    ("color_fix", 3),
    ("start_point", "noise"),
    ("tiled_vae", False),
    ("tiled_vae", 1),
    ("prompt", "a 'quoted' \"cat\"\n"),
    ("prompt", 4.5),
    ("seed", -1),
    ("seed", 2**62),
    ("max_pixels", 63),
    ("latent_tile_overlap", 200),
    ("colour_fix", "adain"),
]


def set_option(lib, options, name: str, value) -> None:
    key = name.encode()
    if isinstance(value, bool):
        call(lib, "seesr_options_set_bool", options, key, int(value))
    elif isinstance(value, int):
        call(lib, "seesr_options_set_int", options, key, value)
    elif isinstance(value, float):
        call(lib, "seesr_options_set_float", options, key, value)
    else:
        call(lib, "seesr_options_set_string", options, key, value.encode())


@pytest.mark.parametrize("name,value", OPTION_CASES, ids=[f"{n}={v!r}" for n, v in OPTION_CASES])
def test_option_checks_match_python(lib, pipeline, name, value):
    """Each value is accepted or refused as seesr_runtime.options checks it, with the same message."""
    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", pipeline, ctypes.byref(options))
    try:
        try:
            option_table.check(name, value)
            expected = None
        except OptionError as refused:
            expected = str(refused)
        try:
            set_option(lib, options, name, value)
            got = None
        except SeeSRError as refused:
            assert refused.status == STATUS["SEESR_ERROR_OPTION"]
            got = refused.message
        assert got == expected
    finally:
        lib.seesr_options_free(options)


def test_strings_that_are_not_utf8_are_refused(lib, pipeline):
    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", pipeline, ctypes.byref(options))
    with pytest.raises(SeeSRError) as refused:
        call(lib, "seesr_options_set_string", options, b"prompt", b"caf\xc3")
    assert refused.value.status == STATUS["SEESR_ERROR_OPTION"]
    assert refused.value.message == "prompt is not valid UTF-8 (byte 3)"
    lib.seesr_options_free(options)


def test_a_tokenizer_disagreeing_with_the_manifest_is_refused(lib, runtime_bundle, tmp_path):
    bundle = _bundle_copy(Path(runtime_bundle), tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    data["text"]["max_length"] = 64
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, bundle)
    assert refused.value.status == STATUS["SEESR_ERROR_BUNDLE"]
    assert refused.value.message == f"{bundle}: tokenizer.json gives 77 ids, the manifest's text.max_length is 64"


@pytest.mark.parametrize(
    "edit, words",
    [
        (
            lambda options: options.remove(next(o for o in options if o["name"] == "guidance")),
            "has no option 'guidance'",
        ),
        (lambda options: next(o for o in options if o["name"] == "steps").update(type="float"), "gives option 'steps'"),
    ],
    ids=["missing", "wrong-type"],
)
def test_an_options_table_without_what_the_pipeline_reads_is_refused_on_open(
    lib, runtime_bundle, tmp_path, edit, words
):
    """The options an upscale reads are checked against the bundle's table at open, not found missing halfway."""
    bundle = _bundle_copy(Path(runtime_bundle), tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data["pipeline"]["options"])
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, bundle)
    assert refused.value.status == STATUS["SEESR_ERROR_BUNDLE"]
    assert refused.value.message.startswith(f"{bundle}: pipeline.options in manifest.json {words}")


def test_rules_between_options_are_checked_at_the_call(lib, pipeline):
    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", pipeline, ctypes.byref(options))
    set_option(lib, options, "latent_tile_overlap", 96)  # fine alone; not with the default tile of 96
    image = (ctypes.c_uint8 * (16 * 16 * 3))()
    with pytest.raises(SeeSRError) as refused:
        call(lib, "seesr_upscale", pipeline, image, 16, 16, 48, options, ctypes.byref(ctypes.c_void_p()))
    assert refused.value.status == STATUS["SEESR_ERROR_OPTION"]
    with pytest.raises(OptionError) as python:
        option_table.resolve({"latent_tile_overlap": 96})
    assert refused.value.message == str(python.value)
    call(lib, "seesr_options_unset", options, b"latent_tile_overlap")
    for name, value in (("steps", 1), ("process_size", 64)):  # keep the upscale that now runs small
        set_option(lib, options, name, value)
    out = ctypes.c_void_p()
    call(lib, "seesr_upscale", pipeline, image, 16, 16, 48, options, ctypes.byref(out))
    assert (lib.seesr_image_width(out), lib.seesr_image_height(out)) == (64, 64)
    lib.seesr_image_free(out)
    lib.seesr_options_free(options)


# ---------------------------------------------------------------- the C++ wrapper and the C example


def test_cpp_wrapper(cpp_build, runtime_bundle):
    run = subprocess.run([cpp_build / "seesr_wrapper_test", str(runtime_bundle)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") == 16, run.stdout


def test_c_example(cpp_build, runtime_bundle, tmp_path):
    """The C example upscales its 40x32 image in 2 steps (the bundle's other defaults) and writes a 160x128 PPM."""
    out = tmp_path / "out.ppm"
    run = subprocess.run(
        [cpp_build / "seesr_example_c", str(runtime_bundle), str(out), "2"], capture_output=True, text=True
    )
    from seesr_runtime import __version__

    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"seesr {__version__} (ABI 1, header ABI 1)\nbundle ")
    assert "\n160x128, tags: " in run.stdout
    assert run.stderr == "step 1/2\nstep 2/2\n"
    header = b"P6\n160 128\n255\n"
    written = out.read_bytes()
    assert written.startswith(header) and len(written) == len(header) + 160 * 128 * 3


def _upscale_png_command(cpp_build):
    command = cpp_build / "seesr-upscale-cpp"
    if not command.exists():
        pytest.skip("seesr-upscale-cpp was not built: libpng is missing (apt-get install libpng-dev)")
    return command


def test_upscale_png_command(cpp_build, runtime_bundle, tmp_path):
    """seesr-upscale-cpp IN.png OUT.png --bundle DIR: a x4 PNG, the same bytes for the same seed."""
    command = _upscale_png_command(cpp_build)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    outputs = []
    for name in ("a.png", "b.png"):
        run = subprocess.run(
            [command, tmp_path / "in.png", tmp_path / name, "--bundle", runtime_bundle, "--steps", "1", "--seed", "3"],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{tmp_path / 'in.png'} -> {tmp_path / name} (128x96); tags: ")
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert outputs[0].shape == (96, 128, 3) and np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize(
    "arguments, code, message",
    [
        (["in.png"], 64, "usage: seesr-upscale-cpp IN.png OUT.png --bundle DIR"),
        (["in.png", "out.png", "--bundle", "BUNDLE", "--steps", "x"], 64, "--steps must be a whole number, got 'x'"),
        (["in.png", "out.png", "--bundle", "BUNDLE", "--colour", "red"], 64, "unknown option --colour"),
        (
            ["in.png", "out.png", "--bundle", "BUNDLE", "--verify", "sometimes"],
            64,
            "--verify must be auto, always or never, got 'sometimes'",
        ),
        (["not.png", "out.png", "--bundle", "BUNDLE"], 65, "not.png: not a readable PNG"),
        (["in.png", "out.png", "--bundle", "missing"], 2, "missing: not a SeeSR bundle (no manifest.json)"),
        (["in.png", "out.png", "--bundle", "BUNDLE", "--steps", "0"], 3, "steps must be in [1, 999], got 0"),
        (
            ["in.png", "out.png", "--bundle", "BUNDLE", "--tiled-vae-spill-dir", "spill"],
            1,
            "tiled_vae_spill_dir 'spill' does not exist; expected an existing folder",
        ),
    ],
    ids=[
        "usage",
        "steps-not-a-number",
        "unknown-option",
        "bad-verify",
        "not-a-png",
        "missing-bundle",
        "steps-out-of-range",
        "missing-spill-dir",
    ],
)
def test_upscale_png_command_refusals(cpp_build, runtime_bundle, tmp_path, arguments, code, message):
    command = _upscale_png_command(cpp_build)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "not.png").write_text("plain text")
    argv = [str(runtime_bundle) if a == "BUNDLE" else str(tmp_path / a) if a.endswith(".png") else a for a in arguments]
    run = subprocess.run([command, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == code, run.stderr
    assert message in run.stderr and len(run.stderr.splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- memory: growth across calls, valgrind


def _heap_reports(stdout: str) -> dict:
    """calls -> heap bytes in use, from the memory test's "heap after N calls: BYTES" lines."""
    reports = {}
    for line in stdout.splitlines():
        calls, heap = line.removeprefix("heap after ").split(" calls: ")
        reports[int(calls)] = int(heap)
    return reports


def test_memory_does_not_grow_with_the_number_of_calls(cpp_build, runtime_bundle):
    """20 upscales (1 step, 16x16 -> 64x64) hold the heap of 2 within 64 KiB (measured: 2.6 KiB, the same after
    60 calls, so nothing per call): images, options and the per-call tensors are all given back."""
    run = subprocess.run(
        [cpp_build / "seesr_memory_test", str(runtime_bundle), "20"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    heap = _heap_reports(run.stdout)
    assert set(heap) == {2, 20}
    assert heap[20] - heap[2] < 64 * 1024, heap


@pytest.mark.slow
@pytest.mark.valgrind
def test_no_invalid_accesses_or_leaks_under_valgrind(cpp_build, runtime_bundle):
    """One upscale, the pipeline opened and closed, under memcheck: no invalid read or write and nothing
    definitely or indirectly lost, with only runtime/cpp/tests/valgrind.supp suppressed (glibc's loader, outside
    libseesr). Uninitialised-value tracking is off to save time; OpenVINO compiling its models at memcheck's pace
    still takes most of its 5 CPU minutes (8 on a busy 2-core machine)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    command = [
        valgrind,
        "--error-exitcode=99",
        "--undef-value-errors=no",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect",
        "--errors-for-leak-kinds=definite,indirect",
        f"--suppressions={CPP / 'tests' / 'valgrind.supp'}",
        "--num-callers=40",
        str(cpp_build / "seesr_memory_test"),
        str(runtime_bundle),
        "1",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-20000:]
    assert "ERROR SUMMARY: 0 errors" in run.stderr
    nothing_lost = "definitely lost: 0 bytes" in run.stderr and "indirectly lost: 0 bytes" in run.stderr
    assert nothing_lost or "no leaks are possible" in run.stderr, run.stderr[-3000:]
    assert set(_heap_reports(run.stdout)) == {1}  # the upscale ran to its end


# ---------------------------------------------------------------- sha256 verification of the bundle's files

VERIFY_AUTO, VERIFY_ALWAYS = 0, 1


def test_sha256_matches_hashlib(cpp_build, tmp_path):
    """Lengths on either side of SHA-256's 64-byte blocks and 56-byte padding limit, and past the 4 MiB read chunk."""
    import hashlib

    rng = np.random.default_rng(11)
    files = []
    for size in (0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, (1 << 22) + 77):
        files.append(tmp_path / f"{size}.bin")
        files[-1].write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    answer = probe(cpp_build, "sha256", *map(str, files))
    assert answer["sha256"] == [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]
    assert hashlib.sha256(b"").hexdigest() == answer["sha256"][0]


def _whole_bundle_copy(runtime_bundle, folder: Path) -> Path:
    """Every file of the bundle in `folder`/bundle, without its verification stamp."""
    copy = folder / "bundle"
    shutil.copytree(runtime_bundle, copy, ignore=shutil.ignore_patterns(".seesr-verified*"))
    return copy


@pytest.mark.parametrize("mode", [VERIFY_AUTO, VERIFY_ALWAYS], ids=["auto", "always"])
def test_a_damaged_graph_is_refused_on_open(lib, runtime_bundle, tmp_path, monkeypatch, mode):
    """One flipped byte in a graph: seesr_pipeline_open refuses the bundle, naming it and the file, as the
    Python runtime does (same message)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _whole_bundle_copy(runtime_bundle, tmp_path)
    graph = bundle / "onnx" / "fp32" / "unet.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, bundle, verify=mode)
    assert refused.value.status == STATUS["SEESR_ERROR_BUNDLE"]
    assert refused.value.message.startswith(f"{bundle}: bundle files do not match the manifest")
    assert "sha256 mismatch for onnx/fp32/unet.onnx" in refused.value.message
    with pytest.raises(BundleError) as python:
        Manifest.load(bundle, verify="always")
    assert refused.value.message == str(python.value)


def test_a_missing_file_is_refused_on_open(lib, runtime_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _whole_bundle_copy(runtime_bundle, tmp_path)
    (bundle / "negative_prompt_embeds.npy").unlink()
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, bundle, verify=VERIFY_ALWAYS)
    assert refused.value.status == STATUS["SEESR_ERROR_BUNDLE"]
    assert "\n  missing negative_prompt_embeds.npy" in refused.value.message


def test_verification_stamp_is_shared_with_the_python_runtime(lib, cpp_build, runtime_bundle, tmp_path, monkeypatch):
    """Mode "auto" hashes every file once, stamps them (umask permissions), then trusts the stamp; the Python runtime
    trusts the C++ stamp and the reverse; a file rewritten later is hashed again, and refused when altered."""
    import time

    from seesr_runtime.verification import STAMP, verify_bundle

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _whole_bundle_copy(runtime_bundle, tmp_path)
    pinned = sorted(Manifest.load(bundle, verify="never").all_files())
    time.sleep(1.1)  # files younger than a second are hashed but not stamped (a same-tick change could hide)
    first = probe(cpp_build, "verify", str(bundle), "auto")
    assert (first["hashed"], first["trusted"], first["stamp"]) == (pinned, [], str(bundle / STAMP))
    assert (bundle / STAMP).stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert probe(cpp_build, "verify", str(bundle), "auto")["trusted"] == pinned
    assert probe(cpp_build, "verify", str(bundle), "always")["hashed"] == pinned
    python = verify_bundle(Manifest.load(bundle, verify="never"), "auto")
    assert (python.hashed, sorted(python.trusted)) == ([], pinned)

    (bundle / STAMP).unlink()
    verify_bundle(Manifest.load(bundle, verify="never"), "auto")  # the Python runtime's stamp, read by C++
    assert probe(cpp_build, "verify", str(bundle), "auto")["hashed"] == []
    lib.seesr_pipeline_close(open_pipeline(lib, bundle, verify=VERIFY_AUTO))

    embeds = bundle / "negative_prompt_embeds.npy"
    embeds.write_bytes(embeds.read_bytes())  # same bytes, a new ctime: hashed again, still accepted
    assert probe(cpp_build, "verify", str(bundle), "auto")["hashed"] == ["negative_prompt_embeds.npy"]
    embeds.write_bytes(embeds.read_bytes()[:-1] + b"\x01")
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, bundle, verify=VERIFY_AUTO)
    assert "sha256 mismatch for negative_prompt_embeds.npy" in refused.value.message


def test_the_stamp_goes_to_the_cache_when_the_bundle_is_read_only(cpp_build, runtime_bundle, tmp_path, monkeypatch):
    import hashlib
    import time

    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder, so the fallback to the cache cannot be shown")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _whole_bundle_copy(runtime_bundle, tmp_path)
    time.sleep(1.1)
    bundle.chmod(0o555)
    try:
        answer = probe(cpp_build, "verify", str(bundle), "auto")
    finally:
        bundle.chmod(0o755)
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:32]
    assert answer["stamp"] == str(tmp_path / "cache" / "seesr" / "verified" / f"{key}.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- the manifest: the Python runtime's refusals


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value

    return edit


def _delete(path: str):
    def edit(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        del data[last]

    return edit


def _add_graph_file(rel: str):
    def edit(data):
        data["networks"]["unet"]["files"]["fp32"]["sha256"][rel] = "0" * 64

    return edit


MANIFEST_EDITS = {
    "unchanged": lambda data: None,
    "schema-2": _set("schema_version", 2),
    "schema-string": _set("schema_version", "1"),
    "schema-float": _set("schema_version", 1.0),
    "format": _set("format", "other-bundle"),
    "no-networks": _delete("networks"),
    "no-provenance": _delete("provenance"),
    "pipeline-list": _set("pipeline", []),
    "unknown-network": _set("networks.upsampler", {"spec": {}}),
    "network-not-object": _set("networks.unet", 3),
    "unknown-precision": lambda data: data["networks"]["dape"]["files"].update(int4={"onnx": "a", "sha256": {}}),
    "graph-without-onnx": _delete("networks.dape.files.fp32.onnx"),
    "tiled-not-object": _set("networks.vae_decoder.tiled", None),
    "segments-not-objects": _set("networks.vae_decoder.tiled", {"segments": [1, 2]}),
    "engines-not-objects": _set("networks.unet.engines", {"fp16": "unet.plan"}),
    "engine-without-file": _set("networks.unet.engines", {"fp16": {}}),
    "files-list": _set("files", ["tokenizer.json"]),
    "thresholds-short": lambda data: data["tagger"]["thresholds"].pop(),
    "tags-not-list": _set("tagger.tags", "cat"),
    "options-not-list": _set("pipeline.options", {}),
    "option-without-type": lambda data: data["pipeline"]["options"][0].pop("type"),
    "option-without-name": lambda data: data["pipeline"]["options"][1].pop("name"),
    "tokenizer-absolute": _set("text.tokenizer", "/etc/passwd"),
    "tokenizer-drive": _set("text.tokenizer", "C:tokenizer.json"),
    "tokenizer-backslash-root": _set("text.tokenizer", "\\tokenizer.json"),
    "tokenizer-climbs": _set("text.tokenizer", "../tokenizer.json"),
    "tokenizer-climbs-inside": _set("text.tokenizer", "onnx/../tokenizer.json"),
    "tokenizer-deep-climb": _set("text.tokenizer", "onnx/../../elsewhere/tokenizer.json"),
    "tokenizer-dot": _set("text.tokenizer", "."),
    "tokenizer-empty": _set("text.tokenizer", ""),
    "tokenizer-number": _set("text.tokenizer", 7),
    "tokenizer-missing": _delete("text.tokenizer"),
    "embeds-through-link": _set("text.negative_prompt_embeds", "outside/embeds.npy"),
    "file-through-link": lambda data: data["files"].update({"outside/x.bin": "0" * 64}),
    "graph-file-climbs": _add_graph_file("../x.onnx"),
    "external-data-absolute": _set("networks.unet.files.fp32.external_data", "/data/unet.bin"),
    "engine-climbs": _set("networks.unet.engines", {"fp16": {"file": "../unet.plan"}}),
}


def _bundle_copy(source: Path, folder: Path) -> Path:
    """The bundle's manifest and small files in `folder`, with a link `outside` leading out of it."""
    folder.mkdir()
    for name in ("manifest.json", "tokenizer.json", "negative_prompt_embeds.npy"):
        shutil.copy(source / name, folder / name)
    (folder / "onnx").mkdir()
    (folder / "outside").symlink_to(folder.parent, target_is_directory=True)
    return folder


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_manifest_refusals_match_python(cpp_build, runtime_bundle, tmp_path, edit):
    """Each edited manifest is accepted or refused by the C++ reader as by Manifest.load, in the same words."""
    bundle = _bundle_copy(Path(runtime_bundle), tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    MANIFEST_EDITS[edit](data)
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert_same_verdict(cpp_build, bundle)


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"], ids=["broken", "array", "empty", "not-utf8"]
)
def test_unreadable_manifests_are_refused(cpp_build, tmp_path, content):
    (tmp_path / "manifest.json").write_bytes(content)
    answer = probe(cpp_build, "manifest", str(tmp_path))
    assert answer["status"] == STATUS["SEESR_ERROR_BUNDLE"]
    with pytest.raises(BundleError):
        Manifest.load(tmp_path, verify="never")
    assert answer["message"].startswith(str(tmp_path / "manifest.json") + ": ")


def test_a_folder_without_manifest_is_refused(cpp_build, tmp_path):
    answer = probe(cpp_build, "manifest", str(tmp_path))
    assert answer == {
        "ok": False,
        "status": STATUS["SEESR_ERROR_BUNDLE"],
        "message": f"{tmp_path}: not a SeeSR bundle (no manifest.json)",
    }


def probe(cpp_build: Path, *args: str) -> dict:
    run = subprocess.run([cpp_build / "seesr_probe", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def assert_same_verdict(cpp_build: Path, bundle: Path) -> None:
    answer = probe(cpp_build, "manifest", str(bundle))
    try:
        Manifest.load(bundle, verify="never")
        python = None
    except BundleError as refused:
        python = str(refused)
    if python is None:
        assert answer["ok"], answer
    else:
        assert (answer.get("status"), answer.get("message")) == (STATUS["SEESR_ERROR_BUNDLE"], python)


# ---------------------------------------------------------------- the CLIP tokenizer: the Python runtime's ids

# Material for generated prompts: what SeeSR prompts hold, and what trips tokenizers up.
_WORDS = ["cat", "dog", "clean", "high-resolution", "8k", "Hello", "WORLD", "photo", "it's", "they'LL", "we'd"]
_PUNCTUATION = list(",.;:!?'\"()[]{}<>|/\\@#$%^&*-_=+~`") + ["...", "!!", "?!", "--", "''s", "<|", "|>"]
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0085", "\u2009", "\u200b", "\ufeff"]
_UNICODE = [
    "café",
    "cafe\u0301",  # decomposed: NFC composes it
    "naïve",
    "İstanbul",  # lowercases to two code points
    "ǅungla",  # title case
    "ΣΊΣΥΦΟΣ",
    "Ελληνικά",
    "Русский",
    "日本語の写真",
    "한국어",
    "\u1100\u1161\u11a8",  # conjoining jamo: NFC composes a syllable
    "العربية",
    "עברית",
    "हिन्दी",
    "ไทย",
    "😀🐱‍👤",
    "👍🏽",
    "ﬁne",
    "①②③",
    "٣٤",
    "Ⅻ",
    "½",
    "x\u0300\u0301",
    "Åström",
    "ß",
    "ŉ",
    "\u00ad",
]
_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|STARTOFTEXT|>", "<|endoftext", "!"]


def generated_prompts(count: int, seed: int = 0) -> list[str]:
    """Prompts mixing words, numbers, punctuation, odd whitespace, many scripts and the special tokens; some
    empty, some far past 77 tokens, some one very long word."""
    import random

    rng = random.Random(seed)
    pools = [_WORDS, _PUNCTUATION, _SPACES, _UNICODE, _SPECIAL]
    prompts = ["", " ", "\n\t", "!", "a" * 500, "🐱" * 60]
    while len(prompts) < count:
        length = rng.choice([1, 2, 4, 8, 16, 40, 120])
        parts = []
        for _ in range(length):
            pool = rng.choices(pools, weights=[6, 3, 3, 3, 1])[0]
            part = rng.choice(pool)
            if rng.random() < 0.1:
                part = str(rng.randint(0, 10 ** rng.randint(1, 9)))
            elif rng.random() < 0.05:
                part = chr(rng.randint(0xA0, 0x2FFF))  # a random code point from many blocks
            parts.append(part)
            if rng.random() < 0.6:
                parts.append(rng.choice(_SPACES[:2]))
        prompts.append("".join(parts))
    return prompts


def test_tokenizer_matches_python_on_generated_prompts(cpp_build, runtime_bundle):
    """Ids equal to seesr_runtime.text's on 3000 generated prompts (Unicode, punctuation, long, empty)."""
    prompts = generated_prompts(3000)
    expected = _assert_tokenized_like_python(cpp_build, runtime_bundle, prompts)
    assert any(ids[-1] != 0 for ids in expected), "no generated prompt was long enough to be truncated"


def _assert_tokenized_like_python(cpp_build, runtime_bundle, prompts: list[str]) -> list[list[int]]:
    """The probe's ids for ``prompts`` equal the Python runtime's (``PromptEncoder.token_ids``); returns them."""
    from seesr_runtime.text import PromptEncoder

    manifest = Manifest.load(runtime_bundle, verify="never")
    encoder = PromptEncoder(manifest, backend=None)  # token_ids needs no engine
    expected = [encoder.token_ids(prompt)[0].tolist() for prompt in prompts]
    _assert_native_ids(cpp_build, manifest.file(manifest.data["text"]["tokenizer"]), prompts, expected)
    return expected


def _assert_native_ids(cpp_build, tokenizer: Path, prompts: list[str], expected: list[list[int]]) -> None:
    run = subprocess.run(
        [cpp_build / "seesr_probe", "tokenize", str(tokenizer)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["ok"], answer
    differing = [(ascii(p), want, have) for p, want, have in zip(prompts, expected, answer["ids"]) if want != have]
    assert not differing, f"{len(differing)} of {len(prompts)} differ; first: {differing[0]}"


def random_code_point_prompts(count: int, seed: int = 0) -> list[str]:
    """Short strings of random code points from all planes: those assigned by Python's Unicode tables
    (14.0), leaving out combining marks, whose ordering the tokenizers package's normalisation tables (older)
    and utf8proc's (15.0) can disagree on; nor do unassigned code points classify alike in both."""
    import random
    import unicodedata

    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        chars = []
        while len(chars) < rng.randint(1, 12):
            c = chr(rng.randint(0x20, 0x10FFFF) if rng.random() < 0.3 else rng.randint(0x20, 0x3000))
            if unicodedata.category(c) not in ("Cn", "Cs", "Co") and unicodedata.combining(c) == 0:
                chars.append(c)
        prompts.append("".join(chars))
    return prompts


def test_tokenizer_matches_python_on_random_code_points(cpp_build, runtime_bundle):
    _assert_tokenized_like_python(cpp_build, runtime_bundle, random_code_point_prompts(5000))


# SD2-base's tokenizer folder as released (seesr_export/testing/released.py): bos, eos and unk as AddedToken
# objects with "normalized": true (so the tokenizer.json `seesr-export build` writes from it matches them after
# normalisation: "<|EndOfText|>" is EOS), and special_tokens_map.json's pad token "!", which overrides
# tokenizer_config.json's.


@pytest.fixture(scope="module")
def released_tokenizer_json(tmp_path_factory) -> dict:
    """tokenizer.json as `seesr-export build` writes it from the fixture's vocabulary and merges with the
    released tokenizer_config.json and special_tokens_map.json."""
    pytest.importorskip("torch", reason="tokenizer.json is written by seesr_export, which needs torch")
    from seesr_export.manifest_writer import write_tokenizer_json
    from seesr_export.testing.fixtures import write_clip_tokenizer

    sd2 = tmp_path_factory.mktemp("released-sd2")
    write_clip_tokenizer(sd2 / "tokenizer", layout="released")
    write_tokenizer_json(sd2, sd2 / "tokenizer.json")
    return json.loads((sd2 / "tokenizer.json").read_text())


def test_the_released_tokenizer_folder_gives_normalized_special_tokens(released_tokenizer_json):
    """What the native tokenizer must read: BOS and EOS matched after normalisation, the pad "!" in the raw text."""
    flags = {t["content"]: (t["id"], t["normalized"], t["special"]) for t in released_tokenizer_json["added_tokens"]}
    assert flags == {
        "!": (0, False, True),
        "<|startoftext|>": (49406, True, True),
        "<|endoftext|>": (49407, True, True),
    }


def _random_case(text: str, rng) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text)


# Around the special tokens: whitespace the normalizer folds to one space, letters and punctuation the
# pre-tokenizer would join to them, a mark NFC composes with their "<" or ">" (U+0338 turns ">" into "≯", so the
# token no longer matches), characters NFC changes or lowercasing lengthens, and fullwidth look-alikes.
_AROUND_SPECIAL = (
    _SPACES
    + ["a", "b", "Cat", "8k", "!", "!!", "..", "<", ">", "|", "<|", "|>"]
    + ["\u0338", "e\u0301", "\u212b", "\u2126", "\u212a", "İ", "\u00ad", "＜", "＞"]
)


def special_token_prompts(count: int, contents: tuple[str, ...], seed: int = 0) -> list[str]:
    """Prompts that spell the added tokens ``contents`` in mixed case, repeated, with a character dropped, glued
    to letters and punctuation, between odd whitespace and NFC-changing characters; some truncated."""
    import random

    rng = random.Random(seed)
    prompts = [
        "<|STARTOFTEXT|>",
        "<|EndOfText|>",
        "a<|endoftext|>b",
        "a<|EndOfText|>b",
        "  <|endoftext|>  ",
        "\t<|EndOfText|>\n",
        "\u3000<|STARTOFTEXT|>\u2028",
        "<|endoftext|><|ENDOFTEXT|><|EndOfText|>",
        "!!<|ENDOFTEXT|>!!",
        "..<|ENDOFTEXT|>..",
        "<|endoftext|>\u0338",
        "<\u0338|endoftext|>",
        "<|endof\u00adtext|>",
        "<|end of text|>",
        "<|EndOfText|>" * 80,
        "cat " * 74 + "<|EndOfText|>",
        "cat " * 75 + "<|EndOfText|>",
    ]
    while len(prompts) < count:
        parts = []
        for _ in range(rng.choice([1, 2, 4, 8, 30])):
            token = rng.choice(contents)
            if rng.random() < 0.1:
                cut = rng.randrange(len(token))
                token = token[:cut] + token[cut + 1 :]
            parts += rng.choices(_AROUND_SPECIAL, k=rng.randint(0, 2))
            parts.append(_random_case(token, rng) if rng.random() < 0.7 else token)
        parts += rng.choices(_AROUND_SPECIAL, k=rng.randint(0, 2))
        prompts.append("".join(parts))
    return prompts


def _unnormalized(content: str):
    def edit(data: dict) -> None:
        for token in data["added_tokens"]:
            if token["content"] == content:
                token["normalized"] = False

    return edit


def _added(content: str, normalized: bool):
    """One more added token, of the next id (the one the tokenizers package gives it whatever the file says)."""

    def edit(data: dict) -> None:
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "special": False}
        token = {"id": len(data["model"]["vocab"]), "content": content, "normalized": normalized, **flags}
        data["added_tokens"].append(token)

    return edit


# The released layout, and variants mixing unnormalized and normalized added tokens: each with the extra texts its
# prompts spell and one prompt whose ids show that the case matters (BOS 49406, EOS 49407, an added token 49408).
_ADDED_TOKEN_LAYOUTS = {
    "released": (lambda data: None, (), ("<|EndOfText|>", [49406, 49407, 49407, 0])),
    "bos-unnormalized": (_unnormalized("<|startoftext|>"), (), ("<|STARTOFTEXT|>", [49406, 27, 347, 1486])),
    "normalized-word": (_added("<|Tag  Line|>", True), ("<|Tag  Line|>",), ("<|TAG\tLINE|>", [49406, 49408, 49407])),
    "unnormalized-word": (_added("Tag", False), ("Tag", "tag"), ("Tag TAG", [49406, 49408, 83, 525, 49407])),
}


@pytest.mark.parametrize("layout", _ADDED_TOKEN_LAYOUTS)
def test_tokenizer_matches_tokenizers_on_normalized_added_tokens(cpp_build, released_tokenizer_json, tmp_path, layout):
    """Ids equal to the tokenizers package's, on the generated prompts and on prompts built around the added tokens
    in other cases and spacings."""
    from tokenizers import Tokenizer

    edit, extra, (sample, sample_ids) = _ADDED_TOKEN_LAYOUTS[layout]
    data = json.loads(json.dumps(released_tokenizer_json))
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    prompts = [
        sample,
        *generated_prompts(1500),
        *special_token_prompts(1500, ("<|startoftext|>", "<|endoftext|>", "!", *extra)),
    ]
    expected = [encoding.ids for encoding in Tokenizer.from_file(str(path)).encode_batch(prompts)]
    assert expected[0][: len(sample_ids)] == sample_ids
    _assert_native_ids(cpp_build, path, prompts, expected)


def _two_normalizing_alike(data: dict) -> None:
    """EOS normalized, and a second normalized added token that lowercases to it."""
    eos = data["added_tokens"][2]
    eos["normalized"] = True
    data["added_tokens"].append({**eos, "content": "<|EndOfText|>", "id": 9})


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t["normalizer"]["normalizers"].pop(), "normalizer"),
        (lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\S+"), "pre_tokenizer"),
        (lambda t: t["model"].update(dropout=0.1), "model"),
        (lambda t: t.update(truncation=None), "truncation"),
        (lambda t: t["padding"].update(strategy="BatchLongest"), "padding"),
        (lambda t: t["added_tokens"][0].update(lstrip=True), '"lstrip" is true'),
        (lambda t: t["added_tokens"][1].update(rstrip=True), '"rstrip" is true'),
        (lambda t: t["added_tokens"][2].update(single_word=True), '"single_word" is true'),
        (lambda t: t["added_tokens"][0].update(normalized=1), '"normalized" is not true or false'),
        (lambda t: t["added_tokens"][0].pop("lstrip"), '"lstrip" is not true or false'),
        (lambda t: t["added_tokens"][0].update(id=-1), "no content or no id"),
        (_two_normalizing_alike, "normalizes to the same text as the one with id 49407"),
        (lambda t: t["model"]["merges"].append(["zzzq", "x"]), "merge part 'zzzq' is not in the vocabulary"),
    ],
    ids=[
        "normalizer",
        "pattern",
        "dropout",
        "no-truncation",
        "padding",
        "lstrip",
        "rstrip",
        "single-word",
        "normalized-not-boolean",
        "lstrip-missing",
        "negative-id",
        "same-normalized-text",
        "merge-unknown",
    ],
)
def test_other_tokenizer_layouts_are_refused(cpp_build, runtime_bundle, tmp_path, edit, words):
    data = json.loads((Path(runtime_bundle) / "tokenizer.json").read_text())
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    run = subprocess.run([cpp_build / "seesr_probe", "tokenize", str(path)], input="[]", capture_output=True, text=True)
    answer = json.loads(run.stdout)
    assert answer["status"] == STATUS["SEESR_ERROR_BUNDLE"] and words in answer["message"], answer
    assert answer["message"].startswith(f"{path}: ")


# ---------------------------------------------------------------- the DDPM scheduler: seesr_runtime.scheduler's numbers


def _scheduler_configs(runtime_bundle) -> dict:
    import numpy as np

    manifest = Manifest.load(runtime_bundle, verify="never")
    betas = np.random.default_rng(3).uniform(1e-4, 2e-2, 1000).astype(np.float32)
    return {
        "bundle": {k: v for k, v in manifest.data["pipeline"]["scheduler"].items() if k != "type"},
        "trailing": {"timestep_spacing": "trailing"},
        "linspace-scaled": {
            "timestep_spacing": "linspace",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        },
        "trained-clipped": {"trained_betas": betas.tolist(), "clip_sample_range": 0.5, "steps_offset": 2},
        "short-trailing": {"num_train_timesteps": 7, "timestep_spacing": "trailing", "beta_end": 0.3},
    }


def _probe_json(cpp_build: Path, command: str, request: dict) -> dict:
    run = subprocess.run(
        [cpp_build / "seesr_probe", command], input=json.dumps(request), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("name", ["bundle", "trailing", "linspace-scaled", "trained-clipped", "short-trailing"])
def test_scheduler_timesteps_match_python(cpp_build, runtime_bundle, name):
    """alphas_cumprod bit for bit, and the timesteps of every step count, as seesr_runtime.scheduler has them."""
    import numpy as np

    from seesr_runtime.errors import OptionError
    from seesr_runtime.scheduler import DDPMScheduler

    config = _scheduler_configs(runtime_bundle)[name]
    python = DDPMScheduler(config)
    n = python.config.num_train_timesteps
    answer = _probe_json(cpp_build, "timesteps", {"config": config, "steps": list(range(1, n + 1)) + [0, n + 1]})
    assert np.array_equal(np.asarray(answer["alphas_cumprod"], dtype=np.float32), python.alphas_cumprod)
    *counted, zero, too_many = answer["timesteps"]
    for steps, got in zip(range(1, n + 1), counted):
        try:
            expected = python.set_timesteps(steps).tolist()
        except OptionError as refused:  # past the schedule: both refuse, in the same words
            assert got == {"status": STATUS["SEESR_ERROR_OPTION"], "message": str(refused)}, steps
        else:
            assert got == expected, steps
    for refused, steps in ((zero, 0), (too_many, n + 1)):
        assert refused == {"status": STATUS["SEESR_ERROR_OPTION"], "message": f"steps must be in 1..{n}, got {steps}"}


@pytest.mark.parametrize("steps", [1, 3, 20, 50])
@pytest.mark.parametrize("name", ["bundle", "trailing", "linspace-scaled", "trained-clipped"])
def test_scheduler_steps_match_python(cpp_build, runtime_bundle, name, steps):
    """add_noise and every step x_t -> x_{t-1}, same eps and noise, equal to seesr_runtime.scheduler's float32."""
    import numpy as np

    from seesr_runtime.scheduler import DDPMScheduler

    config = _scheduler_configs(runtime_bundle)[name]
    rng = np.random.default_rng(steps)
    shape = (1, 4, 6, 5)
    sample = rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal((steps, *shape), dtype=np.float32)
    noise = rng.standard_normal((steps, *shape), dtype=np.float32)
    answer = _probe_json(
        cpp_build,
        "sample",
        {
            "config": config,
            "steps": steps,
            "sample": sample.ravel().tolist(),
            "eps": eps.reshape(steps, -1).tolist(),
            "noise": noise.reshape(steps, -1).tolist(),
        },
    )
    python = DDPMScheduler(config)
    timesteps = python.set_timesteps(steps)
    noised = np.asarray(answer["noised"], dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(noised, python.add_noise(sample, noise[0], int(timesteps[0])))
    latents = sample
    for i, t in enumerate(timesteps.tolist()):
        latents = python.step(eps[i], t, latents, noise[i])
        got = np.asarray(answer["samples"][i], dtype=np.float32).reshape(shape)
        np.testing.assert_array_equal(got, latents, err_msg=f"step {i} (t={t})")


# ---------------------------------------------------------------- the OpenVINO engine: the Python backend's outputs


def _run_network(cpp_build: Path, bundle, network: str, feeds: dict, folder: Path, **settings) -> list:
    """Outputs of `network` for `feeds` (name -> array) from the C++ engine, through files in `folder`."""
    import numpy as np

    folder.mkdir(exist_ok=True)
    described = []
    for name, value in feeds.items():
        path = folder / f"feed-{name}.bin"
        np.ascontiguousarray(value).tofile(path)
        described.append({"name": name, "dtype": str(value.dtype), "shape": list(value.shape), "file": str(path)})
    request = {"threads": 1, **settings, "feeds": described, "out": str(folder)}
    run = subprocess.run(
        [cpp_build / "seesr_probe", "run", str(bundle), network],
        input=json.dumps(request),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    if not answer["ok"]:
        raise SeeSRError(answer["status"], answer["message"])
    return [np.fromfile(o["file"], dtype=np.float32).reshape(o["shape"]) for o in answer["outputs"]]


def _network_feeds(manifest: Manifest, network: str):
    import numpy as np

    from seesr_runtime.text import PromptEncoder

    rng = np.random.default_rng(5)
    dims = manifest.dims
    if network == "text_encoder":
        return {"input_ids": PromptEncoder(manifest, backend=None).token_ids("a cat on a mat, clean, 8k")}
    if network == "vae_decoder":
        return {manifest.spec(network).input_names[0]: rng.standard_normal((1, 4, 8, 6), dtype=np.float32)}
    h, w = 8, 8
    return {  # controlnet: a guided batch of two, and the 0-d conditioning scale
        "sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
        "timestep": np.full((2,), 999, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, dims.text_tokens, dims.text_dim), dtype=np.float32),
        "image_embeds": rng.standard_normal((2, dims.image_tokens, dims.image_embed_dim), dtype=np.float32),
        "controlnet_cond": rng.uniform(0, 1, (2, 3, 8 * h, 8 * w)).astype(np.float32),
        "conditioning_scale": np.array(1.0, dtype=np.float32),
    }


@pytest.mark.parametrize("network", ["text_encoder", "vae_decoder", "controlnet"])
def test_openvino_engine_matches_the_python_backend(cpp_build, runtime_bundle, tmp_path, network):
    """Same graph, engine, precision (fp32) and thread count: the outputs are those of OpenVINOBackend."""
    pytest.importorskip("openvino", reason="the Python OpenVINO backend is the reference (pip install openvino)")
    import numpy as np

    from seesr_runtime.openvino_backend import OpenVINOBackend

    manifest = Manifest.load(runtime_bundle, verify="never")
    feeds = _network_feeds(manifest, network)
    got = _run_network(cpp_build, runtime_bundle, network, feeds, tmp_path)
    expected = OpenVINOBackend(manifest, precision="fp32", device="CPU", threads=1).run(network, feeds)
    assert len(got) == len(expected) == len(manifest.spec(network).output_names)
    for name, have, want in zip(manifest.spec(network).output_names, got, expected):
        assert have.shape == want.shape, name
        relative = np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-30)
        assert relative <= 1e-6, f"{network} output {name}: relative L2 {relative:.2e}"


@pytest.mark.parametrize(
    "settings,status,words",
    [
        ({"device": "NPU.7"}, "SEESR_ERROR_ENGINE", "OpenVINO device 'NPU.7' is not available here"),
        ({"engine": "onnxruntime"}, "SEESR_ERROR_ENGINE", "unknown engine 'onnxruntime'; this build has: ['openvino']"),
    ],
    ids=["device", "engine"],
)
def test_engine_settings_are_checked(cpp_build, runtime_bundle, tmp_path, settings, status, words):
    feeds = _network_feeds(Manifest.load(runtime_bundle, verify="never"), "text_encoder")
    with pytest.raises(SeeSRError) as refused:
        _run_network(cpp_build, runtime_bundle, "text_encoder", feeds, tmp_path, **settings)
    assert refused.value.status == STATUS[status] and words in refused.value.message, refused.value.message


def test_engine_info_agrees_with_doctor(lib, runtime_bundle):
    """seesr_engine_info_json: OpenVINO's version and devices as `seesr doctor` reports them, and the precisions
    it lists for the CPU are those seesr_pipeline_open lets the CPU run."""
    from seesr_runtime import doctor, openvino_backend

    info = capi.engine_info(lib)
    report = doctor.openvino_report()
    assert (info["engine"], info["version"], info["devices"]) == ("openvino", report["version"], report["devices"])
    assert capi.engine_info(lib, None) == info  # NULL: openvino
    first, again = ctypes.c_char_p(), ctypes.c_char_p()
    call(lib, "seesr_engine_info_json", b"openvino", ctypes.byref(first))
    call(lib, "seesr_engine_info_json", b"openvino", ctypes.byref(again))
    assert ctypes.cast(first, ctypes.c_void_p).value == ctypes.cast(again, ctypes.c_void_p).value  # kept, not remade
    cpu = next(device for device in info["devices"] if device["name"] == "CPU")
    for precision in openvino_backend.PRECISIONS:
        if precision.startswith("int8"):
            continue  # the tiny bundle has no int8 graphs: refused for that reason on any device
        if precision in cpu["precisions"]:
            lib.seesr_pipeline_close(open_pipeline(lib, runtime_bundle, precision=precision.encode()))
        else:
            with pytest.raises(SeeSRError) as refused:
                open_pipeline(lib, runtime_bundle, precision=precision.encode())
            assert refused.value.status == STATUS["SEESR_ERROR_ENGINE"] and "lack" in refused.value.message
    with pytest.raises(SeeSRError) as unknown:
        capi.engine_info(lib, "onnxruntime")
    assert unknown.value.status == STATUS["SEESR_ERROR_ENGINE"]
    assert "unknown engine 'onnxruntime'; this build has: ['openvino']" in unknown.value.message
    with pytest.raises(SeeSRError) as null_out:
        call(lib, "seesr_engine_info_json", None, None)
    assert null_out.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"] and "out is NULL" in null_out.value.message


def test_pipeline_open_checks_precision(lib, runtime_bundle):
    with pytest.raises(SeeSRError) as unknown:
        open_pipeline(lib, runtime_bundle, precision=b"fp8")
    assert unknown.value.status == STATUS["SEESR_ERROR_ENGINE"]
    assert (
        "openvino precision 'fp8' is not one of ['fp32', 'bf16', 'fp16', 'int8', 'int8-bf16']" in unknown.value.message
    )


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/secret.bin", "weights.bin"])
def test_graph_external_data_is_checked_before_the_engine_reads_it(cpp_build, runtime_bundle, tmp_path, location):
    """A graph naming external data outside the bundle, or not pinned by the manifest, is refused before
    OpenVINO opens it, in the words of Manifest.graph_path."""
    onnx = pytest.importorskip("onnx", reason="writing a graph with external data needs the onnx package")
    from onnx import TensorProto, helper

    bundle = _bundle_copy(Path(runtime_bundle), tmp_path / "bundle")
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    (bundle / "onnx" / "fp32").mkdir(parents=True)
    onnx.save(helper.make_model(graph), bundle / "onnx" / "fp32" / "text_encoder.onnx")
    with pytest.raises(BundleError) as python:
        Manifest.load(bundle, verify="never").graph_path("text_encoder")
    feeds = _network_feeds(Manifest.load(runtime_bundle, verify="never"), "text_encoder")
    with pytest.raises(SeeSRError) as refused:
        _run_network(cpp_build, bundle, "text_encoder", feeds, tmp_path / "out")
    assert (refused.value.status, refused.value.message) == (STATUS["SEESR_ERROR_BUNDLE"], str(python.value))


# ---------------------------------------------------------------- describing an image: DAPE's tags and the prompt


def _test_images() -> dict:
    """RGB8 arrays: structured and noisy, small, non-square, larger than DAPE's input (downscaled)."""
    import numpy as np

    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:40, 0:56]
    structured = (np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256 + rng.normal(0, 8, (40, 56, 3))).clip(0, 255)
    return {
        "structured-56x40": structured.astype(np.uint8),
        "smallest-8x8": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "wide-500x301": rng.integers(0, 256, (301, 500, 3), dtype=np.uint8),
        "strip-1000x13": rng.integers(0, 256, (13, 1000, 3), dtype=np.uint8),
    }


def _padded_rows(image, padding: int):
    """The image's rows `padding` bytes apart beyond 3 * width (a stride the library must honour)."""
    import numpy as np

    height, width, _ = image.shape
    rows = np.full((height, 3 * width + padding), 0xEE, dtype=np.uint8)
    rows[:, : 3 * width] = image.reshape(height, -1)
    return rows


@pytest.mark.parametrize("name", list(_test_images()))
def test_dape_input_is_bit_equal_to_python(cpp_build, runtime_bundle, tmp_path, name):
    import numpy as np
    from PIL import Image

    from seesr_runtime.imaging import dape_input

    tagger = Manifest.load(runtime_bundle, verify="never").data["tagger"]
    image = _test_images()[name]
    rows = _padded_rows(image, padding=5)
    rows.tofile(tmp_path / "rgb.bin")
    request = {
        "file": str(tmp_path / "rgb.bin"),
        "width": image.shape[1],
        "height": image.shape[0],
        "stride": rows.shape[1],
        "size": tagger["input_size"],
        "mean": tagger["mean"],
        "std": tagger["std"],
        "out": str(tmp_path / "x.bin"),
    }
    answer = _probe_json(cpp_build, "dape-input", request)
    got = np.fromfile(tmp_path / "x.bin", dtype=np.float32).reshape(answer["shape"])
    expected = dape_input(Image.fromarray(image), tagger["input_size"], tagger["mean"], tagger["std"])
    np.testing.assert_array_equal(got, expected)


def describe(lib, pipeline, image, options=None, padding: int = 0):
    rows = _padded_rows(image, padding)
    buffer = (ctypes.c_uint8 * rows.size).from_buffer(rows)
    out = ctypes.c_void_p()
    height, width, _ = image.shape
    call(lib, "seesr_describe", pipeline, buffer, width, height, rows.shape[1], options, ctypes.byref(out))
    try:
        assert lib.seesr_image_pixels(out) is None  # a description has no pixels
        return lib.seesr_image_tags(out).decode(), lib.seesr_image_prompt(out).decode()
    finally:
        lib.seesr_image_free(out)


def test_describe_matches_the_python_pipeline(lib, runtime_bundle):
    """Tags and prompt of seesr_describe equal SeeSRPipeline.tag and its prompt template (OpenVINO fp32, one
    thread on both sides), for images of several shapes, rows padded, with a user prompt."""
    pytest.importorskip("openvino", reason="the Python OpenVINO backend is the reference (pip install openvino)")
    from PIL import Image

    from seesr_runtime.openvino_backend import OpenVINOBackend
    from seesr_runtime.pipeline import SeeSRPipeline

    manifest = Manifest.load(runtime_bundle, verify="never")
    python = SeeSRPipeline(manifest, OpenVINOBackend(manifest, precision="fp32", device="CPU", threads=1))
    native = open_pipeline(lib, runtime_bundle, threads=1)
    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", native, ctypes.byref(options))
    user_prompt = "a 'red' cat, {braces}"
    set_option(lib, options, "prompt", user_prompt)
    try:
        fired = 0
        for name, image in _test_images().items():
            tags, prompt = describe(lib, native, image, options, padding=7)
            expected_tags, _ = python.tag(Image.fromarray(image))
            assert tags == expected_tags, name
            assert prompt == python.prompt_template.format(
                tags=expected_tags, prompt=user_prompt, added_prompt=manifest.data["pipeline"]["added_prompt"]
            )
            fired += bool(tags)
        assert fired, "no image fired a tag: the comparison would prove little"
    finally:
        lib.seesr_options_free(options)
        lib.seesr_pipeline_close(native)


@pytest.mark.parametrize("shape,max_pixels", [((20, 7, 3), None), ((7, 7, 3), None), ((9, 9, 3), 64)])
def test_images_outside_the_limits_are_refused(lib, pipeline, shape, max_pixels):
    import numpy as np

    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", pipeline, ctypes.byref(options))
    if max_pixels is not None:
        set_option(lib, options, "max_pixels", max_pixels)
    with pytest.raises(SeeSRError) as refused:
        describe(lib, pipeline, np.zeros(shape, dtype=np.uint8), options)
    lib.seesr_options_free(options)
    limit = max_pixels or option_table.default("max_pixels")
    with pytest.raises(option_table.ImageRejected) as python:
        option_table.check_image_size(shape[1], shape[0], limit)
    assert (refused.value.status, refused.value.message) == (STATUS["SEESR_ERROR_IMAGE"], str(python.value))


# ---------------------------------------------------------------- text encoding: PromptEncoder's embeddings


def test_text_encoding_matches_python(cpp_build, runtime_bundle, tmp_path):
    """Prompts through the C++ tokenizer and engine, and negative prompts (the bundle's default: its
    precomputed embedding), equal to seesr_runtime.text.PromptEncoder on the same OpenVINO engine."""
    pytest.importorskip("openvino", reason="the Python OpenVINO backend is the reference (pip install openvino)")
    import numpy as np

    from seesr_runtime.openvino_backend import OpenVINOBackend
    from seesr_runtime.text import PromptEncoder

    manifest = Manifest.load(runtime_bundle, verify="never")
    encoder = PromptEncoder(manifest, OpenVINOBackend(manifest, precision="fp32", device="CPU", threads=1))
    prompts = ["", "a cat, dog, clean, high-resolution, 8k", "Ünïcode 日本 " * 30]
    negatives = [manifest.data["pipeline"]["negative_prompt"], "blurry, low quality"]
    answer = _probe_json_args(
        cpp_build,
        ["encode-text", str(runtime_bundle)],
        {"threads": 1, "prompts": prompts, "negatives": negatives, "out": str(tmp_path)},
    )
    for kind, texts, reference in (
        ("prompts", prompts, encoder.encode),
        ("negatives", negatives, encoder.encode_negative),
    ):
        for text, written in zip(texts, answer[kind], strict=True):
            got = np.fromfile(written["file"], dtype=np.float32).reshape(written["shape"])
            np.testing.assert_array_equal(got, reference(text), err_msg=f"{kind}: {text!r}")


def _probe_json_args(cpp_build: Path, args: list, request: dict) -> dict:
    run = subprocess.run([cpp_build / "seesr_probe", *args], input=json.dumps(request), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["ok"], answer
    return answer


# ---------------------------------------------------------------- latent tiling and the seeded noise source


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(64, 64, 96, 4), (128, 96, 96, 4), (200, 130, 96, 4), (40, 33, 8, 0), (37, 300, 16, 15), (9, 9, 8, 7)],
)
def test_tile_origins_and_weights_match_python(cpp_build, height, width, tile, overlap):
    import numpy as np

    from seesr_runtime.imaging import gaussian_tile_weights, tile_origins

    tile = min(tile, height, width)
    answer = _probe_json(cpp_build, "tiles", {"height": height, "width": width, "tile": tile, "overlap": overlap})
    assert [tuple(o) for o in answer["origins"]] == tile_origins(height, width, tile, overlap)
    # a few ULP: numpy's vectorised exp and the C library's round a few weights differently
    np.testing.assert_allclose(
        np.asarray(answer["weights"]).reshape(tile, tile), gaussian_tile_weights(tile), rtol=1e-15, atol=0
    )


@pytest.mark.parametrize(
    "shape,tile,overlap", [((2, 4, 40, 33), 16, 4), ((1, 4, 24, 24), 10, 9), ((2, 4, 12, 30), 96, 4)]
)
def test_tile_blending_matches_python(cpp_build, tmp_path, shape, tile, overlap):
    """Windows blended as SeeSRPipeline.predict_noise_tiled blends them (float64 products accumulated in
    float32), each window's prediction its field times (1 + its index) so overlaps disagree."""
    import numpy as np

    from seesr_runtime.imaging import gaussian_tile_weights, tile_origins

    field = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    field.tofile(tmp_path / "field.bin")
    request = {"shape": list(shape), "tile": tile, "overlap": overlap, "field": str(tmp_path / "field.bin")}
    _probe_json(cpp_build, "blend", {**request, "out": str(tmp_path / "out.bin")})
    got = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(shape)

    tile = min(tile, shape[2], shape[3])
    weights = gaussian_tile_weights(tile)
    total = np.zeros(shape, dtype=np.float32)
    contributors = np.zeros(shape, dtype=np.float32)
    for index, (y, x) in enumerate(tile_origins(shape[2], shape[3], tile, overlap)):
        window = np.s_[:, :, y : y + tile, x : x + tile]
        total[window] += field[window] * np.float32(1 + index) * weights
        contributors[window] += weights
    np.testing.assert_array_equal(got, total / contributors)


def test_seeded_noise_is_standard_normal_and_reproducible(cpp_build, tmp_path):
    import numpy as np

    def draws(seed: int, count: int = 1_000_000):
        out = tmp_path / f"noise-{seed}.bin"
        _probe_json(cpp_build, "noise", {"seed": seed, "count": count, "out": str(out)})
        return np.fromfile(out, dtype=np.float32)

    first = draws(7)
    np.testing.assert_array_equal(first, draws(7))
    assert not np.array_equal(first[:1000], draws(8)[:1000])
    assert abs(first.mean()) < 0.005 and abs(first.std() - 1) < 0.005
    beyond = np.mean(np.abs(first) > 3)
    assert 0.0022 < beyond < 0.0032, beyond  # 0.27% for a normal distribution


# ---------------------------------------------------------------- installing: find_package(seesr) for users


def test_installed_package_is_found_by_cmake_users(cpp_build, tmp_path, runtime_bundle):
    """`cmake --install` then a user's project with find_package(seesr) and seesr::seesr, in C, opens a bundle."""
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        ["cmake", "--install", str(cpp_build), "--prefix", str(prefix)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    user = tmp_path / "user"
    user.mkdir()
    (user / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(user C)\nfind_package(seesr 0.1 REQUIRED)\n"
        "add_executable(user main.c)\ntarget_link_libraries(user PRIVATE seesr::seesr)\n"
    )
    (user / "main.c").write_text(
        "#include <seesr.h>\n#include <stdio.h>\n"
        "int main(int argc, char **argv) {\n"
        "    seesr_engine_options engine; seesr_pipeline *pipeline = NULL; const char *name = NULL;\n"
        "    seesr_engine_options_init(&engine); engine.verify = SEESR_VERIFY_NEVER;\n"
        "    if (seesr_pipeline_open(argv[1], &engine, &pipeline) != SEESR_OK) {\n"
        "        puts(seesr_last_error());\n        return 1;\n    }\n"
        "    seesr_pipeline_bundle_name(pipeline, &name);\n"
        '    printf("%s %s\\n", seesr_version(), name);\n'
        "    seesr_pipeline_close(pipeline);\n    return argc == 2 ? 0 : 2;\n}\n"
    )
    build = user / "build"
    for command in (
        ["cmake", "-S", str(user), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
        ["cmake", "--build", str(build)],
    ):
        step = subprocess.run(command, capture_output=True, text=True)
        assert step.returncode == 0, step.stdout + step.stderr
    # No LD_LIBRARY_PATH: the installed libseesr finds the OpenVINO it was built against by itself.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    run = subprocess.run([build / "user", str(runtime_bundle)], capture_output=True, text=True, env=env)
    data = json.loads((Path(runtime_bundle) / "manifest.json").read_text())
    from seesr_runtime import __version__

    assert (run.returncode, run.stdout) == (0, f"{__version__} {data['name']}\n"), run.stdout + run.stderr


# ---------------------------------------------------------------- bicubic resizing: PIL's, as working_image uses it


def _resize_cases(count: int = 60) -> list:
    """(width, height, new width, new height): working_image's and the final resize's kinds of change (x4,
    to multiples of 8, to lr x 4, both sides shrinking on either side of Pillow 13's rule for the order of the
    passes: the height first when it loses more than twice the columns the width loses) and random ones."""
    import numpy as np

    rng = np.random.default_rng(4)
    cases = [(56, 40, 224, 160), (224, 160, 896, 640), (13, 1000, 52, 4000), (8, 8, 128, 128), (512, 365, 512, 360)]
    cases += [(300, 200, 47, 200), (640, 480, 640, 100), (97, 61, 97, 56), (61, 97, 56, 97), (200, 150, 230, 140)]
    cases += [(716, 512, 224, 160), (100, 100, 90, 80), (100, 100, 90, 79), (100, 100, 89, 80), (82, 287, 14, 135)]
    while len(cases) < count:
        cases.append(tuple(int(v) for v in rng.integers(8, 300, 4)))
    return cases


@pytest.mark.parametrize("case", _resize_cases(), ids=lambda c: "{}x{}->{}x{}".format(*c))
def test_bicubic_resize_equals_pil(cpp_build, tmp_path, case):
    import numpy as np
    from PIL import Image

    w, h, tw, th = case
    image = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    rows = _padded_rows(image, padding=2)
    rows.tofile(tmp_path / "rgb.bin")
    request = {"file": str(tmp_path / "rgb.bin"), "width": w, "height": h, "stride": rows.shape[1], "to": [tw, th]}
    _probe_json(cpp_build, "resize", {**request, "out": str(tmp_path / "out.bin")})
    got = np.fromfile(tmp_path / "out.bin", dtype=np.uint8).reshape(th, tw, 3)
    np.testing.assert_array_equal(got, np.asarray(Image.fromarray(image).resize((tw, th), Image.BICUBIC)))


# ---------------------------------------------------------------- seesr_upscale: the whole loop against SeeSRPipeline

NOISE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_float),
    ctypes.c_size_t,
)
LATENTS_FN = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_int32,
    ctypes.POINTER(ctypes.c_float),
    ctypes.c_size_t,
)
PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


def _upscale_image(width: int, height: int, seed: int = 3):
    """A structured, noisy RGB8 image (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256
    return (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)


class NativeUpscale:
    """seesr_upscale through ctypes, with the callbacks a test sets: noise drawn from numpy's generator of
    `noise_seed` (the stream the Python runtime's noise_fn is given), the latents of every step captured,
    progress recorded (and a step to cancel at)."""

    def __init__(self, lib, pipeline, noise_seed=None, cancel_at=None):
        import numpy as np

        self.lib, self.pipeline = lib, pipeline
        self.draws: list = []
        self.latents: list = []
        self.progress: list = []
        rng = np.random.default_rng(noise_seed) if noise_seed is not None else None

        def noise(_, kind, shape, rank, out, count):
            dims = tuple(shape[i] for i in range(rank))
            self.draws.append((kind.decode(), dims))
            np.ctypeslib.as_array(out, shape=(count,))[:] = rng.standard_normal(dims, dtype=np.float32).ravel()
            return 0

        def latents(_, step, shape, rank, values, count):
            dims = tuple(shape[i] for i in range(rank))
            self.latents.append((step, np.ctypeslib.as_array(values, shape=(count,)).copy().reshape(dims)))

        def progress(_, step, total):
            self.progress.append((step, total))
            return int(step == cancel_at)

        # kept on the object: ctypes callbacks must outlive every call that may invoke them
        self._callbacks = (NOISE_FN(noise), LATENTS_FN(latents), PROGRESS_FN(progress))
        self._use_noise = rng is not None

    def __call__(self, image, **options):

        handle = ctypes.c_void_p()
        call(self.lib, "seesr_options_create", self.pipeline, ctypes.byref(handle))
        try:
            for name, value in options.items():
                set_option(self.lib, handle, name, value)
            noise, latents, progress = self._callbacks
            if self._use_noise:
                call(self.lib, "seesr_options_set_noise", handle, noise, None)
            call(self.lib, "seesr_options_set_step_latents", handle, latents, None)
            call(self.lib, "seesr_options_set_progress", handle, progress, None)
            return upscale(self.lib, self.pipeline, image, handle)
        finally:
            self.lib.seesr_options_free(handle)


def upscale(lib, pipeline, image, options, padding: int = 5):
    """seesr_upscale of an HxWx3 uint8 array (rows padded): the result as an array."""
    import numpy as np

    rows = _padded_rows(image, padding)
    buffer = (ctypes.c_uint8 * rows.size).from_buffer(rows)
    out = ctypes.c_void_p()
    height, width, _ = image.shape
    call(lib, "seesr_upscale", pipeline, buffer, width, height, rows.shape[1], options, ctypes.byref(out))
    try:
        w, h, stride = lib.seesr_image_width(out), lib.seesr_image_height(out), lib.seesr_image_stride(out)
        assert stride == 3 * w
        pixels = ctypes.string_at(lib.seesr_image_pixels(out), h * stride)
        return np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 3).copy()
    finally:
        lib.seesr_image_free(out)


@pytest.fixture(scope="module")
def python_openvino(runtime_bundle):
    """The Python runtime on OpenVINO fp32, one thread: the reference the native loop is held to."""
    pytest.importorskip("openvino", reason="the Python OpenVINO backend is the reference (pip install openvino)")
    from seesr_runtime.openvino_backend import OpenVINOBackend
    from seesr_runtime.pipeline import SeeSRPipeline

    manifest = Manifest.load(runtime_bundle, verify="never")
    return SeeSRPipeline(manifest, OpenVINOBackend(manifest, precision="fp32", device="CPU", threads=1))


@pytest.fixture(scope="module")
def native_one_thread(lib, runtime_bundle):
    handle = open_pipeline(lib, runtime_bundle, threads=1)
    yield handle
    lib.seesr_pipeline_close(handle)


def _relative_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# (options, image width x height, image tolerance). 57 wide: the working image is resampled to a multiple of 8
# and the result back to 4 x 57. 72x40 gives a 288x160 working image (36x20 latents): above both tiled-VAE
# thresholds at the smallest tiles (encoder 64 + 64 px, decoder 8 + 22 latent px), uneven tiles.
# Tolerances: from pure noise the two loops are bit-equal (latents and image). From the LR latent they agree to
# ~2e-6: the posterior's exp is numpy's SIMD float32 exp on one side, the C library's on the other (they differ
# by an ulp in ~40% of values), so a decoded value may round one level apart; adain multiplies such a flip by
# its colour gain (source std / target std), which can make it 2, as tests/test_runtime_parity.py allows.
UPSCALE_CASES = {
    "none": (dict(steps=3, process_size=128, color_fix="none"), (57, 40), 1),
    "wavelet": (dict(steps=2, process_size=128, color_fix="wavelet"), (57, 40), 1),
    "adain": (dict(steps=2, process_size=128, color_fix="adain"), (57, 40), 2),
    "adain-from-noise": (dict(steps=2, process_size=128, color_fix="adain", start_point="noise"), (57, 40), 0),
    "wavelet-from-noise": (dict(steps=2, process_size=128, color_fix="wavelet", start_point="noise"), (57, 40), 0),
    "latent-tiles": (
        dict(steps=2, process_size=128, latent_tile_size=16, latent_tile_overlap=4, color_fix="none"),
        (56, 40),
        1,
    ),
    "unguided": (dict(steps=2, process_size=128, guidance=1.0, color_fix="none"), (56, 40), 1),
    "tiled-vae": (
        dict(steps=1, process_size=128, vae_encoder_tile_size=64, vae_decoder_tile_size=8, color_fix="wavelet"),
        (72, 40),
        1,
    ),
    "tiled-vae-from-noise": (
        dict(steps=1, process_size=128, vae_decoder_tile_size=8, color_fix="none", start_point="noise"),
        (72, 40),
        0,
    ),
    "upscale-2": (dict(steps=2, process_size=64, upscale=2, color_fix="wavelet"), (44, 36), 1),
    # The bundle's defaults but the steps: the 16x40 input is raised to 128x320, so the working image is
    # 512x1280 (latent tiles, the tiled VAE encoder) and the final resize shrinks both sides, the height first.
    "official-geometry": (dict(steps=1, color_fix="wavelet"), (16, 40), 1),
}


# Left to `make test-cpp-all` (`make test-cpp`, what CI runs, leaves out the tests marked slow): each needs models
# compiled for shapes of its own on both sides (10-40 s apiece on 2 cores). The cases kept share one geometry
# and still hold every step's latents to 1e-5 and the image to a level, from the LR latent and from noise.
SLOW_UPSCALE_CASES = {"official-geometry", "latent-tiles", "unguided", "tiled-vae", "tiled-vae-from-noise", "upscale-2"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_UPSCALE_CASES else []) for name in UPSCALE_CASES],
)
def test_upscale_matches_the_python_pipeline(lib, native_one_thread, python_openvino, case):
    """The same injected noise through seesr_upscale and SeeSRPipeline (OpenVINO fp32 on both sides): the same
    draws, the latents after every step within 1e-5 relative L2, the final image within the case's tolerance."""
    import numpy as np

    options, (width, height), tolerance = UPSCALE_CASES[case]
    image = _upscale_image(width, height)
    python_draws: list = []
    rng = np.random.default_rng(17)

    def noise_fn(kind, shape):
        python_draws.append((kind, tuple(shape)))
        return rng.standard_normal(shape, dtype=np.float32)

    expected = python_openvino(image, noise_fn=noise_fn, **options)
    native = NativeUpscale(lib, native_one_thread, noise_seed=17)
    got = native(image, **options)

    assert native.draws == python_draws
    assert [step for step, _ in native.latents] == list(range(1, options["steps"] + 1))
    assert native.progress == [(step, options["steps"]) for step in range(1, options["steps"] + 1)]
    errors = [_relative_l2(ours, theirs) for (_, ours), theirs in zip(native.latents, expected.latents)]
    assert max(errors) <= 1e-5, errors
    reference = np.asarray(expected.image)
    assert got.shape == reference.shape == (height * options.get("upscale", 4), width * options.get("upscale", 4), 3)
    assert int(np.abs(got.astype(int) - reference.astype(int)).max()) <= tolerance


@pytest.mark.parametrize("cancel_at", [1, 2])
def test_cancelling_from_the_progress_callback(lib, native_one_thread, cancel_at):
    """A non-zero return from the progress callback stops the loop there: SEESR_ERROR_CANCELLED, no image."""
    native = NativeUpscale(lib, native_one_thread, cancel_at=cancel_at)
    with pytest.raises(SeeSRError) as cancelled:
        native(_upscale_image(24, 16), steps=3, process_size=64)
    assert cancelled.value.status == STATUS["SEESR_ERROR_CANCELLED"]
    assert f"after step {cancel_at} of 3" in cancelled.value.message
    assert native.progress == [(step, 3) for step in range(1, cancel_at + 1)]
    assert [step for step, _ in native.latents] == list(range(1, cancel_at + 1))


def test_cancelling_from_the_noise_callback_writes_no_image(lib, native_one_thread):
    import numpy as np

    rng = np.random.default_rng(0)

    def noise(_, kind, shape, rank, out, count):
        np.ctypeslib.as_array(out, shape=(count,))[:] = rng.standard_normal(count, dtype=np.float32)
        return int(kind == b"step")

    callback = NOISE_FN(noise)
    options = ctypes.c_void_p()
    call(lib, "seesr_options_create", native_one_thread, ctypes.byref(options))
    set_option(lib, options, "process_size", 64)
    call(lib, "seesr_options_set_noise", options, callback, None)
    image = _upscale_image(24, 16)
    rows = _padded_rows(image, 0)
    out = ctypes.c_void_p(1)  # not NULL before the call: the library must reset it
    status = lib.seesr_upscale(
        native_one_thread, (ctypes.c_uint8 * rows.size).from_buffer(rows), 24, 16, 72, options, ctypes.byref(out)
    )
    lib.seesr_options_free(options)
    assert status == STATUS["SEESR_ERROR_CANCELLED"]
    assert out.value is None
    assert "the noise callback cancelled the upscale (at a 'step' draw)" in lib.seesr_last_error().decode()


def test_seeded_upscale_is_reproducible(lib, native_one_thread):
    """Without a noise callback the seed option drives the draws: the same seed, the same image; another, another."""
    import numpy as np

    image = _upscale_image(24, 16)
    native = NativeUpscale(lib, native_one_thread)
    first, again, other = (native(image, steps=2, process_size=64, seed=seed) for seed in (5, 5, 6))
    assert first.shape == (64, 96, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_bundle_without_tiled_vae_graphs_asks_for_untiled(lib, runtime_bundle, tmp_path):
    """A bundle from an exporter that wrote no tiled-VAE segments: a bundle error where the image needs them,
    naming the network and the way out (tiled_vae false), which then upscales."""
    import os

    copy = tmp_path / "old"
    shutil.copytree(runtime_bundle, copy, copy_function=os.link)
    manifest = json.loads((copy / "manifest.json").read_text())
    for network in ("vae_encoder", "vae_decoder"):
        del manifest["networks"][network]["tiled"]
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    handle = open_pipeline(lib, copy, threads=1)
    try:
        native = NativeUpscale(lib, handle)
        image = _upscale_image(72, 40)
        small_tiles = dict(steps=1, process_size=128, vae_encoder_tile_size=64)
        with pytest.raises(SeeSRError) as refused:
            native(image, **small_tiles)
        assert refused.value.status == STATUS["SEESR_ERROR_BUNDLE"]
        assert "no tiled-VAE graphs for vae_encoder, which a 288x160 input needs" in refused.value.message
        assert "set the option tiled_vae to false" in refused.value.message
        assert native(image, **small_tiles, tiled_vae=False).shape == (160, 288, 3)
    finally:
        lib.seesr_pipeline_close(handle)


def test_a_second_tiled_image_of_the_same_size_compiles_nothing(cpp_build, runtime_bundle, tmp_path):
    """Two upscales of 72x40 images through one pipeline, the tiled VAE at small uneven tiles (the encoder's grid
    has four tile shapes, the decoder's two): the second compiles no shape."""
    images = []
    for seed in (1, 2):
        rows = _padded_rows(_upscale_image(72, 40, seed), 0)
        rows.tofile(tmp_path / f"{seed}.rgb")
        images.append({"file": str(tmp_path / f"{seed}.rgb"), "width": 72, "height": 40, "stride": rows.shape[1]})
    options = dict(steps=1, process_size=128, vae_encoder_tile_size=64, vae_decoder_tile_size=8, color_fix="none")
    answer = _probe_json_args(
        cpp_build, ["compiles", str(runtime_bundle)], {"threads": 1, "options": options, "images": images}
    )
    first, second = answer["compiles"]
    assert first > 6 + 4 + 2 and second == 0, answer  # networks, encoder and decoder segments' shapes; none again


# ---------------------------------------------------------------- tiled VAE states spilled to files

# 72x40 at these options tiles both VAE halves (as UPSCALE_CASES' "tiled-vae" does); the seed option, so repeatable.
SPILL_CASE = dict(
    steps=1, process_size=128, vae_encoder_tile_size=64, vae_decoder_tile_size=8, color_fix="none", seed=5
)
SPILL_EXPECTED = (
    "expected an existing folder the tiled VAE can write its tile states in (or NULL to keep them in memory)"
)


def open_spilling(lib, bundle, spill: Path):
    return open_pipeline(lib, bundle, threads=1, tiled_vae_spill_dir=str(spill).encode())


@contextlib.contextmanager
def watching(folder: Path):
    """What appears in `folder` while the body runs, seen by a thread polling it every 2 ms (the upscale's ctypes
    call releases the GIL): a set of (path relative to `folder`, is a folder, permission bits)."""
    seen: set = set()
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                for top, folders, files in os.walk(folder):
                    for name, is_folder in [(n, True) for n in folders] + [(n, False) for n in files]:
                        path = Path(top) / name
                        seen.add((str(path.relative_to(folder)), is_folder, path.stat().st_mode & 0o777))
            except FileNotFoundError:  # removed between listing and stat: the next round sees the rest
                pass
            stop.wait(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield seen
    finally:
        stop.set()
        poller.join()


@pytest.mark.slow  # compiles the tiled geometry's networks for a second pipeline: 45 s alone on 2 cores
def test_spilled_tile_states_give_the_same_image(lib, runtime_bundle, native_one_thread, tmp_path):
    """With tiled_vae_spill_dir the tile states wait in files of a private folder made there per tiled-VAE run
    (mode 0700, the files 0666 less the umask), the image is byte-identical to the in-memory run, and nothing is
    left behind: neither by the check on open, nor by the upscale, nor by a cancelled one."""
    spill = tmp_path / "spill"
    spill.mkdir()
    image = _upscale_image(72, 40)
    expected = NativeUpscale(lib, native_one_thread)(image, **SPILL_CASE)
    handle = open_spilling(lib, runtime_bundle, spill)
    try:
        assert list(spill.iterdir()) == []
        with watching(spill) as seen:
            got = NativeUpscale(lib, handle)(image, **SPILL_CASE)
        assert list(spill.iterdir()) == []
        with pytest.raises(SeeSRError) as cancelled:
            NativeUpscale(lib, handle, cancel_at=1)(image, **{**SPILL_CASE, "steps": 2})
        assert cancelled.value.status == STATUS["SEESR_ERROR_CANCELLED"]
        assert list(spill.iterdir()) == []
    finally:
        lib.seesr_pipeline_close(handle)
    assert np.array_equal(got, expected)
    folders = {path for path, is_folder, mode in seen if is_folder}
    files = {(path, mode) for path, is_folder, mode in seen if not is_folder}
    assert len(folders) >= 1 and all(Path(path).name.startswith("seesr-tiles-") for path in folders), seen
    assert {mode for path, is_folder, mode in seen if is_folder} == {0o700}
    assert len(files) >= 12 and {Path(path).parent.as_posix() for path, _ in files} <= folders, seen
    assert {mode for _, mode in files} == {0o666 & ~_umask()}


def test_the_spill_folder_goes_when_a_segment_fails(lib, runtime_bundle, tmp_path):
    """A failure in the middle of the tiled VAE (its second segment's graph damaged, found when that segment
    first runs), its tile states spilled by the first: the upscale fails naming the graph and leaves nothing
    in the spill folder."""
    bundle = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, bundle, copy_function=os.link)
    graph = bundle / "onnx" / "fp32" / "vae_encoder_tiled" / "segment_01.onnx"
    graph.unlink()  # a new file, not the shared hard link's data
    graph.write_bytes(b"not an ONNX graph")
    spill = tmp_path / "spill"
    spill.mkdir()
    handle = open_spilling(lib, bundle, spill)
    try:
        with watching(spill) as seen, pytest.raises(SeeSRError) as failed:
            NativeUpscale(lib, handle)(_upscale_image(72, 40), **SPILL_CASE)
    finally:
        lib.seesr_pipeline_close(handle)
    assert failed.value.status == STATUS["SEESR_ERROR_BUNDLE"]
    assert "vae_encoder#1 fp32 graph 'onnx/fp32/vae_encoder_tiled/segment_01.onnx' is not a readable ONNX file" in (
        failed.value.message
    )
    assert any(path.endswith(".f32") for path, _, _ in seen), seen  # the states were spilled when it failed
    assert list(spill.iterdir()) == []


# Run in a child process: one upscale of the tiled geometry with the spill folder, files limited to 4 KiB
# (RLIMIT_FSIZE, SIGXFSZ ignored so a write past it fails with EFBIG instead of killing the process).
_LIMITED_SPILL = """
import ctypes, json, resource, signal, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import seesr_capi as capi
lib = capi.load_library(sys.argv[2])
pipeline = capi.open_pipeline(lib, sys.argv[3], verify=capi.VERIFY_NEVER, threads=1,
                              tiled_vae_spill_dir=sys.argv[4].encode())
options = ctypes.c_void_p()
capi.call(lib, "seesr_options_create", pipeline, ctypes.byref(options))
for name, value in json.loads(sys.argv[5]).items():
    if isinstance(value, str):
        capi.call(lib, "seesr_options_set_string", options, name.encode(), value.encode())
    else:
        capi.call(lib, "seesr_options_set_int", options, name.encode(), value)
rows = np.random.default_rng(0).integers(0, 256, (40, 72 * 3), dtype=np.uint8)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
out = ctypes.c_void_p()
status = lib.seesr_upscale(pipeline, rows.ctypes.data_as(ctypes.c_void_p), 72, 40, 72 * 3, options, ctypes.byref(out))
print(json.dumps({"status": status, "message": lib.seesr_last_error().decode(), "image": out.value}))
"""


def test_a_spill_write_past_the_file_size_limit_is_out_of_memory(cpp_build, runtime_bundle, tmp_path):
    """A tile state that cannot be written in full (here the file-size limit; a full disk alike): the upscale
    fails with SEESR_ERROR_OUT_OF_MEMORY naming the file, no image, and neither the partial file nor the
    folder is left."""
    spill = tmp_path / "spill"
    spill.mkdir()
    arguments = [CPP / "python", cpp_build / "libseesr.so", runtime_bundle, spill, json.dumps(SPILL_CASE)]
    run = subprocess.run(
        [sys.executable, "-c", _LIMITED_SPILL, *map(str, arguments)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.splitlines()[-1])
    assert answer["status"] == STATUS["SEESR_ERROR_OUT_OF_MEMORY"] and answer["image"] is None, answer
    assert answer["message"].startswith(f"cannot write the tiled VAE's tile state {spill}/seesr-tiles-"), answer
    assert answer["message"].endswith("/1.f32: File too large"), answer
    assert list(spill.iterdir()) == []


def _a_file(tmp_path: Path) -> Path:
    file = tmp_path / "file"
    file.write_text("")
    return file


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder: no refusal to check")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


@pytest.mark.parametrize(
    "make_spill,problem",
    [
        (lambda tmp_path: tmp_path / "missing", "does not exist"),
        (lambda tmp_path: tmp_path / "missing" / "spill", "does not exist"),
        (_a_file, "is not a folder"),
        (_read_only_folder, "is not writable (Permission denied)"),
    ],
    ids=["missing", "missing-parent", "a-file", "read-only"],
)
def test_a_spill_dir_that_cannot_hold_states_is_refused_on_open(lib, runtime_bundle, tmp_path, make_spill, problem):
    spill = make_spill(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SeeSRError) as refused:
        open_spilling(lib, runtime_bundle, spill)
    assert refused.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert refused.value.message == f"tiled_vae_spill_dir '{spill}' {problem}; {SPILL_EXPECTED}"
    assert sorted(tmp_path.rglob("*")) == before


def test_an_empty_spill_dir_is_refused(lib, runtime_bundle):
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, runtime_bundle, tiled_vae_spill_dir=b"")
    assert refused.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert refused.value.message == f'tiled_vae_spill_dir is ""; {SPILL_EXPECTED}'


def test_a_spill_dir_removed_after_open_is_refused_at_the_tiled_vae(lib, runtime_bundle, tmp_path):
    """The folder is checked on open and used at each tiled-VAE run: gone by then, the upscale fails there
    naming it, before any tile runs."""
    spill = tmp_path / "spill"
    spill.mkdir()
    handle = open_spilling(lib, runtime_bundle, spill)
    try:
        spill.rmdir()
        with pytest.raises(SeeSRError) as refused:
            NativeUpscale(lib, handle)(_upscale_image(72, 40), **SPILL_CASE)
    finally:
        lib.seesr_pipeline_close(handle)
    assert refused.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert refused.value.message == f"tiled_vae_spill_dir '{spill}' does not exist; {SPILL_EXPECTED}"
    assert not spill.exists()


def test_an_engine_options_struct_of_the_first_release_still_opens(lib, runtime_bundle):
    """A caller built before tiled_vae_spill_dir passes the shorter struct_size: the library opens with it and
    reads nothing past it (here a spill folder that would be refused); shorter than the first release's is refused."""
    first_release = capi.EngineOptions.tiled_vae_spill_dir.offset
    smallest = capi.EngineOptions.verify.offset + ctypes.sizeof(ctypes.c_int)
    for size in (first_release, smallest):
        handle = open_pipeline(lib, runtime_bundle, struct_size=size, tiled_vae_spill_dir=b"/nonexistent/spill")
        lib.seesr_pipeline_close(handle)
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, runtime_bundle, struct_size=smallest - 1)
    assert refused.value.status == STATUS["SEESR_ERROR_INVALID_ARGUMENT"]
    assert f"struct_size is {smallest - 1}, expected at least {smallest}" in refused.value.message
    with pytest.raises(SeeSRError) as current:
        open_pipeline(lib, runtime_bundle, tiled_vae_spill_dir=b"/nonexistent/spill")
    assert "tiled_vae_spill_dir '/nonexistent/spill' does not exist" in current.value.message


@pytest.mark.parametrize(
    "setter", ["seesr_options_set_progress", "seesr_options_set_noise", "seesr_options_set_step_latents"]
)
def test_callback_setters_refuse_null_options(lib, setter):
    with pytest.raises(SeeSRError) as refused:
        call(lib, setter, None, None, None)
    assert (refused.value.status, refused.value.message) == (STATUS["SEESR_ERROR_INVALID_ARGUMENT"], "options is NULL")


def test_callbacks_can_be_removed(lib, native_one_thread):
    """A NULL callback takes one off: the upscale then runs on the seeded source, with no progress calls."""
    import numpy as np

    native = NativeUpscale(lib, native_one_thread, noise_seed=1)
    image = _upscale_image(24, 16)
    handle = ctypes.c_void_p()
    call(lib, "seesr_options_create", native_one_thread, ctypes.byref(handle))
    try:
        for name, value in (("steps", 2), ("process_size", 64), ("seed", 5)):
            set_option(lib, handle, name, value)
        noise, latents, progress = native._callbacks
        for setter, callback in (
            ("seesr_options_set_noise", noise),
            ("seesr_options_set_step_latents", latents),
            ("seesr_options_set_progress", progress),
        ):
            call(lib, setter, handle, callback, None)
            call(lib, setter, handle, None, None)
        removed = upscale(lib, native_one_thread, image, handle)
    finally:
        lib.seesr_options_free(handle)
    assert native.draws == native.latents == native.progress == []
    assert np.array_equal(removed, NativeUpscale(lib, native_one_thread)(image, steps=2, process_size=64, seed=5))


# ---------------------------------------------------------------- reduced precision hints


def _cpu_capabilities() -> list:
    openvino = pytest.importorskip("openvino", reason="OpenVINO reports the CPU's capabilities")
    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@pytest.mark.slow  # compiles every network twice more (bf16, and fp32 at this size): 40 s on 2 cores
def test_bf16_runs_close_to_fp32(lib, runtime_bundle, native_one_thread):
    """precision "bf16" is OpenVINO's INFERENCE_PRECISION_HINT bf16 on the fp32 graphs: with the same noise it
    stays as close to fp32 as the Python runtime's bf16 test asks on this fixture (final latents within 0.5
    relative L2, image PSNR above 15 dB; measured here 0.25 and 26 dB: random tiny networks amplify rounding
    far more than SD2 size does). Refused, naming the capability, on a CPU without BF16."""
    import numpy as np

    if "BF16" not in _cpu_capabilities():
        with pytest.raises(SeeSRError) as refused:
            open_pipeline(lib, runtime_bundle, precision=b"bf16", threads=1)
        assert refused.value.status == STATUS["SEESR_ERROR_ENGINE"]
        assert "cannot run precision 'bf16'" in refused.value.message and "lack 'BF16'" in refused.value.message
        pytest.skip("this CPU has no BF16 (the refusal was checked)")
    image, options = _upscale_image(40, 32), dict(steps=2, process_size=64, color_fix="wavelet")
    reference = NativeUpscale(lib, native_one_thread, noise_seed=9)
    expected = reference(image, **options)
    bf16 = open_pipeline(lib, runtime_bundle, precision=b"bf16", threads=1)
    try:
        reduced = NativeUpscale(lib, bf16, noise_seed=9)
        got = reduced(image, **options)
    finally:
        lib.seesr_pipeline_close(bf16)
    latent = _relative_l2(reduced.latents[-1][1], reference.latents[-1][1])
    mse = np.mean((got.astype(np.float64) - expected.astype(np.float64)) ** 2)
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    print(f"bf16 against fp32: final latents relative L2 {latent:.2e}, image PSNR {psnr:.1f} dB")
    assert 0 < latent < 0.5  # not zero: the hint reached OpenVINO
    assert psnr > 15


def test_fp16_needs_the_capability(lib, runtime_bundle):
    """fp16 (OpenVINO's f16 hint) on a CPU without FP16 is refused with the capabilities the CPU has."""
    if "FP16" in _cpu_capabilities():
        pytest.skip("this CPU runs f16 (AMX-FP16): nothing to refuse")
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, runtime_bundle, precision=b"fp16")
    assert refused.value.status == STATUS["SEESR_ERROR_ENGINE"]
    assert "OpenVINO device CPU cannot run precision 'fp16': its OPTIMIZATION_CAPABILITIES [" in refused.value.message
    assert "lack 'FP16'" in refused.value.message


# ---------------------------------------------------------------- reduced precisions: the Python backend's numbers
# The native engine prepares each network as OpenVINOBackend does (the int8 Q/DQ graphs where the bundle has them;
# under a bf16 hint the UNet's and ControlNet's timestep path split off into an f32 model and f16 weights) and
# compiles it with the same OpenVINO, so at one thread it computes what the Python backend computes.

PRECISION_CAPABILITY = {"bf16": "BF16", "int8": "INT8", "int8-bf16": "BF16"}


def _needs_capability(precision: str) -> None:
    capabilities = _cpu_capabilities()
    if PRECISION_CAPABILITY[precision] not in capabilities:
        pytest.skip(
            f"precision {precision!r} needs {PRECISION_CAPABILITY[precision]}, which this CPU lacks "
            f"(OPTIMIZATION_CAPABILITIES {sorted(capabilities)})"
        )


@pytest.fixture(scope="module")
def int8_bundle(int8_tiny_bundle):
    """ModelOpt's int8 bundle where installed, else onnxruntime's quantizer (tests/test_openvino.py's choice)."""
    pytest.importorskip("torch", reason="the int8 bundle is built from the tiny checkout, which needs torch")
    from seesr_export.quantize import modelopt_available

    return int8_tiny_bundle("modelopt" if modelopt_available() else "onnxruntime")[0]


def _precision_feeds(manifest: Manifest, network: str) -> dict:
    from seesr_runtime.networks import dummy_feeds

    env = {"B": 1, "h": 8, "w": 6} if network.startswith("vae") else {"B": 2, "h": 8, "w": 8}
    return dummy_feeds(manifest.spec(network), env, seed=5)


def _engine_against_python(cpp_build, bundle, network: str, precision: str, folder: Path) -> dict:
    """{output: (native against Python, Python against Python fp32)} relative L2 of `network` at `precision`."""
    from seesr_runtime.openvino_backend import OpenVINOBackend

    manifest = Manifest.load(bundle, verify="never")
    feeds = _precision_feeds(manifest, network)
    got = _run_network(cpp_build, bundle, network, feeds, folder, precision=precision)
    python = OpenVINOBackend(manifest, precision=precision, device="CPU", threads=1, on_unsupported="error")
    expected = python.run(network, feeds)
    fp32 = OpenVINOBackend(manifest, precision="fp32", device="CPU", threads=1).run(network, feeds)
    names = manifest.spec(network).output_names
    assert len(got) == len(expected) == len(names)
    errors = {}
    for name, have, want, reference in zip(names, got, expected, fp32):
        assert have.shape == want.shape, name
        errors[name] = (_relative_l2(have, want), _relative_l2(want, reference))
    print(f"{network} at {precision}: native against Python, Python against fp32:", errors)
    return errors


@pytest.mark.parametrize("precision", ["int8", "int8-bf16"])
def test_int8_needs_a_bundle_with_int8_graphs(lib, runtime_bundle, precision):
    """The int8 precisions on a bundle without int8 graphs: refused on open, in the Python backend's words."""
    from seesr_runtime.openvino_backend import OpenVINOBackend

    _needs_capability(precision)
    manifest = Manifest.load(runtime_bundle, verify="never")
    if any("int8" in entry["files"] for entry in manifest.data["networks"].values()):
        pytest.skip(f"the bundle under test ({runtime_bundle}) has int8 graphs: nothing to refuse")
    with pytest.raises(BundleError) as python:
        OpenVINOBackend(manifest, precision=precision, device="CPU", on_unsupported="error")
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, runtime_bundle, precision=precision.encode())
    assert (refused.value.status, refused.value.message) == (STATUS["SEESR_ERROR_BUNDLE"], str(python.value))
    assert str(runtime_bundle) in refused.value.message and f"precision '{precision}'" in refused.value.message


@pytest.mark.parametrize(
    "network", ["controlnet", "vae_decoder", pytest.param("unet", marks=pytest.mark.slow), "text_encoder"]
)
def test_bf16_engine_matches_the_python_backend(cpp_build, runtime_bundle, tmp_path, network):
    """bf16: OpenVINOBackend's bf16 outputs to the bit, where bf16 itself moves them 1e-3 to 0.4 from fp32 on this
    fixture. Measured (Python bf16 against itself with a step left out): without the f32 timestep path the
    ControlNet's residuals move by up to 0.27 relative L2, without the f16 weights by 1e-2, so each is held."""
    _needs_capability("bf16")
    errors = _engine_against_python(cpp_build, runtime_bundle, network, "bf16", tmp_path)
    for name, (native, from_fp32) in errors.items():
        assert native == 0.0, f"{network} output {name}: relative L2 {native:.2e} from the Python backend's bf16"
        assert from_fp32 > 1e-4, f"{network} output {name}: bf16 is fp32's ({from_fp32:.2e}): the hint did not apply"


@pytest.mark.slow  # the int8 bundle (built once per session: a minute or two) and two compilations per case
@pytest.mark.parametrize("precision", ["int8", "int8-bf16"])
@pytest.mark.parametrize("network", ["controlnet", "unet", "vae_decoder"])
def test_int8_engine_matches_the_python_backend(cpp_build, int8_bundle, tmp_path, precision, network):
    """int8 and int8-bf16: the Q/DQ graphs for UNet and ControlNet, the fp32 graph for the VAE decoder (int8-bf16:
    bf16 hint, f32 timestep path, weights kept f32 as the int8 graphs' scales are): OpenVINOBackend's outputs to
    the bit. Measured from fp32: the Q/DQ graphs 4e-2 to 0.4, the VAE decoder 0 at int8 (its fp32 graph, f32) and
    1e-2 at int8-bf16."""
    _needs_capability(precision)
    errors = _engine_against_python(cpp_build, int8_bundle, network, precision, tmp_path)
    for name, (native, from_fp32) in errors.items():
        assert native == 0.0, f"{network} output {name}: relative L2 {native:.2e} from the Python backend's {precision}"
        if network == "vae_decoder" and precision == "int8":
            assert from_fp32 == 0.0, f"{network} output {name} is not its fp32 graph's at f32"
        else:
            assert from_fp32 > 1e-3, f"{network} output {name}: {precision} is fp32's ({from_fp32:.2e})"


# (bundle fixture, final latents' tolerance from the LR latent, image's). From start_point "noise" both loops are
# bit-equal. From the LR latent numpy's float32 exp and the C library's differ by an ulp in the posterior (see
# UPSCALE_CASES): bf16 rounds such differences away (measured 3e-9 for bf16 and int8-bf16, the image equal), but
# under int8 an ulp can carry an activation across a quantizer's rounding boundary, a whole int8 step, which the
# next step spreads (measured 1.4e-7 after step 1, 4.4e-4 after step 2; the image 2 levels apart).
PRECISION_UPSCALES = {
    "bf16": ("runtime_bundle", 1e-5, 1),
    "int8": ("int8_bundle", 2e-3, 4),
    "int8-bf16": ("int8_bundle", 1e-5, 1),
}


def _python_upscale(manifest: Manifest, precision: str, image, options: dict):
    import numpy as np

    from seesr_runtime.openvino_backend import OpenVINOBackend
    from seesr_runtime.pipeline import SeeSRPipeline

    backend = OpenVINOBackend(manifest, precision=precision, device="CPU", threads=1, on_unsupported="error")
    pipeline = SeeSRPipeline(manifest, backend)
    results = {}
    for start_point in ("noise", "lr"):
        rng = np.random.default_rng(9)  # NativeUpscale's stream for noise_seed=9
        results[start_point] = pipeline(image, noise_fn=_standard_normal(rng), start_point=start_point, **options)
    return results


def _standard_normal(rng):
    return lambda kind, shape: rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.slow  # every network compiled for this geometry three times (the int8 ones: the int8 bundle too)
@pytest.mark.parametrize("precision", list(PRECISION_UPSCALES))
def test_reduced_precision_upscale_matches_the_python_pipeline(lib, request, precision):
    """The same noise through seesr_upscale and SeeSRPipeline on OpenVINOBackend at a reduced precision: from
    noise the same latents after every step and the same image; from the LR latent within PRECISION_UPSCALES'
    tolerances; where the precision itself moves the final latents 7e-2 (int8) to 0.27 (bf16) from fp32."""
    import numpy as np

    _needs_capability(precision)
    fixture, tolerance, levels = PRECISION_UPSCALES[precision]
    bundle = request.getfixturevalue(fixture)
    manifest = Manifest.load(bundle, verify="never")
    image, options = _upscale_image(40, 32), dict(steps=2, process_size=64, color_fix="wavelet")
    expected = _python_upscale(manifest, precision, image, options)
    handle = open_pipeline(lib, bundle, precision=precision.encode(), threads=1)
    try:
        for start_point, want in expected.items():
            native = NativeUpscale(lib, handle, noise_seed=9)
            got = native(image, start_point=start_point, **options)
            errors = [_relative_l2(ours, theirs) for (_, ours), theirs in zip(native.latents, want.latents)]
            apart = int(np.abs(got.astype(int) - np.asarray(want.image).astype(int)).max())
            print(f"{precision} from {start_point}: latents against Python {errors}, image {apart} levels apart")
            assert len(errors) == options["steps"]
            if start_point == "noise":
                assert errors == [0.0] * options["steps"] and apart == 0
            else:
                assert max(errors) <= tolerance and apart <= levels
    finally:
        lib.seesr_pipeline_close(handle)


# ---------------------------------------------------------------- the memory budget (engine options memory_budget)

# Upscales of the plan grid (LR size, options): the default geometry, a small image, no encoder stage and no
# guidance (batch 1), latent tiles, latent and tiled-VAE tiles.
PLAN_CASES = {
    "default": ((56, 40), {}),
    "small": ((16, 16), {"process_size": 64}),
    "from-noise-unguided": ((56, 40), {"start_point": "noise", "guidance": 1.0}),
    "latent-tiles": ((56, 40), {"latent_tile_size": 16, "latent_tile_overlap": 4}),
    "vae-tiles": ((56, 40), {"upscale": 8, "vae_decoder_tile_size": 24, "latent_tile_size": 32}),
}


def _native_plan(lib, handle, size, options):
    """seesr_pipeline_memory_plan_json, or ("refused", status, message)."""
    made = ctypes.c_void_p()
    call(lib, "seesr_options_create", handle, ctypes.byref(made))
    try:
        for name, value in options.items():
            set_option(lib, made, name, value)
        return capi.memory_plan(lib, handle, *size, made)
    except SeeSRError as refused:
        return ("refused", refused.status, refused.message)
    finally:
        lib.seesr_options_free(made)


def _python_plan(pipe, size, options, caplog):
    """SeeSRPipeline.memory_plan as JSON (without a budget it plans only with -v: DEBUG), or ("refused", ...)."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="seesr_runtime.pipeline"):
        try:
            plan = pipe.memory_plan(size, pipe.resolve_options(dict(options)))
        except OptionError as refused:
            return ("refused", STATUS["SEESR_ERROR_OPTION"], str(refused))
    return json.loads(json.dumps(plan.to_json()))


def _budget_grid(lib, bundle, precision, size, options) -> list:
    """Budgets that take every branch of the plan for this upscale: none, roomy, just under the roomy peak of each
    stage that has levers (spill, int8 linear weights, smaller tiles), far too small, and the smallest named."""
    handle = open_pipeline(lib, bundle, precision=precision.encode(), memory_budget=10**12)
    try:
        roomy = _native_plan(lib, handle, size, options)
    finally:
        lib.seesr_pipeline_close(handle)
    budgets = [None, 10**12, 10**6]
    for stage in roomy["stages"]:
        if stage["name"] in ("encode", "denoise", "decode"):
            budgets.append(stage["peak"] - 1)
        if stage["name"] == "denoise":  # below what int8 linear weights save: smaller latent tiles
            budgets.append(stage["peak"] - 30_000_000)
    return budgets


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_the_native_plan_is_the_python_plan(lib, runtime_bundle, caplog, precision):
    """For a grid of image sizes, options and budgets the native plan (seesr_pipeline_memory_plan_json) equals the
    Python runtime's MemoryPlan.to_json on the same bundle and engine, refusals word for word; the smallest budget a
    refusal names plans; the grid reaches the tiled VAE's spill and int8 linear weights."""
    from seesr_runtime.backends import create_backend
    from seesr_runtime.pipeline import SeeSRPipeline

    if precision != "fp32":
        _needs_capability(precision)
    manifest = Manifest.load(runtime_bundle, verify="never")
    backend = create_backend("openvino", manifest, precision=precision, map_weights=True)  # as from_bundle's
    compared = refused = 0
    levers: set[str] = set()
    for name, (size, options) in PLAN_CASES.items():
        for budget in _budget_grid(lib, runtime_bundle, precision, size, options):
            handle = open_pipeline(lib, runtime_bundle, precision=precision.encode(), memory_budget=budget or 0)
            python = SeeSRPipeline(manifest, backend, memory_budget=budget)
            try:
                native = _native_plan(lib, handle, size, options)
                assert native == _python_plan(python, size, options, caplog), (name, budget)
            finally:
                lib.seesr_pipeline_close(handle)
            compared += 1
            if isinstance(native, dict):
                levers |= {"spill"} if native["spill"] else set()
                levers |= {"int8"} if native["int8_linear"] == ["controlnet", "unet"] else set()
                levers |= {"tiles"} if any("tile_size" in change for change in native["changed"]) else set()
            else:
                refused += 1
                smallest = option_table.parse_byte_size(
                    "memory_budget", native[2].split("needs at least ")[1].split()[0]
                )
                handle = open_pipeline(lib, runtime_bundle, precision=precision.encode(), memory_budget=smallest)
                try:
                    assert _native_plan(lib, handle, size, options)["peak"] <= smallest
                finally:
                    lib.seesr_pipeline_close(handle)
    # smaller tiles are reached by the Python plan's own tests (test_memory_budget.py); since a staged tiled VAE
    # counts one tile shape at a time, this grid's budgets no longer need them
    assert compared >= 30 and refused >= len(PLAN_CASES) and {"spill", "int8"} <= levers


def _levers_of(lib, bundle, size, options, budget):
    handle = open_pipeline(lib, bundle, memory_budget=budget)
    try:
        return _native_plan(lib, handle, size, options)
    finally:
        lib.seesr_pipeline_close(handle)


class BudgetedUpscale(NativeUpscale):
    """NativeUpscale that also records, at every step, the compiled models the engine says are alive."""

    def __init__(self, lib, pipeline):
        super().__init__(lib, pipeline)
        self.alive_in_loop: list = []

        def progress(_, step, total):
            self.alive_in_loop.append(capi.resident(lib, pipeline))
            return 0

        noise, latents, _ = self._callbacks
        self._callbacks = (noise, latents, PROGRESS_FN(progress))


BUDGET_GEOMETRIES = {
    "untiled": {},
    # every tile shape of every VAE segment compiled twice (free and budgeted): slow
    "tiled": {"upscale": 8, "vae_decoder_tile_size": 24, "latent_tile_size": 32},
}


@pytest.mark.parametrize(
    "geometry", [pytest.param("untiled"), pytest.param("tiled", marks=pytest.mark.slow)], ids=list(BUDGET_GEOMETRIES)
)
def test_a_budgeted_upscale_frees_each_stage_and_makes_the_same_image(lib, runtime_bundle, geometry):
    """memory_budget honoured: the same image as without one, only ControlNet and UNet compiled during the loop
    (counted by the engine), nothing left after the last stage; without a budget every network stays."""
    options = {"steps": 2, "seed": 3, **BUDGET_GEOMETRIES[geometry]}
    image = _upscale_image(56, 40)
    free = open_pipeline(lib, runtime_bundle)
    try:
        expected = NativeUpscale(lib, free)(image, **options)
        assert len(capi.resident(lib, free)) >= 6
    finally:
        lib.seesr_pipeline_close(free)
    handle = open_pipeline(lib, runtime_bundle, memory_budget=10**12)
    try:
        budgeted = BudgetedUpscale(lib, handle)
        got = budgeted(image, **options)
        assert budgeted.alive_in_loop == [{"controlnet": 1, "unet": 1}] * options["steps"]
        assert capi.resident(lib, handle) == {}
        assert np.array_equal(got, expected)
    finally:
        lib.seesr_pipeline_close(handle)


@pytest.mark.slow  # the denoisers compiled twice more, once with int8 linear weights
def test_a_budget_that_needs_int8_linear_weights_stays_close(lib, runtime_bundle):
    """A budget just under the denoiser stage's roomy peak: the plan gives ControlNet and UNet int8 linear weights
    (the Python backend's compress_linear_weights_int8), and the image stays within the relative L2 of 0.05 the
    Python test holds the int8 UNet to (tests/test_memory_budget.py)."""
    options = {"steps": 2, "seed": 3}
    image = _upscale_image(56, 40)
    roomy = _levers_of(lib, runtime_bundle, (56, 40), {}, 10**12)
    denoise = next(stage for stage in roomy["stages"] if stage["name"] == "denoise")
    budget = max(denoise["peak"] - 1, *(s["peak"] for s in roomy["stages"] if s["name"] != "denoise"))
    assert _levers_of(lib, runtime_bundle, (56, 40), {}, budget)["int8_linear"] == ["controlnet", "unet"]
    free = open_pipeline(lib, runtime_bundle)
    handle = open_pipeline(lib, runtime_bundle, memory_budget=budget)
    try:
        expected = NativeUpscale(lib, free)(image, **options).astype(np.float64)
        got = BudgetedUpscale(lib, handle)(image, **options).astype(np.float64)
    finally:
        lib.seesr_pipeline_close(free)
        lib.seesr_pipeline_close(handle)
    apart = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"int8 linear weights: image {apart:.4f} relative L2 from the unbudgeted one")
    assert 0 < apart < 0.05


def test_an_impossible_budget_is_refused_before_any_network_loads(lib, runtime_bundle):
    from seesr_runtime.pipeline import SeeSRPipeline

    handle = open_pipeline(lib, runtime_bundle, memory_budget=10**6)
    python = SeeSRPipeline.from_bundle(runtime_bundle, backend="openvino", verify="never", memory_budget=10**6)
    try:
        with pytest.raises(SeeSRError) as refused:
            NativeUpscale(lib, handle)(_upscale_image(56, 40), steps=2)
        assert capi.resident(lib, handle) == {}
    finally:
        lib.seesr_pipeline_close(handle)
    assert refused.value.status == STATUS["SEESR_ERROR_OPTION"]
    assert refused.value.message.startswith("memory_budget 1 MB is below the smallest plan for this bundle on openvino")
    with pytest.raises(OptionError) as python_refused:
        python(Image.fromarray(_upscale_image(56, 40)), steps=2)
    assert refused.value.message == str(python_refused.value)


def test_an_engine_options_struct_without_memory_budget_still_opens(lib, runtime_bundle):
    """A caller built before memory_budget passes the struct_size that ends with tiled_vae_spill_dir: the library
    reads no budget (here 1 byte, which every plan would refuse); the current size reads it."""
    before = capi.EngineOptions.memory_budget.offset
    for size in (before, capi.EngineOptions.tiled_vae_spill_dir.offset):
        handle = open_pipeline(lib, runtime_bundle, struct_size=size, memory_budget=1)
        try:
            assert capi.memory_plan(lib, handle, 56, 40)["budget"] is None
        finally:
            lib.seesr_pipeline_close(handle)
    handle = open_pipeline(lib, runtime_bundle, memory_budget=1)
    try:
        with pytest.raises(SeeSRError) as refused:
            capi.memory_plan(lib, handle, 56, 40)
        assert refused.value.message.startswith("memory_budget 1 B is below the smallest plan")
    finally:
        lib.seesr_pipeline_close(handle)


@pytest.mark.parametrize(
    "text",
    ["4GB", "2500MB", "4GiB", "3.5 GB", " 1.25kib ", "4000000000", "1", "lots", "0", "-1GB", "1.5", "4 G", "", "1e9"],
)
def test_byte_sizes_are_parsed_as_python_parses_them(lib, text):
    value = ctypes.c_uint64()
    try:
        expected = option_table.parse_byte_size("memory_budget", text)
    except OptionError as refused:
        with pytest.raises(SeeSRError) as native:
            call(lib, "seesr_parse_byte_size", b"memory_budget", text.encode(), ctypes.byref(value))
        assert (native.value.status, native.value.message) == (STATUS["SEESR_ERROR_OPTION"], str(refused))
        return
    call(lib, "seesr_parse_byte_size", b"memory_budget", text.encode(), ctypes.byref(value))
    assert value.value == expected


def test_a_budget_on_another_device_is_refused(lib, runtime_bundle):
    with pytest.raises(SeeSRError) as refused:
        open_pipeline(lib, runtime_bundle, device=b"AUTO", memory_budget=4 * 10**9)
    assert refused.value.status == STATUS["SEESR_ERROR_OPTION"]
    assert "memory_budget plans host memory for the CPU" in refused.value.message


def test_upscale_png_command_takes_a_memory_budget(cpp_build, runtime_bundle, tmp_path):
    """--memory-budget as `seesr upscale` reads it: the plan printed and the image written (the same image as
    without a budget: test_a_budgeted_upscale_frees_each_stage_and_makes_the_same_image); nonsense refused in one
    line."""
    command = _upscale_png_command(cpp_build)
    Image.fromarray(_upscale_image(32, 24)).save(tmp_path / "in.png")
    common = [command, tmp_path / "in.png", "--bundle", runtime_bundle, "--steps", "1"]
    budgeted = subprocess.run(
        [*common[:2], tmp_path / "b.png", *common[2:], "--memory-budget", "1TB", "--print-plan", "yes"],
        capture_output=True,
        text=True,
    )
    assert budgeted.returncode == 0, budgeted.stderr
    plan = json.loads(budgeted.stderr)
    assert plan["budget"] == 10**12 and plan["staged"] and plan["engine"] == "openvino fp32"
    assert Image.open(tmp_path / "b.png").size == (128, 96)
    nonsense = subprocess.run(
        [*common[:2], tmp_path / "c.png", *common[2:], "--memory-budget", "lots"], capture_output=True, text=True
    )
    assert nonsense.returncode == STATUS["SEESR_ERROR_OPTION"]
    assert nonsense.stderr.splitlines() == [
        "error: SEESR_ERROR_OPTION: memory_budget must be " + option_table.BYTE_SIZE_FORMS + ", got 'lots'"
    ]
