"""The networks behind one small interface: ``backend.run(network, feeds) -> outputs``.

A backend is created once per pipeline and keeps one session per network,
created on first use and reused across steps and images. Feeds and outputs are
float32/int64 numpy arrays named as in the bundle manifest. The backends: onnxruntime
(``ort_backend``, the base install), TensorRT (``trt_backend``), OpenVINO (``openvino_backend``).
"""

from __future__ import annotations

from typing import Any

from .errors import BundleError
from .manifest import Manifest
from .openvino_backend import OpenVINOBackend
from .ort_backend import OnnxRuntimeBackend as OnnxRuntimeBackend  # re-exported: where callers have found it
from .tensors import Backend as Backend  # re-exported: the interface every backend implements
from .tensors import Feeds, FloatArray
from .trt_backend import TensorRTBackend


def to_device(backend: Backend, array: FloatArray) -> Any:
    """A per-image constant where ``backend`` computes (a backend without ``to_device``: the array)."""
    method = getattr(backend, "to_device", None)
    return method(array) if method is not None else array


def run_on_device(backend: Backend, network: str, feeds: Feeds) -> list[Any]:
    """``backend.run``, except that outputs may stay on the device when they only feed another network."""
    method = getattr(backend, "run_on_device", None)
    outputs: list[Any] = method(network, feeds) if method is not None else backend.run(network, feeds)
    return outputs


def compile_count(backend: Backend) -> int | None:
    """Shapes ``backend`` has compiled so far (the openvino backend's ``compiles``); None for a backend
    that compiles no shapes per call."""
    count: int | None = getattr(backend, "compiles", None)
    return count


def create_backend(kind: str, manifest: Manifest, **options: Any) -> Backend:
    if kind == "onnxruntime":
        return OnnxRuntimeBackend(manifest, **options)
    if kind == "tensorrt":
        try:
            return TensorRTBackend(
                manifest, **{k: v for k, v in options.items() if k in ("precision", "cuda_graph") and v}
            )
        except ImportError as exc:
            raise BundleError(
                f"the tensorrt backend needs the 'tensorrt' and 'cuda-python' packages and an NVIDIA "
                f"GPU ({exc}); use backend='onnxruntime'"
            ) from None
    if kind == "openvino":
        if options.pop("cuda_graph", False):
            raise BundleError("CUDA graph capture is an option of the tensorrt backend, not of openvino")
        if options.pop("providers", None):
            raise BundleError(
                "--providers selects onnxruntime execution providers; the openvino backend "
                "takes --device (CPU, GPU, AUTO) instead"
            )
        return OpenVINOBackend(manifest, **{k: v for k, v in options.items() if v is not None})
    raise BundleError(f"unknown backend {kind!r} (available: {', '.join(map(repr, BACKENDS))})")


BACKENDS = ("onnxruntime", "tensorrt", "openvino")
