"""Index caches: keyed by what they depend on, reused, and built by one process while the others wait."""

import hashlib
import multiprocessing
import os

import numpy as np
import pytest
from filelock import FileLock

from megatron_mega.data.builder import build_datasets
from megatron_mega.data.config import DataConfig
from megatron_mega.data.documents import DocumentSource
from megatron_mega.data.gpt_dataset import GPTDataset, gpt_index_description
from megatron_mega.data.index_cache import IndexCache
from tests.data.fixtures import TOKENIZER_SHA, make_manifest, random_documents


def entry_files(directory):
    return sorted(f for f in os.listdir(directory) if not f.endswith(".lock"))


def test_second_build_loads_the_cache(tmp_path):
    roots = [make_manifest(tmp_path / "a", random_documents(50, seed=0)),
             make_manifest(tmp_path / "b", random_documents(50, seed=1))]
    config = DataConfig(paths=roots, weights=[2, 1], seq_len=16, split="90,10", cache_dir=str(tmp_path / "cache"))
    first = build_datasets(config, {"train": 100, "valid": 10}, tokenizer_sha256=TOKENIZER_SHA)
    files = entry_files(tmp_path / "cache")
    # per split: one blend entry + one entry per component (a .json and its .npy arrays)
    assert sum(f.endswith(".json") for f in files) == 6 and not any(".tmp" in f for f in files)
    assert first.train.built and all(c.built for c in first.train.datasets)
    mtimes = {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files}
    again = build_datasets(config, {"train": 100, "valid": 10}, tokenizer_sha256=TOKENIZER_SHA)
    assert not again.train.built and not any(c.built for c in again.train.datasets) and not again.valid.built
    assert entry_files(tmp_path / "cache") == files
    assert {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in files} == mtimes
    assert all(np.array_equal(first.train[i]["tokens"], again.train[i]["tokens"]) for i in range(100))


@pytest.mark.parametrize("change", [dict(seq_len=8), dict(seed=2), dict(split="80,20"), dict(weights=[1, 1]),
                                    dict(num_samples=101), dict(data=True)])
def test_every_dependency_changes_the_key(tmp_path, change):
    docs = [random_documents(50, seed=0), random_documents(50, seed=1)]
    roots = [make_manifest(tmp_path / "a", docs[0]), make_manifest(tmp_path / "b", docs[1])]
    base = dict(paths=roots, weights=[2, 1], seq_len=16, split="90,10", seed=1, cache_dir=str(tmp_path / "cache"))
    build_datasets(DataConfig(**base), {"train": 100}, tokenizer_sha256=TOKENIZER_SHA)
    num_samples = change.pop("num_samples", 100)
    if change.pop("data", False):
        docs[1][3][0] += 1  # one token of one document: new checksums
        make_manifest(tmp_path / "b", docs[1])
    again = build_datasets(DataConfig(**{**base, **change}), {"train": num_samples}, tokenizer_sha256=TOKENIZER_SHA)
    assert again.train.built or any(c.built for c in again.train.datasets)


def _build_in_child(manifest, cache_dir, ready):
    source = DocumentSource(manifest)
    ready.put(os.getpid())
    ds = GPTDataset(source, range(0, source.num_documents), 8, 5000, seed=3, cache=IndexCache(cache_dir))
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in ds.indices.arrays.values()))
    return ds.built, digest.hexdigest()


def _child(manifest, cache_dir, ready, results):
    results.put(_build_in_child(manifest, cache_dir, ready))


def test_concurrent_builders_make_one_cache(tmp_path):
    """Two processes start while the entry's lock is held: one builds, the other waits and loads the same files."""
    manifest = make_manifest(tmp_path / "ds", random_documents(400, seed=3))
    cache_dir = str(tmp_path / "cache")
    description = gpt_index_description(DocumentSource(manifest), range(0, 400), 8, 5000, 3)
    name = IndexCache(cache_dir).entry_name("gpt", description)
    os.makedirs(cache_dir)
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    with FileLock(os.path.join(cache_dir, f"{name}.lock")):
        children = [context.Process(target=_child, args=(manifest, cache_dir, ready, results)) for _ in range(2)]
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=60)
        assert entry_files(cache_dir) == []  # both are blocked on the lock
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(built for built, _ in outcomes) == [False, True]
    assert outcomes[0][1] == outcomes[1][1]
    assert entry_files(cache_dir) == sorted(f"{name}{suffix}" for suffix in (
        ".json", "-document_index.npy", "-sample_index.npy", "-shuffle_index.npy"))
    loaded, digest = _build_in_child(manifest, cache_dir, multiprocessing.Queue())
    assert not loaded and digest == outcomes[0][1]


