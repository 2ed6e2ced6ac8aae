"""Triton Python-backend model: SeeSR x4 super-resolution on the torch-free runtime.

Written into ``<repository>/<model>/1/model.py`` by ``seesr-export triton``. Each model instance
is its own stub process: ``initialize`` loads the bundle's sessions (or TensorRT engines) once,
``execute`` serves requests one at a time. Everything this model needs is read from the
``parameters`` of config.pbtxt (bundle, backend, precision, providers, threads, max_pixels,
pipeline_options). The server's Python environment must have the runtime installed
(``pip install seesr-export``; no torch).

A bad request (wrong dtype, rank, channel count, too large or too small, an option outside the
runtime's options table) gets a Triton error naming the value and what was expected; an unexpected
failure also becomes an error response, never a dead instance. Each input's declared shape is checked
before its data is converted (Triton has already refused shapes that the bytes sent do not fill).
"""

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
    from seesr_runtime.options import check_image_size
    from seesr_runtime.triton import NUMPY_TYPES, REQUEST_OPTIONS

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


def _threads(value: str, model_config: dict[str, Any]) -> int | None:
    """'auto': share the machine's cores between the instances instead of oversubscribing them."""
    if value == "auto":
        return max(1, (os.cpu_count() or 1) // _instance_count(model_config))
    return int(value) or None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.max_pixels = int(params["max_pixels"])
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
        options: dict[str, Any] = {"precision": params["precision"]}
        if backend == "onnxruntime":
            options["providers"] = params["providers"].split(",")
            options["threads"] = _threads(params.get("threads", "auto"), config)
        bundle = _bundle_path(params["bundle"], args)
        self.pipe = SeeSRPipeline.from_bundle(bundle, backend=backend, **options)
        self.pipe.resolve_options(self.pipeline_options)  # a bad config.pbtxt fails here, not per request
        self._load_all_networks()
        pb_utils.Logger.log_info(
            f"seesr: instance {args['model_instance_name']} ready: bundle {bundle}, backend {backend}, {options}"
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
                pb_utils.Tensor("image", np.ascontiguousarray(np.asarray(result.image, dtype=np.uint8))),
                pb_utils.Tensor("tags", np.array([result.tags.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("prompt", np.array([result.prompt.encode("utf-8")], dtype=np.object_)),
            ]
        )

    def _read(self, request: Request) -> tuple[npt.NDArray[np.uint8], dict[str, object]]:
        tensor = pb_utils.get_input_tensor_by_name(request, "image")
        if tensor is None:
            raise RequestError("input 'image' is required (UINT8 [H, W, 3])")
        check_image_shape(_shape(tensor), self.max_pixels)  # the declared shape first: no data converted yet
        image = check_image_dtype(tensor.as_numpy())
        options = {
            name: _text(request, name)
            if data_type == "TYPE_STRING"
            else _scalar(request, name, np.dtype(NUMPY_TYPES[data_type]))
            for name, data_type in REQUEST_OPTIONS.items()
        }
        return image, {name: value for name, value in options.items() if value is not None}


# Triton checks dtype and shape against config.pbtxt first; these repeat it for clear messages, and check
# what config.pbtxt cannot express (the pixel limit) from the declared shape alone.


def check_image_shape(shape: list[int], max_pixels: int) -> None:
    if len(shape) != 3 or shape[2] != 3:
        raise RequestError(f"input 'image' must be [H, W, 3] (RGB), got shape {shape}")
    try:
        check_image_size(shape[1], shape[0], max_pixels, raise_with="config.pbtxt parameter max_pixels")
    except InputError as exc:
        raise RequestError(f"input 'image': {exc}") from None


def check_image_dtype(image: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if image.dtype != np.uint8:
        raise RequestError(f"input 'image' must be UINT8, got {image.dtype}")
    return image


def _shape(tensor: Tensor) -> list[int]:
    return [int(size) for size in tensor.shape()]


def _one_element(request: Request, name: str, what: str) -> npt.NDArray[Any] | None:
    """The input's data, once its declared shape says it holds exactly one element; None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    shape = _shape(tensor)
    if math.prod(shape) != 1:  # Python integers: no overflow whatever the declared sizes
        raise RequestError(f"input '{name}' must hold one {what}, got shape {shape}")
    value: npt.NDArray[Any] = tensor.as_numpy()
    return value


def _scalar(request: Request, name: str, dtype: np.dtype[Any]) -> int | float | None:
    value = _one_element(request, name, f"{dtype.name} value")
    if value is None:
        return None
    if value.dtype != dtype:
        raise RequestError(f"input '{name}' must hold one {dtype.name} value, got {value.dtype}")
    number: int | float = value.reshape(()).item()
    return number


def _text(request: Request, name: str) -> str | None:
    value = _one_element(request, name, "string")
    if value is None:
        return None
    raw = value.reshape(()).item()
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise RequestError(f"input '{name}' is not valid UTF-8 ({exc})") from None


def _error(message: str, invalid: bool) -> Response:
    codes = getattr(pb_utils.TritonError, "INVALID_ARG", None), getattr(pb_utils.TritonError, "INTERNAL", None)
    code = codes[0] if invalid else codes[1]
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
