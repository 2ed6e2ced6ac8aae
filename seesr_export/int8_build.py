"""int8 graphs for a bundle: calibrate through the sampler, quantize the int8 networks, measure them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seesr_runtime.lazy import install_hint
from seesr_runtime.networks import INT8_NETWORKS, NETWORK_TABLE

from .errors import BuildError
from .export import graph_module
from .export_networks import graph_files_entry
from .graph_format import TRACE_ENV
from .manifest_writer import as_loaded
from .quantize import (
    QualityReport,
    QuantOptions,
    end_to_end_psnr,
    heldout_error,
    modelopt_available,
    quantize_graph,
    quantize_module_modelopt,
    record_calibration_feeds,
)


def add_int8(work: Path, manifest: dict, options, progress, models) -> dict:
    """Calibrate through the sampler, write int8 UNet/ControlNet graphs into ``manifest``, and measure
    them against fp32; returns the quality report (also recorded in ``manifest``)."""
    quant = QuantOptions(
        method=options.quant_method,
        calib_size=options.calib_size,
        calib_steps=options.calib_steps,
        exclude_image_attention=options.int8_image_attention_fp32,
        conv_input_percentile=None if options.int8_conv_percentile >= 100 else options.int8_conv_percentile,
    )
    use_modelopt = quant.method == "modelopt" or (quant.method == "auto" and modelopt_available())
    if quant.method == "modelopt" and not modelopt_available():
        raise BuildError(f"--quant-method modelopt needs nvidia-modelopt: {install_hint('quant')}")
    images = [Image.open(p).convert("RGB") for p in options.calib_images]
    bundle = as_loaded(work, manifest)
    recorded = record_calibration_feeds(bundle, images, quant, progress)
    quality = QualityReport()
    (work / "onnx" / "int8").mkdir(parents=True, exist_ok=True)
    for name in INT8_NETWORKS:
        feeds = recorded[name]
        split = max(1, int(len(feeds) * (1 - quant.holdout)))
        calibration, heldout = feeds[:split], feeds[split:] or feeds[-1:]
        progress.stage(
            f"{name}: int8 Q/DQ ({'ModelOpt SmoothQuant' if use_modelopt else 'onnxruntime'}) "
            f"from {len(calibration)} recorded calls"
        )
        rel = f"onnx/int8/{name}.onnx"
        if use_modelopt:
            module = graph_module(name, models)
            quality.excluded[name] = quantize_module_modelopt(
                module, bundle.spec(name), calibration, work / rel, TRACE_ENV, quant
            )
            del module
            models.drop(NETWORK_TABLE[name].model)
        else:
            quality.excluded[name] = quantize_graph(bundle.graph_path(name, "fp32"), work / rel, calibration, quant)
        quality.network_rel_l2[name] = heldout_error(bundle, name, work / rel, heldout)
        files = [work / rel] + ([work / (rel + ".data")] if (work / (rel + ".data")).exists() else [])
        manifest["networks"][name]["files"]["int8"] = graph_files_entry(work, files, "int8")
    progress.stage("int8: end-to-end PSNR against fp32 (same noise)")
    quality.psnr_vs_fp32_db = end_to_end_psnr(as_loaded(work, manifest), images[-1], quant.calib_steps, seed=1234)
    settings = {
        "image_attention_fp32": quant.exclude_image_attention,
        "conv_input_percentile": quant.conv_input_percentile if use_modelopt else None,
    }
    manifest["quality"] = {
        "int8": {**quality.to_json(), "method": "modelopt" if use_modelopt else "onnxruntime", "settings": settings}
    }
    return manifest["quality"]["int8"]
