"""Triton Inference Server support files (torch-free), and the one description of the service.

``model.py`` here is not imported by the runtime: ``seesr-export triton`` copies it into a
generated model repository as ``<model>/<SERVICE_VERSION>/model.py``, where Triton's Python backend
loads it.

``INPUTS`` and ``OUTPUTS`` describe every tensor of a request and of its response: ``seesr-export
triton`` writes config.pbtxt from them, the model reads and writes its tensors by them, and
``seesr-triton-client`` builds its requests and reads the answers by them.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError, InputError
from ..ort_backend import IO_BINDING_MODES

MODEL_FILE = Path(__file__).with_name("model.py")

# The request format's version, also the Triton model version (the repository's version directory). Version 2:
# the image travels encoded (one image file's bytes); version 1 sent raw UINT8 [H, W, 3] pixels, whose variable
# dims let a declared shape reach Triton's size arithmetic.
SERVICE_VERSION = 2

NUMPY_TYPES = {
    "TYPE_STRING": "object",
    "TYPE_UINT8": "uint8",
    "TYPE_INT64": "int64",
    "TYPE_INT32": "int32",
    "TYPE_FP32": "float32",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the service, as config.pbtxt declares it."""

    name: str
    data_type: str  # config.pbtxt's name: TYPE_STRING, TYPE_UINT8, ...
    dims: tuple[int, ...]  # -1: any size
    what: str  # what it holds, for messages and documentation
    optional: bool = False

    @property
    def wire_type(self) -> str:
        """The protocol's name of the data type (TYPE_STRING travels as BYTES)."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type.removeprefix("TYPE_")

    @property
    def numpy_type(self) -> str:
        return NUMPY_TYPES[self.data_type]


# Fixed dims: Triton refuses any other declared shape before it computes a byte size or reserves memory.
IMAGE_INPUT = TensorSpec("image", "TYPE_STRING", (1,), "one encoded image file (PNG, JPEG, WebP, BMP, TIFF)")
# The options' names, ranges and defaults are those of ``seesr_runtime.options``.
OPTION_INPUTS = (
    TensorSpec("prompt", "TYPE_STRING", (1,), "one UTF-8 string", optional=True),
    TensorSpec("seed", "TYPE_INT64", (1,), "one int64 value", optional=True),
    TensorSpec("steps", "TYPE_INT32", (1,), "one int32 value", optional=True),
    TensorSpec("guidance", "TYPE_FP32", (1,), "one float32 value", optional=True),
)
INPUTS = (IMAGE_INPUT, *OPTION_INPUTS)
# Each output is the pipeline result's attribute of the same name.
OUTPUTS = (
    TensorSpec("image", "TYPE_UINT8", (-1, -1, 3), "the x4 image, RGB [4H, 4W, 3]"),
    TensorSpec("tags", "TYPE_STRING", (1,), "the DAPE tags, UTF-8"),
    TensorSpec("prompt", "TYPE_STRING", (1,), "the full prompt used, UTF-8"),
)
REQUEST_OPTIONS = tuple(spec.name for spec in OPTION_INPUTS)

# Access key. tritonserver itself restricts its inference API to requests carrying this header with the
# deployment's key (``server_access_arguments``), and checks it before it reads a request's body: a client
# without the key cannot reach the HTTP frontend's JSON parsing, which reserves whatever size a JSON-inline
# tensor declares. The client reads the key from ``ACCESS_KEY_ENV``, never from its command line.
ACCESS_KEY_HEADER = "seesr-key"
ACCESS_KEY_ENV = "SEESR_TRITON_KEY"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def server_access_arguments(key: str) -> list[str]:
    """tritonserver's options that admit only requests carrying ``ACCESS_KEY_HEADER: key`` to inference,
    over HTTP and gRPC (health, metadata and the other APIs stay open)."""
    # tritonserver splits the option at these characters; the key itself is never echoed (it is a secret).
    bad = next((c for c in key if c in " ,:=" or not c.isprintable()), None)
    if not key or bad is not None:
        found = "it is empty" if not key else f"it contains {bad!r}"
        raise InputError(f"the access key must be non-empty printable text without spaces, ',', ':' or '=': {found}")
    return [
        f"--http-restricted-api=inference:{ACCESS_KEY_HEADER}={key}",
        f"--grpc-restricted-protocol=inference:{ACCESS_KEY_HEADER}={key}",
    ]


def access_headers(key: str | None, protocol: str) -> dict[str, str]:
    """The HTTP headers or gRPC metadata that carry ``key``; none without one. tritonserver looks for a
    restricted gRPC protocol's header under its own prefix."""
    if not key:
        return {}
    return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + ACCESS_KEY_HEADER: key}


