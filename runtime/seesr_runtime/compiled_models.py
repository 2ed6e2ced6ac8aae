"""Compiled models shared by threads: one ``NetworkModels`` per network, one pool of requests per shape.

An engine that compiles a network for static shapes (OpenVINO) keeps, per network, the shapes it has
compiled (``NetworkModels``), and per compiled shape a ``RequestPool``: an inference request serves one
call at a time, so each thread takes one from the pool (creating it when none is idle) and gives it
back after the call, as openvino.genai's pipelines keep one request per thread. Requests live as long
as their compiled model, so a server reuses the same few.

A new shape is compiled outside the network's lock, once: the first thread to ask for it compiles, a
second thread asking for the same shape waits for that compile (a shared future), and calls of other
shapes, or other networks, carry on meanwhile.

Each network keeps at most ``capacity`` compiled shapes (the least recently used dropped first); a shape
in use by some call is never dropped (dropping it would free nothing, and a second copy would be compiled),
so the count may exceed the capacity while calls of several shapes run at once, and shrinks back as
they end. ``release()`` drops every idle shape of a network (what a staged memory plan calls when a
stage ends); calls in flight keep theirs until they end. ``release_working_memory()`` keeps the shapes
compiled but lets the engine free their intermediate memory, for networks that run once per image.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Generic, TypeVar

Model = TypeVar("Model")
Request = TypeVar("Request")


class RequestPool(Generic[Request]):
    """Idle inference requests of one compiled model; ``take()`` one for a call, ``give_back()`` it after."""

    def __init__(self, create: Callable[[], Request]):
        self._create = create
        self._idle: list[Request] = []
        self._lock = threading.Lock()
        self.created = 0  # requests made so far: the most calls that ran at once

    def take(self) -> Request:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return self._create()

    def give_back(self, request: Request) -> None:
        with self._lock:
            self._idle.append(request)

    def clear(self) -> None:
        """Drop the idle requests (and the input and output memory each holds); later calls make new ones."""
        with self._lock:
            self._idle.clear()

    @contextmanager
    def request(self) -> Iterator[Request]:
        request = self.take()
        try:
            yield request
        finally:
            self.give_back(request)


class _Shape(Generic[Model]):
    """One compiled shape and the number of calls using it now (guarded by its network's lock)."""

    def __init__(self, model: Model):
        self.model, self.users = model, 0


class _Pending(Generic[Model]):
    """A shape being compiled: its future, and how many other calls wait for it."""

    def __init__(self) -> None:
        self.future: Future[_Shape[Model]] = Future()
        self.waiters = 0


class NetworkModels(Generic[Model]):
    """The compiled shapes of one network (see the module's doc). ``compiles`` counts the shapes it
    compiled, including any compiled again after being dropped."""

    def __init__(self, network: str, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least one compiled shape, got {capacity}")
        self.network, self.capacity = network, capacity
        self.compiles = 0
        self._lock = threading.Lock()
        self._ready: OrderedDict[Hashable, _Shape[Model]] = OrderedDict()
        self._pending: dict[Hashable, _Pending[Model]] = {}

    @contextmanager
    def use(self, key: Hashable, compile_shape: Callable[[], Model]) -> Iterator[Model]:
        """The model compiled for ``key`` (``compile_shape()`` makes it on first use), kept while the
        block runs. An exception from ``compile_shape`` reaches every caller waiting for that key, and
        the next call of that key compiles again."""
        shape = self._acquire(key, compile_shape)
        try:
            yield shape.model
        finally:
            with self._lock:
                shape.users -= 1
                self._drop_idle(self.capacity)

    def _acquire(self, key: Hashable, compile_shape: Callable[[], Model]) -> _Shape[Model]:
        with self._lock:
            ready = self._ready.get(key)
            if ready is not None:
                self._ready.move_to_end(key)
                ready.users += 1
                return ready
            pending, dropped = self._pending.get(key), 0
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending()
                dropped = self._drop_idle(self.capacity - 1)  # room first: never two copies of the weights
            else:  # another thread compiles this shape: wait for it, counted as one of its users
                pending.waiters += 1
        if not owner:
            return pending.future.result()  # the compiler's exception, if it failed
        if dropped:
            gc.collect()  # free the dropped models' weights before the next one is compiled
        try:
            shape = _Shape(compile_shape())
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.future.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self.compiles += 1
            shape.users += 1 + pending.waiters  # the waiters' uses start now, before any drop can see it idle
            self._ready[key] = shape
        pending.future.set_result(shape)
        return shape

    def _drop_idle(self, limit: int) -> int:
        """Drop the least recently used idle shapes until at most ``limit`` are kept (or only shapes
        in use are left); under the lock. Returns how many were dropped."""
        dropped = 0
        for key in [k for k, s in self._ready.items() if s.users == 0]:
            if len(self._ready) <= limit:
                break
            del self._ready[key]
            dropped += 1
        return dropped

    def release(self) -> None:
        """Drop every compiled shape no call is using now (calls in flight keep theirs until they end)."""
        with self._lock:
            dropped = self._drop_idle(0)
        if dropped:
            gc.collect()

    def release_working_memory(self, free: Callable[[Model], None]) -> None:
        """``free(model)`` for every kept shape no call is using now, under the lock, so that no call starts
        on it meanwhile: an engine frees the shape's intermediate memory there and keeps it compiled."""
        with self._lock:
            for shape in self._ready.values():
                if shape.users == 0:
                    free(shape.model)

    def models(self) -> list[Model]:
        """The compiled shapes kept now, least recently used first."""
        with self._lock:
            return [shape.model for shape in self._ready.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready)
