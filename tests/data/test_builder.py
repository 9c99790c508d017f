"""Opening datasets for training: the tokenizer check, checksums, and clear refusals."""

import os
from pathlib import Path

import numpy as np
import pytest

from megatron_mega.data import manifest as manifest_module
from megatron_mega.data.builder import build_datasets, checksum_problems
from megatron_mega.data.config import DataConfig, DataConfigError
from megatron_mega.data.indexed_dataset import IndexedDatasetError
from megatron_mega.data.manifest import ManifestError
from tests.data.fixtures import EOS, TOKENIZER_SHA, labelled_documents, make_manifest, random_documents


def config_for(tmp_path, paths, **changes):
    return DataConfig(**{"paths": paths, "seq_len": 8, "split": "9,1,0", "cache_dir": str(tmp_path / "cache"),
                         **changes})


def test_a_manifest_for_another_tokenizer_is_refused(tmp_path):
    root = make_manifest(tmp_path / "ds", random_documents(20))
    with pytest.raises(ManifestError, match=r"prepared with tokenizer sha256 abababababab…, but the tokenizer "
                                            r"given to training has sha256 cdcdcdcdcdcd…"):
        build_datasets(config_for(tmp_path, [root]), {"train": 10}, tokenizer_sha256="cd" * 32)
    assert not os.path.exists(tmp_path / "cache")  # refused before anything was built
    splits = build_datasets(config_for(tmp_path, [root]), {"train": 10}, tokenizer_sha256=TOKENIZER_SHA)
    assert splits.tokenizer.sha256 == TOKENIZER_SHA and splits.test is None


def test_a_blend_of_two_tokenizers_is_refused(tmp_path):
    a = make_manifest(tmp_path / "a", random_documents(20))
    b = make_manifest(tmp_path / "b", random_documents(20), tokenizer_sha="ef" * 32)
    with pytest.raises(ManifestError, match="a blend needs one tokenizer"):
        build_datasets(config_for(tmp_path, [a, b]), {"train": 10}, tokenizer_sha256=None)


def test_checksums_are_verified_when_asked(tmp_path):
    root = make_manifest(tmp_path / "ds", random_documents(20), shards=2)
    path = os.path.join(root, "shard-00001.bin")
    data = bytearray(open(path, "rb").read())
    data[0] ^= 1
    open(path, "wb").write(bytes(data))
    build_datasets(config_for(tmp_path, [root]), {"train": 10}, tokenizer_sha256=TOKENIZER_SHA)  # counts still match
    with pytest.raises(ManifestError, match=r"shard-00001.bin: sha256 .* != manifest"):
        build_datasets(config_for(tmp_path, [root], verify_checksums=True), {"train": 10},
                       tokenizer_sha256=TOKENIZER_SHA)


def test_checksums_are_dealt_over_the_processes(tmp_path, monkeypatch):
    """Each shard file of all the paths is hashed by exactly one of the job's processes, and the corrupted one is
    reported (naming the file) by the process it was dealt to."""
    a = make_manifest(tmp_path / "a", random_documents(20), shards=3)
    b = make_manifest(tmp_path / "b", random_documents(20), shards=2)
    bad = os.path.join(b, "shard-00001.bin")
    data = bytearray(open(bad, "rb").read())
    data[-1] ^= 1
    open(bad, "wb").write(bytes(data))
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    config = config_for(tmp_path, [a, b])
    problems = {rank: checksum_problems(config, rank, 3) for rank in range(3)}
    every = [os.path.join(root, f"shard-{i:05d}.{kind}") for root, n in ((a, 3), (b, 2)) for i in range(n)
             for kind in ("bin", "idx")]
    assert sorted(hashed) == sorted(set(every) - {bad[:-4] + ".idx"})  # once each; a bad .bin ends its shard
    # five shards dealt over three ranks: a's 0,1,2 then b's 0,1 -> b's shard 1 is the fifth, rank 1's
    assert problems[0] == problems[2] == [] and len(problems[1]) == 1
    assert problems[1][0].startswith(f"{bad}: sha256 ") and "!= manifest" in problems[1][0]
    assert checksum_problems(config) == problems[1]  # one process hashes everything


