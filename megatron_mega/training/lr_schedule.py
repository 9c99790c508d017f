"""Learning rate: linear warmup, then cosine or linear decay from lr to min_lr, then min_lr.

`lr_at(step)` is the rate used by optimizer step `step` (0-based). Warmup reaches lr at step warmup_steps - 1
(step 0 already trains, at lr / warmup_steps). Decay runs over steps [warmup_steps, decay_steps].
"""

from __future__ import annotations

import math

import torch

from megatron_mega.training.config import OptimConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    warmup, total = optim.warmup_steps, optim.total_decay_steps
    if warmup > 0 and step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.decay == "constant" or total <= warmup:
        return optim.lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    if optim.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


class WarmupDecay(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR whose state is just its step count (the function is rebuilt from the config on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig):
        self.optim_config = optim
        super().__init__(optimizer, lambda step: lr_at(step, optim) / optim.lr)

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state):
        self.last_epoch = state["last_epoch"]
        self._step_count = state["_step_count"]
        self.apply_rates()

    def rates(self) -> list[float]:
        """Each group's rate at the current step: LambdaLR.get_lr without its warning, which is meant for calls
        from inside step() and fired on every resume."""
        return [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas)]

    def apply_rates(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.rates()):
            group["lr"] = lr
