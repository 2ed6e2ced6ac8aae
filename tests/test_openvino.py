"""The OpenVINO backend, on real OpenVINO and the tiny bundle: parity with the torch reference in f32,
bf16 and int8 against f32, the compiled-model cache across starts, the bf16 capability fallback."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ov = pytest.importorskip(
    "openvino",
    reason="the openvino package is not installed (the openvino extra; make test installs it)",
)

from PIL import Image
from test_runtime_parity import compare, replayable_noise

from seesr_export.quantize import modelopt_available
from seesr_runtime import (
    SeeSRPipeline,
    doctor,
    openvino_backend,
)
from seesr_runtime.cli import main
from seesr_runtime.errors import BackendError
from seesr_runtime.manifest import BundleError, Manifest
from seesr_runtime.openvino_backend import OpenVINOBackend

FAST = dict(steps=2, process_size=128, color_fix="none")


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def ov_f32(tiny_bundle):
    return SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32")


# Same cases and tolerances as test_runtime_parity (latents <= 1e-4 relative L2, uint8 image within 1-2 levels).
@pytest.mark.parametrize(
    "options, image_tolerance",
    [
        (dict(steps=3, process_size=128, color_fix="none"), 1),  # the fast set's OpenVINO parity case
        pytest.param(dict(steps=2, color_fix="adain"), 1, marks=pytest.mark.slow),
        pytest.param(
            dict(steps=2, process_size=128, latent_tile_size=16, latent_tile_overlap=4, color_fix="none"),
            1,
            marks=pytest.mark.slow,
        ),
        pytest.param(dict(steps=2, process_size=128, guidance=1.0, color_fix="none"), 1, marks=pytest.mark.slow),
    ],
)
def test_openvino_f32_matches_reference(ov_f32, reference, lr_image, options, image_tolerance):
    latent_error, image_error = compare(ov_f32, reference, lr_image, **options)
    assert latent_error <= 1e-4
    assert image_error <= image_tolerance


def _against_f32(pipe, ov_f32, lr_image, label):
    ours = pipe(lr_image, noise_fn=replayable_noise(), **FAST)
    f32 = ov_f32(lr_image, noise_fn=replayable_noise(), **FAST)
    latent = relative_l2(ours.latents[-1], f32.latents[-1])
    quality = psnr(ours.image, f32.image)
    print(f"{label}: final latent rel L2 vs OpenVINO f32 {latent:.2e}, image PSNR {quality:.1f} dB")
    assert np.isfinite(ours.latents[-1]).all() and ours.image.size == f32.image.size
    return latent, quality


@pytest.mark.slow
def test_bf16_runs_and_reports_its_error(tiny_bundle, ov_f32, lr_image):
    pipe = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="bf16")
    expected = "bf16" if "BF16" in openvino_backend.device_capabilities(ov.Core(), "CPU") else "f32"
    assert pipe.backend.inference_precision == expected
    latent, quality = _against_f32(pipe, ov_f32, lr_image, "bf16")
    # Measured on the tiny random-weight fixture (AVX512_BF16 CPU): ~1e-1 / ~25 dB; random tiny networks
    # amplify rounding far more than SD2 size does (benchmarks/results/cpu/openvino_precision.md).
    assert latent < 0.5 and quality > 15


@pytest.fixture(scope="module")
def int8_bundle(int8_tiny_bundle):
    """ModelOpt's int8 (the primary recipe) where installed, else onnxruntime's quantizer: tests/test_int8.py's."""
    return int8_tiny_bundle("modelopt" if modelopt_available() else "onnxruntime")[0]