def test_arrays_are_built_in_their_files_and_a_failed_build_leaves_nothing(tmp_path):
    cache = IndexCache(str(tmp_path / "cache"))
    seen = {}

    def build(allocate):
        seen["a"] = allocate("a", 5, np.int32)
        seen["a"][:] = np.arange(5)
        seen["b"] = allocate("b", (2, 3), np.int64)
        seen["b"][:] = 7
        return {"a": seen["a"], "b": seen["b"], "c": np.ones(3)}  # c built in memory

    entry = cache.load_or_build("test", {"n": 1}, build)
    assert isinstance(seen["a"], np.memmap)  # written in place, not copied into a file afterwards
    assert entry.built and entry.arrays["a"].tolist() == [0, 1, 2, 3, 4] and entry.arrays["b"].shape == (2, 3)
    assert entry.arrays["c"].tolist() == [1, 1, 1]
    suffixes = (".json", "-a.npy", "-b.npy", "-c.npy")
    assert entry_files(tmp_path / "cache") == sorted(f"{entry.name}{suffix}" for suffix in suffixes)

    def failing(allocate):
        allocate("a", 1000, np.int64)[:] = 1
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        cache.load_or_build("test", {"n": 2}, failing)
    assert len(entry_files(tmp_path / "cache")) == 4  # no temporary, no marker of the failed entry

    def returns_a_view(allocate):
        array = allocate("x", 10, np.int8)
        array[:] = 7
        return {"x": array[:5]}

    with pytest.raises(ValueError, match="'x' is not the array allocated under that name"):
        cache.load_or_build("test", {"n": 4}, returns_a_view)
    with pytest.raises(ValueError, match=r"allocated but not returned: \['b'\]"):
        cache.load_or_build("test", {"n": 3},
                            lambda allocate: {"a": allocate("a", 1, np.int8), "x": allocate("b", 1, np.int8)})
    assert len(entry_files(tmp_path / "cache")) == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs root and mount, as CI has; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_an_error_naming_the_cache_not_a_bus_error(small_disk):
    """Pages of a sparse memory-mapped file written on a full disk raise SIGBUS and kill the process, leaving the
    temporaries; the blocks are reserved first, so the build fails with an error and leaves only its lock."""
    from megatron_mega.data.gpt_dataset import build_gpt_indices
    from megatron_mega.data.index_cache import IndexCacheError

    cache = IndexCache(str(small_disk / "cache"))
    lengths = np.full(1000, 100, dtype=np.int32)
    with pytest.raises(IndexCacheError, match=r"cache: no room for index gpt-\w+'s sample_index \(1,680,128 bytes\)"):
        cache.load_or_build("gpt", {"v": 1}, lambda allocate: build_gpt_indices(lengths, 0, 10, 200000, 1, 2, allocate))
    assert os.listdir(small_disk / "cache") == [f"{cache.entry_name('gpt', {'v': 1})}.lock"]


def test_a_killed_build_leaves_temporaries_the_next_build_removes(tmp_path):
    cache = IndexCache(str(tmp_path))
    name = cache.entry_name("test", {"n": 1})
    stale = tmp_path / f".{name}-a.npy.abcd1234.tmp"  # as a SIGKILLed build leaves them
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / ".gpt-0123-a.npy.abcd1234.tmp"  # another entry's: its builder may be running
    other.write_bytes(b"")
    entry = cache.load_or_build("test", {"n": 1}, lambda allocate: {"a": np.arange(3)})
    assert entry.arrays["a"].tolist() == [0, 1, 2] and not stale.exists() and other.exists()
