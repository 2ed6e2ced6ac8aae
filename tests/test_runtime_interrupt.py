"""``seesr upscale`` over a folder, interrupted: SIGKILL leaves only complete PNGs, SIGINT/SIGTERM stop
after the current image with the summary and a non-zero exit, and ``--skip-existing`` finishes the rest.
Real processes on the tiny bundle (torch-free)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from seesr_runtime.filemodes import remove_stale_temporaries, write_atomically

# Real processes killed and signalled mid-batch: integration, not the inner loop (`make test-fast`).
pytestmark = pytest.mark.slow

IMAGES = 8
OUT_SIZE = (128, 96)  # 32x24 inputs, x4


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(inputs / f"img{i}.png")
    return inputs


def upscale(bundle, inputs, out, *extra) -> list[str]:
    # Enough steps that one image takes a noticeable moment, so a signal lands mid-batch.
    return [
        sys.executable,
        "-m",
        "seesr_runtime.cli",
        "upscale",
        str(inputs),
        "-o",
        str(out),
        "--bundle",
        str(bundle),
        "--backend",
        "onnxruntime",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--steps",
        "4",
        "--process-size",
        "128",
        "-q",
        *extra,
    ]


def start_and_wait_for_first_output(command, out, timeout=600.0) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not list(out.glob("*.png")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.01)
    return process


def assert_only_complete_pngs(out) -> int:
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert all(name.endswith(".png") for name in visible), visible
    for name in visible:
        with Image.open(out / name) as image:
            image.load()  # a truncated PNG fails here
            assert image.size == OUT_SIZE
    return len(visible)


def finish_with_skip_existing(bundle, inputs, out, already: int) -> None:
    done = subprocess.run(upscale(bundle, inputs, out, "--skip-existing"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{IMAGES - already} upscaled, {already} skipped, 0 failed" in done.stderr
    assert assert_only_complete_pngs(out) == IMAGES
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("delay", [0.0, 0.15], ids=["just after an output", "mid-image"])
def test_sigkill_leaves_only_complete_pngs(runtime_bundle, folder, tmp_path, delay):
    out = tmp_path / "out"
    process = start_and_wait_for_first_output(upscale(runtime_bundle, folder, out), out)
    time.sleep(delay)
    process.kill()
    process.communicate()
    written = assert_only_complete_pngs(out)
    assert 1 <= written < IMAGES
    finish_with_skip_existing(runtime_bundle, folder, out, written)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_after_the_current_image(runtime_bundle, folder, tmp_path, signum):
    out = tmp_path / "out"
    process = start_and_wait_for_first_output(upscale(runtime_bundle, folder, out), out)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    written = assert_only_complete_pngs(out)
    assert 1 <= written < IMAGES
    name = signal.Signals(signum).name
    assert (
        f"{written} upscaled, 0 skipped, 0 failed; stopped by {name} with {IMAGES - written} not started "
        "(rerun with --skip-existing to finish)"
    ) in err
    finish_with_skip_existing(runtime_bundle, folder, out, written)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its process id now names no live process
    stale = tmp_path / f".a.png.{finished.pid}.x1y2z3.tmp"
    live = tmp_path / f".b.png.{os.getpid()}.x1y2z3.tmp"
    other = tmp_path / f".notes.{finished.pid}.x1y2z3.tmp"  # not an output's temporary file
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    remove_stale_temporaries(tmp_path, ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_outputs_get_the_users_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "a.png", lambda tmp: Image.new("RGB", (8, 8)).save(tmp, format="PNG"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o640
