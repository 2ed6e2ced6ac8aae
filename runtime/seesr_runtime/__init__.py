"""Torch-free SeeSR runtime: numpy over onnxruntime (the base install), OpenVINO or TensorRT (extras).

This package must never import torch: it is what users deploy.
"""

from ._version import __version__
from .pipeline import SeeSRPipeline, UpscaleResult

__all__ = ["SeeSRPipeline", "UpscaleResult", "__version__"]
