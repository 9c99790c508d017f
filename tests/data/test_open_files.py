"""A dataset of many shards under a low limit on open files (each shard keeps two: its .bin and .idx maps)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
import pytest

from tests.data.fixtures import make_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

READ_ALL = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from megatron_mega.data.documents import DocumentSource
from megatron_mega.data.indexed_dataset import IndexedDatasetError
try:
    source = DocumentSource(sys.argv[1])
except IndexedDatasetError as err:
    print("refused:", err)
    sys.exit(2)
total = sum(int(source.get(d).sum()) for d in range(source.num_documents))
print(source.num_documents, total, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _read_all(folder: str, soft: int, hard: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", READ_ALL.format(soft=soft, hard=hard), folder], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_many_shards_under_a_low_limit(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096 and os.geteuid() != 0:
        pytest.skip(f"the hard limit on open files is {hard}; the test raises it to 4096 (as root)")
    documents = [np.full(3, d % 50 + 1, dtype=np.int64) for d in range(600)]
    folder = make_manifest(tmp_path / "ds", documents, shards=600)
    expected = sum(int(d.sum()) for d in documents)
    # 600 shards keep 1,200 files open: the soft limit of 256 is raised up to the hard one
    done = _read_all(folder, 256, 4096)
    assert done.returncode == 0, done.stderr
    count, total, soft = map(int, done.stdout.split())
    assert (count, total) == (600, expected) and soft == 4096
    # a hard limit too low for them: one message with the fix, before any shard is opened
    done = _read_all(folder, 256, 1024)
    assert done.returncode == 2, done.stderr
    assert "600 shards keep 1200 files open" in done.stdout and "ulimit -n" in done.stdout
    assert "prepare merge --reshard" in done.stdout


BLEND = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
import megatron_mega.data.index_cache
megatron_mega.data.index_cache.SMALL_ARRAY_BYTES = 0  # these tiny indices mapped as a large corpus's are
from megatron_mega.data.builder import build_datasets
from megatron_mega.data.config import DataConfig
from megatron_mega.data.indexed_dataset import IndexedDatasetError
paths = sys.argv[1:]
config = DataConfig(paths=paths, weights=[1.0] * len(paths), seq_len=4, split="8,1,1", cache_dir=paths[0] + "/c")
try:
    splits = build_datasets(config, {{"train": 440, "valid": 220, "test": 220}}, tokenizer_sha256=None)
except IndexedDatasetError as err:
    print("refused:", err)
    sys.exit(2)
print(sum(int(splits.train[i]["tokens"].sum()) >= 0 for i in range(len(splits.train))),
      resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_blend_of_many_corpora_makes_room_for_its_index_maps(tmp_path):
    """110 one-shard corpora, each sampled in every split: 220 shard files, but 3 index memory maps per corpus and
    split, 2 per blend: 996 maps, each holding a descriptor. Under a soft limit of 1024 the blend failed with 'Too
    many open files'."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096 and os.geteuid() != 0:
        pytest.skip(f"the hard limit on open files is {hard}; the test raises it to 4096 (as root)")
    folders = [make_manifest(tmp_path / f"ds{k}", [np.full(5, k % 50 + 1, dtype=np.int64)] * 30) for k in range(110)]

    def blend(soft: int, limit: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLEND.format(soft=soft, hard=limit), *folders], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    done = blend(1024, 4096)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["440", "4096"]
    done = blend(1024, 1024)
    assert done.returncode == 2, done.stderr
    # refused where the maps cannot fit even without headroom: at the third split (~250 files, then 330 maps a split)
    assert "data.paths (test split of 110 datasets): their index caches keep 330 memory maps open" in done.stdout
    assert "ulimit -n" in done.stdout
