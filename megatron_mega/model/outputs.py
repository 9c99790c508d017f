"""Output containers with transformers' names: attribute access, `out["logits"]`, `out[0]`, `to_tuple()`, and the
mapping protocol (`"loss" in out`, `keys()`, `items()`, `values()`, `get()`).

Like transformers' ModelOutput (an OrderedDict of the fields that are set), fields that are None are not keys and
are skipped by integer indexing and `to_tuple()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

import torch


@dataclass
class ModelOutput:
    def set_lazy(self, name: str, compute: Callable[[], Any]) -> None:
        """Make field `name` computed by `compute()` on first access (then stored)."""
        self.__dict__.setdefault("_lazy", {})[name] = compute

    def __getattribute__(self, name: str) -> Any:
        lazy = object.__getattribute__(self, "__dict__").get("_lazy")
        if lazy and name in lazy:
            value = lazy.pop(name)()
            object.__setattr__(self, name, value)
            return value
        return object.__getattribute__(self, name)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        """The fields that are set, a deferred one included, without computing it (as a key test in transformers
        is a dict lookup: `"loss" in out` must not run a vocabulary-sized product)."""
        state = object.__getattribute__(self, "__dict__")
        lazy = state.get("_lazy") or {}
        return [f.name for f in fields(self) if f.name in lazy or state.get(f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    past_key_values: Optional[Any] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Any] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class SequenceClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class MultipleChoiceModelOutput(MaskedLMOutput):
    pass


@dataclass
class TokenClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    start_logits: Optional[torch.Tensor] = None
    end_logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(..., return_dict_in_generate=True): transformers' names. scores: the processed scores of each step
    (output_scores), logits: the raw ones (output_logits), each (batch, vocab)."""

    sequences: Optional[torch.Tensor] = None
    scores: Optional[tuple[torch.Tensor, ...]] = None
    logits: Optional[tuple[torch.Tensor, ...]] = None