@pytest.mark.slow
def test_int8_runs_and_reports_its_error(int8_bundle, lr_image):
    f32 = SeeSRPipeline.from_bundle(int8_bundle, backend="openvino", precision="fp32")
    pipe = SeeSRPipeline.from_bundle(int8_bundle, backend="openvino", precision="int8")
    assert pipe.backend.graph_precision("unet") == "int8" and pipe.backend.graph_precision("dape") == "fp32"
    latent, quality = _against_f32(pipe, f32, lr_image, "int8")
    # onnxruntime runs the same Q/DQ graphs at ~6e-2 per call on this fixture (tests/test_int8.py)
    assert latent < 0.5 and quality > 15


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def controlnet_feeds(manifest, side=8):
    rng = np.random.default_rng(0)
    spec = manifest.spec("controlnet")
    feeds = {
        t.name: rng.standard_normal(t.concrete_shape({"B": 2, "h": side, "w": side})).astype(np.float32)
        for t in spec.inputs
    }
    feeds.update(
        timestep=np.full((2,), 499.0, np.float32),
        conditioning_scale=np.array(1.0, np.float32),
        controlnet_cond=rng.random(feeds["controlnet_cond"].shape, dtype=np.float32),
    )
    return feeds


@pytest.mark.slow
def test_second_start_loads_compiled_models_from_the_cache(tiny_bundle, tmp_path):
    manifest = Manifest.load(tiny_bundle)
    feeds = controlnet_feeds(manifest)
    first = OpenVINOBackend(manifest, precision="bf16", cache_dir=tmp_path / "cache")
    expected = first.run("controlnet", feeds)
    compiled = first.network("controlnet").models()[0]
    assert not compiled.main.get_property("LOADED_FROM_CACHE")
    files = _snapshot(tmp_path / "cache")
    ir = [name for name in files if name.startswith("ir/controlnet.fp32.") and name.endswith(".xml")]
    assert len(ir) == 2 and any(name.endswith(".timestep.xml") for name in ir), files  # main + f32 timestep path
    assert any(name.startswith("blobs/") for name in files), files

    second = OpenVINOBackend(manifest, precision="bf16", cache_dir=tmp_path / "cache")
    outputs = second.run("controlnet", feeds)
    compiled = second.network("controlnet").models()[0]
    # OpenVINO read both compiled blobs and compiled nothing, and nothing new was written
    assert compiled.main.get_property("LOADED_FROM_CACHE")
    assert compiled.timestep_path.get_property("LOADED_FROM_CACHE")
    assert _snapshot(tmp_path / "cache") == files
    assert all(np.array_equal(a, b) for a, b in zip(outputs, expected))


@pytest.mark.slow
def test_timestep_path_runs_apart_in_f32(tiny_bundle):
    """The policy's "timestep" group (default for UNet and ControlNet): brings bf16 from ~1.5e-1 to ~2e-2
    relative L2 on this fixture (and at SD2 size: benchmarks/results/cpu/openvino_precision.md)."""
    manifest = Manifest.load(tiny_bundle)
    if "BF16" not in openvino_backend.device_capabilities(ov.Core(), "CPU"):
        pytest.skip("this CPU has no bf16 units: bf16 falls back to f32")
    feeds = controlnet_feeds(manifest, side=64)  # 512 px; at 8x8 bf16 errors are 0.3 either way
    f32 = OpenVINOBackend(manifest, precision="fp32").run("controlnet", dict(feeds))
    errors = {}
    for keep in ((), ("timestep",)):
        backend = OpenVINOBackend(manifest, precision="bf16", keep_f32={"controlnet": keep})
        outputs = backend.run("controlnet", dict(feeds))
        errors[keep] = max(relative_l2(a, b) for a, b in zip(outputs, f32))
        compiled = backend.network("controlnet").models()[0]
        assert (compiled.timestep_path is not None) == bool(keep)
    print(f"controlnet bf16 rel L2 vs f32: all bf16 {errors[()]:.2e}, timestep path in f32 {errors[('timestep',)]:.2e}")
    assert errors[("timestep",)] < errors[()] / 2


def test_bf16_without_bf16_units_falls_back_to_f32(tiny_bundle, monkeypatch):
    manifest = Manifest.load(tiny_bundle)
    monkeypatch.setattr(openvino_backend, "device_capabilities", lambda core, device: {"FP32", "INT8", "BIN"})
    with pytest.warns(RuntimeWarning, match=r"CPU cannot run precision 'bf16'.*lack 'BF16'.*running f32"):
        backend = OpenVINOBackend(manifest, precision="bf16")
    assert backend.inference_precision == "f32" and backend.config["INFERENCE_PRECISION_HINT"] == "f32"
    feeds = {"input_ids": np.arange(77, dtype=np.int64)[None] % 100}
    f32 = OpenVINOBackend(manifest, precision="fp32").run("text_encoder", feeds)
    assert np.array_equal(backend.run("text_encoder", feeds)[0], f32[0])
    with pytest.raises(BundleError, match="lack 'BF16'"):
        OpenVINOBackend(manifest, precision="bf16", on_unsupported="error")


