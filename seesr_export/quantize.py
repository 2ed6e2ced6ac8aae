"""int8 Q/DQ graphs of the UNet and ControlNet (97 % of SeeSR's FLOPs), calibrated through the sampler.

Calibration data is what the networks see in real use: the fp32 runtime upscales
the calibration images and every ControlNet/UNet call of every step is recorded.
Quantization is explicit (QDQ nodes), so TensorRT and onnxruntime alike run the
same int8 graph. Two quantizers:

- ``modelopt`` (primary): NVIDIA ModelOpt on the torch modules, INT8 SmoothQuant
  (alpha 0.8) for linear and convolution layers, max calibration, then traced to
  ONNX like the fp32 graph. Runs on CPU too.
- ``onnxruntime`` (fallback where ModelOpt is not installed): onnxruntime's static
  quantizer on the fp32 graph, per-channel symmetric weights, min/max activations.

Layers that diffusion PTQ recipes keep in higher precision are excluded by name
(``DEFAULT_EXCLUDE``), and attention's activation-by-activation products stay fp32.
"""

from __future__ import annotations

import copy
import inspect
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from seesr_runtime.backends import OnnxRuntimeBackend
from seesr_runtime.lazy import available, lazy_import
from seesr_runtime.manifest import Manifest
from seesr_runtime.networks import INT8_NETWORKS
from seesr_runtime.pipeline import SeeSRPipeline

from .export import finalize, trace
from .parity import relative_l2

mtq = lazy_import("modelopt.torch.quantization", extra="quant")  # the ModelOpt quantizer (optional)
modelopt_histogram = lazy_import("modelopt.torch.quantization.calib.histogram", extra="quant")

# Time embedding, first/last convolutions, skip projections and the transformers' output projections:
# small, sensitive layers NVIDIA's diffusion recipes leave unquantized.
DEFAULT_EXCLUDE = ("time_embedding", "conv_in", "conv_out", "conv_shortcut", "norm_out", "proj_out")
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantOptions:
    method: str = "auto"  # "modelopt", "onnxruntime", or "auto" (ModelOpt when installed)
    calib_size: int = 4  # images
    calib_steps: int = 4  # sampler steps per image (every step's inputs are recorded)
    holdout: float = 0.25  # share of recorded calls kept out of calibration, to measure the error
    exclude: tuple = DEFAULT_EXCLUDE
    exclude_image_attention: bool = False  # also keep the image cross-attention projections in fp32
    conv_input_percentile: float | None = 99.99  # ModelOpt: convolution inputs' amax at this percentile
    seed: int = 0


class RecordingBackend:
    """Wraps a backend and keeps a copy of every feed given to the chosen networks."""

    def __init__(self, inner, networks=INT8_NETWORKS):
        self.inner, self.name = inner, f"recording({inner.name})"
        self.recorded = {n: [] for n in networks}

    def run(self, network, feeds):
        if network in self.recorded:
            self.recorded[network].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(network, feeds)


def record_calibration_feeds(manifest: Manifest, images: list, options: QuantOptions, progress=None) -> dict:
    """Run the fp32 pipeline on ``images`` and return every ControlNet/UNet feed it made."""
    backend = RecordingBackend(OnnxRuntimeBackend(manifest, precision="fp32"))
    pipe = SeeSRPipeline(manifest, backend)
    for i, image in enumerate(images[: options.calib_size]):
        if progress is not None:
            progress.stage(
                f"calibration: image {i + 1}/{min(len(images), options.calib_size)} "
                f"through {options.calib_steps} sampler steps"
            )
        pipe(image, steps=options.calib_steps, seed=options.seed + i)
    return backend.recorded


def excluded_nodes(model, options: QuantOptions) -> list[str]:
    """Quantizable nodes left in fp32: the recipe's exclusions by name, and every MatMul of two
    activations (attention's Q.K^T and P.V: int8 would hurt, and calibrating their N x N inputs
    would hold gigabytes)."""
    patterns = list(options.exclude) + (["image_attentions"] if options.exclude_image_attention else [])
    pattern = re.compile("|".join(re.escape(p) for p in patterns))
    weights = {t.name for t in model.graph.initializer}
    excluded = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        activation_only = node.op_type == "MatMul" and not any(i in weights for i in node.input)
        if activation_only or pattern.search(node.name):
            excluded.append(node.name)
    return excluded


