"""What a bundle build is asked for (``BuildOptions``) and the up-front refusal of what it cannot produce."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from seesr_runtime.lazy import available, install_hint
from seesr_runtime.manifest import GPU_GRAPH
from seesr_runtime.networks import INT8_NETWORKS, NETWORK_NAMES

from .errors import BuildError
from .graph_format import EXTERNAL_DATA_THRESHOLD, OPSET
from .parity import PARITY_TOLERANCES

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnx", "tensorrt")


@dataclass
class BuildOptions:
    precision: str = "fp32"
    backend: str = "onnx"
    networks: tuple = NETWORK_NAMES
    opset: int = OPSET
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    verify: bool = True  # ONNX vs torch on sample inputs, recorded in the manifest
    name: str | None = None
    calib_images: tuple = ()  # int8: real LR images the sampler runs on to record calibration inputs
    calib_size: int = 4
    calib_steps: int = 4
    quant_method: str = "auto"  # int8: "modelopt" (SmoothQuant, primary), "onnxruntime" (fallback), "auto"
    int8_image_attention_fp32: bool = False  # int8: keep the image cross-attention projections in fp32
    int8_conv_percentile: float = 99.99  # int8 (ModelOpt): conv input range at this percentile; 100 = max
    jobs: int = 1  # networks exported at once, each in its own process (each needs up to ~12 GB at SD2 size)
    parity_tolerances: dict = field(default_factory=dict)  # {network: {graph: max rel L2}} over PARITY_TOLERANCES
    sd_turbo: Path | None = None  # SeeSR-turbo: the sd-turbo folder (seesr_export.turbo); None: the standard bundle

    def graph_precisions(self) -> tuple[str, ...]:
        # fp32 graphs are always written: onnxruntime on CPU wants them, and they are
        # the baseline the lower precisions are measured against.
        # fp16 builds add the GPU graphs (UNet, ControlNet, VAE; see gpu_graph.py); int8 builds keep fp16 graphs
        # for the networks they do not quantize.
        return {"fp32": ("fp32",), "fp16": ("fp32", "fp16", GPU_GRAPH)}.get(self.precision, ("fp32", "fp16"))

    def tolerance(self, network: str, graph: str) -> float:
        return self.parity_tolerances.get(network, {}).get(graph, PARITY_TOLERANCES[network][graph])


@dataclass
class BuildReport:
    bundle: Path
    exported: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    parity: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # int8: error and PSNR against fp32


def check_request(options: BuildOptions) -> None:
    """Refuse, up front and in one message, what this build cannot produce."""
    if options.precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {PRECISIONS}, got {options.precision!r}")
    if options.backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {BACKENDS}, got {options.backend!r}")
    unknown = [n for n in options.networks if n not in NETWORK_NAMES]
    if unknown:
        raise BuildError(f"unknown network(s) {unknown}; choose from {list(NETWORK_NAMES)}")
    if options.backend == "tensorrt":
        missing = _tensorrt_missing()
        if missing:
            raise BuildError(
                f"--backend tensorrt is not available here: {missing}. "
                "Use --backend onnx (the bundle's ONNX graphs build engines later on a GPU machine)."
            )
    if options.precision == "int8":
        if not options.calib_images:
            raise BuildError(
                "--precision int8 needs --calib-images DIR: real LR images that the SeeSR sampler "
                "runs on to record calibration inputs (random tensors calibrate badly)"
            )
        missing = [n for n in INT8_NETWORKS if n not in options.networks]
        if missing or not set(NETWORK_NAMES) <= set(options.networks):
            raise BuildError(
                "--precision int8 calibrates through the whole sampler: build all networks (leave out --networks)"
            )


def _tensorrt_missing() -> str | None:
    if not available("tensorrt"):
        return f"the 'tensorrt' Python package is not installed ({install_hint('tensorrt')})"
    if not (Path("/dev/nvidiactl").exists() or os.environ.get("CUDA_VISIBLE_DEVICES")):
        return "no NVIDIA GPU is visible"
    return None
