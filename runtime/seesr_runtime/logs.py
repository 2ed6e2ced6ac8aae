"""Logging for the command-line tools: one set-up, called by each CLI's ``main``.

Library modules log through ``logging.getLogger(__name__)`` and never configure logging themselves, so
an application embedding the runtime keeps control of its own handlers. The CLIs map their flags to a
level for the toolkit's two packages (``seesr_runtime``, ``seesr_export``):

    -q  WARNING   problems only (and the command's own result lines, which are printed, not logged)
        INFO      what is being done: stages, notes, timings (the default)
    -v  DEBUG     details: sessions, shapes, cache hits, per-file checks

Progress bars (tqdm) are separate and shown only at INFO or below, i.e. hidden by ``-q``.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("seesr_runtime", "seesr_export")


class _Format(logging.Formatter):
    """Plain messages at INFO; "warning: ..." / "error: ..." above it; module names in DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno <= logging.DEBUG:
            return f"[{record.name}] {message}"
        return message


def level_for(quiet: bool = False, verbose: int = 0) -> int:
    """The logging level the ``-q`` / ``-v`` flags ask for (``-q`` wins)."""
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose > 0 else logging.INFO


def configure(quiet: bool = False, verbose: int = 0) -> int:
    """Route the toolkit's loggers to stderr at the level the flags ask for; returns that level.

    Idempotent: a second call (tests run several CLI commands in one process) replaces the handler."""
    level = level_for(quiet, verbose)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "_seesr_cli", False)]:
            logger.removeHandler(handler)
        # sys.stderr looked up per record, not bound now: pytest's capture replaces it between tests.
        handler = _StderrHandler()
        handler.setFormatter(_Format("%(message)s"))
        handler._seesr_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return level


def progress_enabled() -> bool:
    """Whether progress bars should be drawn: the CLI's level is INFO or more verbose."""
    return logging.getLogger(PACKAGES[0]).getEffectiveLevel() <= logging.INFO


class _StderrHandler(logging.Handler):
    """Writes each record to whatever ``sys.stderr`` is at that moment; through ``tqdm.write`` once tqdm
    is imported, so that a message printed while a progress bar is drawn goes above the bar, not into it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            bars = sys.modules.get("tqdm")  # not imported: no bar can be on screen (and none is loaded for this)
            if bars is not None:
                bars.tqdm.write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report through handleError, never raise
            self.handleError(record)
