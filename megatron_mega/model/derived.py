"""Tensors derived from parameters, computed once per decoded sequence during cached decoding.

Cached decoding computes one token at a time, and at a batch of one each step is a long chain of small kernels
(launch-bound on a GPU): recomputing the EMA's coefficients and the rotary tables from the parameters at every step
and layer is a good share of it. Inside `memoising()` (the model enters it for a `use_cache` forward with autograd
off) these are memoised, keyed by each parameter's identity, storage, device, dtype and version counter (bumped by
every in-place change: an optimizer step, `load_state_dict`, `copy_`), and by the decoding "epoch": every forward
that starts a sequence (an empty cache) begins a new one and recomputes. The epoch is what makes the memo safe
against writes the version counter cannot see: `p.data.copy_()` and the flat buffers DeepSpeed's ZeRO-1/2 and
bf16 optimizers write through (evaluation once read the weights of its first run from the memo ever after).
Anywhere else (training, evaluation without a cache, ZeRO-3's gathered parameters) they are recomputed every time.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

_MEMOISING: ContextVar[bool] = ContextVar("megatron_mega_memoising", default=False)
_EPOCH = [0]  # the decoding epoch: a new sequence starts a new one (a list: one mutable value shared by all)


@contextmanager
def memoising(enabled: bool = True, new_sequence: bool = False) -> Iterator[None]:
    """Memoise inside this block (when autograd is off); `new_sequence` (a forward from an empty cache) first
    starts a new epoch, so nothing memoised before it is served."""
    if enabled and new_sequence:
        _EPOCH[0] += 1
    token = _MEMOISING.set(enabled)  # autograd mode is checked where the memo is read (memoising_active)
    try:
        yield
    finally:
        _MEMOISING.reset(token)


def memoising_active() -> bool:
    # torch.compile cannot trace ContextVar.get (a graph break at every call, 14 per block): autograd mode and
    # compilation are checked first, and a traced forward never memoises
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return _MEMOISING.get()


class DerivedTensors:
    """One memoised value (the last key's): a module holds one per derived quantity."""

    def __init__(self) -> None:
        self._key: Hashable = None
        self._value: Any = None

    @property
    def value(self) -> Any:
        """The value memoised last (None before any), for a holder that must keep it alive."""
        return self._value

    def get(self, params: Sequence[torch.Tensor], extra: Hashable, compute: Callable[[], Any]) -> Any:
        if not memoising_active():
            return compute()
        key = (_EPOCH[0], tuple((id(p), p.data_ptr(), p.device, p.dtype, p._version) for p in params), extra)
        if key != self._key:
            self._value, self._key = compute(), key
        return self._value
