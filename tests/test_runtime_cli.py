"""``seesr upscale``: batches, bad inputs, atomic outputs (torch-free)."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seesr_runtime.cli import main

FAST = ["--steps", "1", "--process-size", "64", "-q"]


def _png(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    good = _png(folder / "a_good.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    gray = _png(folder / "b_gray.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    rgba = _png(folder / "c_rgba.png", rng.integers(0, 256, (20, 24, 4), dtype=np.uint8))
    deep = folder / "d_16bit.png"
    Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(deep)
    tiny = _png(folder / "e_tiny.png", np.zeros((1, 1, 3), np.uint8))
    (folder / "f_empty.png").write_bytes(b"")
    (folder / "g_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    jpeg = folder / "h_truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    big = _png(folder / "i_big.png", np.zeros((300, 300, 3), np.uint8))
    return folder, {"good": good, "gray": gray, "rgba": rgba, "deep": deep, "tiny": tiny, "big": big}


@pytest.mark.slow  # a CLI batch end to end
def test_batch_goes_on_past_bad_files(runtime_bundle, inputs, tmp_path, capsys):
    folder, files = inputs
    out = tmp_path / "out"
    code = main(
        [
            "upscale",
            str(folder),
            "-o",
            str(out),
            "--bundle",
            str(runtime_bundle),
            "--max-pixels",
            "50000",
            "--save-prompts",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["a_good.png", "b_gray.png", "c_rgba.png", "d_16bit.png"]
    for name in written:
        assert Image.open(out / name).size == (96, 80)
    assert (out / "txt" / "a_good.txt").read_text().endswith("clean, high-resolution, 8k")
    assert "e_tiny.png: 1x1 is too small" in err
    assert "f_empty.png: empty file" in err
    assert "g_corrupt.png: not a readable image" in err
    assert "h_truncated.jpg: cannot decode the image" in err
    assert "i_big.png: 300x300 is 90000 pixels, over the limit of 50000" in err
    assert "4 upscaled, 0 skipped, 5 failed" in err
    assert not list(out.glob(".*"))  # no temporary files left behind


@pytest.mark.slow  # a CLI batch end to end
def test_conversions_are_reported(runtime_bundle, inputs, tmp_path, capsys):
    _, files = inputs
    code = main(
        [
            "upscale",
            str(files["gray"]),
            str(files["rgba"]),
            str(files["deep"]),
            "-o",
            str(tmp_path / "o"),
            "--bundle",
            str(runtime_bundle),
            "--steps",
            "1",
            "--process-size",
            "64",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "b_gray.png: grayscale converted to RGB" in err
    assert "c_rgba.png: alpha channel dropped" in err
    assert "d_16bit.png: 16-bit grayscale scaled to 8-bit RGB" in err


def test_skip_existing(runtime_bundle, inputs, tmp_path, capsys):
    _, files = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_good.png").write_bytes(b"keep me")
    code = main(
        ["upscale", str(files["good"]), "-o", str(out), "--bundle", str(runtime_bundle), "--skip-existing", *FAST]
    )
    assert code == 0 and (out / "a_good.png").read_bytes() == b"keep me"
    assert "0 upscaled, 1 skipped, 0 failed" in capsys.readouterr().err


def test_missing_bundle_is_one_clear_error(inputs, tmp_path, capsys):
    _, files = inputs
    code = main(["upscale", str(files["good"]), "-o", str(tmp_path / "o"), "--bundle", str(tmp_path / "nope")])
    assert code == 2 and "not a SeeSR bundle" in capsys.readouterr().err


def test_help_documents_every_option():
    done = subprocess.run(
        [sys.executable, "-m", "seesr_runtime.cli", "upscale", "--help"], capture_output=True, text=True
    )
    options = [
        "--bundle",
        "--backend",
        "--providers",
        "--precision",
        "--threads",
        "--seed",
        "--prompt",
        "--added-prompt",
        "--negative-prompt",
        "--steps",
        "--guidance",
        "--conditioning-scale",
        "--process-size",
        "--upscale",
        "--latent-tile-size",
        "--latent-tile-overlap",
        "--color-fix",
        "--start-point",
        "--save-prompts",
        "--skip-existing",
        "--max-pixels",
        "--quiet",
    ]
    assert [option for option in options if option not in done.stdout] == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "0"], "--concurrency must be an integer >= 1, got 0"),
        (["--port", "70000"], "--port must be an integer in [0, 65535], got 70000"),
        (["--max-file-size", "lots"], "max_file_size must be a positive size"),
    ],
)
def test_ui_bad_flags_are_one_clear_error(flags, message, tmp_path, capsys):
    code = main(["ui", "--bundle", str(tmp_path / "none"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_ui_without_gradio_names_the_extra(tmp_path, capsys):
    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed here (CI's base-install run checks this without it)")
    code = main(["ui", "--bundle", str(tmp_path / "none")])
    assert code == 2 and "pip install '.[ui]'" in capsys.readouterr().err
