"""Opening datasets for training: the tokenizer check, checksums, and clear refusals."""

import os

import numpy as np
import pytest

from megatron_mega.data.builder import build_datasets
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
