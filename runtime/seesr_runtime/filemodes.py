"""Files we write: replaced atomically, with the permissions the user's umask gives any new file.

Atomic writes go through ``tempfile``, which creates files 0600 and directories 0700 (private while
unfinished). Renamed into place as they are, a result would stay unreadable to a web server or another
user; ``give_umask_mode`` gives the finished file the mode ``open``/``mkdir`` would have given it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it; elsewhere set back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool) -> int:
    """0666 (files) or 0777 (directories) less the umask: what a plain ``open``/``mkdir`` creates."""
    return (0o777 if directory else 0o666) & ~current_umask()


def give_umask_mode(path: str | os.PathLike[str]) -> None:
    """chmod ``path`` (a file, or a directory itself, not its contents) to the umask's mode."""
    os.chmod(path, umask_mode(os.path.isdir(path)))


def give_tree_umask_modes(root: str | os.PathLike[str], files: bool = True) -> None:
    """``give_umask_mode`` for ``root`` and everything under it (``files`` False: directories only;
    symbolic links left alone). Only modes that differ are changed: a chmod moves the file's ctime,
    which verification stamps record."""
    file_mode, directories = umask_mode(False), umask_mode(True)
    for folder, subfolders, names in os.walk(os.fspath(root)):
        entries = [(n, directories) for n in subfolders] + ([(n, file_mode) for n in names] if files else [])
        for name, mode in entries:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and (os.stat(path).st_mode & 0o7777) != mode:
                os.chmod(path, mode)
    if (os.stat(root).st_mode & 0o7777) != directories:
        os.chmod(root, directories)


def write_atomically(path: Path, write: Callable[..., object]) -> None:
    """``write(tmp_path)`` (a str; typed loosely, as callers bind their values as default arguments) then
    rename onto ``path``: readers never see a partial file, and the file gets
    the mode the umask gives a new file (not the temporary file's 0600). The hidden temporary file
    carries our process id, so that ``remove_stale_temporaries`` can tell a killed writer's leftovers
    from a live one's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        give_umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_png(path: Path, image: Any) -> None:
    """``image`` (a PIL image) as a PNG at ``path``, atomically: the one writer of result files, so
    ``seesr upscale`` and ``seesr ui`` give the same bytes for the same image."""
    write_atomically(path, partial(image.save, format="PNG"))


def remove_stale_temporaries(folder: Path, suffix: str) -> None:
    """Remove the temporary files ``write_atomically`` left for ``*{suffix}`` outputs in ``folder`` when
    its process was killed (SIGKILL, power loss); those of live processes stay."""
    for tmp in folder.glob(f".*{suffix}.*.tmp") if folder.is_dir() else ():
        pid = tmp.name.rsplit(".", 3)[1] if tmp.name.count(".") >= 4 else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
