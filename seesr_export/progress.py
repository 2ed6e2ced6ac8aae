"""Progress reporting for long build-side commands: stage messages logged at INFO, a step bar on stderr."""

from __future__ import annotations

import logging
import sys
import time

from seesr_runtime.lazy import lazy_import
from seesr_runtime.logs import progress_enabled

log = logging.getLogger(__name__)
tqdm = lazy_import("tqdm")  # a tenth of a second to import: loaded with the first bar, not at CLI start-up


class Progress:
    """Stage messages, each prefixed with the seconds since this object was made, and step bars.

    ``quiet`` silences both, whatever the logging level (library callers pass it to build without
    reports); otherwise stages go to the ``seesr_export.progress`` logger at INFO and bars are drawn
    only where the CLI's logging shows INFO (``seesr_runtime.logs.progress_enabled``)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._start = time.perf_counter()

    def stage(self, message: str) -> None:
        if not self.quiet:
            log.info("[%6.1fs] %s", time.perf_counter() - self._start, message)

    def bar(self, total: int, desc: str):
        hidden = self.quiet or not progress_enabled()
        return tqdm.tqdm(total=total, desc=desc, disable=hidden, leave=False, file=sys.stderr)
