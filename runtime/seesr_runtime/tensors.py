"""What flows between the pipeline and a backend: the array types and the backend interface.

A module of its own, below ``backends`` and every backend implementation, so that a backend can hold
another backend (TensorRT runs the tiled VAE's segment graphs on onnxruntime) without importing
``backends``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
"""An image, latent, embedding or network output in float32 (the pipeline's working precision)."""

Array = npt.NDArray[Any]
"""A network feed or output of any dtype (float32 and float16 tensors, int64 token ids)."""

Feeds = Mapping[str, Any]
"""A network call's inputs by name: arrays, or a backend's own device handles (``ort_device.DeviceTensor``)."""


class Backend(Protocol):
    """Runs a bundle's networks: ``backend.run(network, feeds) -> outputs``."""

    name: str

    def run(self, network: str, feeds: Feeds) -> list[Array]:
        """Outputs of ``network`` in manifest order."""
        ...
