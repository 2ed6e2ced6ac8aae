"""Torch-free SeeSR runtime: numpy over onnxruntime (the base install), OpenVINO or TensorRT (extras).

This package must never import torch: it is what users deploy.
"""

import os

# onnxruntime's Linux wheels (1.32 measured) send usage telemetry to mobile.events.data.microsoft.com within a
# minute of creating a session, unless this is set before onnxruntime is imported (its
# disable_telemetry_events() does not stop it). A runtime meant for offline and edge machines sends nothing;
# setdefault: a user who sets it to 0 keeps onnxruntime's default.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from ._version import __version__
from .pipeline import SeeSRPipeline, UpscaleResult

__all__ = ["SeeSRPipeline", "UpscaleResult", "__version__"]
