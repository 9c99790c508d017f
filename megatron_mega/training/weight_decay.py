"""Which parameters AdamW decays: the optimizer's two parameter groups.

Rule "weights" (every run whose checkpoints record `weight_decay_rule` in trainer_state.json): the weight
matrices of the projections, the feed-forward layers, the embeddings and the heads are decayed, as Megatron-LM and
Hugging Face's Trainer do; biases and norm scales are not, and neither are MEGA's own small parameters:
- the EMA's (`ema_gate.*`): its damping and decay factors are logits that go through a sigmoid, so decaying them
  pulls the EMA's alpha and delta towards 0.5 (a shorter or longer memory), not towards a smaller weight;
- the attention's per-dimension query/key scale and offset (`qk_weight`, `qk_bias`), a bias and a norm scale in all
  but name;
- the relative-position bias (`rel_pos_bias.*`, simple or rotary).
Several of these are 2-D or 3-D, so a rule by rank alone decays them.

Rule "rank2" (checkpoints saved before the rule was recorded): every tensor of rank >= 2 is decayed. A run resumed
from such a checkpoint keeps it, so that its optimizer groups, and with them its exact continuation, stay as they
were.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

RULES = ("weights", "rank2")
DEFAULT_RULE = "weights"
LEGACY_RULE = "rank2"  # what a checkpoint without `weight_decay_rule` was trained with

_NO_DECAY_MODULES = frozenset({"ema_gate", "rel_pos_bias"})
_NO_DECAY_PARAMETERS = frozenset({"qk_weight", "qk_bias", "bias"})


def is_decayed(name: str, parameter: nn.Parameter, rule: str = DEFAULT_RULE) -> bool:
    if rule not in RULES:
        raise ValueError(f"weight decay rule {rule!r}: expected one of {RULES}")
    if parameter.ndim < 2:
        return False
    if rule == LEGACY_RULE:
        return True
    parts = name.split(".")
    return parts[-1] not in _NO_DECAY_PARAMETERS and not _NO_DECAY_MODULES.intersection(parts[:-1])


def rule_of_checkpoint(trainer_state: Optional[dict[str, Any]]) -> str:
    """The rule a run continues with: the saved one, the legacy rule for a checkpoint that predates it, the
    default for a fresh start (None)."""
    if trainer_state is None:
        return DEFAULT_RULE
    rule = trainer_state.get("weight_decay_rule", LEGACY_RULE)
    if rule not in RULES:
        raise ValueError(f"trainer_state.json: weight_decay_rule {rule!r} is not one this code knows ({RULES})")
    return rule


def param_groups(model: nn.Module, weight_decay: float, rule: str = DEFAULT_RULE) -> list[dict[str, Any]]:
    """The decayed parameters, then the others. A group with no parameter is left out: a pipeline stage holding
    only the embedding has no undecayed parameter, and DeepSpeed drops an empty group, which then disagreed with
    the lr schedule's group count (a crash at the first step)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_decayed(name, p, rule) else no_decay).append(p)
    return [{"params": params, "weight_decay": wd}
            for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]