# ---------------------------------------------------------------- the model's backend, from config.pbtxt

# The precision of an OpenVINO model that the serving machine picks when the instance loads (the image may be
# built elsewhere): bf16 on a CPU with bf16 units, f32 otherwise, the rule of `seesr upscale`'s default
# (``doctor.openvino_cpu_precision``).
AUTO_PRECISION = "auto"
# Which backend reads which of config.pbtxt's backend parameters (``backend_options``); the generator writes
# these and no others, so that a configuration shows only what takes effect.
BACKEND_PARAMETERS = {
    "onnxruntime": ("precision", "providers", "threads", "static_shapes", "io_binding", "cuda_graph"),
    "tensorrt": ("precision", "cuda_graph"),
    "openvino": ("precision", "threads"),
}
FLAG_VALUES = {"true": True, "false": False}


def backend_options(params: Mapping[str, str], instances: int) -> dict[str, Any]:
    """The keyword options of ``SeeSRPipeline.from_bundle(bundle, backend=params["backend"], ...)`` that
    config.pbtxt's string parameters ask for; ``instances``: the model's instance count (threads "auto" share
    the machine's cores between them). A value the runtime cannot take is a ``BundleError`` naming it."""
    backend = params.get("backend", "")
    if backend not in BACKEND_PARAMETERS:
        raise BundleError(f"config.pbtxt parameter backend must be one of {list(BACKEND_PARAMETERS)}, got {backend!r}")
    readers = {
        "precision": lambda value: _precision(backend, value),
        "providers": lambda value: value.split(","),
        "threads": lambda value: _threads(value, instances),
        "static_shapes": lambda value: _flag("static_shapes", value),
        "cuda_graph": lambda value: _flag("cuda_graph", value),
        "io_binding": _io_binding,
    }
    options = {name: readers[name](params[name]) for name in BACKEND_PARAMETERS[backend] if name in params}
    if backend == "openvino":
        options["device"] = "CPU"  # Triton's instance kinds are CPU or NVIDIA GPU: OpenVINO serves the CPU
    return options


def _precision(backend: str, value: str) -> str:
    if value != AUTO_PRECISION:
        return value
    if backend != "openvino":
        raise BundleError(f"config.pbtxt parameter precision {value!r} is for backend openvino, not {backend}")
    from ..doctor import openvino_precision_here  # asks OpenVINO about the CPU: only where it is needed

    return openvino_precision_here()[0]


def _threads(value: str, instances: int) -> int | None:
    """'auto': share the machine's cores between the instances instead of oversubscribing them."""
    if value == "auto":
        return max(1, (os.cpu_count() or 1) // max(1, instances))
    if not value.isdigit() or int(value) < 1:
        raise BundleError(f"config.pbtxt parameter threads must be 'auto' or a positive number, got {value!r}")
    return int(value)


def _flag(name: str, value: str) -> bool:
    if value not in FLAG_VALUES:
        raise BundleError(f"config.pbtxt parameter {name} must be one of {list(FLAG_VALUES)}, got {value!r}")
    return FLAG_VALUES[value]


def _io_binding(value: str) -> bool | None:
    if value not in IO_BINDING_MODES:
        raise BundleError(f"config.pbtxt parameter io_binding must be one of {list(IO_BINDING_MODES)}, got {value!r}")
    return IO_BINDING_MODES[value]
