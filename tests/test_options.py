"""The options table (seesr_runtime.options) and the error hierarchy at every entry point: the library
refuses bad options and images with the documented exception naming the value; every CLI prints one
line and exits 2, never a traceback."""

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from seesr_runtime import SeeSRPipeline
from seesr_runtime import options as option_table
from seesr_runtime.errors import BundleError, ImageRejected, InputError, OptionError, SeeSRError
from seesr_runtime.imaging import COLOR_FIXES
from seesr_runtime.manifest import Manifest

RGB = np.zeros((24, 32, 3), np.uint8)
FAST = {"steps": 1, "process_size": 64}

# (image, options, exception, what the message says)
LIBRARY_CASES = {
    "0x0 array": (np.zeros((0, 0, 3), np.uint8), {}, ImageRejected, "0x0 is too small (at least 8x8 pixels)"),
    "2-D array": (
        np.zeros((16, 16), np.uint8),
        {},
        ImageRejected,
        "expected a PIL image or an HxWx3 uint8 array, got uint8 (16, 16)",
    ),
    "4-channel array": (np.zeros((16, 16, 4), np.uint8), {}, ImageRejected, "got uint8 (16, 16, 4)"),
    "float array": (np.zeros((16, 16, 3), np.float32), {}, ImageRejected, "got float32 (16, 16, 3)"),
    "1x1 image": (Image.new("RGB", (1, 1)), {}, ImageRejected, "1x1 is too small (at least 8x8 pixels)"),
    "7 px side": (np.zeros((7, 300, 3), np.uint8), {}, ImageRejected, "300x7 is too small"),
    "over the default pixel limit": (
        np.broadcast_to(RGB[:1, :1], (4097, 4096, 3)),
        {},
        ImageRejected,
        "4096x4097 is 16781312 pixels, over the limit of 16777216",
    ),
    "over a lowered pixel limit": (
        RGB,
        {"max_pixels": 700},
        ImageRejected,
        "32x24 is 768 pixels, over the limit of 700 (raise it with the max_pixels option)",
    ),
    "upscale 0": (RGB, {"upscale": 0}, OptionError, "upscale must be in [1, 8], got 0"),
    "process_size -8": (RGB, {"process_size": -8}, OptionError, "process_size must be in [8, 8192], got -8"),
    "guidance nan": (RGB, {"guidance": math.nan}, OptionError, "guidance must be a finite number >= 0.0, got nan"),
    "guidance inf": (RGB, {"guidance": math.inf}, OptionError, "guidance must be a finite number >= 0.0, got inf"),
    "steps 0": (RGB, {"steps": 0}, OptionError, "steps must be in [1, 999], got 0"),
    "steps 2.5": (RGB, {"steps": 2.5}, OptionError, "steps must be an integer in [1, 999], got 2.5 (float)"),
    "steps as text": (RGB, {"steps": "10"}, OptionError, "steps must be an integer in [1, 999], got '10' (str)"),
    "unknown colour fix": (
        RGB,
        {"color_fix": "sepia"},
        OptionError,
        "color_fix must be one of ('adain', 'wavelet', 'none'), got 'sepia'",
    ),
    "unknown start point": (RGB, {"start_point": "lr2"}, OptionError, "start_point must be one of ('lr', 'noise')"),
    "tile overlap = tile size": (
        RGB,
        {"latent_tile_size": 16, "latent_tile_overlap": 16},
        OptionError,
        "latent_tile_overlap must be smaller than latent_tile_size (16), got 16",
    ),
    "tile overlap > bundle's tile size": (
        RGB,
        {"latent_tile_overlap": 200},
        OptionError,
        "latent_tile_overlap must be smaller than latent_tile_size (96), got 200",
    ),
    "negative seed": (RGB, {"seed": -1}, OptionError, "seed must be >= 0, got -1"),
    "tiled_vae as 0": (RGB, {"tiled_vae": 0}, OptionError, "tiled_vae must be true or false, got 0 (int)"),
    "unknown option": (RGB, {"stepz": 3}, OptionError, "unknown option(s) ['stepz']"),
}


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_library_refuses_with_the_documented_error(runtime_pipeline, case):
    image, options, error, message = LIBRARY_CASES[case]
    with pytest.raises(error) as raised:
        runtime_pipeline(image, **{**FAST, **options})
    assert type(raised.value) is error
    assert message in str(raised.value)
    assert isinstance(raised.value, InputError) and isinstance(raised.value, SeeSRError)


