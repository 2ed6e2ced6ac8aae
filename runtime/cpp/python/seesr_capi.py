"""libseesr's C ABI (``runtime/cpp/include/seesr.h``) declared for ctypes: one place for the tests and the
benchmarks that drive the native runtime from Python. Not a Python API of its own: the Python runtime is
``seesr_runtime``; this only mirrors the header so its callers need not repeat it.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

VERIFY_AUTO, VERIFY_ALWAYS, VERIFY_NEVER = 0, 1, 2  # seesr_verify


class SeeSRError(Exception):
    """A call returned a status other than SEESR_OK; ``message`` is seesr_last_error()."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class EngineOptions(ctypes.Structure):
    """seesr_engine_options, field for field."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("engine", ctypes.c_char_p),
        ("device", ctypes.c_char_p),
        ("precision", ctypes.c_char_p),
        ("threads", ctypes.c_int32),
        ("cache_dir", ctypes.c_char_p),
        ("verify", ctypes.c_int),
        ("tiled_vae_spill_dir", ctypes.c_char_p),
        ("memory_budget", ctypes.c_uint64),
    ]


def load_library(path: Path) -> ctypes.CDLL:
    """libseesr with the signatures ctypes cannot guess declared: strings and pointers returned, 64-bit and
    double arguments, handles passed to the free functions and the image accessors."""
    lib = ctypes.CDLL(str(path))
    for name in ("seesr_version", "seesr_last_error", "seesr_status_name"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.seesr_status_name.argtypes = [ctypes.c_int]
    setters = {"int": ctypes.c_int64, "float": ctypes.c_double, "bool": ctypes.c_int, "string": ctypes.c_char_p}
    for kind, value_type in setters.items():
        getattr(lib, f"seesr_options_set_{kind}").argtypes = [ctypes.c_void_p, ctypes.c_char_p, value_type]
    for name in ("seesr_pipeline_close", "seesr_options_free", "seesr_image_free", "seesr_string_free"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.seesr_pipeline_memory_plan_json.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.seesr_pipeline_resident_json.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.seesr_parse_byte_size.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)]
    image_accessors = {"pixels": ctypes.c_void_p, "tags": ctypes.c_char_p, "prompt": ctypes.c_char_p}
    image_accessors.update(dict.fromkeys(("width", "height", "stride"), ctypes.c_int32))
    for field, result_type in image_accessors.items():
        accessor = getattr(lib, f"seesr_image_{field}")
        accessor.argtypes, accessor.restype = [ctypes.c_void_p], result_type
    return lib


def engine_info(lib: ctypes.CDLL, engine: str | None = "openvino") -> dict:
    """seesr_engine_info_json, parsed."""
    text = ctypes.c_char_p()
    call(lib, "seesr_engine_info_json", engine.encode() if engine is not None else None, ctypes.byref(text))
    return json.loads(text.value)


def owned_json(lib: ctypes.CDLL, function: str, *args: object) -> object:
    """The JSON string ``lib.function(*args, &out)`` allocates, parsed, then freed (seesr_string_free)."""
    text = ctypes.c_void_p()
    call(lib, function, *args, ctypes.byref(text))
    try:
        return json.loads(ctypes.string_at(text.value))
    finally:
        lib.seesr_string_free(text)


def resident(lib: ctypes.CDLL, pipeline: ctypes.c_void_p) -> dict[str, int]:
    """seesr_pipeline_resident_json: compiled models alive now, per network."""
    alive = owned_json(lib, "seesr_pipeline_resident_json", pipeline)
    assert isinstance(alive, dict)
    return alive


def memory_plan(lib: ctypes.CDLL, pipeline: ctypes.c_void_p, width: int, height: int, options: object = None) -> dict:
    """seesr_pipeline_memory_plan_json for a ``width`` x ``height`` image (``options``: a seesr_options or None)."""
    plan = owned_json(lib, "seesr_pipeline_memory_plan_json", pipeline, width, height, options)
    assert isinstance(plan, dict)
    return plan


def call(lib: ctypes.CDLL, function: str, *args: object) -> None:
    """``lib.function(*args)``; a failing status raises SeeSRError with the library's message."""
    status = getattr(lib, function)(*args)
    if status != 0:
        raise SeeSRError(status, lib.seesr_last_error().decode())


def engine_options(lib: ctypes.CDLL, **fields: object) -> EngineOptions:
    """seesr_engine_options_init's defaults, then ``fields`` (e.g. ``threads=2, verify=VERIFY_NEVER``)."""
    options = EngineOptions()
    call(lib, "seesr_engine_options_init", ctypes.byref(options))
    for key, value in fields.items():
        setattr(options, key, value)
    return options


def open_pipeline(lib: ctypes.CDLL, bundle: Path, **fields: object) -> ctypes.c_void_p:
    """A seesr_pipeline handle for ``bundle``, opened with ``engine_options(lib, **fields)``."""
    pipeline = ctypes.c_void_p()
    options = engine_options(lib, **fields)
    call(lib, "seesr_pipeline_open", str(bundle).encode(), ctypes.byref(options), ctypes.byref(pipeline))
    return pipeline