def test_kept_groups_run_in_f32_under_bf16(tiny_bundle):
    manifest = Manifest.load(tiny_bundle)
    if "BF16" not in openvino_backend.device_capabilities(ov.Core(), "CPU"):
        pytest.skip("this CPU has no bf16 units: every operation runs in f32 anyway")
    feeds = {"input_ids": np.arange(77, dtype=np.int64)[None] % 100}

    def mvn_precisions(keep):
        backend = OpenVINOBackend(manifest, precision="bf16", keep_f32={"text_encoder": keep})
        backend.run("text_encoder", feeds)
        compiled = backend.network("text_encoder").models()[0]
        info = [op.get_rt_info() for op in compiled.main.get_runtime_model().get_ops()]
        return {i["runtimePrecision"].value for i in info if i["layerType"].value == "MVN"}

    assert "bf16" in mvn_precisions(())  # (the last one, at the graph's tail, stays f32 anyway)
    assert mvn_precisions(("norm",)) == {"f32"}


def test_threads_sharing_one_pipeline_get_their_serial_images(tiny_bundle):
    """Eight upscales at once on one pipeline (4 images at 2 sizes), started together on a fresh backend, so
    that they compile and run at once: each gives the bytes it gives alone."""
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4) for h, w in ((20, 24), (16, 28))]
    options = dict(steps=2, process_size=64, color_fix="wavelet")
    serial_pipe = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32")
    serial = [serial_pipe(image, seed=i, **options).image.tobytes() for i, image in enumerate(images)]
    assert len({len(image) for image in serial}) == 2  # two output sizes: two shapes of every denoiser call

    shared = SeeSRPipeline.from_bundle(tiny_bundle, backend="openvino", precision="fp32")
    start = threading.Barrier(len(images))

    def upscale(i):
        start.wait()
        return shared(images[i], seed=i, **options).image.tobytes()

    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(upscale, range(len(images))))
    assert [a == b for a, b in zip(together, serial)] == [True] * len(images)
    # the calls really overlapped: some compiled shape served several at once, each with its own request
    assert max(c.requests.created for c in shared.backend.network("dape").models()) > 1


def test_openvino_failures_are_backend_errors(tiny_bundle):
    backend = OpenVINOBackend(Manifest.load(tiny_bundle), precision="fp32")
    with pytest.raises(BackendError, match=r"OpenVINO failed to run text_encoder on input shapes \{'input_ids'"):
        backend.run("text_encoder", {"input_ids": np.zeros((1, 77), np.float32)})  # float token ids
    with pytest.raises(BackendError, match=r"OpenVINO could not compile controlnet for input shapes"):
        backend.run("controlnet", {**controlnet_feeds(backend.manifest), "sample": np.zeros((2, 4, 8, 9), np.float32)})


# A 72x40 input at process size 128 is a 288x160 working image (36x20 latents): at these tiles the encoder's grid
# is 4 x 2 tiles of four shapes (128 or 96 px wide, 128 or 96 high), the decoder's 2 x 1 of two.
UNEVEN_TILES = ["--process-size", "128", "--vae-encoder-tile-size", "64", "--vae-decoder-tile-size", "8"]