def test_option_error_names_the_option(runtime_pipeline):
    with pytest.raises(OptionError) as raised:
        runtime_pipeline(RGB, steps=1, guidance=-1.0)
    assert raised.value.option == "guidance"


def test_pixel_limit_can_be_raised(runtime_pipeline):
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with pytest.raises(ImageRejected, match="768 pixels, over the limit of 767"):
        runtime_pipeline(image, max_pixels=767, **FAST)
    assert runtime_pipeline(image, max_pixels=768, **FAST).image.size == (128, 96)


def test_equal_values_of_other_types_give_the_same_image(runtime_pipeline):
    image = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    plain = runtime_pipeline(image, guidance=5.0, process_size=64, steps=2, seed=3)
    numpy = runtime_pipeline(
        image, guidance=np.int64(5), process_size=np.int32(64), steps=np.int64(2), seed=np.uint8(3)
    )
    assert np.array_equal(np.asarray(plain.image), np.asarray(numpy.image))


def test_every_default_passes_its_own_check():
    for option in option_table.OPTIONS:
        assert option.check(option.default) == option.default, option.name
    assert option_table.resolve({}) == {o.name: o.default for o in option_table.OPTIONS}


def test_colour_fix_choices_are_the_runtimes():
    assert option_table.OPTION["color_fix"].choices == tuple(COLOR_FIXES)


# ------------------------------------------------------------------ the manifest's description


def test_bundle_records_the_options_description(runtime_bundle):
    pipeline = json.loads((runtime_bundle / "manifest.json").read_text())["pipeline"]
    assert pipeline["options"] == json.loads(json.dumps(option_table.describe()))
    assert pipeline["defaults"] == option_table.bundle_defaults()
    steps = next(entry for entry in pipeline["options"] if entry["name"] == "steps")
    assert steps == {
        "name": "steps",
        "type": "int",
        "default": 50,
        "minimum": 1,
        "maximum": 999,
        "in_bundle": "defaults.steps",
        "help": "DDPM steps",
    }


def _rewritten(bundle, tmp_path, change):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    change(data["pipeline"])
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_bundles_built_before_the_description_fall_back_to_the_table(runtime_bundle, tmp_path):
    def older(pipeline):
        del pipeline["options"]
        del pipeline["defaults"]["tiled_vae"]  # older still: built before the tiled VAE
        pipeline["defaults"]["steps"] = 20

    bundle = _rewritten(runtime_bundle, tmp_path, older)
    described = {entry["name"]: entry for entry in Manifest.load(bundle).options()}
    assert described["steps"]["default"] == 20 and described["tiled_vae"]["default"] is True
    assert described["steps"]["maximum"] == 999
    resolved = SeeSRPipeline.from_bundle(bundle).resolve_options({})
    assert resolved["steps"] == 20 and resolved["tiled_vae"] is True


def test_malformed_description_is_a_bundle_error(runtime_bundle, tmp_path):
    def broken(pipeline):
        pipeline["options"][3] = {"name": "steps", "type": "integer", "default": 50}

    with pytest.raises(BundleError, match=r"pipeline.options\[3\] \(steps\): needs 'type'"):
        Manifest.load(_rewritten(runtime_bundle, tmp_path, broken))


# ------------------------------------------------------------------ command lines


