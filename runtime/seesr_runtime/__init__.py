"""Torch-free SeeSR runtime: numpy + onnxruntime (TensorRT later).

This package must never import torch: it is what users deploy.
"""
__version__ = "0.1.0"

from .pipeline import SeeSRPipeline, UpscaleResult  # noqa: E402

__all__ = ["SeeSRPipeline", "UpscaleResult", "__version__"]