def test_mlm_needs_a_mask_token(tmp_path):
    root = make_manifest(tmp_path / "ds", random_documents(20), mask_id=None)
    with pytest.raises(DataConfigError, match=r"^objective: 'mlm' needs a mask token"):
        build_datasets(config_for(tmp_path, [root], objective="mlm"), {"train": 10}, tokenizer_sha256=TOKENIZER_SHA)


def test_missing_data_and_bad_requests_are_named(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        build_datasets(config_for(tmp_path, [str(tmp_path / "nowhere") + "/"]), {"train": 1}, tokenizer_sha256=None)
    with pytest.raises(IndexedDatasetError, match=r"neither a manifest .* nor a Megatron prefix"):
        build_datasets(config_for(tmp_path, [str(tmp_path / "prefix")]), {"train": 1}, tokenizer_sha256=None)
    root = make_manifest(tmp_path / "ds", random_documents(20))
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['validation'\]"):
        build_datasets(config_for(tmp_path, [root]), {"validation": 1}, tokenizer_sha256=None)


def test_splits_are_disjoint_by_documents(tmp_path):
    docs = labelled_documents(60, seed=2)
    root = make_manifest(tmp_path / "ds", docs, shards=2)
    config = DataConfig(paths=[root], seq_len=8, split="70,20,10", seed=5, cache_dir=str(tmp_path / "cache"))
    splits = build_datasets(config, {"train": 300, "valid": 100, "test": 60}, tokenizer_sha256=TOKENIZER_SHA)
    seen = {}
    for name in ("train", "valid", "test"):
        ds = splits[name]
        tokens = np.concatenate([ds[i]["tokens"] for i in range(len(ds))])
        seen[name] = set((tokens[tokens != EOS] - 100).tolist())
    assert seen["train"] == set(range(0, 42)) and seen["valid"] == set(range(42, 54))
    assert seen["test"] == set(range(54, 60))


@pytest.mark.parametrize("change, message", [
    (lambda m: [m], r"not a megatron_mega dataset manifest \(a JSON list, not an object\)"),
    (lambda m: {**m, "format": "other"}, r"not a megatron_mega dataset manifest \(format 'other'\)"),
    (lambda m: {**m, "dtype": "uint161"}, r"dtype 'uint161' has no Megatron code"),
    (lambda m: {**m, "dtype": "uint32"}, r"dtype 'uint32' has no Megatron code"),
    (lambda m: {**m, "tokenizer": None}, r"malformed manifest"),
    (lambda m: {**m, "shards": ["shard-00000"]}, r"malformed manifest"),
])
def test_a_malformed_manifest_is_one_error_naming_it(tmp_path, change, message):
    """Each used to be a TypeError or AttributeError traceback from `prepare inspect` or training."""
    import json

    root = make_manifest(tmp_path / "ds", random_documents(5))
    path = os.path.join(root, "manifest.json")
    with open(path) as fh:
        data = json.load(fh)
    with open(path, "w") as fh:
        json.dump(change(data), fh)
    with pytest.raises(ManifestError, match=f"^{path}: {message}"):
        build_datasets(config_for(tmp_path, [root]), {"train": 1}, tokenizer_sha256=None)


def test_a_bare_prefix_is_hashed_once_for_every_process(tmp_path, monkeypatch):
    """A bare prefix's identity (what keys its indices) hashes the whole .idx: one process records it in the index
    cache, under the files' location, sizes and times; the others and later runs read it. The identity itself is
    unchanged, so caches built before stay valid; a rewritten .idx is hashed again."""
    from megatron_mega.data import documents
    from megatron_mega.data.builder import open_sources
    from megatron_mega.data.indexed_dataset import IndexedDatasetWriter

    prefix = str(tmp_path / "megatron")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in random_documents(30, seed=2):
            writer.add_sequence(doc)
            writer.end_document()
    hashed = []
    real_sha256_file = documents.sha256_file
    monkeypatch.setattr(documents, "sha256_file", lambda path, *a: hashed.append(path) or real_sha256_file(path, *a))
    config = config_for(tmp_path, [prefix])
    first = build_datasets(config, {"train": 10}, tokenizer_sha256=None)
    again = build_datasets(config, {"train": 10}, tokenizer_sha256=None)
    assert hashed == [prefix + ".idx"] and not again.train.built
    assert again.train.source.identity == first.train.source.identity == documents.prefix_content_identity(prefix)
    os.utime(prefix + ".idx", ns=(1, 1))
    build_datasets(config, {"train": 10}, tokenizer_sha256=None)
    assert len(hashed) == 3  # once for the record, once by prefix_content_identity above
    # rewritten with the same size and its times put back (cp -p, tar x): the change time still tells
    idx = Path(prefix + ".idx")
    status = os.stat(idx)
    raw = bytearray(idx.read_bytes())
    lengths = np.frombuffer(raw, dtype=np.int32, count=2, offset=34).copy()  # header 34 bytes, int32 lengths
    raw[34:42] = np.array([lengths[0] - 1, lengths[1] + 1], dtype=np.int32).tobytes()
    count = len(random_documents(30, seed=2))
    pointer = 34 + 4 * count + 8  # the second sequence's int64 byte offset
    raw[pointer:pointer + 8] = (np.frombuffer(raw, dtype=np.int64, count=1, offset=pointer) - 2).tobytes()
    idx.write_bytes(bytes(raw))
    os.utime(idx, ns=(status.st_atime_ns, status.st_mtime_ns))
    rewritten = build_datasets(config, {"train": 10}, tokenizer_sha256=None)
    assert len(hashed) == 4 and rewritten.train.source.identity == documents.prefix_content_identity(prefix)
    assert rewritten.train.source.identity != first.train.source.identity
    hashed.clear()
    # opened without building (train --dry-run): the identity is never asked for, nothing is hashed
    sources, _ = open_sources(config_for(tmp_path, [prefix], cache_dir=str(tmp_path / "other")), None)
    assert hashed == [] and not os.path.exists(tmp_path / "other")
    # a cache folder that cannot be written (indices built elsewhere): the identity is hashed in the process
    from megatron_mega.data.index_cache import IndexCache

    assert documents.prefix_identity(prefix, IndexCache("/dev/null/cache")) == rewritten.train.source.identity


def test_shards_are_checked_in_constant_time_on_open_and_summed_where_indices_are_built(tmp_path):
    """Every process opens every shard: the manifest's counts are checked against the index's header and where its
    last sequence ends; the index's lengths are summed only by the process that builds the sample indices (and by
    `Manifest.verify`, which data_prep runs after writing)."""
    from megatron_mega.data.documents import DocumentSource
    from megatron_mega.data.manifest import Manifest

    root = make_manifest(tmp_path / "ds", [np.arange(1, 4)] * 3 + [np.arange(1, 3)] * 3, shards=2)
    # shard 0's second length 3 -> 2: its sequences still lie inside the .bin, and the .bin's size is unchanged
    idx = tmp_path / "ds" / "shard-00000.idx"
    raw = bytearray(idx.read_bytes())
    raw[34 + 4:34 + 8] = np.array([2], dtype=np.int32).tobytes()  # header 34 bytes, then int32 lengths
    idx.write_bytes(bytes(raw))
    source = DocumentSource(root)
    assert source.num_documents == 6
    with pytest.raises(ManifestError, match="shard shard-00000: its index's lengths add up to 8 tokens, the "
                                            "manifest says 9"):
        build_datasets(config_for(tmp_path, [root], split="1"), {"train": 4}, tokenizer_sha256=None)
    with pytest.raises(ManifestError, match="its index's lengths add up to 8 tokens"):
        Manifest.load(root).verify(checksums=False)
    # a .bin that goes on past its last sequence (padded by some tool) still opens, as before
    with open(tmp_path / "ds" / "shard-00001.bin", "ab") as fh:
        fh.write(b"\0\0")
    assert DocumentSource(root).num_documents == 6
    # an index whose last sequence ends elsewhere than the manifest's count: refused on open
    (tmp_path / "ds" / "manifest.json").write_text((tmp_path / "ds" / "manifest.json").read_text().replace(
        '"tokens": 6', '"tokens": 7'))
    with pytest.raises(ManifestError, match="shard shard-00001: holds 3 documents / 6 tokens, the manifest says 3 / 7"):
        DocumentSource(root)
