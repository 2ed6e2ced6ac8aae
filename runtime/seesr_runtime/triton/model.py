"""Triton Python-backend model: SeeSR x4 super-resolution on the torch-free runtime.

Written into ``<repository>/<model>/1/model.py`` by ``seesr-export triton``. Each model instance
is its own stub process: ``initialize`` loads the bundle's sessions (or TensorRT engines) once,
``execute`` serves requests one at a time. Everything this model needs is read from the
``parameters`` of config.pbtxt (bundle, backend, precision, providers, threads, max_pixels,
pipeline_options). The server's Python environment must have the runtime installed
(``pip install seesr-export``; no torch).

A bad request (wrong dtype, rank, channel count, too large or too small, bad option value) gets a
Triton error naming the value and what was expected; an unexpected failure also becomes an error
response, never a dead instance.
"""
import json
import math
import os
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

MIN_SIDE = 8  # as the runtime CLI: smaller inputs break the tagger's resize
MAX_STEPS = 1000  # the DDPM schedule has 1000 training steps


class RequestError(ValueError):
    """This request cannot be served; the message is returned to the client."""


def _parameters(model_config: dict) -> dict:
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def _bundle_path(value: str, args: dict) -> Path:
    """Relative bundle paths are relative to the version directory, where the generator copies it."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(args["model_repository"]) / args["model_version"] / path
    return path


def _instance_count(model_config: dict) -> int:
    return max(1, sum(int(group.get("count", 1)) for group in model_config.get("instance_group", [])))


def _threads(value: str, model_config: dict) -> int | None:
    """'auto': share the machine's cores between the instances instead of oversubscribing them."""
    if value == "auto":
        return max(1, (os.cpu_count() or 1) // _instance_count(model_config))
    return int(value) or None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.max_pixels = int(params["max_pixels"])
        self.pipeline_options = json.loads(params.get("pipeline_options", "{}"))
        if args["model_instance_kind"] == "GPU":
            # One stub process per instance: pin it to its GPU before any CUDA library starts.
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        try:
            from seesr_runtime import SeeSRPipeline
        except ImportError as exc:
            raise RuntimeError(f"the SeeSR runtime is not installed in the server's Python ({exc}); "
                               "pip install seesr-export (no extras) in the Triton image") from None
        backend = params["backend"]
        options = {"precision": params["precision"]}
        if backend == "onnxruntime":
            options["providers"] = params["providers"].split(",")
            options["threads"] = _threads(params.get("threads", "auto"), config)
        bundle = _bundle_path(params["bundle"], args)
        self.pipe = SeeSRPipeline.from_bundle(bundle, backend=backend, **options)
        self._load_all_networks()
        pb_utils.Logger.log_info(f"seesr: instance {args['model_instance_name']} ready: bundle {bundle}, "
                                 f"backend {backend}, {options}")

    def _load_all_networks(self):
        """Create every session now, not on the first request (TensorRT loads its engines eagerly)."""
        load_all = getattr(self.pipe.backend, "load_all", None)
        if load_all is not None:
            load_all()

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            image, seed, options = self._read(request)
            result = self.pipe(image, seed=seed, **{**self.pipeline_options, **options})
        except RequestError as exc:
            return _error(str(exc), invalid=True)
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the instance down
            pb_utils.Logger.log_error(f"seesr: request failed:\n{traceback.format_exc()}")
            return _error(f"internal error: {type(exc).__name__}: {exc}", invalid=False)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("image", np.ascontiguousarray(np.asarray(result.image, dtype=np.uint8))),
            pb_utils.Tensor("tags", np.array([result.tags.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("prompt", np.array([result.prompt.encode("utf-8")], dtype=np.object_)),
        ])

    def _read(self, request):
        image = _input(request, "image")
        if image is None:
            raise RequestError("input 'image' is required (UINT8 [H, W, 3])")
        check_image(image, self.max_pixels)
        seed = _scalar(request, "seed", np.int64)
        if seed is not None and seed < 0:
            raise RequestError(f"seed must be >= 0, got {seed}")
        steps = _scalar(request, "steps", np.int32)
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise RequestError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
        guidance = _scalar(request, "guidance", np.float32)
        if guidance is not None and not math.isfinite(guidance):
            raise RequestError(f"guidance must be a finite number, got {guidance}")
        options = {"steps": steps, "guidance": guidance, "prompt": _text(request, "prompt")}
        return image, (0 if seed is None else seed), {k: v for k, v in options.items() if v is not None}


def check_image(image: np.ndarray, max_pixels: int) -> None:
    """Triton checks dtype and shape against config.pbtxt first; this repeats it for clear messages."""
    if image.dtype != np.uint8:
        raise RequestError(f"input 'image' must be UINT8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise RequestError(f"input 'image' must be [H, W, 3] (RGB), got shape {list(image.shape)}")
    height, width = image.shape[:2]
    if height * width > max_pixels:
        raise RequestError(f"input 'image' is {width}x{height} = {height * width} pixels, over this model's "
                           f"limit of {max_pixels} (config.pbtxt parameter max_pixels)")
    if min(height, width) < MIN_SIDE:
        raise RequestError(f"input 'image' is {width}x{height}; each side must be at least {MIN_SIDE} pixels")


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request, name: str, dtype):
    value = _input(request, name)
    if value is None:
        return None
    if value.size != 1 or value.dtype != dtype:
        raise RequestError(f"input '{name}' must hold one {np.dtype(dtype).name} value, "
                           f"got {value.dtype} shape {list(value.shape)}")
    return value.reshape(()).item()


def _text(request, name: str):
    value = _input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"input '{name}' must hold one string, got shape {list(value.shape)}")
    raw = value.reshape(()).item()
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise RequestError(f"input '{name}' is not valid UTF-8 ({exc})") from None


def _error(message: str, invalid: bool):
    codes = getattr(pb_utils.TritonError, "INVALID_ARG", None), getattr(pb_utils.TritonError, "INTERNAL", None)
    code = codes[0] if invalid else codes[1]
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
