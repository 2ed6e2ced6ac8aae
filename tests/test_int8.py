"""int8: Q/DQ UNet and ControlNet calibrated through the real sampler, run on onnxruntime CPU."""

import numpy as np
import onnx
import pytest
from conftest import write_calibration_images

from seesr_export.bundle import BuildOptions, build_bundle
from seesr_export.quantize import DEFAULT_EXCLUDE, modelopt_available
from seesr_runtime import SeeSRPipeline
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import INT8_NETWORKS

pytestmark = pytest.mark.slow  # every test here calibrates through the sampler and quantizes two networks


@pytest.fixture(scope="module", params=["modelopt", "onnxruntime"])
def int8_bundle(request, int8_tiny_bundle):
    if request.param == "modelopt" and not modelopt_available():
        pytest.skip("nvidia-modelopt is not installed (the quant extra)")
    out, report = int8_tiny_bundle(request.param)
    assert report.quality["method"] == request.param
    return out, report


@pytest.mark.parametrize("name", INT8_NETWORKS)
def test_int8_graph_error_is_bounded(int8_bundle, name):
    out, report = int8_bundle
    manifest = Manifest.load(out)
    quality = manifest.data["quality"]["int8"]
    assert quality == report.quality
    # Measured on the tiny random-weight fixture (onnxruntime quantizer): ControlNet ~8e-2, UNet ~6e-2.
    assert "int8" in manifest.data["networks"][name]["files"]
    assert 0 < quality["network_rel_l2_vs_fp32"][name] < 0.25


def test_int8_bundle_runs_end_to_end(int8_bundle, lr_image):
    out, _ = int8_bundle
    manifest = Manifest.load(out)
    manifest.verify_files()
    assert manifest.data["quality"]["int8"]["end_to_end_psnr_vs_fp32_db"] > 20  # measured ~30 dB
    pipe = SeeSRPipeline.from_bundle(out, precision="int8")
    result = pipe(lr_image, steps=2, process_size=128)
    assert result.image.size == (224, 160) and np.isfinite(result.latents[-1]).all()


def quantized_nodes(model) -> set:
    """Names of the Conv/MatMul/Gemm nodes whose weight is int8 (dequantized from an initializer). An
    excluded layer keeps fp32 weights and computes in fp32; its activation may still come from a
    quantized neighbour."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in model.graph.initializer}

    def quantized(node):
        for i in node.input:
            dq = producers.get(i)
            if dq is not None and dq.op_type == "Transpose":  # linear weights: DQ -> Transpose -> MatMul
                dq = producers.get(dq.input[0])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = producers.get(dq.input[0])  # ModelOpt: fp32 weight -> Q -> DQ
            if dq.input[0] in weights or (
                source is not None and source.op_type == "QuantizeLinear" and source.input[0] in weights
            ):
                return True
        return False

    return {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and quantized(n)}


def test_int8_settings_are_recorded(int8_bundle):
    out, report = int8_bundle
    settings = Manifest.load(out).data["quality"]["int8"]["settings"]
    assert settings["image_attention_fp32"] is False
    assert settings["conv_input_percentile"] == (99.99 if report.quality["method"] == "modelopt" else None)


@pytest.mark.parametrize("name", INT8_NETWORKS)
def test_exclusions_are_honoured(int8_bundle, name):
    out, _ = int8_bundle
    model = onnx.load(str(Manifest.load(out).graph_path(name, "int8")))
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    int8 = quantized_nodes(model)
    excluded = [n.name for n in compute if any(p in n.name for p in DEFAULT_EXCLUDE)]
    assert excluded
    assert not int8 & set(excluded), sorted(int8 & set(excluded))
    assert len(int8) > len(compute) // 3  # the bulk is int8
    assert any("image_attentions" in n for n in int8)  # quantized by default (see the experiment)


@pytest.fixture(scope="module")
def image_attention_fp32_bundle(tiny_checkout, tmp_path_factory):
    method = "modelopt" if modelopt_available() else "onnxruntime"
    (calib,) = write_calibration_images(tmp_path_factory.mktemp("calib"), 1)
    out = tmp_path_factory.mktemp("engines") / "int8"
    build_bundle(
        tiny_checkout,
        out,
        BuildOptions(
            precision="int8",
            calib_images=(calib,),
            calib_size=1,
            calib_steps=1,
            verify=False,
            quant_method=method,
            int8_image_attention_fp32=True,
        ),
    )
    return Manifest.load(out)


def test_image_attention_fp32_is_recorded(image_attention_fp32_bundle):
    assert image_attention_fp32_bundle.data["quality"]["int8"]["settings"]["image_attention_fp32"] is True


@pytest.mark.parametrize("name", INT8_NETWORKS)
def test_image_attention_can_stay_fp32(image_attention_fp32_bundle, name):
    model = onnx.load(str(image_attention_fp32_bundle.graph_path(name, "int8")))
    int8 = quantized_nodes(model)
    image_attention = {
        n.name for n in model.graph.node if "image_attentions" in n.name and n.op_type in ("MatMul", "Gemm")
    }
    assert image_attention and int8 and not int8 & image_attention
