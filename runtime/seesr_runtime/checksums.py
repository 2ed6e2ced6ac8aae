"""The sha256 of a file: what a bundle's manifest pins for every file it names.

A module of its own, below both ``manifest`` (which pins the sums) and ``verification`` (which checks
them), so that neither has to import the other for it.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """The hex sha256 of the file at ``path``, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
