"""sha256 verification of a bundle's files on every load, paid once per file version.

A full-size bundle holds about 10 GB of graphs; hashing them on every start would cost tens of seconds.
So a successful check leaves a *verification stamp*: for each verified file its sha256 and what the
kernel records about the file version that was hashed (size, mtime, ctime, inode). A later load hashes
only files whose record no longer matches, or whose expected sha256 in the manifest changed.

The ctime is what makes this safe: it changes whenever the file's contents or metadata change and,
unlike the mtime, no user can set it back, so a file rewritten in place with its size and mtime
restored is still hashed again. Copies (new inodes) and extracted archives (new inodes and ctimes) are
always hashed, even when a stamp travels with them. A file changed within ``RACY_NS`` before its
check is not stamped (a change in the same timestamp tick could otherwise go unseen) and is hashed
again next time.

The stamp lives in the bundle (``STAMP``) or, where the bundle is read-only to this user, in
``$XDG_CACHE_HOME/seesr/verified/`` (default ``~/.cache``), named by a hash of the bundle's path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .checksums import sha256_file
from .errors import BundleError, OptionError
from .filemodes import write_atomically

STAMP = ".seesr-verified.json"
STAMP_FORMAT = "seesr-verified"
STAMP_VERSION = 1
RACY_NS = 1_000_000_000  # coarser than any common file system's timestamp granularity but FAT's
VERIFY_MODES = ("auto", "always", "never")

log = logging.getLogger(__name__)


class PinnedFiles(Protocol):
    """What verification needs of a bundle (``manifest.Manifest``; a protocol, so that this module stays
    below the manifest's)."""

    @property
    def root(self) -> Path: ...

    def all_files(self) -> dict[str, str]: ...

    def file(self, rel: str, what: str = ...) -> Path: ...


@dataclass
class Verification:
    """What one check of a bundle did: which files it hashed, which the stamp vouched for."""

    mode: str
    hashed: list[str] = field(default_factory=list)
    trusted: list[str] = field(default_factory=list)
    stamp: Path | None = None  # where the stamp was written this time (None: unchanged or not writable)
    seconds: float = 0.0


def verify_mode(verify: str | bool) -> str:
    """``verify`` as one of VERIFY_MODES (True is "always", False "never")."""
    if verify is True or verify is False:
        return "always" if verify else "never"
    if verify in VERIFY_MODES:
        return verify
    raise OptionError(
        f"verify={verify!r}: expected 'auto' (hash files new or changed since their last check), "
        "'always' (hash every file), 'never' (no check), True or False"
    )


def stamp_locations(root: Path) -> list[Path]:
    """Where a bundle's stamp is written, in order of preference: in the bundle, then the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:32]
    return [Path(root) / STAMP, Path(cache) / "seesr" / "verified" / f"{key}.json"]


def verify_bundle(manifest: PinnedFiles, mode: str = "auto", stamps: list[Path] | None = None) -> Verification:
    """Check every file ``manifest`` pins against its sha256 (``mode`` "auto" trusts the stamp for
    unchanged files); BundleError names the bundle and every missing or altered file.
    ``stamps``: where to read and write the stamp (default ``stamp_locations``)."""
    start = time.perf_counter()
    stamps = stamps or stamp_locations(manifest.root)
    bundle = str(Path(manifest.root).resolve())
    known = _read_stamps(stamps) if mode == "auto" else {}
    report, verified, problems = Verification(mode), {}, []
    for rel, expected in sorted(manifest.all_files().items()):
        path = manifest.file(rel)
        checked_at = time.time_ns()
        try:
            info = os.stat(path)
        except FileNotFoundError:
            problems.append(f"missing {rel}")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"not a regular file: {rel}")
            continue
        record = {"sha256": expected, **_file_version(info)}
        if known.get(rel) == record:
            report.trusted.append(rel)
            verified[rel] = record
            continue
        actual = sha256_file(path)
        report.hashed.append(rel)
        if actual != expected:
            problems.append(f"sha256 mismatch for {rel} (the file's is {actual}, the manifest's {expected})")
        elif max(info.st_mtime_ns, info.st_ctime_ns) < checked_at - RACY_NS:
            verified[rel] = record
    if report.hashed:
        report.stamp = _write_stamp(stamps, bundle, verified)
    report.seconds = time.perf_counter() - start
    log.debug(
        f"{manifest.root}: {len(report.hashed)} files hashed, {len(report.trusted)} vouched for by the "
        f"verification stamp ({report.seconds:.2f} s)"
    )
    if problems:
        raise BundleError(
            f"{manifest.root}: bundle files do not match the manifest (damaged or altered; "
            "rebuild or download the bundle again):\n  " + "\n  ".join(problems)
        )
    return report


def _file_version(info: os.stat_result) -> dict[str, int]:
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns, "inode": info.st_ino}


def _read_stamps(stamps: list[Path]) -> dict[str, Any]:
    """rel -> record from every readable stamp of this bundle (earlier locations win). A stamp that
    cannot be read only means more hashing, so it is ignored rather than reported."""
    known: dict[str, Any] = {}
    for path in reversed(stamps):
        try:
            stamp = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        # The bundle's path is not compared: a bundle renamed into place keeps its files' versions.
        if (
            isinstance(stamp, dict)
            and stamp.get("format") == STAMP_FORMAT
            and stamp.get("version") == STAMP_VERSION
            and isinstance(stamp.get("files"), dict)
        ):
            known.update(stamp["files"])
    return known


def _write_stamp(stamps: list[Path], bundle: str, verified: dict[str, Any]) -> Path | None:
    """Write the stamp atomically at the first location that takes it; None (and a warning) if none does."""
    text = (
        json.dumps(
            {"format": STAMP_FORMAT, "version": STAMP_VERSION, "bundle": bundle, "files": verified},
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    failures = []
    for path in stamps:
        try:
            write_atomically(path, lambda tmp: Path(tmp).write_text(text))
            return path
        except OSError as exc:
            failures.append(f"{exc.filename or path}: {exc.strerror or exc}")
    log.warning(
        f"{bundle}: the verification stamp could not be written ({'; '.join(failures)}); "
        "every load will hash the bundle's files again"
    )
    return None
