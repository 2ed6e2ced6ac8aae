"""Where onnxruntime's tensors live, hidden from the pipeline: graph choice, IOBinding, static shapes.

The pipeline (``pipeline.py``) stays a numpy description of the algorithm. It marks two things only:
per-image constants (``backend.to_device``: embeddings, control image) and outputs that only feed
another network (``backend.run_on_device``: the ControlNet residuals). With IOBinding the backend
then keeps those on the device, so per step only the latent goes in and the noise prediction comes
out. ``DeviceTensor`` is the opaque handle for such a tensor.

Static shapes: the denoisers are called 50 times per image at one shape, so each input shape gets its
own session whose symbolic dimensions are fixed (``add_free_dimension_override_by_name``); onnxruntime
then folds the shape arithmetic the tracer left in the graphs, which otherwise runs on the CPU between
GPU kernels and prevents CUDA graph capture. Those sessions share one copy of the weights (user-supplied
initializers), and each can capture its own CUDA graph (one per shape).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as ort_capi

from .errors import BundleError
from .lazy import available, lazy_import
from .manifest import GPU_GRAPH, Manifest
from .networks import NetworkSpec, eval_dim, graph_for_precision
from .tensors import Array, Feeds

# Only to share weights between static-shape sessions (``SharedWeights``); without it each loads its own.
onnx = lazy_import("onnx", extra="export")
onnx_numpy_helper = lazy_import("onnx.numpy_helper", extra="export")

PER_STEP_NETWORKS = ("controlnet", "unet")  # called every step at one shape: static-shape sessions pay off
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def graph_precision(
    manifest: Manifest, network: str, precision: str, providers: list[str], gpu_graph: bool = True
) -> str:
    """Which of a network's graphs to load. fp16 with the GPU graph's providers (CUDA) gets the GPU
    graph when the bundle has one (bundles built before it existed keep their plain fp16 graph);
    int8 bundles quantize only the UNet and ControlNet, the rest run fp32."""
    files = manifest.entry(network)["files"]
    precision = graph_for_precision(files, precision)
    gpu = files.get(GPU_GRAPH)
    if precision == "fp16" and gpu_graph and gpu is not None and set(gpu.get("providers", ())) <= set(providers):
        return GPU_GRAPH
    return precision


class DeviceTensor:
    """A tensor in the backend's device memory (an onnxruntime OrtValue), to be fed to a network call.

    ``host``: the numpy array it was copied from, if any (kept for slicing and for CUDA-graph input
    buffers). ``fixed``: its buffer is a static-shape session's output, reused by every call of that
    session, so a consumer may bind it once. A handle from ``run_on_device`` is valid until the next
    call of the network that produced it.
    """

    def __init__(
        self,
        value: Any,
        host: Array | None = None,
        fixed: bool = False,
        upload: Callable[[Array], Array | DeviceTensor] | None = None,
    ):
        self.value, self.host, self.fixed = value, host, fixed  # value: an onnxruntime OrtValue
        self._upload = upload
        self._windows: dict[str, Array | DeviceTensor] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def numpy(self) -> Array:
        array: Array = self.host if self.host is not None else self.value.numpy()
        return array

    def __getitem__(self, key: Any) -> Array | DeviceTensor:
        """A window of a per-image constant (the control image of one latent tile), uploaded once."""
        if self.host is None or self._upload is None:
            raise TypeError("only a tensor uploaded with to_device can be sliced")
        window = self._windows.get(repr(key))
        if window is None:
            window = self._windows[repr(key)] = self._upload(self.host[key])
        return window


def solve_dims(spec: NetworkSpec, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The named dimensions (B, h, w) of a call, read off its input shapes."""
    env: dict[str, int] = {}
    for tensor in spec.inputs:
        for expr, size in zip(tensor.shape, shapes.get(tensor.name, ())):
            if isinstance(expr, str) and expr.isidentifier():
                env.setdefault(expr, int(size))
    return env


def fix_dimensions(options: Any, spec: NetworkSpec, env: dict[str, int]) -> None:
    """Fix every symbolic input dimension of ``spec`` (the ONNX dim_params are the spec's expressions)."""
    fixed = {}
    for tensor in spec.inputs:
        for expr in tensor.shape:
            if isinstance(expr, str) and expr not in fixed:
                fixed[expr] = eval_dim(expr, env)
    for name, value in fixed.items():
        options.add_free_dimension_override_by_name(name, value)