def run_cli(*args, prelude: str = ""):
    script = prelude + textwrap.dedent(f"""
        import sys
        from {args[0]} import main
        sys.exit(main({list(args[1:])!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def assert_one_line_error(done, message: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr[-2000:]


@pytest.fixture(scope="module")
def lr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lr") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


RUNTIME_CLI_CASES = {
    "steps 0": (["--steps", "0"], "steps must be in [1, 999], got 0"),
    "guidance nan": (["--guidance", "nan"], "guidance must be a finite number >= 0.0, got nan"),
    "process size -8": (["--process-size", "-8"], "process_size must be in [8, 8192], got -8"),
    "upscale 0": (["--upscale", "0"], "upscale must be in [1, 8], got 0"),
    "tile overlap >= the bundle's tile size": (
        ["--latent-tile-overlap", "96"],
        "latent_tile_overlap must be smaller than latent_tile_size (96)",
    ),
    "max pixels 0": (["--max-pixels", "0"], "max_pixels must be >= 64, got 0"),
    "missing bundle": (["--bundle", "/nonexistent/bundle"], "not a SeeSR bundle"),
}


@pytest.mark.parametrize("case", RUNTIME_CLI_CASES)
def test_seesr_upscale_refuses_in_one_line(runtime_bundle, lr_file, tmp_path, case):
    extra, message = RUNTIME_CLI_CASES[case]
    done = run_cli(
        "seesr_runtime.cli",
        "upscale",
        str(lr_file),
        "-o",
        str(tmp_path / "out"),
        "--bundle",
        str(runtime_bundle),
        "--backend",
        "onnxruntime",
        "-q",
        *extra,
    )
    assert_one_line_error(done, message)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_line(runtime_bundle, lr_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    done = run_cli(
        "seesr_runtime.cli",
        "upscale",
        str(lr_file),
        "-o",
        str(blocker / "out"),
        "--bundle",
        str(runtime_bundle),
        "--backend",
        "onnxruntime",
        "--steps",
        "1",
        "--process-size",
        "64",
        "-q",
    )
    assert_one_line_error(done, str(blocker / "out"))


EXPORT_CLI_CASES = {
    "flops, missing bundle": (["flops", "--bundle", "/nonexistent/bundle"], "/nonexistent/bundle: not a SeeSR bundle"),
    "triton, steps 0": (
        ["triton", "--bundle", "{bundle}", "--out", "{tmp}/repo", "--option", "steps=0"],
        "--option: steps must be in [1, 999], got 0",
    ),
    "triton, max pixels 10": (
        ["triton", "--bundle", "{bundle}", "--out", "{tmp}/repo", "--max-pixels", "10"],
        "--max-pixels: max_pixels must be >= 64, got 10",
    ),
    "reference, guidance nan": (
        ["reference", "{lr}", "-o", "{tmp}/out", "--seesr-root", "{tmp}", "--guidance", "nan"],
        "guidance must be a finite number >= 0.0, got nan",
    ),
}


@pytest.mark.parametrize("case", EXPORT_CLI_CASES)
def test_seesr_export_refuses_in_one_line(runtime_bundle, lr_file, tmp_path, case):
    extra, message = EXPORT_CLI_CASES[case]
    args = [a.format(bundle=runtime_bundle, tmp=tmp_path, lr=lr_file) for a in extra]
    assert_one_line_error(run_cli("seesr_export.cli", *args, "-q"), message)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # a torch subprocess
def test_fixture_errors_are_one_line_even_quiet(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli("seesr_export.cli", "fixture", "--out", str(blocker / "tiny"), "-q")
    assert_one_line_error(done, str(blocker))


@pytest.mark.slow  # a torch subprocess
def test_fixture_needs_no_open_clip(tmp_path):
    # open_clip_torch is installed here: a None entry in sys.modules makes it unimportable, as when it is not.
    done = run_cli(
        "seesr_export.cli",
        "fixture",
        "--out",
        str(tmp_path / "tiny"),
        "-q",
        prelude="import sys\nsys.modules['open_clip'] = None\n",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tiny" / "preset").is_dir()


def test_triton_client_checks_options_before_connecting(lr_file, tmp_path):
    # Nothing listens on port 9 (discard): an option error must come first, without tritonclient even installed.
    done = run_cli(
        "seesr_runtime.triton_client",
        "upscale",
        str(lr_file),
        "-o",
        str(tmp_path / "out"),
        "--url",
        "127.0.0.1:9",
        "--steps",
        "0",
    )
    assert_one_line_error(done, "steps must be in [1, 999], got 0")


@pytest.mark.parametrize(
    "command", [("seesr_runtime.cli", "upscale"), ("seesr_export.cli", "reference"), ("seesr_export.cli", "demo")]
)
def test_option_flags_come_from_the_table(command):
    done = subprocess.run([sys.executable, "-m", command[0], command[1], "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    help_text = " ".join(done.stdout.split())
    for option in option_table.OPTIONS:
        assert option.cli_flag in help_text, option.name
    assert "DDPM steps; in [1, 999] (default: the bundle's; 50 in a standard bundle)" in help_text


def test_scheduler_refuses_steps_past_its_schedule():
    """The released SD2 scheduler ("leading", steps_offset 1) at 1000 steps would reach t=1000: refused by name,
    not an IndexError at the first step; 999, the table's maximum, is the largest it runs."""
    from seesr_runtime.scheduler import DDPMScheduler

    released = DDPMScheduler({"timestep_spacing": "leading", "steps_offset": 1})
    assert released.set_timesteps(999)[0] == 999
    with pytest.raises(OptionError) as refused:
        released.set_timesteps(1000)
    assert str(refused.value) == (
        "steps 1000 reach timestep 1000 with this bundle's scheduler (leading spacing, steps_offset 1), outside 0..999"
    )
    assert option_table.OPTION["steps"].maximum == 999
