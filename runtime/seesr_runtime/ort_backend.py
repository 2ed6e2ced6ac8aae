"""The onnxruntime backend: one onnxruntime session per network of a bundle, over its ONNX graphs.

The base install's backend (CPU; CUDA and TensorRT execution providers with onnxruntime-gpu). Where
tensors live on a GPU (IOBinding, static shapes, CUDA graphs) is ``ort_device``'s business.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import BundleError
from .heap import return_freed_memory
from .manifest import Manifest
from .networks import NetworkSpec, part_of
from .ort_device import (
    GPU_PROVIDERS,
    PER_STEP_NETWORKS,
    BoundCall,
    DeviceTensor,
    SharedWeights,
    fix_dimensions,
    graph_precision,
    solve_dims,
)
from .tensors import Array, Feeds

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# ``io_binding`` as command lines and Triton model configurations spell it.
IO_BINDING_MODES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


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

    def __init__(
        self,
        manifest: Manifest,
        precision: str = "fp32",
        providers: list[str] | None = None,
        threads: int | None = None,
        cpu_arena: str = "none",
        io_binding: bool | None = None,
        static_shapes: bool = False,
        cuda_graph: bool = False,
        gpu_graph: bool = True,
    ):
        """``io_binding``: keep per-image constants and ControlNet residuals on the device (default: on
        with a GPU provider); ``static_shapes``: one session per denoiser input shape, weights shared;
        ``cuda_graph``: capture each of those (CUDA provider); ``gpu_graph``: False runs the plain fp16
        graphs even where the bundle has GPU graphs (comparisons). See ``ort_device``."""
        self.manifest, self.precision, self.gpu_graph = manifest, precision, gpu_graph
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
            raise BundleError(
                f"onnxruntime providers {missing} are not available here "
                f"(available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        if cpu_arena not in ("shared", "per-session", "none"):
            raise BundleError(f"cpu_arena must be 'shared', 'per-session' or 'none', got {cpu_arena!r}")
        if cpu_arena == "shared":
            _register_shared_cpu_arena(ort)
        self.threads, self.cpu_arena = threads, cpu_arena
        self.options = self.new_options()
        on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        if cuda_graph and "CUDAExecutionProvider" not in self.providers:
            raise BundleError(f"cuda_graph needs the CUDA provider (providers: {self.providers})")
        self.device = "cuda" if on_gpu else "cpu"
        self.static_shapes = static_shapes or cuda_graph  # a CUDA graph needs fixed shapes and buffers
        self.io_binding = (on_gpu if io_binding is None else io_binding) or self.static_shapes
        self.cuda_graph = cuda_graph
        self._sessions: dict[str, Any] = {}  # network -> onnxruntime InferenceSession
        self._outputs: dict[str, list[str]] = {}
        self._calls: dict[tuple[str, tuple[tuple[str, int], ...]], BoundCall] = {}
        self._weights: dict[str, SharedWeights] = {}

    def new_options(self) -> Any:
        """Fresh onnxruntime SessionOptions for this backend's threads and CPU arena."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.cpu_arena == "shared":
            options.add_session_config_entry("session.use_env_allocators", "1")
        elif self.cpu_arena == "none":
            options.enable_cpu_mem_arena = False
        return options

    def graph_precision(self, network: str) -> str:
        return graph_precision(self.manifest, network, self.precision, self.providers, self.gpu_graph)

    def session(self, network: str) -> Any:
        """The onnxruntime InferenceSession of ``network`` (opened at first use)."""
        if network not in self._sessions:
            path = self.manifest.graph_path(network, self.graph_precision(network))
            log.debug(f"onnxruntime: {network} session on {self.providers} from {path}")
            self._sessions[network] = ort.InferenceSession(str(path), self.options, providers=self.providers)
            self._outputs[network] = self.manifest.spec(network).output_names
        return self._sessions[network]

    def release(self, network: str) -> None:
        """Close the sessions of ``network`` and of its tiled-VAE segments ("vae_decoder#0", ...) with their
        weights (a staged memory plan's stage end), and give the memory back to the system."""
        for name in [n for n in self._sessions if part_of(n, network)]:
            del self._sessions[name]
        for key in [k for k in self._calls if part_of(k[0], network)]:
            del self._calls[key]
        for name in [n for n in self._weights if part_of(n, network)]:
            del self._weights[name]
        return_freed_memory()

    def resident(self) -> dict[str, int]:
        """Sessions open now, per network or segment."""
        counts = {name: 1 for name in self._sessions}
        for network, _ in self._calls:
            counts[network] = counts.get(network, 0) + 1
        return counts

    def run(self, network: str, feeds: Feeds) -> list[Array]:
        if not self.io_binding:
            outputs: list[Array] = self.session(network).run(self._outputs[network], feeds)
            return outputs
        return [np.array(v.numpy()) for v in self._run_bound(network, feeds)]  # a copy: buffers are reused

    def run_on_device(self, network: str, feeds: Feeds) -> list[Any]:
        """Outputs that only feed another network: left on the device (``DeviceTensor``) with IOBinding."""
        if not self.io_binding:
            return self.run(network, feeds)
        fixed = self._static(network)
        return [DeviceTensor(v, fixed=fixed) for v in self._run_bound(network, feeds)]

    def to_device(self, array: Array) -> Array | DeviceTensor:
        """A per-image constant, copied to the device once (with IOBinding; else the array itself)."""
        if not self.io_binding:
            return array
        array = np.ascontiguousarray(array)
        return DeviceTensor(ort.OrtValue.ortvalue_from_numpy(array, self.device, 0), host=array, upload=self.to_device)

    def load_all(self) -> None:
        """Open every session now rather than at first use (servers, benchmarks); static-shape sessions
        open at the first call of each shape."""
        for network in self.manifest.data["networks"]:
            if not self._static(network):
                self.session(network)

    # ---------------------------------------------------------------- IOBinding

    def _static(self, network: str) -> bool:
        return self.static_shapes and network in PER_STEP_NETWORKS

    def _run_bound(self, network: str, feeds: Feeds) -> list[Any]:
        if self._static(network):
            return self.bound_call(network, feeds).run(feeds)
        session = self.session(network)
        binding = session.io_binding()
        host = []  # contiguous copies of sliced feeds (latent tiles): alive until the run is done
        for name, value in feeds.items():
            if isinstance(value, DeviceTensor):
                binding.bind_ortvalue_input(name, value.value)
            else:
                host.append(np.ascontiguousarray(value))
                binding.bind_cpu_input(name, host[-1])
        for name in self._outputs[network]:
            binding.bind_output(name, self.device, 0)
        session.run_with_iobinding(binding)
        outputs: list[Any] = binding.get_outputs()  # OrtValues on the device
        return outputs

    def bound_call(self, network: str, feeds: Feeds) -> BoundCall:
        """The static-shape session of ``network`` for the shapes of ``feeds`` (made at first use)."""
        spec = self.manifest.spec(network)
        env = solve_dims(spec, {name: np.shape(value) for name, value in feeds.items()})
        key = (network, tuple(sorted(env.items())))
        if key not in self._calls:
            path = self.manifest.graph_path(network, self.graph_precision(network))
            if network not in self._weights:
                self._weights[network] = SharedWeights(path, self.device)
            self._calls[key] = self.static_call(path, spec, env, self._weights[network])
        return self._calls[key]

    def static_call(
        self, path: Path, spec: NetworkSpec, env: dict[str, int], weights: SharedWeights | None = None
    ) -> BoundCall:
        """A session over the graph at ``path`` with ``spec``'s dimensions fixed to ``env``, its weights from
        ``weights`` when given, a CUDA graph captured when this backend has ``cuda_graph``."""
        options = self.new_options()
        fix_dimensions(options, spec, env)
        if weights is not None:
            weights.add_to(options)
        providers = [
            ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
            if p == "CUDAExecutionProvider" and self.cuda_graph
            else p
            for p in self.providers
        ]
        session = ort.InferenceSession(str(path), options, providers=providers)
        return BoundCall(session, spec, env, self.device)


_SHARED_ARENA: list[Any] = []  # the registered arena's OrtMemoryInfo, once registered


def _register_shared_cpu_arena(ort: Any) -> None:
    """One CPU arena for every session of the process. Per-session arenas each keep their own peak
    activations, and the six networks run in turn; one shared arena holds only the largest."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _SHARED_ARENA.append(info)