class _FeedsReader:
    """onnxruntime's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # not needed: one pass
        pass


def calibration_ranges(fp32_path: Path, calibration: list[dict], work: Path, large: bool):
    """Activation ranges exactly as ``quantize_static`` computes them (its min/max calibrator, moving
    average), in a session that runs in priority-based order.

    The calibrator adds a ReduceMin/ReduceMax pair per calibrated tensor, as graph outputs; in onnxruntime's
    default order those reductions run after the whole network, so every calibrated tensor (attention's
    N x N scores included) stays alive to the end: 20 GB at 512 px on the tiny fixture. Priority-based
    order runs each reduction right after its tensor, so memory stays that of the plain graph.
    """
    calibrator = create_calibrator(
        Path(fp32_path),
        list(QUANTIZABLE_OPS),
        str(work / "augmented.onnx"),
        CalibrationMethod.MinMax,
        use_external_data_format=large,
        extra_options={"moving_average": True},
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's own
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, options, providers=["CPUExecutionProvider"]
    )
    calibrator.collect_data(_FeedsReader(calibration))
    return calibrator.compute_data()


def quantize_graph(fp32_path: Path, out_path: Path, calibration: list[dict], options: QuantOptions) -> list[str]:
    """Write a QDQ int8 copy of ``fp32_path``; returns the names of the excluded nodes."""
    excluded = excluded_nodes(onnx.load(str(fp32_path), load_external_data=False), options)
    large = Path(str(fp32_path) + ".data").exists()
    settings = dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZABLE_OPS),
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax,
        # onnxruntime's percentile calibrator keeps every activation of every call in memory (20 GB
        # for the tiny fixture); min/max keeps two scalars per tensor, and its moving average damps outliers.
        # Dedicated pairs: an excluded layer reads the fp32 tensor even where a neighbour quantizes it.
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "CalibMovingAverage": True,
            "DedicatedQDQPair": True,
        },
        use_external_data_format=large,
    )
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        # onnxruntime before calibration caches: its own calibration session (peak memory as noted above)
        quantize_static(str(fp32_path), str(out_path), _FeedsReader(calibration), **settings)
        return excluded
    with tempfile.TemporaryDirectory(prefix=".calibration-", dir=Path(out_path).parent) as work:
        cache = Path(work) / "ranges.json"
        save_tensors_data(calibration_ranges(fp32_path, calibration, Path(work), large), cache)
        quantize_static(str(fp32_path), str(out_path), None, calibration_cache_path=str(cache), **settings)
    return excluded


def modelopt_available() -> bool:
    return available("modelopt.torch.quantization")


def quantize_module_modelopt(
    module, spec, calibration: list[dict], out_path: Path, trace_env: dict, options: QuantOptions
) -> list[str]:
    """ModelOpt INT8 SmoothQuant on the torch graph module, then traced to a Q/DQ ONNX graph.

    Returns the quantizer-name patterns that were disabled (the exclusions)."""
    config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    config["algorithm"] = {"method": "smoothquant", "alpha": 0.8}
    patterns = list(options.exclude) + (["image_attentions"] if options.exclude_image_attention else [])
    disabled = [f"*{p}*" for p in patterns]
    config["quant_cfg"] = (
        list(config["quant_cfg"])
        + _conv_percentile_cfg(options.conv_input_percentile)
        + [{"quantizer_name": d, "enable": False} for d in disabled]
    )

    def forward_loop(model):
        with torch.no_grad():
            for feeds in calibration:
                model(*(torch.from_numpy(feeds[name]) for name in spec.input_names))

    quantized = mtq.quantize(module, config, forward_loop=forward_loop)
    with tempfile.TemporaryDirectory(prefix="seesr-int8-", dir=out_path.parent) as scratch:
        traced = trace(quantized, spec, trace_env, Path(scratch) / "traced.onnx")
        finalize(traced, out_path, fold=False)
    return disabled


def _conv_percentile_cfg(percentile: float | None) -> list[dict]:
    """Convolution inputs calibrated to a histogram percentile rather than the max, as NVIDIA's diffusion
    recipe does: a few outlier activations would otherwise stretch the int8 range of a whole layer.
    (SmoothQuant only rescales linear layers, so convolutions get no help from it.)"""
    if percentile is None:
        return []

    class PercentileCalibrator(modelopt_histogram.HistogramCalibrator):
        def compute_amax(self, method: str = "percentile", **kwargs):
            return super().compute_amax(method, **{"percentile": percentile, **kwargs})

    calibrator = (PercentileCalibrator, (), {"num_bits": 8, "axis": None})
    return [
        {
            "quantizer_name": "*input_quantizer",
            "parent_class": "nn.Conv2d",
            "cfg": {"num_bits": 8, "axis": None, "calibrator": calibrator},
        }
    ]


def heldout_error(manifest: Manifest, network: str, int8_path: Path, feeds: list[dict]) -> float:
    """Worst relative L2 of the int8 graph against fp32 over held-out recorded calls."""
    fp32 = ort.InferenceSession(str(manifest.graph_path(network, "fp32")), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    names = manifest.spec(network).output_names
    worst = 0.0
    for feed in feeds:
        for a, b in zip(int8.run(names, feed), fp32.run(names, feed)):
            worst = max(worst, relative_l2(a, b))
    return worst


def psnr(a, b) -> float:
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass
class QualityReport:
    network_rel_l2: dict = field(default_factory=dict)
    psnr_vs_fp32_db: float | None = None
    excluded: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "network_rel_l2_vs_fp32": self.network_rel_l2,
            "end_to_end_psnr_vs_fp32_db": self.psnr_vs_fp32_db,
            "excluded": {n: len(v) for n, v in self.excluded.items()},
        }


def end_to_end_psnr(manifest: Manifest, image, steps: int, seed: int) -> float:
    """PSNR of the final image with int8 UNet/ControlNet against the all-fp32 pipeline, same noise."""
    images = []
    for precision in ("fp32", "int8"):  # one pipeline's sessions at a time: at SD2 size memory is the limit
        pipe = SeeSRPipeline(manifest, OnnxRuntimeBackend(manifest, precision=precision))
        images.append(pipe(image, steps=steps, seed=seed).image)
        del pipe
    return psnr(images[1], images[0])
