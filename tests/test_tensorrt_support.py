"""TensorRT support that needs no GPU: profiles from the manifest, engine names, manifest entries."""
import pytest

from seesr_export.trt_engines import EngineOptions, engine_entry, engine_filename, optimization_profiles
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import NETWORK_NAMES


def test_profiles_cover_the_declared_shapes(runtime_bundle):
    manifest = Manifest.load(runtime_bundle)
    for name in NETWORK_NAMES:
        spec = manifest.spec(name)
        profiles = optimization_profiles(spec)
        assert [p for p, _ in profiles] == [p.name for p in spec.profiles]
        for (_, shapes), profile in zip(profiles, spec.profiles):
            assert set(shapes) == {t.name for t in spec.inputs if t.shape}
            for tensor in spec.inputs:
                if not tensor.shape:
                    continue
                low, opt, high = shapes[tensor.name]
                assert all(a <= b <= c for a, b, c in zip(low, opt, high)), (name, tensor.name)
                assert opt == tensor.concrete_shape(profile.opt)


def test_denoiser_profiles_include_512px_and_the_96_tile():
    from seesr_runtime.networks import ModelDims, network_specs

    dims = ModelDims(text_dim=1024, num_tags=4585, residual_channels=(320,) * 4 + (640,) * 3 + (1280,) * 5,
                     residual_strides=(1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8), mid_channels=1280)
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
    entry = engine_entry("unet", spec, "engines/unet.fp16.trt10.8.0.sm90.plan", "0" * 64,
                         EngineOptions(profiles=("512px", "tile96")), "10.8.0", (9, 0))
    assert entry["strongly_typed"] and entry["profiles"] == ["512px", "tile96"]
    assert entry["compute_capability"] == [9, 0]


def test_tensorrt_backend_imports_without_torch_and_refuses_clearly(runtime_bundle):
    import subprocess
    import sys
    import textwrap

    from no_torch import PRELUDE

    script = PRELUDE + textwrap.dedent(f"""
        import seesr_runtime.trt_backend  # the module itself imports neither torch nor tensorrt
        from seesr_runtime import SeeSRPipeline
        from seesr_runtime.manifest import BundleError
        try:
            SeeSRPipeline.from_bundle({str(runtime_bundle)!r}, backend="tensorrt")
        except BundleError as exc:
            print("REFUSED", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED") and "backend='onnxruntime'" in done.stdout


def test_gpu_validate_dry_run(tiny_bundle):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.py"
    done = subprocess.run([sys.executable, str(script), "--bundle", str(tiny_bundle), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan: unet fp16 at {'B': 2, 'h': 64, 'w': 64}" in done.stdout
    assert "dry run: 6 engines would be built and checked" in done.stdout


def test_cuda_graph_option_needs_a_gpu(runtime_bundle, capsys):
    """--cuda-graph needs a GPU: onnxruntime refuses it without the CUDA provider, and the CLI's
    tensorrt backend refuses clearly where TensorRT is missing (exit 2, no traceback)."""
    from seesr_runtime.backends import create_backend
    from seesr_runtime.cli import main
    from seesr_runtime.manifest import BundleError

    manifest = Manifest.load(runtime_bundle)
    with pytest.raises(BundleError, match="cuda_graph needs the CUDA provider"):
        create_backend("onnxruntime", manifest, cuda_graph=True)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["bench", "--bundle", str(runtime_bundle), "--backend", "tensorrt", "--cuda-graph",
                     "--precision", "fp16", "--steps", "1", "--runs", "1", "--warmup", "0", "-q"]) == 2
        assert "tensorrt" in capsys.readouterr().err