SHARED_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16: the weights
MIN_SHARED_ELEMENTS = 1024


class SharedWeights:
    """One copy of a graph's initializers in device memory, handed to every static-shape session of it.

    onnxruntime takes a user-supplied initializer only if its OrtValue does not own the buffer, and
    then uses that buffer as is: an owning device OrtValue is turned into a non-owning view by a DLPack
    round trip (the capsule keeps the owner alive). Only floating-point tensors of at least
    ``MIN_SHARED_ELEMENTS`` are shared: integer and small tensors (shape constants, which CPU-side kernels
    read from host memory) stay in each session. Reading the initializers needs the ``onnx`` package;
    without it (``available`` False) each session loads its own copy.
    """

    def __init__(self, path: Path, device: str):
        self.values, self._owners = {}, []
        self.available = available("onnx")
        if not self.available:
            return
        model = onnx.load(str(path), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_type not in SHARED_TYPES or int(np.prod(init.dims)) < MIN_SHARED_ELEMENTS:
                continue  # shape constants and small tensors: some kernels read them on the host
            array = _initializer_array(init, Path(path).parent)
            owner = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, device, 0)
            owner.update_inplace(array)
            self._owners.append(owner)
            self.values[init.name] = ort.OrtValue(ort_capi.OrtValue.from_dlpack(owner._ortvalue.to_dlpack()))

    @property
    def nbytes(self) -> int:
        return sum(v.tensor_size_in_bytes() for v in self._owners) if self._owners else 0

    def add_to(self, options: Any) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)


def _initializer_array(init: Any, folder: Path) -> Array:
    """An initializer's values; external data is memory-mapped, not read into memory twice."""
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return np.ascontiguousarray(onnx_numpy_helper.to_array(init))
    info = {entry.key: entry.value for entry in init.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    count = int(np.prod(init.dims)) if len(init.dims) else 1
    mapped = np.memmap(
        folder / info["location"],
        dtype=np.uint8,
        mode="r",
        offset=int(info.get("offset", 0)),
        shape=(count * np.dtype(dtype).itemsize,),
    )
    return np.ascontiguousarray(mapped.view(dtype).reshape(tuple(init.dims)))


class BoundCall:
    """One static-shape session with its IOBinding kept between calls: fixed input and output buffers,
    which a CUDA graph needs (it replays the addresses it captured)."""

    def __init__(self, session: Any, spec: NetworkSpec, env: dict[str, int], device: str):
        self.session, self.spec, self.device = session, spec, device
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}  # name -> OrtValue bound now
        self.owned: set[str] = set()  # inputs bound to this call's own buffers (copied into, never rebound)
        self.sources: dict[str, DeviceTensor | None] = {}  # owned input -> the DeviceTensor last copied into it
        self.outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type(t.concrete_shape(env), NUMPY_DTYPES[t.dtype], device, 0)
            for t in spec.outputs
        ]
        for tensor, value in zip(spec.outputs, self.outputs):
            self.binding.bind_ortvalue_output(tensor.name, value)
        self.ran = False

    def run(self, feeds: Feeds) -> list[Any]:
        for name, value in feeds.items():
            self._feed(name, value)
        self.session.run_with_iobinding(self.binding)
        self.ran = True
        return self.outputs

    def _feed(self, name: str, value: Any) -> None:
        bound = self.inputs.get(name)
        if isinstance(value, DeviceTensor) and value.fixed:
            if bound is not None and bound.data_ptr() == value.value.data_ptr():
                return  # the producer's output buffer, bound once: nothing crosses
            if self.ran:
                raise BundleError(
                    f"{self.spec.name}: input {name!r} moved to another device buffer after the "
                    "first call of a static-shape session (a captured CUDA graph would read the old one)"
                )
            self.binding.bind_ortvalue_input(name, value.value)
            self.inputs[name] = value.value
            return
        if isinstance(value, DeviceTensor) and self.sources.get(name) is value:
            return  # a per-image constant already in this call's buffer
        array = np.ascontiguousarray(value.numpy() if isinstance(value, DeviceTensor) else value)
        if name not in self.owned:
            if self.ran:
                raise BundleError(f"{self.spec.name}: input {name!r} changed kind after the first call")
            self.inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.device, 0)
            self.owned.add(name)
            self.binding.bind_ortvalue_input(name, self.inputs[name])
        self.sources[name] = value if isinstance(value, DeviceTensor) else None
        self.inputs[name].update_inplace(array)
