"""Errors raised by the build side. Each names the file or value at fault."""

from seesr_runtime.errors import SeeSRError


class SeeSRExportError(SeeSRError):
    """Base class of every error the build side raises on purpose."""


class CheckpointError(SeeSRExportError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


class BuildError(SeeSRExportError):
    """A bundle build refused or failed: a bad request, a graph outside its parity tolerance."""
