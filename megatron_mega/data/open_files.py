"""Room for the files a reader keeps open.

Every shard of a dataset keeps two files open while it is read: the memory maps of its .bin and .idx (CPython's
mmap holds a duplicate of the file's descriptor until the map is closed; 3.13's trackfd=False is not available
before it). A blend of large corpora, or a merge of a many-task tokenize array without --reshard, reaches
thousands of shards, past the soft limit of 1024 open files most systems start a process with.
"""

from __future__ import annotations

import os
import resource

FILES_PER_SHARD = 2
# what the process has open besides the shards and the index caches' memory maps: the interpreter, torch, sockets of
# the process group, DataLoader pipes
_HEADROOM = 512


def open_files() -> int:
    """How many files this process has open now (Linux; elsewhere 0, and the headroom covers it)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def make_room(shards: int, what: str) -> None:
    """Raises this process's soft limit on open files, up to the hard limit, so that `shards` more shards fit;
    refuses with the fix when the hard limit is too low. `what`: the dataset, for the message."""
    _make_room(FILES_PER_SHARD * shards, what, f"{shards} shards keep {FILES_PER_SHARD * shards} files open",
               "or merge the data into fewer shards (prepare merge --reshard)")


def make_room_for_maps(maps: int, what: str) -> None:
    """The same for `maps` more memory-mapped index arrays (3 per dataset and split): a blend of a hundred corpora
    keeps ~900 of them open."""
    _make_room(maps, what, f"their index caches keep {maps} memory maps open", "or blend fewer datasets")


def _make_room(files: int, what: str, why: str, other_fix: str) -> None:
    now = open_files()
    needed = now + files + _HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and now + files > hard:  # cannot fit even without the headroom
        from megatron_mega.data.indexed_dataset import IndexedDatasetError

        raise IndexedDatasetError(
            f"{what}: {why}, and this process may open {hard} files at most (ulimit -Hn): raise the limit "
            f"(ulimit -n {needed}, or LimitNOFILE / the cluster's setting), {other_fix}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard))
