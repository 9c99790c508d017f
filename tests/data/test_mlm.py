"""MLM masking: BERT's proportions, special tokens untouched, a draw fixed by (seed, sample) alone."""

import numpy as np
import torch

from megatron_mega.data.builder import build_datasets
from megatron_mega.data.config import DataConfig, MLMConfig
from megatron_mega.data.loader import make_loader
from megatron_mega.data.mlm import IGNORE_INDEX, MLMDataset, SpecialTokens, mask_tokens
from tests.data.fixtures import BOS, EOS, MASK, PAD, TOKENIZER_SHA, UNK, make_manifest

SPECIAL = [BOS, PAD, EOS, MASK]


def documents(count, seed=0, vocab=1000):
    """BOS text EOS, the text sprinkled with PAD, MASK and UNK ids (which must survive or be masked as text)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(count):
        text = rng.randint(5, vocab, size=rng.randint(5, 80))
        text[rng.random_sample(len(text)) < 0.1] = rng.choice([PAD, MASK, UNK])
        out.append(np.concatenate([[BOS], text, [EOS]]))
    return out


def mlm_config(tmp_path, name="cache", **changes):
    root = tmp_path / "ds"
    if not root.exists():
        make_manifest(root, documents(400))
    return DataConfig(**{"paths": [str(root)], "seq_len": 64, "split": "1", "seed": 11, "objective": "mlm",
                         "cache_dir": str(tmp_path / name), **changes})


def test_masking_statistics_and_special_tokens(tmp_path):
    train = build_datasets(mlm_config(tmp_path), {"train": 600}, tokenizer_sha256=TOKENIZER_SHA).train
    counts = dict(candidates=0, chosen=0, mask=0, random=0, same=0)
    for i in range(len(train)):
        sample, raw = train[i], train.base[i]["tokens"][:64]
        ids, labels = sample["input_ids"], sample["labels"]
        assert ids.shape == labels.shape == (64,) and ids.dtype == labels.dtype == np.int64
        special = np.isin(raw, SPECIAL)
        assert (labels[special] == IGNORE_INDEX).all() and np.array_equal(ids[special], raw[special])
        chosen = labels != IGNORE_INDEX
        assert np.array_equal(labels[chosen], raw[chosen]) and np.array_equal(ids[~chosen], raw[~chosen])
        replaced = chosen & (ids != raw) & (ids != MASK)
        assert not np.isin(ids[replaced], SPECIAL + [UNK]).any()  # random replacements are ordinary text
        counts["candidates"] += int((~special).sum())
        counts["chosen"] += int(chosen.sum())
        counts["mask"] += int((chosen & (ids == MASK)).sum())
        counts["random"] += int(replaced.sum())
        counts["same"] += int((chosen & (ids == raw)).sum())
    assert abs(counts["chosen"] / counts["candidates"] - 0.15) < 0.01
    assert abs(counts["mask"] / counts["chosen"] - 0.8) < 0.03
    assert abs(counts["random"] / counts["chosen"] - 0.1) < 0.02
    assert abs(counts["same"] / counts["chosen"] - 0.1) < 0.02


def test_masks_depend_on_seed_and_sample_only(tmp_path):
    a = build_datasets(mlm_config(tmp_path, "a"), {"train": 64}, tokenizer_sha256=TOKENIZER_SHA).train
    b = build_datasets(mlm_config(tmp_path, "b"), {"train": 64}, tokenizer_sha256=TOKENIZER_SHA).train
    other_seed = MLMDataset(a.base, a.config, a.special, 1000, seed=12, seq_len=64)
    for i in (0, 7, 63):
        assert all(np.array_equal(a[i][k], b[i][k]) for k in ("input_ids", "labels"))
        assert np.array_equal(a[i]["input_ids"], a[i]["input_ids"])  # a repeated read draws the same mask
        assert not np.array_equal(a[i]["labels"], other_seed[i]["labels"])
    assert not np.array_equal(a[0]["labels"] != IGNORE_INDEX, a[1]["labels"] != IGNORE_INDEX)
    # in worker processes and cut between two data-parallel ranks: the same batches
    single, _ = make_loader(a, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1)
    ranks = [make_loader(a, 2, r, 2, num_workers=2)[0] for r in range(2)]
    for want, got0, got1 in zip(single, *ranks):
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([got0[key], got1[key]]), want[key])


def test_all_special_sample_is_left_alone():
    special = SpecialTokens(bos_id=BOS, pad_id=PAD, eos_id=EOS, mask_id=MASK, unk_id=UNK)
    tokens = np.asarray([BOS, PAD, EOS, MASK, PAD])
    ids, labels = mask_tokens(tokens, MLMConfig(), special, np.arange(5, 100), np.random.RandomState(0))
    assert np.array_equal(ids, tokens) and (labels == IGNORE_INDEX).all()
