"""TensorRT backend: the bundle's engines through the TensorRT runtime and cuda-python (no torch, no pycuda).

Device buffers are allocated once per tensor and grown only when a larger shape
arrives, so steps and images reuse them; every engine's execution context runs
in one shared activation buffer (``USER_MANAGED`` allocation), sized for the
largest engine, since the networks run one after another. Host copies happen
only at the interface the numpy pipeline needs.

Not testable on the CPU-only CI machines: see benchmarks/gpu_validate.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import BundleError, MissingDependency
from .lazy import imported, lazy_import
from .manifest import Manifest
from .ort_backend import OnnxRuntimeBackend
from .tensors import Array, Feeds

trt = lazy_import("tensorrt", extra="tensorrt")
# cuda-python moved its runtime bindings in 12.6; either place will do.
cudart_bindings = lazy_import("cuda.bindings.runtime", extra="tensorrt")
cudart_legacy = lazy_import("cuda.cudart", extra="tensorrt")


def _cudart() -> Any:
    """cuda-python's CUDA runtime module (``MissingDependency`` without cuda-python)."""
    try:
        return imported(cudart_bindings)
    except MissingDependency:
        return imported(cudart_legacy)


def _check(result: Any) -> Any:
    """The value(s) of a cuda-python call's ``(error, *values)`` result; RuntimeError on an error code."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _DeviceBuffer:
    def __init__(self, cudart: Any):
        self.cudart, self.ptr, self.nbytes = cudart, 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            if self.ptr:
                _check(self.cudart.cudaFree(self.ptr))
            self.ptr, self.nbytes = _check(self.cudart.cudaMalloc(nbytes)), nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, precision: str = "fp16", cuda_graph: bool = False):
        """``cuda_graph``: capture each engine launch once per input shape and replay it (static shapes;
        a buffer that grows changes the addresses and so gets a new graph)."""
        self.trt, self.cudart = imported(trt), _cudart()  # tensorrt first: its absence is the one to report
        self.manifest, self.precision, self.cuda_graph = manifest, precision, cuda_graph
        self._graphs: dict[tuple[str, tuple[Any, ...]], Any] = {}  # (network, shapes and addresses) -> graph exec
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self.buffers: dict[tuple[str, str], _DeviceBuffer] = {}
        for network, entry in manifest.data["networks"].items():
            engine_entry = entry.get("engines", {}).get(precision)
            if engine_entry is None:
                raise BundleError(
                    f"{manifest.root}: no {precision} TensorRT engine for {network!r}; "
                    "build with seesr-export build --backend tensorrt"
                )
            engine_file = manifest.file(engine_entry["file"], f"{network} {precision} TensorRT engine")
            engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
            if engine is None:
                raise BundleError(
                    f"{engine_entry['file']}: TensorRT could not deserialize it (built for "
                    f"TensorRT {engine_entry['tensorrt']}, sm{''.join(map(str, engine_entry['compute_capability']))})"
                )
            self.engines[network] = engine
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = {n: e.create_execution_context(strategy) for n, e in self.engines.items()}
        self.activations = _DeviceBuffer(self.cudart)
        self.activations.ensure(max(e.device_memory_size_v2 for e in self.engines.values()))
        self._outputs = {n: manifest.spec(n).output_names for n in self.engines}
        # Events around each engine launch: the benchmark reads the device's time, not the host's.
        self._events = (_check(self.cudart.cudaEventCreate()), _check(self.cudart.cudaEventCreate()))
        self._last_ms: float | None = None

    def _segment_backend(self) -> OnnxRuntimeBackend:
        """onnxruntime (CUDA where onnxruntime-gpu is installed) for the tiled VAE's fp32 segment graphs."""
        if not hasattr(self, "_segments"):
            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            self._segments = OnnxRuntimeBackend(self.manifest, providers=["cuda", "cpu"] if cuda else ["cpu"])
        return self._segments

    def _buffer(self, network: str, tensor: str, nbytes: int) -> int:
        key = (network, tensor)
        if key not in self.buffers:
            self.buffers[key] = _DeviceBuffer(self.cudart)
        return self.buffers[key].ensure(nbytes)

    def run(self, network: str, feeds: Feeds) -> list[Array]:
        if "#" in network:  # a tiled-VAE segment (large images): no engine is built for those
            return self._segment_backend().run(network, feeds)
        cudart, context, engine = self.cudart, self.contexts[network], self.engines[network]
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        context.device_memory = self.activations.ptr
        addresses = []
        for name, value in feeds.items():
            value = np.ascontiguousarray(value, dtype=self.trt.nptype(engine.get_tensor_dtype(name)))
            context.set_input_shape(name, value.shape)
            ptr = self._buffer(network, name, max(value.nbytes, 1))
            _check(cudart.cudaMemcpyAsync(ptr, value.ctypes.data, value.nbytes, h2d, self.stream))
            context.set_tensor_address(name, ptr)
            addresses.append((name, value.shape, ptr))
        outputs = []
        for name in self._outputs[network]:
            shape = tuple(context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self.trt.nptype(engine.get_tensor_dtype(name)))
            ptr = self._buffer(network, name, max(host.nbytes, 1))
            context.set_tensor_address(name, ptr)
            addresses.append((name, shape, ptr))
            outputs.append(host)
        _check(cudart.cudaEventRecord(self._events[0], self.stream))
        self._launch(network, context, tuple(addresses))
        _check(cudart.cudaEventRecord(self._events[1], self.stream))
        for name, host in zip(self._outputs[network], outputs):
            _check(
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self.buffers[(network, name)].ptr, host.nbytes, d2h, self.stream
                )
            )
        _check(cudart.cudaStreamSynchronize(self.stream))
        self._last_ms = float(_check(cudart.cudaEventElapsedTime(*self._events)))
        return [o.astype(np.float32, copy=False) if o.dtype == np.float16 else o for o in outputs]

    def _launch(self, network: str, context: Any, key: tuple[Any, ...]) -> None:
        """Enqueue the engine; with ``cuda_graph``, replay a graph captured for these exact shapes and
        device addresses (every step of one image size repeats them, so the 50 steps replay one graph
        per network instead of enqueueing hundreds of kernels each)."""
        if not self.cuda_graph:
            if not context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT execution of {network} failed")
            return
        graph = self._graphs.get((network, key))
        if graph is None:
            # One plain run first: TensorRT does its shape-dependent setup outside the capture.
            if not context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT execution of {network} failed")
            mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
            context.execute_async_v3(self.stream)
            captured = _check(self.cudart.cudaStreamEndCapture(self.stream))
            graph = self._graphs[(network, key)] = _check(self.cudart.cudaGraphInstantiate(captured, 0))
            _check(self.cudart.cudaGraphDestroy(captured))
        _check(self.cudart.cudaGraphLaunch(graph, self.stream))

    def device_ms(self) -> float | None:
        """GPU time of the last engine launch (CUDA events), without the host copies."""
        return self._last_ms

    def close(self) -> None:
        for graph in self._graphs.values():
            self.cudart.cudaGraphExecDestroy(graph)
        self._graphs.clear()
        for buffer in self.buffers.values():
            buffer.free()
        self.activations.free()
