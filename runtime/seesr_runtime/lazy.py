"""Optional heavy dependencies, imported on first use: the one place that knows how.

Modules import what every install has (numpy, onnxruntime, tokenizers, Pillow) at the top. A package
only some installs have (an extra: OpenVINO, TensorRT, cuda-python, tritonclient, onnx; torch on the
build side) is declared at the top of the module that needs it as a lazy module, so the dependency is
visible where a reader looks for it, importing the module stays cheap, and a missing package raises
``MissingDependency`` naming the extra that provides it instead of a bare ``ModuleNotFoundError``:

    ov = lazy_import("openvino", extra="openvino")
    ...
    core = ov.Core()            # openvino is imported here, on first attribute access

``imported(module)`` imports a lazy module now and returns the real one (to report a missing package
early); ``available(name)`` asks whether a package can be imported, without importing it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from .errors import MissingDependency


def install_hint(extra: str) -> str:
    """How to install the pip extra ``extra``: seesr-export is installed from its source checkout."""
    return f"pip install '.[{extra}]' in the seesr-export checkout"


class LazyModule(ModuleType):
    """A stand-in for a module that imports it on first attribute access. Its own names all start with
    ``_lazy_``, so none hides an attribute of the real module (``onnx.load``)."""

    def __init__(self, name: str, extra: str | None):
        super().__init__(name)
        self._lazy_extra = extra
        self._lazy_module: ModuleType | None = None

    def _lazy_load(self) -> ModuleType:
        """The real module, imported now if it was not yet; ``MissingDependency`` when it is missing."""
        if self._lazy_module is None:
            try:
                self._lazy_module = importlib.import_module(self.__name__)
            except ImportError as exc:
                hint = f": {install_hint(self._lazy_extra)}" if self._lazy_extra else ""
                raise MissingDependency(
                    f"this needs the optional package {self.__name__!r}, which is not installed{hint} ({exc})",
                    module=self.__name__,
                ) from exc
        return self._lazy_module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_lazy_"):  # our own slots, before __init__ has set them
            raise AttributeError(attr)
        return getattr(self._lazy_load(), attr)

    def __repr__(self) -> str:
        state = "imported" if self._lazy_module is not None else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_import(name: str, extra: str | None = None) -> Any:
    """``name`` (a dotted module path) as a lazy module; ``extra`` is the pip extra that installs it.

    Typed ``Any`` because the real module's attributes are only known once it is imported."""
    return LazyModule(name, extra)


def imported(module: Any) -> ModuleType:
    """The real module behind ``module`` (a lazy module, imported now: ``MissingDependency`` when it is
    missing; any other module is returned as it is)."""
    return module._lazy_load() if isinstance(module, LazyModule) else module


def available(name: str) -> bool:
    """Whether ``name`` can be imported here (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a half-initialised module
        return False
