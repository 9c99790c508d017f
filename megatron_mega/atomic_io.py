"""Atomic file writes: a reader (or a crashed writer) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from typing import Callable, Iterator


# what `atomic_path` names its temporaries: "." + the file's name + "." + mkstemp's 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def temporary_beside(path: str | os.PathLike) -> str:
    """A new empty file beside `path`, named as `remove_stale_temporaries` recognises, for a write renamed over
    `path` once complete (the caller renames or removes it)."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(os.fspath(path))}.", suffix=".tmp", dir=directory)
    try:
        _set_mode(lambda mode: os.fchmod(fd, mode), _usual_mode(0o666))
    finally:
        os.close(fd)
    return tmp


def _set_mode(chmod, mode: int) -> None:
    # best effort: some mounts (CIFS, some FUSE) refuse chmod, and a write must not fail for its mode
    with contextlib.suppress(OSError):
        chmod(mode)


def _usual_mode(mode: int) -> int:
    """`mode` less the umask: what open() and mkdir() give a new file or folder, which an atomic write makes (a
    rewrite does not keep the old file's mode). mkstemp and mkdtemp make 0600 files and 0700 folders, which would
    leave a prepared dataset, a checkpoint or a converted model unreadable to the rest of a team."""
    return mode & ~_umask()


def _umask() -> int:
    # Linux reports it (4.7+); setting and restoring it instead would leave a moment in which another thread's new
    # files get umask 0
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on error removed."""
    tmp = temporary_beside(path)
    path = os.fspath(path)
    try:
        yield tmp
        if stat.S_ISREG(os.lstat(tmp).st_mode):  # a writer may have made it anew (safetensors' save_file: 0600)
            _set_mode(lambda mode: os.chmod(tmp, mode), _usual_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)` and move the result into place only if it returns."""
    with atomic_path(path) as tmp:
        writer(tmp)


def remove_stale_temporaries(directory: str | os.PathLike, of: str = "") -> list[str]:
    """Delete the temporaries `atomic_path` left in `directory` when its process was killed before it could remove
    them (SIGKILL runs no cleanup); the names removed. Only for files no other process is writing: a folder, as
    when a run resumes where a killed one stopped, or with `of`, those of the files whose names start with it."""
    removed = [name for name in os.listdir(directory) if _TEMPORARY.match(name) and name.startswith(f".{of}")]
    for name in removed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    return removed


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """`path` is `folder` or lies inside it (symbolic links resolved): replacing `folder` would delete it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside `path` to fill (".NAME.xxxxxxxx.partial"); on success it replaces `path` (an
    existing one is removed first), on error it is removed. A reader sees the old folder or the new one, never a
    half-written one."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        _set_mode(lambda mode: os.chmod(tmp, mode), _usual_mode(0o777))
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_partial_directories(path: str | os.PathLike) -> list[str]:
    """Delete the temporary folders `atomic_directory(path)` left when its process was killed (SIGKILL runs no
    cleanup); the paths removed. Only while no other process is writing `path`."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        return []
    pattern = re.compile(rf"^\.{re.escape(os.path.basename(path))}\.[a-z0-9_]{{8}}\.partial$")
    removed = [os.path.join(parent, name) for name in sorted(os.listdir(parent)) if pattern.match(name)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
