"""Per-stage timing of the pipeline: which stage took how long, per call and per image.

A ``StageProfiler`` is handed to ``SeeSRPipeline(profiler=...)``; the pipeline
marks its stages (pre/post-processing, the scheduler step, each denoising step)
and every network call goes through ``ProfiledBackend``, so the same names
appear for every backend. Backends whose ``run`` returns before the device is
done expose ``device_ms()`` (GPU events); onnxruntime with numpy feeds returns
only after its outputs are on the host, so its host time is its latency.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .backends import run_on_device
from .tensors import Array, Backend, Feeds

Shapes = tuple[Any, ...]  # the input shapes of a call, as recorded: ((name, shape), ...)


class StageProfiler:
    """Collects (stage, seconds, input shapes) records; ``clear()`` between timed runs."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, Shapes]] = []

    @contextmanager
    def stage(self, name: str, shapes: Shapes = ()) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.records.append((name, time.perf_counter() - start, shapes))

    def add(self, name: str, seconds: float, shapes: Shapes = ()) -> None:
        self.records.append((name, seconds, shapes))

    def clear(self) -> None:
        self.records.clear()

    def calls(self) -> dict[str, list[float]]:
        """Seconds of every call, per stage, in call order."""
        out: defaultdict[str, list[float]] = defaultdict(list)
        for name, seconds, _ in self.records:
            out[name].append(seconds)
        return dict(out)

    def shapes(self) -> dict[str, set[Shapes]]:
        out: defaultdict[str, set[Shapes]] = defaultdict(set)
        for name, _, shapes in self.records:
            out[name].add(shapes)
        return dict(out)


class ProfiledBackend:
    """Wraps a backend so each network call is recorded under the network's name."""

    def __init__(self, backend: Backend, profiler: StageProfiler):
        self.inner, self.profiler = backend, profiler
        self.name = backend.name

    def run(self, network: str, feeds: Feeds) -> list[Array]:
        return self._timed(self.inner.run, network, feeds)

    def run_on_device(self, network: str, feeds: Feeds) -> list[Any]:
        return self._timed(lambda n, f: run_on_device(self.inner, n, f), network, feeds)

    def _timed(self, call: Callable[[str, Feeds], list[Any]], network: str, feeds: Feeds) -> list[Any]:
        shapes = tuple((k, tuple(np.shape(v))) for k, v in feeds.items())
        start = time.perf_counter()
        outputs = call(network, feeds)
        seconds = time.perf_counter() - start
        device_ms = getattr(self.inner, "device_ms", None)
        if device_ms is not None and device_ms() is not None:
            seconds = device_ms() / 1e3  # GPU events: the device's own time for the call
        self.profiler.add(network.partition("#")[0], seconds, shapes)  # tiled-VAE segments count as their VAE half
        return outputs

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.inner, attribute)


def summarize(values: list[float]) -> dict[str, Any]:
    """median, p95, mean, min of a sample (seconds in, milliseconds out)."""
    array = np.asarray(values, dtype=np.float64) * 1e3
    if array.size == 0:
        return {"median_ms": None, "p95_ms": None, "mean_ms": None, "min_ms": None, "n": 0}
    return {
        "median_ms": float(np.median(array)),
        "p95_ms": float(np.percentile(array, 95)),
        "mean_ms": float(array.mean()),
        "min_ms": float(array.min()),
        "n": int(array.size),
    }
