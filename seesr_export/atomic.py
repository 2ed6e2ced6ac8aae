"""Replacing a directory as a whole (bundles, model repositories): readers see the old one or the new one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from seesr_runtime.filemodes import give_umask_mode


def swap_into_place(work: Path, out: Path) -> None:
    """Rename the finished ``work`` directory onto ``out``, replacing what was there. ``work`` (made by
    ``tempfile.mkdtemp``, so 0700) first gets the mode the umask gives a new directory."""
    give_umask_mode(work)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(work, out)
