"""The runtime's error hierarchy: every error raised on purpose derives from ``SeeSRError``.

Callers (the CLIs, the Triton model, users' code) catch ``SeeSRError`` for "the user or the
environment got something wrong" and let anything else surface as a bug. Each message names the
value, file or option at fault and what was expected. The build side's errors
(``seesr_export.errors``) derive from ``SeeSRError`` too.
"""

from __future__ import annotations


class SeeSRError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class BundleError(SeeSRError):
    """A bundle is missing, malformed, reaches outside itself, or its files do not match the manifest."""


class BackendError(SeeSRError):
    """An inference engine is missing, cannot run here, or failed to run a network."""


class InputError(SeeSRError, ValueError):
    """An input the caller supplied (an image, a tensor, a request) is not acceptable."""


class ImageRejected(InputError):
    """An image file or array cannot be used: unreadable, corrupt, too small or too large."""


class OptionError(InputError):
    """An upscale option has the wrong type or lies outside its accepted range (``seesr_runtime.options``);
    ``option`` names it."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class UpscaleCancelled(SeeSRError):
    """An upscale stopped because its caller asked: a progress callback raises it to stop at the next step
    (``seesr ui``'s cancel button)."""


class MissingDependency(SeeSRError, ImportError):
    """An optional package (an extra such as ``openvino`` or ``tensorrt``) is needed and not installed
    (``seesr_runtime.lazy``); ``module`` names it and the message says which extra provides it."""

    def __init__(self, message: str, module: str):
        super().__init__(message, name=module)
        self.module = module
