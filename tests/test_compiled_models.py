"""The compiled-shape cache the OpenVINO backend keeps per network (seesr_runtime/compiled_models.py), with
compiles that take as long as the test says: one compile per shape whatever the threads, other shapes going on
meanwhile, failures reaching every waiter, shapes in use never dropped, release()."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from seesr_runtime.compiled_models import NetworkModels, RequestPool


class Compiler:
    """Compiles "models" (strings) for keys; a key in ``held`` blocks until ``release(key)``."""

    def __init__(self, *held):
        self.calls = []
        self.gates = {key: threading.Event() for key in held}
        self.started = {key: threading.Event() for key in held}

    def __call__(self, key):
        def compile_shape():
            self.calls.append(key)
            if key in self.gates:
                self.started[key].set()
                assert self.gates[key].wait(10)
            if key == "bad":
                raise RuntimeError("cannot compile bad")
            return f"model {key}"

        return compile_shape

    def release(self, key):
        self.gates[key].set()


def test_one_compile_per_shape_and_other_shapes_carry_on():
    models = NetworkModels("unet", capacity=4)
    compiler = Compiler("a")
    results = {}

    def use(key, name):
        with models.use(key, compiler(key)) as model:
            results[name] = model

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(use, "a", "first")
        assert compiler.started["a"].wait(10)
        waiting = [pool.submit(use, "a", f"waiter {i}") for i in range(2)]
        pool.submit(use, "b", "other").result(10)  # done while "a" is still compiling
        assert not first.done() and not any(w.done() for w in waiting)
        compiler.release("a")
        for future in (first, *waiting):
            future.result(10)
    assert compiler.calls == ["a", "b"] and models.compiles == 2
    assert results == {"first": "model a", "waiter 0": "model a", "waiter 1": "model a", "other": "model b"}


def test_a_failed_compile_reaches_its_waiters_and_is_tried_again():
    models = NetworkModels("unet", capacity=1)
    compiler = Compiler("bad")

    def use():
        with models.use("bad", compiler("bad")):
            pass

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(use)
        assert compiler.started["bad"].wait(10)
        waiter = pool.submit(use)
        compiler.release("bad")
        for future in (first, waiter):
            with pytest.raises(RuntimeError, match="cannot compile bad"):
                future.result(10)
    with pytest.raises(RuntimeError, match="cannot compile bad"):
        use()
    assert compiler.calls == ["bad", "bad"] and models.compiles == 0 and len(models) == 0


def test_least_recently_used_idle_shapes_are_dropped_but_not_shapes_in_use():
    models = NetworkModels("vae_decoder#1", capacity=2)
    compiler = Compiler()
    with models.use("a", compiler("a")):
        for key in ("b", "c", "d"):  # "a" stays: in use
            with models.use(key, compiler(key)):
                pass
        assert models.models() == ["model a", "model d"]
    with models.use("a", compiler("a")), models.use("e", compiler("e")), models.use("f", compiler("f")):
        assert len(models) == 3  # above the capacity while all three run
    # back to the capacity as they ended: "f" ended first, while the others still ran, so "f" went
    assert models.models() == ["model a", "model e"]
    assert compiler.calls == ["a", "b", "c", "d", "e", "f"]
    models.release()
    assert len(models) == 0 and models.compiles == 6


def test_release_keeps_shapes_in_use():
    models = NetworkModels("unet", capacity=1)
    with models.use("a", Compiler()("a")) as model:
        models.release()
        assert models.models() == [model]
    models.release()
    assert models.models() == []


def test_request_pool_gives_each_caller_its_own_request():
    made = []
    pool = RequestPool(lambda: made.append(len(made)) or f"request {len(made)}")
    with pool.request() as first, pool.request() as second:
        assert first != second
    with pool.request() as again:
        assert again in (first, second)
    assert pool.created == 2


def test_capacity_must_hold_a_shape():
    with pytest.raises(ValueError, match="at least one compiled shape, got 0"):
        NetworkModels("unet", capacity=0)
