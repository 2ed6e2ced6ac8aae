"""Triton Python-backend model: SeeSR x4 super-resolution on the torch-free runtime.

Written into ``<repository>/<model>/<SERVICE_VERSION>/model.py`` by ``seesr-export triton``. Each model instance
is its own stub process: ``initialize`` loads the bundle's sessions (or TensorRT engines) once,
``execute`` serves requests one at a time. Everything this model needs is read from the
``parameters`` of config.pbtxt (bundle, backend, max_pixels, pipeline_options, and the backend's options
that ``seesr_runtime.triton.backend_options`` reads: precision, providers, threads, static_shapes,
io_binding, cuda_graph). The server's Python environment must have the runtime installed
(``pip install seesr-export``; no torch).

Its tensors are those of ``seesr_runtime.triton.INPUTS`` and ``OUTPUTS``: the image arrives as one
encoded image file (BYTES [1]), decoded by the runtime's image loader with the pixel limit checked
before decoding and its decompression-bomb guard. A bad request (an undecodable, too large or too
small image, an option outside the runtime's options table) gets a Triton error naming the value and
what was expected; an unexpected failure also becomes an error response, never a dead instance. Triton
itself refuses any declared shape other than the fixed dims of config.pbtxt before it sizes the data.
"""

# Annotations stay unevaluated: without the runtime installed, the module must still load, for initialize to
# say so (they name the runtime's types).
from __future__ import annotations

import json
import math
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

# The Python backend's objects (requests, tensors, responses) come from its stub and have no type information.
Request = Any
Tensor = Any
Response = Any

RUNTIME_MISSING: ImportError | None

try:
    from seesr_runtime import SeeSRPipeline
    from seesr_runtime.errors import InputError
    from seesr_runtime.inputs import load_lr_image_bytes
    from seesr_runtime.triton import (
        IMAGE_INPUT,
        OPTION_INPUTS,
        OUTPUTS,
        SERVICE_VERSION,
        TensorSpec,
        backend_options,
    )

    RUNTIME_MISSING = None
except ImportError as exc:  # reported by initialize, where Triton shows it
    RUNTIME_MISSING = exc


class RequestError(ValueError):
    """This request cannot be served; the message is returned to the client."""


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def _bundle_path(value: str, args: dict[str, str]) -> Path:
    """Relative bundle paths are relative to the version directory, where the generator copies it."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(args["model_repository"]) / args["model_version"] / path
    return path


def _instance_count(model_config: dict[str, Any]) -> int:
    return max(1, sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.max_pixels = int(params["max_pixels"])
        self._check_service_version(params)
        self.pipeline_options = json.loads(params.get("pipeline_options", "{}"))
        if args["model_instance_kind"] == "GPU":
            # One stub process per instance: pin it to its GPU before any CUDA library starts.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        if RUNTIME_MISSING is not None:
            raise RuntimeError(
                f"the SeeSR runtime is not installed in the server's Python ({RUNTIME_MISSING}); "
                "pip install seesr-export (no extras) in the Triton image"
            )
        backend = params["backend"]
        # precision "auto" (OpenVINO) is decided here, on the serving machine's CPU
        options = backend_options(params, _instance_count(config))
        bundle = _bundle_path(params["bundle"], args)
        self.pipe = SeeSRPipeline.from_bundle(bundle, backend=backend, **options)
        self.pipe.resolve_options(self.pipeline_options)  # a bad config.pbtxt fails here, not per request
        self._load_all_networks()
        pb_utils.Logger.log_info(
            f"seesr: instance {args['model_instance_name']} ready: bundle {bundle}, backend {backend}, {options}"
        )

    @staticmethod
    def _check_service_version(params: dict[str, str]) -> None:
        """model.py comes from the repository, the declaration from the server's installed runtime: they must agree."""
        if RUNTIME_MISSING is None and params.get("service_version") != str(SERVICE_VERSION):
            raise RuntimeError(
                f"the repository was written for request format {params.get('service_version')!r} but the server's "
                f"seesr_runtime speaks {SERVICE_VERSION}; regenerate it with seesr-export triton of the same version"
            )

    def _load_all_networks(self) -> None:
        """Create every session now, not on the first request (TensorRT loads its engines eagerly)."""
        load_all = getattr(self.pipe.backend, "load_all", None)
        if load_all is not None:
            load_all()

    def execute(self, requests: list[Request]) -> list[Response]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Request) -> Response:
        try:
            image, options = self._read(request)
            result = self.pipe(image, max_pixels=self.max_pixels, **{**self.pipeline_options, **options})
        except (RequestError, InputError) as exc:  # InputError: an option outside the runtime's options table
            return _error(str(exc), invalid=True)
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the instance down
            pb_utils.Logger.log_error(f"seesr: request failed:\n{traceback.format_exc()}")
            return _error(f"internal error: {type(exc).__name__}: {exc}", invalid=False)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(spec.name, _output_array(spec, getattr(result, spec.name))) for spec in OUTPUTS
            ]
        )

    def _read(self, request: Request) -> tuple[Any, dict[str, object]]:
        data = _one_element(request, IMAGE_INPUT)
        if data is None:
            raise RequestError(f"input '{IMAGE_INPUT.name}' is required ({IMAGE_INPUT.what})")
        try:
            image, _note = load_lr_image_bytes(
                _bytes(data, IMAGE_INPUT), self.max_pixels, raise_with="config.pbtxt parameter max_pixels"
            )
        except InputError as exc:  # ImageRejected: undecodable, a decompression bomb, too small or too large
            raise RequestError(f"input '{IMAGE_INPUT.name}': {exc}") from None
        options = {spec.name: _option(request, spec) for spec in OPTION_INPUTS}
        return image, {name: value for name, value in options.items() if value is not None}


def _output_array(spec: TensorSpec, value: Any) -> npt.NDArray[Any]:
    if spec.data_type == "TYPE_STRING":
        return np.array([str(value).encode("utf-8")], dtype=np.object_)
    return np.ascontiguousarray(np.asarray(value, dtype=spec.numpy_type))


def _shape(tensor: Tensor) -> list[int]:
    return [int(size) for size in tensor.shape()]


def _one_element(request: Request, spec: TensorSpec) -> Any:
    """The input's one element, once its declared shape says it holds exactly one; None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
    if tensor is None:
        return None
    shape = _shape(tensor)
    if math.prod(shape) != 1:  # Triton refuses other shapes already (fixed dims); Python integers cannot overflow
        raise RequestError(f"input '{spec.name}' must hold {spec.what}, got shape {shape}")
    value: npt.NDArray[Any] = tensor.as_numpy()
    if value.dtype != np.dtype(spec.numpy_type):
        raise RequestError(f"input '{spec.name}' must hold {spec.what}, got {value.dtype}")
    return value.reshape(()).item()


def _bytes(value: object, spec: TensorSpec) -> bytes:
    if not isinstance(value, bytes):
        raise RequestError(f"input '{spec.name}' must hold {spec.what}, got {type(value).__name__}")
    return value


def _option(request: Request, spec: TensorSpec) -> object:
    value = _one_element(request, spec)
    if value is None or spec.data_type != "TYPE_STRING":
        return value
    try:
        return _bytes(value, spec).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"input '{spec.name}' is not valid UTF-8 ({exc})") from None


def _error(message: str, invalid: bool) -> Response:
    codes = getattr(pb_utils.TritonError, "INVALID_ARG", None), getattr(pb_utils.TritonError, "INTERNAL", None)
    code = codes[0] if invalid else codes[1]
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
