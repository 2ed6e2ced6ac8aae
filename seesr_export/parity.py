"""The parity gate: each ONNX graph against the torch fp32 reference, on the build's sample inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BuildError
from .graph_format import VERIFY_ENV

# The largest relative L2 error against the torch fp32 reference that each graph of a network may show
# on the build's sample inputs; `seesr-export build` refuses a graph outside it.
# "fused_fp32": the GPU graph's fusions without the CUDA-only kernels, in fp32 (the CPU-runnable check of
# the fusions); "fp16_gpu": the GPU graph itself, measured on a GPU by benchmarks/gpu_validate.py.
# Measured at SD2 size (benchmarks/results/cpu/export_sd2_fp16.md): fp32 <= 2e-6, fp16 <= 4.2e-3.
_FP32, _FP16 = 1e-4, 1e-2
PARITY_TOLERANCES = {
    "dape": {"fp32": _FP32, "fp16": _FP16},
    "text_encoder": {"fp32": _FP32, "fp16": _FP16},
    "controlnet": {"fp32": _FP32, "fp16": _FP16, "fused_fp32": _FP32, "fp16_gpu": _FP16},
    "unet": {"fp32": _FP32, "fp16": _FP16, "fused_fp32": _FP32, "fp16_gpu": _FP16},
    "vae_encoder": {"fp32": _FP32, "fp16": _FP16, "fused_fp32": _FP32, "fp16_gpu": _FP16},
    "vae_decoder": {"fp32": _FP32, "fp16": _FP16, "fused_fp32": _FP32, "fp16_gpu": _FP16},
}


def relative_l2(got: np.ndarray, expected: np.ndarray) -> float:
    """||got - expected|| / ||expected||, in float64. The runtime's own measurements (benchmarks, tests)
    use this one too; there is no runtime twin."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def compare_graph(onnx_path: Path, spec, feeds: dict, expected: list) -> dict:
    """Relative L2 error of every output, onnxruntime (CPU) against torch's ``expected``."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(spec.output_names, feeds)
    errors = [relative_l2(g, e) for g, e in zip(got, expected)]
    return {"max_rel_l2": max(errors), "env": VERIFY_ENV}


def check_parity(name: str, parity: dict, tolerance) -> None:
    """Refuse the build when a graph is further from torch than ``tolerance(name, graph)``; records
    each tolerance beside its measurement."""
    for graph, result in parity.items():
        limit = tolerance(name, graph)
        result["tolerance"] = limit
        if not result["max_rel_l2"] <= limit:  # NaN fails too
            raise BuildError(
                f"{name}: the {graph} graph differs from the torch fp32 reference by "
                f"{result['max_rel_l2']:.3e} relative L2, over its tolerance {limit:.1e} "
                f"(seesr_export.parity.PARITY_TOLERANCES); the bundle was not written"
            )
