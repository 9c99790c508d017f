"""Tensors derived from parameters, computed once per set of parameter values during cached decoding.

Cached decoding computes one token at a time, and at a batch of one each step is a long chain of small kernels
(launch-bound on a GPU): recomputing the EMA's coefficients and the rotary tables from the parameters at every step
and layer is a good share of it. Inside `memoising()` (the model enters it for a `use_cache` forward with autograd
off) these are memoised, keyed by each parameter's identity, storage, device, dtype and version counter (bumped by
every in-place change: an optimizer step, `load_state_dict`, `copy_`), so a changed parameter is not served a stale
value. Anywhere else (training, evaluation, ZeRO-3's gathered parameters) they are recomputed every time.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

_MEMOISING: ContextVar[bool] = ContextVar("megatron_mega_memoising", default=False)


@contextmanager
def memoising(enabled: bool = True) -> Iterator[None]:
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
        key = (tuple((id(p), p.data_ptr(), p.device, p.dtype, p._version) for p in params), extra)
        if key != self._key:
            self._value, self._key = compute(), key
        return self._value
