"""Blending by weight: every prefix of the blend holds each dataset within one sample of weight * n."""

import numpy as np
import pytest

from megatron_mega.data.blended import build_blending_indices
from megatron_mega.data.builder import build_datasets
from megatron_mega.data.config import DataConfig
from tests.data.fixtures import EOS, TOKENIZER_SHA, index_digest, labelled_documents, make_manifest


def prefix_deviation(dataset_index, weights):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.cumsum(np.eye(len(weights))[dataset_index], axis=0)
    return np.abs(counts - weights * np.arange(1, len(dataset_index) + 1)[:, None]).max()


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [5, 3, 2], [0.5, 0.25, 0.125, 0.0625, 0.0625],
                                     [1e-3, 1, 0.2, 0.05, 0.3, 0.9, 0.01], [2, 0, 1]])
def test_every_prefix_is_within_one_sample(weights):
    indices = build_blending_indices(weights, 4000)
    k = sum(w > 0 for w in weights)
    bound = 1 - 1 / (2 * (k - 1))  # Tijdeman's bound, below 1
    assert prefix_deviation(indices["dataset_index"], weights) <= bound + 1e-9
    for i, w in enumerate(weights):  # each dataset's own samples are taken in order 0, 1, 2, ...
        taken = indices["dataset_sample_index"][indices["dataset_index"] == i]
        assert np.array_equal(taken, np.arange(len(taken)))
        if w == 0:
            assert len(taken) == 0


def test_random_weights_stay_within_one_sample():
    rng = np.random.RandomState(0)
    for _ in range(30):
        weights = rng.random_sample(rng.randint(2, 9)) ** 3
        assert prefix_deviation(build_blending_indices(weights, 1500)["dataset_index"], weights) < 1


def test_blend_is_a_prefix_of_a_longer_blend():
    short, long = build_blending_indices([3, 2, 2], 500), build_blending_indices([3, 2, 2], 2000)
    assert np.array_equal(long["dataset_index"][:500], short["dataset_index"])


def test_blended_dataset_serves_components_in_proportion(tmp_path):
    roots = [make_manifest(tmp_path / f"ds{i}", labelled_documents(40, start=1000 * i, seed=i)) for i in range(3)]
    config = DataConfig(paths=roots, weights=[0.5, 0.3, 0.2], seq_len=8, split="1", seed=4,
                        cache_dir=str(tmp_path / "cache"))
    train = build_datasets(config, {"train": 200}, tokenizer_sha256=TOKENIZER_SHA).train
    assert len(train) == 200
    for n in range(200):
        component = train.datasets[int(train.dataset_index[n])]
        assert np.array_equal(train[n]["tokens"], component[int(train.dataset_sample_index[n])]["tokens"])
        text = train[n]["tokens"][train[n]["tokens"] != EOS]
        assert set(((text - 100) // 1000).tolist()) == {int(train.dataset_index[n])}  # from that dataset only
    assert np.bincount(train.dataset_index).tolist() == [100, 60, 40]


def test_default_weights_follow_token_counts(tmp_path):
    roots = [make_manifest(tmp_path / "a", labelled_documents(30, seed=0)),
             make_manifest(tmp_path / "b", labelled_documents(90, seed=1))]
    config = DataConfig(paths=roots, seq_len=8, split="1", cache_dir=str(tmp_path / "cache"))
    train = build_datasets(config, {"train": 1000}, tokenizer_sha256=TOKENIZER_SHA).train
    tokens = [t.source.document_lengths().sum() for t in train.datasets]
    share = np.bincount(train.dataset_index) / 1000
    assert share == pytest.approx(np.asarray(tokens) / sum(tokens), abs=1e-3)


def test_samples_per_dataset_counts_block_by_block(monkeypatch):
    from megatron_mega.data import blended
    from megatron_mega.data.index_cache import CachedIndices

    arrays = blended.build_blending_indices([0.5, 0.2, 0.3], 1001)
    assert blended.samples_per_dataset(CachedIndices("blend-test", arrays, True, ""), 3) == arrays["counts"].tolist()
    arrays.pop("counts")  # as blends cached before the counts were kept: counted
    indices = CachedIndices("blend-test", arrays, built=True, directory="")
    monkeypatch.setattr(blended, "_COUNT_BLOCK", 64)  # 16 blocks, the last one short
    assert blended.samples_per_dataset(indices, 4) == np.bincount(arrays["dataset_index"], minlength=4).tolist()


def test_blends_of_this_version_never_change():
    """BLEND_VERSION keys the cache, so a blend cached by an earlier release is reused: these digests were taken
    from the pure-Python build that numba's compiled walk replaced."""
    from megatron_mega.data import blended

    def digest(weights, size):
        arrays = build_blending_indices(weights, size)
        assert arrays["counts"].tolist() == np.bincount(arrays["dataset_index"], minlength=len(weights)).tolist()
        return index_digest({name: arrays[name] for name in ("dataset_index", "dataset_sample_index")})

    assert blended.BLEND_VERSION == 1
    assert digest([0.5, 0.2, 0.3, 1e-3], 5000) == "0245ca283710daa2"
    assert digest([3, 0, 2, 2, 1], 3001) == "4a0f3346aa47ed3c"


def test_the_walk_without_numba_gives_the_same_blend(monkeypatch):
    """Where numba is missing the same function runs as Python (a warning says so): the same arrays."""
    import sys

    from megatron_mega.data import blended

    rng = np.random.RandomState(1)
    cases = [list(rng.random_sample(rng.randint(2, 12)) ** 3) for _ in range(5)] + [[1.0], [2, 0, 1]]
    assert blended._compiled_walk() is not blended._tijdeman_walk  # numba is a dependency: compiled here
    compiled = [build_blending_indices(w, 700) for w in cases]
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    blended._compiled_walk.cache_clear()
    try:
        assert blended._compiled_walk() is blended._tijdeman_walk
        for weights, arrays in zip(cases, compiled):
            assert index_digest(build_blending_indices(weights, 700)) == index_digest(arrays)
    finally:
        blended._compiled_walk.cache_clear()


def test_the_walk_compiles_where_numba_cannot_cache_it(tmp_path):
    """A read-only install with a read-only home: numba finds no folder for its cache and refuses cache=True; the
    walk is compiled for the process instead. Here the source's __pycache__ is a file and HOME is under /dev/null,
    which no process can create folders in, root included."""
    import os
    import shutil
    import subprocess
    import sys

    from megatron_mega.data import blended

    shutil.copy(blended.__file__, tmp_path / "blend_copy.py")
    (tmp_path / "__pycache__").write_text("")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "HOME": "/dev/null/home", "XDG_CACHE_HOME": "/dev/null/cache", "PYTHONPATH": root,
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    script = ("import sys, numba; sys.path.insert(0, sys.argv[1]); import blend_copy\n"
              "walk = blend_copy._compiled_walk(); assert isinstance(walk, numba.core.registry.CPUDispatcher)\n"
              "print(blend_copy.build_blending_indices([1, 2], 6)['dataset_index'].tolist())")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(build_blending_indices([1, 2], 6)["dataset_index"].tolist())
