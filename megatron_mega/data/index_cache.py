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

import hashlib
import json
import logging
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from filelock import FileLock, Timeout

from megatron_mega.atomic_io import atomic_path, atomic_write_text


logger = logging.getLogger(__name__)


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
        return os.path.join(self.directory, f"{self.name}-{array}.npy")

    # memory maps pickle by value (the whole array): send the file names and map them again instead
    def __getstate__(self) -> dict:
        return {"name": self.name, "arrays": sorted(self.arrays), "built": self.built, "directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.name, self.built, self.directory = state["name"], state["built"], state["directory"]
        self.arrays = {a: np.load(self.path(a), mmap_mode="r", allow_pickle=False) for a in state["arrays"]}


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
        marker = os.path.join(self.directory, f"{name}.json")
        if os.path.exists(marker):
            return self._load(name, description)
        os.makedirs(self.directory, exist_ok=True)
        lock = FileLock(os.path.join(self.directory, f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("waiting for another process to build index %s", name)
            lock.acquire()
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
        with contextlib.ExitStack() as files:  # each temporary renamed into place on success, removed on error
            mapped: dict[str, np.ndarray] = {}

            def allocate(array: str, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
                if array in mapped:
                    raise ValueError(f"index array {array!r} allocated twice")
                tmp = files.enter_context(atomic_path(self._array_path(name, array)))
                shape = tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
                mapped[array] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=shape)
                return mapped[array]

            arrays = build(allocate)
            unreturned = sorted(set(mapped) - set(arrays))
            if unreturned:
                raise ValueError(f"index {name}: arrays allocated but not returned: {unreturned}")
            for array, value in arrays.items():
                if array in mapped and value is mapped[array]:
                    _sync(value)
                else:  # built in memory
                    _save(files.enter_context(atomic_path(self._array_path(name, array))), value)
        # the marker last: a process that finds it finds every array written
        record = {"kind": kind, "description": description, "arrays": sorted(arrays)}
        atomic_write_text(marker, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _array_path(self, name: str, array: str) -> str:
        return os.path.join(self.directory, f"{name}-{array}.npy")

    def _load(self, name: str, description: dict[str, Any]) -> CachedIndices:
        marker = os.path.join(self.directory, f"{name}.json")
        with open(marker, encoding="utf-8") as fh:
            record = json.load(fh)
        if record.get("description") != json.loads(json.dumps(description)):
            raise IndexCacheError(f"{marker}: describes {record.get('description')}, expected {description}")
        arrays = {}
        for array in record["arrays"]:
            path = self._array_path(name, array)
            try:
                arrays[array] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise IndexCacheError(f"{path}: unreadable ({err}); delete {marker} to rebuild") from None
        return CachedIndices(name=name, arrays=arrays, built=False, directory=self.directory)


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
