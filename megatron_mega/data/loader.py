"""A DataLoader over a dataset for one data-parallel rank, resumable at a global sample count.

    loader, sampler = make_loader(splits.train, micro_batch_size=4, data_parallel_rank=r, data_parallel_size=dp,
                                  consumed_samples=state.get("consumed_samples", 0), num_workers=2)
    for step ...:
        for _ in range(grad_accum): batch = next(it)       # {"tokens": LongTensor[micro, seq_len + 1]} (causal)
        ...; sampler.advance(micro * dp * grad_accum)     # after the optimizer step
    checkpoint["data"] = sampler.state_dict()             # consumed samples + the dp size it was made under
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from megatron_mega.data.sampler import PretrainingSampler


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into int64 tensors, key by key."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def make_loader(dataset, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                consumed_samples: int = 0, num_workers: int = 0, state: Optional[dict[str, Any]] = None,
                pin_memory: bool = False) -> tuple[DataLoader, PretrainingSampler]:
    """A loader yielding this rank's micro-batches from `consumed_samples` on (or from `state`, a sampler state
    dict, when given: it may come from a run with another data-parallel size)."""
    sampler = PretrainingSampler(len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size,
                                 consumed_samples=consumed_samples)
    if state is not None:
        sampler.load_state_dict(state)
    # Without a generator of its own, every new iterator draws its workers' base seed from torch's global RNG: a
    # resumed run (RNG restored, then the iterator made) would then see other dropout masks than the run it
    # continues (whose iterator drew before its first step). The samples themselves do not depend on that seed.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                        pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator().manual_seed(0))
    return loader, sampler
