"""The networks behind one small interface: ``backend.run(network, feeds) -> outputs``.

A backend is created once per pipeline and keeps one session per network,
created on first use and reused across steps and images. Feeds and outputs are
float32/int64 numpy arrays named as in the bundle manifest.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .manifest import BundleError, Manifest


class Backend(Protocol):
    name: str

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of ``network`` in manifest order."""


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxRuntimeBackend:
    """onnxruntime sessions over the bundle's ONNX graphs.

    ``providers``: e.g. ``["cuda", "cpu"]`` (needs onnxruntime-gpu); CPU by default.
    ``precision``: which graphs to load: ``"fp32"`` (CPU), ``"fp16"`` (GPU providers) or ``"int8"``
    (Q/DQ UNet and ControlNet, fp32 for the other networks).
    ``cpu_arena``: ``"none"`` (default): CPU buffers are freed after each call; ``"shared"``: one
    CPU arena for all sessions; ``"per-session"``: onnxruntime's default. Measured at SD2 size on
    2 cores, peak RSS at 512 px: 10.9 / 12.9 / 16.3 GB, UNet call 11.1 / 9.8 / 9.1 s (without an arena
    every call maps fresh pages); at 1024 px only "none" fits in 24 GB (17.1 GB: the unfused attention
    of a 96-latent tile needs ~7 GB, which an arena then keeps).
    """

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int | None = None, cpu_arena: str = "none"):
        import onnxruntime as ort

        self.manifest, self.precision = manifest, precision
        self.providers = [PROVIDER_ALIASES.get(p, p) for p in (providers or ["cpu"])]
        if set(self.providers) - {"CPUExecutionProvider"} and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu >= 1.21 finds CUDA/cuDNN in the nvidia-* wheels (those torch also uses)
            # this way; where they are system libraries instead, the call is harmless.
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - the session creation below reports what is really missing
                pass
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BundleError(f"onnxruntime providers {missing} are not available here "
                              f"(available: {ort.get_available_providers()}); "
                              "install onnxruntime-gpu for CUDA/TensorRT")
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self.options.intra_op_num_threads = threads
        if cpu_arena not in ("shared", "per-session", "none"):
            raise BundleError(f"cpu_arena must be 'shared', 'per-session' or 'none', got {cpu_arena!r}")
        if cpu_arena == "shared":
            _register_shared_cpu_arena(ort)
            self.options.add_session_config_entry("session.use_env_allocators", "1")
        elif cpu_arena == "none":
            self.options.enable_cpu_mem_arena = False
        self._sessions = {}
        self._outputs = {n: manifest.spec(n).output_names for n in manifest.data["networks"]}

    def session(self, network: str):
        if network not in self._sessions:
            import onnxruntime as ort

            precision = self.precision
            if precision == "int8" and "int8" not in self.manifest.data["networks"][network]["files"]:
                precision = "fp32"  # int8 bundles quantize only the UNet and ControlNet
            path = self.manifest.graph_path(network, precision)
            self._sessions[network] = ort.InferenceSession(str(path), self.options, providers=self.providers)
        return self._sessions[network]

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(network).run(self._outputs[network], feeds)

    def load_all(self) -> None:
        """Open every session now rather than at first use (servers, benchmarks)."""
        for network in self.manifest.data["networks"]:
            self.session(network)


_SHARED_ARENA = []


def _register_shared_cpu_arena(ort) -> None:
    """One CPU arena for every session of the process. Per-session arenas each keep their own peak
    activations, and the six networks run in turn; one shared arena holds only the largest."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(info)


def create_backend(kind: str, manifest: Manifest, **options) -> Backend:
    if kind == "onnxruntime":
        if options.pop("cuda_graph", False):
            raise BundleError("CUDA graph capture is an option of the tensorrt backend (onnxruntime runs here "
                              "with host feeds, which a captured graph cannot take)")
        return OnnxRuntimeBackend(manifest, **options)
    if kind == "tensorrt":
        from .trt_backend import TensorRTBackend

        try:
            return TensorRTBackend(manifest, **{k: v for k, v in options.items()
                                                if k in ("precision", "cuda_graph") and v})
        except ImportError as exc:
            raise BundleError(f"the tensorrt backend needs the 'tensorrt' and 'cuda-python' packages and an NVIDIA "
                              f"GPU ({exc}); use backend='onnxruntime'") from None
    if kind == "openvino":
        from .openvino_backend import OpenVINOBackend

        if options.pop("cuda_graph", False):
            raise BundleError("CUDA graph capture is an option of the tensorrt backend, not of openvino")
        if options.pop("providers", None):
            raise BundleError("--providers selects onnxruntime execution providers; the openvino backend "
                              "takes --device (CPU, GPU, AUTO) instead")
        return OpenVINOBackend(manifest, **{k: v for k, v in options.items() if v is not None})
    raise BundleError(f"unknown backend {kind!r} (available: {', '.join(map(repr, BACKENDS))})")


BACKENDS = ("onnxruntime", "tensorrt", "openvino")
