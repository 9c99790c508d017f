"""On-disk cache of index arrays (.npy), keyed by a hash of everything they depend on, as Megatron-LM does.

    <cache_dir>/<kind>-<hash>-<array>.npy      one file per array, each written atomically
    <cache_dir>/<kind>-<hash>.json             the description hashed; written last, so it marks a complete entry
    <cache_dir>/<kind>-<hash>.lock             a file lock: one process builds, the others wait and then load

The description never contains the data-parallel layout, so every rank of every layout shares one entry. No process
group is needed: ranks on one file system serialise on the lock, ranks on separate disks build identical entries.

A builder writes its arrays straight into their files, through the `allocate` it is given (memory-mapped .npy files
under temporary names, renamed into place once the build returns): an index of billions of samples is never held
twice in memory, once built and once being saved, and its pages are file-backed, which the kernel can write out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from filelock import FileLock, Timeout

from megatron_mega.atomic_io import atomic_write_text, remove_stale_temporaries, temporary_beside

logger = logging.getLogger(__name__)


LOCK_POLL_S = 1.0


class Allocate(Protocol):
    """`allocate(array, shape, dtype)`: an uninitialised array the builder fills and returns under that name."""

    def __call__(self, array: str, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray: ...


def in_memory(array: str, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """The `Allocate` for a build outside any cache (tests, benchmarks)."""
    return np.empty(shape, dtype=dtype)


class IndexCacheError(RuntimeError):
    """A cache entry that is incomplete or does not describe what its name promises."""


@dataclass
class CachedIndices:
    name: str                      # <kind>-<hash>
    arrays: dict[str, np.ndarray]  # read-only memory maps
    built: bool                    # True when this call built the entry, False when it loaded it
    directory: str

    def path(self, array: str) -> str:
        return _array_file(self.directory, self.name, array)

    # memory maps pickle by value (the whole array): send the file names and map them again instead
    def __getstate__(self) -> dict:
        return {"name": self.name, "arrays": sorted(self.arrays), "built": self.built, "directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.name, self.built, self.directory = state["name"], state["built"], state["directory"]
        marker = _marker_file(self.directory, self.name)
        self.arrays = {a: open_array(self.path(a), marker) for a in state["arrays"]}


def _array_file(directory: str, name: str, array: str) -> str:
    return os.path.join(directory, f"{name}-{array}.npy")


def _marker_file(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.json")


SMALL_ARRAY_BYTES = 1 << 16


def open_array(path: str, marker: str) -> np.ndarray:
    """A cached array, memory-mapped read-only; read whole when small (a map holds a file descriptor, and a blend
    of a hundred corpora holds ~900 maps already)."""
    try:
        if os.path.getsize(path) <= SMALL_ARRAY_BYTES:
            array = np.load(path, allow_pickle=False)
            array.flags.writeable = False
            return array
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise IndexCacheError(f"{path}: cannot be opened, too many files are open ({err.strerror}); raise the "
                                  f"limit (ulimit -n)") from None
        raise IndexCacheError(f"{path}: unreadable ({err}); delete {marker} to rebuild") from None
    except ValueError as err:
        raise IndexCacheError(f"{path}: unreadable ({err}); delete {marker} to rebuild") from None


def description_hash(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


class IndexCache:
    def __init__(self, directory: str):
        self.directory = directory

    def entry_name(self, kind: str, description: dict[str, Any]) -> str:
        return f"{kind}-{description_hash({'kind': kind, **description})}"

    def load_or_build(self, kind: str, description: dict[str, Any],
                      build: Callable[[Allocate], dict[str, np.ndarray]]) -> CachedIndices:
        """Load the entry for `description`, building it with `build(allocate)` under the lock when it is missing.
        `build` returns its arrays by name; those it got from `allocate` are already in their files."""
        name = self.entry_name(kind, description)
        marker = _marker_file(self.directory, name)
        if os.path.exists(marker):
            return self._load(name, description)
        os.makedirs(self.directory, exist_ok=True)
        lock = FileLock(os.path.join(self.directory, f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process to build index %s", name)
            # filelock's default retries every 50 ms: 500 waiting ranks would be ~10,000 lock attempts a second on
            # the shared file system's metadata server, for the minutes a large build takes
            lock.acquire(poll_interval=LOCK_POLL_S)
        try:
            # built by another process while this one waited: loaded after the lock is released, so that the
            # processes that waited do not load one after another
            built_elsewhere = os.path.exists(marker)
            if not built_elsewhere:
                self._build(name, kind, description, build, marker)
        finally:
            lock.release()
        loaded = self._load(name, description)
        loaded.built = not built_elsewhere
        return loaded

    def _build(self, name: str, kind: str, description: dict[str, Any],
               build: Callable[[Allocate], dict[str, np.ndarray]], marker: str) -> None:
        logger.info("building index %s in %s", name, self.directory)
        # an earlier build's, killed before it could remove them (SIGKILL, a job's time limit, SIGBUS): only the
        # holder of the entry's lock writes these names
        remove_stale_temporaries(self.directory, of=f"{name}-")
        temporaries: dict[str, str] = {}  # array -> its file until the rename
        mapped: dict[str, np.ndarray] = {}

        def allocate(array: str, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
            if array in temporaries:
                raise ValueError(f"index array {array!r} allocated twice")
            shape = tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
            tmp = temporaries[array] = temporary_beside(_array_file(self.directory, name, array))
            try:
                mapped[array] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
                _reserve(tmp)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise IndexCacheError(f"{self.directory}: no room for index {name}'s {array} "
                                          f"({os.path.getsize(tmp):,} bytes): {err.strerror}; free space there or "
                                          f"set data.cache_dir") from None
                # a file system without shared writable memory maps (some FUSE mounts): built in memory, saved
                logger.warning("%s: cannot memory-map %s (%s); building it in memory", self.directory, tmp, err)
                mapped.pop(array, None)
                os.unlink(temporaries.pop(array))
                return np.empty(shape, dtype=dtype)
            return mapped[array]

        try:
            arrays = build(allocate)
            unreturned = sorted(set(mapped) - set(arrays))
            if unreturned:
                raise ValueError(f"index {name}: arrays allocated but not returned: {unreturned}")
            for array, value in arrays.items():
                if array in mapped:
                    if value is not mapped[array]:
                        raise ValueError(f"index {name}: {array!r} is not the array allocated under that name")
                    _sync(value)
                else:  # built in memory
                    temporaries[array] = temporary_beside(_array_file(self.directory, name, array))
                    _save(temporaries[array], value)
            for array, tmp in temporaries.items():
                os.replace(tmp, _array_file(self.directory, name, array))
        except BaseException:
            for tmp in temporaries.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        # the marker last: a process that finds it finds every array written
        record = {"kind": kind, "description": description, "arrays": sorted(arrays)}
        atomic_write_text(marker, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _load(self, name: str, description: dict[str, Any]) -> CachedIndices:
        marker = _marker_file(self.directory, name)
        with open(marker, encoding="utf-8") as fh:
            record = json.load(fh)
        if record.get("description") != json.loads(json.dumps(description)):
            raise IndexCacheError(f"{marker}: describes {record.get('description')}, expected {description}")
        arrays = {array: open_array(_array_file(self.directory, name, array), marker) for array in record["arrays"]}
        return CachedIndices(name=name, arrays=arrays, built=False, directory=self.directory)


def _reserve(path: str) -> None:
    """Allocate the blocks of a new memory-mapped file now: on a full disk, writing into a sparse file's pages kills
    the process with SIGBUS, where this raises ENOSPC."""
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not supported here: the pages are written as is
                raise


def _sync(array: np.ndarray) -> None:
    """A memory-mapped array's pages on disk before its file is renamed into place."""
    array.flush()  # type: ignore[attr-defined]
    with open(array.filename, "rb") as fh:  # type: ignore[attr-defined]
        os.fsync(fh.fileno())


def _save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save(path) would append .npy to the temporary name
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