def test_a_second_tiled_image_of_the_same_size_compiles_nothing(tiny_bundle, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    command = ["upscale", str(folder), "-o", str(tmp_path / "out"), "--bundle", str(tiny_bundle)]
    command += ["--backend", "openvino", "--precision", "fp32", "--steps", "1", *UNEVEN_TILES, "-v"]
    assert main(command) == 0
    compiles = dict(re.findall(r"\b(\w)\.png: [\d.]+ s, (\d+) compiles", capsys.readouterr().err))
    # 6 networks + 4 shapes of every encoder segment + 2 of every decoder segment; nothing again for b
    assert int(compiles["a"]) > 6 + 4 + 2 and compiles["b"] == "0", compiles


def test_bench_reports_compiles_per_image(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    command = ["bench", "--bundle", str(tiny_bundle), "--backend", "openvino", "--precision", "fp32"]
    command += ["--size", "128", "640", "--steps", "1", "--warmup", "1", "--runs", "2", "--json", str(out), "-q"]
    assert main(command) == 0
    counts = [report["compiles_per_image"] for report in json.loads(out.read_text())["results"]]
    # compiled at the opt shapes (512 px working image) before timing: 128 px (enlarged to 512) compiles
    # nothing; the 640 px warm-up compiles the shapes of its ControlNet, UNet and VAE, the timed runs nothing
    assert counts[0] == [0, 0, 0] and counts[1][0] >= 4 and counts[1][1:] == [0, 0], counts


def test_bad_options_are_named(tiny_bundle):
    manifest = Manifest.load(tiny_bundle)
    with pytest.raises(BundleError, match=r"precision 'fp8' is not one of"):
        OpenVINOBackend(manifest, precision="fp8")
    with pytest.raises(BundleError, match=r"device 'NPU9' is not available"):
        OpenVINOBackend(manifest, device="NPU9")
    with pytest.raises(BundleError, match=r"keep_f32\['unet'\]: unknown groups \['softmaxx'\]"):
        OpenVINOBackend(manifest, precision="bf16", keep_f32={"unet": ("softmaxx",)})
    with pytest.raises(BundleError, match="no int8 graphs in this bundle"):
        OpenVINOBackend(manifest, precision="int8")


@pytest.mark.slow
def test_cli_upscale_with_openvino(tiny_bundle, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out"
    assert (
        main(
            [
                "upscale",
                str(source),
                "-o",
                str(out),
                "--bundle",
                str(tiny_bundle),
                "--backend",
                "openvino",
                "--precision",
                "bf16",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--threads",
                "2",
                "--steps",
                "1",
                "--process-size",
                "64",
                "-q",
            ]
        )
        == 0
    )
    assert Image.open(out / "in.png").size == (96, 80)
    assert (
        main(
            [
                "upscale",
                str(source),
                "-o",
                str(out),
                "--bundle",
                str(tiny_bundle),
                "--backend",
                "onnxruntime",
                "--precision",
                "bf16",
                "-q",
            ]
        )
        == 2
    )
    assert "--precision bf16 needs --backend openvino" in capsys.readouterr().err


@pytest.mark.slow
def test_upscale_runs_the_recommended_configuration_and_says_so(runtime_bundle, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(source)
    command = [
        "upscale",
        str(source),
        "-o",
        str(tmp_path / "out"),
        "--bundle",
        str(runtime_bundle),
        "--steps",
        "1",
        "--process-size",
        "64",
    ]
    facts = doctor.gather_facts(Manifest.load(runtime_bundle, verify="never"))
    on_gpu = "CUDAExecutionProvider" in facts.onnxruntime_providers and facts.cuda_gpus
    has_bf16 = "BF16" in openvino_backend.device_capabilities(ov.Core(), "CPU")
    cpu_choice = "note: running OpenVINO bf16" if has_bf16 else "note: running OpenVINO fp32"
    assert main(command) == 0
    assert ("note: running onnxruntime fp16 on CUDA" if on_gpu else cpu_choice) in capsys.readouterr().err
    # a CPU without bf16 units runs OpenVINO f32; an explicit backend is never overridden (and not announced)
    monkeypatch.setattr(openvino_backend, "device_capabilities", lambda core, device: {"FP32", "INT8"})
    if not on_gpu:
        assert main(command) == 0
        assert (
            "note: running OpenVINO fp32 (OpenVINO is installed; this CPU has no bf16 units" in capsys.readouterr().err
        )
    assert main(command + ["--backend", "onnxruntime"]) == 0
    assert "note: running" not in capsys.readouterr().err
