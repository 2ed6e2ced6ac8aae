"""Triton Inference Server support files (torch-free).

``model.py`` here is not imported by the runtime: ``seesr-export triton`` copies it into a
generated model repository as ``<model>/1/model.py``, where Triton's Python backend loads it.
"""

from pathlib import Path

MODEL_FILE = Path(__file__).with_name("model.py")

# The request's inputs besides the image: upscale options (ranges and defaults in ``seesr_runtime.options``),
# each with its Triton data type. ``seesr-export triton`` declares them in config.pbtxt, the model reads
# them, ``seesr-triton-client`` sends them.
REQUEST_OPTIONS = {"prompt": "TYPE_STRING", "seed": "TYPE_INT64", "steps": "TYPE_INT32", "guidance": "TYPE_FP32"}
NUMPY_TYPES = {"TYPE_STRING": "object", "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_FP32": "float32"}


def wire_type(config_type: str) -> str:
    """The protocol's name of a config.pbtxt data type (TYPE_STRING travels as BYTES)."""
    return "BYTES" if config_type == "TYPE_STRING" else config_type.removeprefix("TYPE_")
