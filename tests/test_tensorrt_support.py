"""TensorRT support: profiles from the manifest, engine names, manifest entries (no GPU needed), and the
backend's refusals, each checked where it can happen: a missing TensorRT where it is missing, a bundle
without engines where TensorRT and a GPU are present (these skip elsewhere, saying why)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from no_torch import PRELUDE

from seesr_export.trt_engines import EngineOptions, engine_entry, engine_filename, optimization_profiles
from seesr_runtime import SeeSRPipeline
from seesr_runtime.backends import create_backend
from seesr_runtime.cli import main
from seesr_runtime.manifest import BundleError, Manifest
from seesr_runtime.networks import NETWORK_NAMES, ModelDims, network_specs
from seesr_runtime.trt_backend import _cudart


def tensorrt_stack_missing() -> str | None:
    """Why the tensorrt backend cannot load here (a package it imports is missing), or None."""
    try:
        import tensorrt  # noqa: F401  (optional: the tensorrt extra)

        _cudart()  # imports cuda-python (optional) on first use
    except ImportError as exc:
        return f"the tensorrt backend's packages are not installed ({exc})"
    return None


def cuda_device_missing() -> str | None:
    """Why no CUDA device can be used through cuda-python here, or None."""
    missing = tensorrt_stack_missing()
    if missing:
        return missing
    error, count = _cudart().cudaGetDeviceCount()
    return None if int(error) == 0 and count > 0 else f"no CUDA device is visible (cudaGetDeviceCount: {error})"


needs_tensorrt_missing = pytest.mark.skipif(
    tensorrt_stack_missing() is None,
    reason="tensorrt and cuda-python are installed here, so the backend never refuses for a missing package",
)
needs_tensorrt_and_gpu = pytest.mark.skipif(cuda_device_missing() is not None, reason=str(cuda_device_missing()))


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_profiles_cover_the_declared_shapes(runtime_bundle, name):
    spec = Manifest.load(runtime_bundle).spec(name)
    profiles = optimization_profiles(spec)
    assert [p for p, _ in profiles] == [p.name for p in spec.profiles]
    for (_, shapes), profile in zip(profiles, spec.profiles):
        assert set(shapes) == {t.name for t in spec.inputs if t.shape}
        for tensor in spec.inputs:
            if not tensor.shape:
                continue
            low, opt, high = shapes[tensor.name]
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), tensor.name
            assert opt == tensor.concrete_shape(profile.opt)


def test_denoiser_profiles_include_512px_and_the_96_tile():
    dims = ModelDims(
        text_dim=1024,
        num_tags=4585,
        residual_channels=(320,) * 4 + (640,) * 3 + (1280,) * 5,
        residual_strides=(1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8),
        mid_channels=1280,
    )
    unet = network_specs(dims)["unet"]
    shapes = dict(optimization_profiles(unet))
    assert shapes["512px"]["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64))
    assert shapes["tile96"]["down_res_11"][2] == (2, 1280, 12, 12)
    assert shapes["dynamic"]["encoder_hidden_states"][0] == (1, 77, 1024)
    control = dict(optimization_profiles(network_specs(dims)["controlnet"]))
    assert control["tile96"]["controlnet_cond"][1] == (2, 3, 768, 768)
    with pytest.raises(ValueError, match="no profile"):
        optimization_profiles(unet, ("4k",))


def test_engine_names_and_manifest_entry(runtime_bundle):
    assert engine_filename("unet", "fp16", "10.8.0", (9, 0)) == "unet.fp16.trt10.8.0.sm90.plan"
    spec = Manifest.load(runtime_bundle).spec("unet")
    entry = engine_entry(
        "unet",
        spec,
        "engines/unet.fp16.trt10.8.0.sm90.plan",
        "0" * 64,
        EngineOptions(profiles=("512px", "tile96")),
        "10.8.0",
        (9, 0),
    )
    assert entry["strongly_typed"] and entry["profiles"] == ["512px", "tile96"]
    assert entry["compute_capability"] == [9, 0]


def _run_without_torch(body: str):
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_tensorrt_backend_module_imports_without_torch_or_tensorrt():
    out = _run_without_torch("""
        import seesr_runtime.trt_backend  # TensorRT is imported only when a backend is made
        print(sorted(m for m in ("tensorrt", "torch") if m in sys.modules))
    """)
    assert out.strip() == "[]"


@needs_tensorrt_missing
def test_missing_tensorrt_is_refused_clearly(runtime_bundle):
    out = _run_without_torch(f"""
        from seesr_runtime import SeeSRPipeline
        from seesr_runtime.manifest import BundleError
        try:
            SeeSRPipeline.from_bundle({str(runtime_bundle)!r}, backend="tensorrt")
        except BundleError as exc:
            print("REFUSED", exc)
    """)
    assert out.startswith("REFUSED") and "backend='onnxruntime'" in out


@pytest.mark.gpu
@needs_tensorrt_and_gpu
def test_bundle_without_engines_is_refused_clearly(runtime_bundle):
    with pytest.raises(
        BundleError,
        match=r"no fp16 TensorRT engine for '\w+'; build with seesr-export build "
        r"--backend tensorrt",
    ):
        SeeSRPipeline.from_bundle(runtime_bundle, backend="tensorrt")


def test_gpu_validate_dry_run(tiny_bundle):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.py"
    done = subprocess.run(
        [sys.executable, str(script), "--bundle", str(tiny_bundle), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan: unet fp16 at {'B': 2, 'h': 64, 'w': 64}" in done.stdout
    assert "dry run: 6 engines would be built and checked" in done.stdout


def test_cuda_graph_option_needs_the_cuda_provider(runtime_bundle):
    """--cuda-graph on onnxruntime needs the CUDA provider: refused on the CPU provider, GPU or not."""
    with pytest.raises(BundleError, match="cuda_graph needs the CUDA provider"):
        create_backend("onnxruntime", Manifest.load(runtime_bundle), cuda_graph=True)


BENCH_TENSORRT = [
    "--backend",
    "tensorrt",
    "--cuda-graph",
    "--precision",
    "fp16",
    "--steps",
    "1",
    "--runs",
    "1",
    "--warmup",
    "0",
    "-q",
]


@needs_tensorrt_missing
def test_cli_refuses_tensorrt_where_it_is_missing(runtime_bundle, capsys):
    """The CLI's tensorrt backend where TensorRT is missing: exit 2, one line naming it, no traceback."""
    assert main(["bench", "--bundle", str(runtime_bundle), *BENCH_TENSORRT]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "Traceback" not in err


@pytest.mark.gpu
@needs_tensorrt_and_gpu
def test_cli_refuses_a_bundle_without_engines(runtime_bundle, capsys):
    assert main(["bench", "--bundle", str(runtime_bundle), *BENCH_TENSORRT]) == 2
    err = capsys.readouterr().err
    assert "no fp16 TensorRT engine" in err and "Traceback" not in err
