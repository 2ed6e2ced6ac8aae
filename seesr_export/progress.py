"""Progress reporting for long build-side commands: stage names and a step bar on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """Stage names and a step bar on stderr; silent when quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._start = time.perf_counter()

    def stage(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self._start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=self.quiet, leave=False, file=sys.stderr)
