"""Errors raised by the build side. Each names the file or value at fault."""


class SeeSRExportError(Exception):
    """Base class for every error the toolkit raises on purpose."""


class CheckpointError(SeeSRExportError):
    """A checkpoint file is missing, unreadable, or does not match the model."""
