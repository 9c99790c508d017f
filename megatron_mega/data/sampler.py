"""Which samples each data-parallel rank reads, resumable by consumed samples (Megatron's pretraining sampler).

The global order is simply 0, 1, 2, ... of the (already shuffled) dataset. Each global micro-step takes the next
micro_batch_size x data_parallel_size ids; rank r gets ids [r * micro, (r + 1) * micro) of them. consumed_samples
counts globally, so a run saved at consumed_samples = k continues at sample k under any data-parallel size or
micro batch size: only how the same global sequence is cut between ranks changes.

Use as `torch.utils.data.DataLoader(dataset, batch_sampler=sampler, ...)`. A DataLoader iterates the sampler ahead
of training (prefetching), so the sampler cannot know what was trained on: the trainer calls
`sampler.advance(global_batch_size)` after each optimizer step, and `state_dict()` reports that count.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

logger = logging.getLogger(__name__)


class SamplerError(ValueError):
    """Bad sampler arguments or a state dict that cannot be resumed."""


class PretrainingSampler:
    def __init__(self, total_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                 consumed_samples: int = 0):
        for name, value, low in (("total_samples", total_samples, 1), ("micro_batch_size", micro_batch_size, 1),
                                 ("data_parallel_size", data_parallel_size, 1),
                                 ("consumed_samples", consumed_samples, 0),
                                 ("data_parallel_rank", data_parallel_rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SamplerError(f"{name}: must be an integer >= {low}, got {value!r}")
        if data_parallel_rank >= data_parallel_size:
            raise SamplerError(f"data_parallel_rank: {data_parallel_rank} is not below data_parallel_size "
                               f"{data_parallel_size}")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        # the layout of the run this one resumed (None: a fresh run); kept for logs and checkpoints
        self.resumed_from_data_parallel_size: int | None = None
        self._check_consumed()

    @property
    def samples_per_micro_step(self) -> int:
        """Samples one micro-step takes across all ranks."""
        return self.micro_batch_size * self.data_parallel_size

    def _check_consumed(self) -> None:
        if self.consumed_samples >= self.total_samples:
            raise SamplerError(f"consumed_samples: {self.consumed_samples} leaves nothing of the {self.total_samples} "
                               f"samples the dataset holds (ask the dataset for more samples)")

    def __len__(self) -> int:
        """Micro-batches this rank will yield from the current position (a partial last micro-step is dropped)."""
        return (self.total_samples - self.consumed_samples) // self.samples_per_micro_step

    def __iter__(self) -> Iterator[list[int]]:
        # the position is read once: advance() during iteration must not move an iterator already running
        step, consumed = self.samples_per_micro_step, self.consumed_samples
        for start in range(consumed, self.total_samples - step + 1, step):
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))

    def advance(self, num_samples: int) -> None:
        """Record `num_samples` more samples trained on, globally (the global batch size after each step)."""
        if num_samples < 0:
            raise SamplerError(f"num_samples: must be >= 0, got {num_samples}")
        self.consumed_samples += num_samples

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "data_parallel_size": self.data_parallel_size,
                "micro_batch_size": self.micro_batch_size, "total_samples": self.total_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state["consumed_samples"]`; a different data-parallel size continues the same global order."""
        missing = sorted({"consumed_samples", "data_parallel_size"} - set(state))
        if missing:
            raise SamplerError(f"sampler state: missing {missing}")
        self.consumed_samples = int(state["consumed_samples"])
        self._check_consumed()
        self.resumed_from_data_parallel_size = int(state["data_parallel_size"])
        if self.resumed_from_data_parallel_size != self.data_parallel_size:
            logger.info("resuming at sample %d, saved under data-parallel size %d, now %d: the global sample order "
                        "is unchanged", self.consumed_samples, self.resumed_from_data_parallel_size,
                        self.data_parallel_size)
