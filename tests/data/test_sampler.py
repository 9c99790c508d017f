"""Per-rank sample ids from a global order, and exact resume under another data-parallel size."""

import pytest
import torch

from megatron_mega.data.documents import DocumentSource
from megatron_mega.data.gpt_dataset import GPTDataset
from megatron_mega.data.index_cache import IndexCache
from megatron_mega.data.loader import make_loader
from megatron_mega.data.sampler import PretrainingSampler, SamplerError
from tests.data.fixtures import make_manifest, random_documents


def rank_batches(total, micro, dp, consumed=0):
    return [list(PretrainingSampler(total, micro, rank, dp, consumed)) for rank in range(dp)]


@pytest.mark.parametrize("micro, dp", [(2, 2), (1, 4), (4, 1), (1, 3)])
def test_ranks_cut_one_global_sequence(micro, dp):
    total = 100
    per_rank = rank_batches(total, micro, dp)
    steps = len(per_rank[0])
    assert all(len(b) == steps for b in per_rank) and steps == total // (micro * dp)
    merged = [i for step in range(steps) for rank in range(dp) for i in per_rank[rank][step]]
    assert merged == list(range(steps * micro * dp))  # the same global order as dp=1, cut between ranks


def test_resume_continues_the_global_order_under_any_layout():
    for consumed in (0, 6, 12, 37):
        for micro, dp in ((4, 1), (2, 2), (1, 4), (3, 2)):
            first_step = [i for rank in rank_batches(100, micro, dp, consumed) for i in rank[0]]
            assert first_step == list(range(consumed, consumed + micro * dp))


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    source = DocumentSource(make_manifest(root / "ds", random_documents(120, seed=5)))
    return GPTDataset(source, range(0, 120), 16, 200, seed=9, cache=IndexCache(str(root / "cache")))


def test_batches_after_resume_with_another_data_parallel_size_are_equal(train):
    loader, sampler = make_loader(train, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1)
    batches = iter(loader)
    for _ in range(3):  # three optimizer steps of 2 micro-batches x 4 samples
        next(batches), next(batches)
        sampler.advance(8)
    state = sampler.state_dict()
    assert state == {"consumed_samples": 24, "data_parallel_size": 1, "micro_batch_size": 4,
                     "total_samples": len(train)}
    expected = [next(batches)["tokens"] for _ in range(3)]
    resumed = [make_loader(train, 2, rank, 2, state=state) for rank in range(2)]
    assert all(s.resumed_from_data_parallel_size == 1 and s.consumed_samples == 24 for _, s in resumed)
    iterators = [iter(loader) for loader, _ in resumed]
    for want in expected:
        got = torch.cat([next(it)["tokens"] for it in iterators])
        assert got.dtype == torch.int64 and got.shape == (4, 17) and torch.equal(got, want)
    # and back to dp=1 from a dp=2 state
    _, sampler2 = resumed[1]
    sampler2.advance(12)
    back, _ = make_loader(train, 4, 0, 1, state=sampler2.state_dict())
    assert torch.equal(next(iter(back))["tokens"], torch.stack([torch.from_numpy(train[i]["tokens"])
                                                                 for i in range(36, 40)]))


def test_sampler_errors_name_the_argument():
    with pytest.raises(SamplerError, match="^data_parallel_rank: 2 is not below"):
        PretrainingSampler(10, 1, 2, 2)
    with pytest.raises(SamplerError, match="^micro_batch_size: "):
        PretrainingSampler(10, 0, 0, 1)
    with pytest.raises(SamplerError, match="^consumed_samples: 10 leaves nothing"):
        PretrainingSampler(10, 1, 0, 1, consumed_samples=10)
    sampler = PretrainingSampler(10, 1, 0, 1)
    with pytest.raises(SamplerError, match="missing"):
        sampler.load_state_dict({"consumed_samples": 3})
    assert len(PretrainingSampler(10, 3, 0, 1, consumed_samples=2)) == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_making_an_iterator_leaves_the_global_rng_alone(train, workers):
    """A resumed run restores torch's RNG and then makes its loader iterator; if that drew from the global RNG,
    its dropout masks would differ from the uninterrupted run's (whose iterator drew before step 1)."""
    loader, _ = make_loader(train, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1,
                            num_workers=workers)
    before = torch.random.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.random.get_rng_state(), before)
