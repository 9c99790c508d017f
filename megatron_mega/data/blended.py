"""Blending datasets by weight, with the proportions exact at every prefix of the sample stream.

Megatron's BlendedDataset picks, at each step n, the dataset whose count is furthest below weight * n. That keeps
counts close but not within one sample: with three or more datasets a prefix can be off by up to ~1.9 samples.
Here the same deficit idea is made exact with Tijdeman's rule for the chairman assignment problem (1980): at step t
(1-based) a dataset is eligible once its deficit weight*t - count reaches 1/(2(k-1)), and among the eligible the
one whose next sample is due first (smallest (count + 1 - 1/(2(k-1))) / weight) is taken. Then, for every prefix
of n samples and every dataset, |count - weight * n| <= 1 - 1/(2(k-1)) < 1 (k = datasets with weight > 0).

The blend order is deterministic (no seed): each component is shuffled by the seed inside itself.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_mega.data.index_cache import Allocate, CachedIndices, IndexCache, in_memory

logger = logging.getLogger(__name__)

BLEND_VERSION = 1


def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _tijdeman_walk(weights: np.ndarray, inverse: np.ndarray, active: np.ndarray, lead: float, threshold: float,
                   counts: np.ndarray, dataset_index: np.ndarray, dataset_sample_index: np.ndarray) -> None:
    """The blend's samples in order; compiled by numba when it is installed (a few ns a sample instead of ~1 us,
    which is ~20 min once for a billion samples), the same floating-point operations either way."""
    for n in range(len(dataset_index)):
        t = n + 1
        best, due = -1, 0.0
        slack = 1e-12 * t  # float round-off of weight * t
        for j in range(len(active)):
            i = active[j]
            c = counts[i]
            if weights[i] * t - c >= threshold - slack:
                d = (c + lead) * inverse[i]
                if best < 0 or d < due:
                    best, due = i, d
        if best < 0:  # cannot happen in exact arithmetic (Tijdeman's theorem); round-off guard: the largest deficit
            best = active[0]
            for j in range(1, len(active)):
                if weights[active[j]] * t - counts[active[j]] > weights[best] * t - counts[best]:
                    best = active[j]
        dataset_index[n] = best
        dataset_sample_index[n] = counts[best]
        counts[best] += 1


@functools.cache
def _compiled_walk() -> Callable[..., None]:
    try:
        import numba
    except ImportError:
        logger.warning("numba is not installed: the blend index is built in Python, about 1 us a sample")
        return _tijdeman_walk
    try:
        return numba.njit(cache=True, nogil=True)(_tijdeman_walk)
    except RuntimeError as err:  # no writable __pycache__ nor user cache (a read-only install and home)
        logger.info("numba cannot cache the blend walk (%s): compiled for this process only", err)
        return numba.njit(nogil=True)(_tijdeman_walk)


def build_blending_indices(weights: Sequence[float], size: int,
                           allocate: Allocate = in_memory) -> dict[str, np.ndarray]:
    """dataset_index[n]: which dataset serves blended sample n; dataset_sample_index[n]: its sample number there
    (0, 1, 2, ... per dataset, in order)."""
    weights = normalize_weights(weights)
    active = np.asarray([i for i, w in enumerate(weights) if w > 0], dtype=np.int64)
    k = len(active)
    lead = 1.0 - 1.0 / (2 * (k - 1)) if k > 1 else 0.0  # Tijdeman's bound D; eligible at deficit >= 1 - D
    weights_array = np.asarray(weights, dtype=np.float64)
    inverse = np.zeros_like(weights_array)
    inverse[active] = 1.0 / weights_array[active]
    dataset_index = allocate("dataset_index", size, np.int16 if len(weights) < 2 ** 15 else np.int32)
    dataset_sample_index = allocate("dataset_sample_index", size, np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    _compiled_walk()(weights_array, inverse, active, lead, 1.0 - lead, counts, dataset_index.view(np.ndarray),
                     dataset_sample_index.view(np.ndarray))
    # the samples each dataset serves, which every process needs: kept, not recounted from the whole blend
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index, "counts": counts}


def load_blending_indices(cache: IndexCache, weights: Sequence[float], size: int) -> CachedIndices:
    """The blend for `weights` and `size`, from the cache (it depends on nothing else)."""
    description = {"version": BLEND_VERSION, "weights": normalize_weights(weights), "size": int(size)}
    return cache.load_or_build("blend", description, lambda allocate: build_blending_indices(weights, size, allocate))


_COUNT_BLOCK = 1 << 22


def samples_per_dataset(indices: CachedIndices, num_datasets: int) -> list[int]:
    if "counts" in indices.arrays:
        counts = [int(c) for c in indices.arrays["counts"]]
        assert len(counts) == num_datasets, (indices.name, len(counts), num_datasets)  # weights are in the key
        return counts
    # a blend cached before the counts were kept: counted over the whole index (2 ns a sample, in every process),
    # block by block: bincount widens its input to int64, 8 bytes a sample at once for the whole blend otherwise
    dataset_index = indices.arrays["dataset_index"]
    counts = np.zeros(num_datasets, dtype=np.int64)
    for start in range(0, len(dataset_index), _COUNT_BLOCK):
        counts += np.bincount(dataset_index[start:start + _COUNT_BLOCK], minlength=num_datasets)
    return counts.tolist()


class BlendedDataset:
    """Blended sample n is `datasets[dataset_index[n]][dataset_sample_index[n]]`; len = the size asked for."""

    def __init__(self, datasets: Sequence[Optional[object]], indices: CachedIndices):
        self.datasets = list(datasets)
        self.indices = indices
        needed = samples_per_dataset(indices, len(self.datasets))
        for i, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count and (dataset is None or len(dataset) < count):  # type: ignore[arg-type]
                raise ValueError(f"blend component {i} holds {0 if dataset is None else len(dataset)} samples, "
                                 f"the blend needs {count}")
        self._bind()

    def _bind(self) -> None:
        self.dataset_index = self.indices.arrays["dataset_index"]
        self.dataset_sample_index = self.indices.arrays["dataset_sample_index"]

    @property
    def built(self) -> bool:
        return self.indices.built

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} outside [0, {len(self)})")
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.dataset_sample_index[index])]  # type: ignore[index]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("dataset_index")
        state.pop("dataset_sample_index")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind()
