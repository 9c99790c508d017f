"""The masked-language-model view of a sample stream (the bidirectional objective), BERT's recipe.

Per sample: of the tokens that are not special (bos/pad/eos/mask), `mask_prob` are chosen (count rounded at random,
so the expectation is exact), each chosen token becomes the mask id with probability `mask_token_prob`, a random
non-special token with `random_token_prob`, else stays; labels hold the original token at chosen positions and -100
elsewhere. The draw depends only on (seed, split, sample index): never on the worker, rank or data-parallel size.

MLM samples are the first seq_len tokens of the packed samples (the causal samples' extra shared token is dropped,
so MLM samples tile the stream without overlap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_mega.data import seeding
from megatron_mega.data.config import SPLIT_NAMES, MLMConfig

IGNORE_INDEX = -100  # the label PyTorch's cross entropy (and the model's heads) skip


@dataclass(frozen=True)
class SpecialTokens:
    """Ids never chosen for masking (and never drawn as random replacements), from the manifest's tokenizer."""

    bos_id: Optional[int]
    pad_id: Optional[int]
    eos_id: Optional[int]
    mask_id: int
    unk_id: Optional[int] = None  # may be masked (it is text), but never drawn as a replacement

    def protected(self) -> np.ndarray:
        return np.asarray(sorted({i for i in (self.bos_id, self.pad_id, self.eos_id, self.mask_id) if i is not None}),
                          dtype=np.int64)

    def never_drawn(self) -> np.ndarray:
        return np.asarray(sorted(set(self.protected().tolist()) | ({self.unk_id} - {None})), dtype=np.int64)


def mask_tokens(tokens: np.ndarray, config: MLMConfig, special: SpecialTokens, replacements: np.ndarray,
                rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) for `tokens`; `replacements` are the ids a random replacement is drawn from."""
    tokens = np.asarray(tokens, dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(tokens, special.protected()))
    count = min(len(candidates), int(np.floor(config.mask_prob * len(candidates) + rng.random_sample())))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False)) if count else candidates[:0]
    draw = rng.random_sample(count)
    input_ids = tokens.copy()
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[chosen] = tokens[chosen]
    to_mask = draw < config.mask_token_prob
    to_random = (draw >= config.mask_token_prob) & (draw < config.mask_token_prob + config.random_token_prob)
    input_ids[chosen[to_mask]] = special.mask_id
    input_ids[chosen[to_random]] = replacements[rng.randint(0, len(replacements), size=int(to_random.sum()))]
    return input_ids, labels


class MLMDataset:
    """`dataset[i]` = {"input_ids": int64[seq_len], "labels": int64[seq_len]} from `base[i]["tokens"]`."""

    def __init__(self, base, config: MLMConfig, special: SpecialTokens, vocab_size: int, seed: int, seq_len: int,
                 split: str = "train"):
        if special.mask_id is None or not 0 <= special.mask_id < vocab_size:
            raise ValueError(f"mlm: the tokenizer's mask id {special.mask_id!r} is not in [0, {vocab_size})")
        self.base, self.config, self.special, self.seed, self.seq_len = base, config, special, seed, seq_len
        self.split_code = SPLIT_NAMES.index(split)  # valid and test draw other masks than train
        self.replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special.never_drawn())

    def __len__(self) -> int:
        return len(self.base)

    def rng(self, index: int) -> np.random.RandomState:
        return seeding.random_state(seeding.MLM_MASKING, self.seed, self.split_code, index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            index += len(self)
        tokens = self.base[index]["tokens"][:self.seq_len]
        input_ids, labels = mask_tokens(tokens, self.config, self.special, self.replacements, self.rng(index))
        return {"input_ids": input_ids, "labels": labels}


def special_tokens_from(tokenizer_info) -> SpecialTokens:
    """From a manifest's TokenizerInfo."""
    return SpecialTokens(bos_id=tokenizer_info.bos_id, pad_id=tokenizer_info.pad_id, eos_id=tokenizer_info.eos_id,
                         mask_id=tokenizer_info.mask_id, unk_id=tokenizer_info.unk_id)

