"""seesr_runtime.lazy: optional packages imported on first use, never by ``import seesr_runtime``."""

import subprocess
import sys

import pytest

from seesr_runtime.errors import MissingDependency, SeeSRError
from seesr_runtime.lazy import available, imported, lazy_import

MISSING = "seesr_no_such_package"


def test_a_missing_package_names_the_extra_that_installs_it():
    module = lazy_import(MISSING, extra="openvino")
    assert "not imported yet" in repr(module)
    expected = r"'seesr_no_such_package'.*pip install '\.\[openvino\]' in the seesr-export checkout"
    with pytest.raises(MissingDependency, match=expected) as info:
        _ = module.anything
    assert isinstance(info.value, ImportError) and isinstance(info.value, SeeSRError)
    assert info.value.module == MISSING
    with pytest.raises(MissingDependency):
        imported(module)
    assert not available(MISSING) and not available(f"{MISSING}.sub")


def test_a_lazy_module_passes_every_attribute_through():
    """The stand-in's own names never hide the real module's: ``json.load`` is json's, not a method of
    the stand-in (a lazy ``onnx`` once answered ``onnx.load`` with its own)."""
    import json

    module = lazy_import("json")
    assert module.load is json.load and module.dumps([1]) == "[1]"
    assert imported(module) is json and "(imported)" in repr(module)
    assert imported(json) is json and available("json")


def test_importing_the_runtime_loads_no_optional_package():
    optional = ("openvino", "tensorrt", "cuda", "onnx", "tritonclient", "torch")
    code = (
        "import sys, seesr_runtime, seesr_runtime.cli, seesr_runtime.backends;"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({optional!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
