"""The log line per interval and the same scalars in tensorboard (rank 0 only).

    iteration 40/1000 | consumed samples 320 | consumed tokens 40960 | lr 9.000E-04 | loss 5.1234 |
    grad norm 1.234 | loss scale 1 | skipped 0 | dropped 0 | ms/iter 123.4 | data wait 0.3 ms (0.2%) |
    tokens/s 8301 | TFLOP/s/device 0.05 | MFU n/a

skipped: optimizer steps not applied (non-finite gradients, or a non-finite loss on the pipeline path), since the
start of this process; dropped: micro-batches dropped before their backward for a non-finite loss (plain path).
data wait: per iteration, the time this rank (rank 0) spent blocked on the data loader for the next micro-batch,
and its share of the interval's wall time (`data_wait_ms`, `data_wait_share` in tensorboard).
TFLOP/s/device and MFU count the model's FLOPs (training/flops.py, without recomputation: PaLM's definition);
`hfu` in tensorboard adds what activation checkpointing and selective recomputation compute again.
"""

from __future__ import annotations

import math
import time
from typing import Optional

# Dense peak TFLOP/s per device by (device name substring, dtype). MFU is only reported for a known device or a
# configured logging.peak_tflops.
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H100", "bf16"): 989.0, ("A100", "bf16"): 312.0, ("A100", "fp32"): 19.5,
    ("H100", "fp32"): 67.0, ("H200", "fp32"): 67.0, ("V100", "fp16"): 125.0, ("A10", "bf16"): 125.0,
    ("L40S", "bf16"): 362.0, ("MI300X", "bf16"): 1307.0,
}


def peak_tflops(dtype: str, configured: Optional[float]) -> Optional[float]:
    if configured is not None:
        return float(configured)
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (key, kind), value in PEAK_TFLOPS.items():
        if key in name and kind == dtype:
            return value
    return None


class MetricsWriter:
    def __init__(self, enabled: bool, tensorboard_dir: Optional[str], print_fn=print):
        self.enabled = enabled
        self.print = print_fn
        self.tb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)

    def log_train(self, step: int, total: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        def fmt(name, value, spec):
            return f"{name} {format(value, spec)}"
        # the wall-clock time first, as Megatron-LM's lines: when a long run slowed down or stalled
        parts = [f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {step}/{total}",
                 fmt("consumed samples", values["consumed_samples"], "d"),
                 fmt("consumed tokens", values["consumed_tokens"], "d"),
                 fmt("lr", values["lr"], ".3E"), fmt("loss", values["loss"], ".4f"),
                 "grad norm " + ("n/a" if values.get("grad_norm") is None else f"{values['grad_norm']:.3f}"),
                 fmt("loss scale", values["loss_scale"], "g"), fmt("skipped", values["skipped"], "d"),
                 fmt("dropped", values.get("dropped", 0), "d"), fmt("ms/iter", values["ms_per_iter"], ".1f"),
                 f"data wait {values.get('data_wait_ms', 0.0):.1f} ms "
                 f"({100 * values.get('data_wait_share', 0.0):.1f}%)",
                 fmt("tokens/s", values["tokens_per_s"], ".0f"),
                 fmt("TFLOP/s/device", values["tflops"], ".3f"),
                 "MFU " + ("n/a" if values.get("mfu") is None else f"{100 * values['mfu']:.2f}%")]
        self.print(" | ".join(parts))
        if self.tb is not None:
            for key, value in values.items():
                if value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)

    def log_eval(self, step: int, split: str, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        self.print(f"{split} at iteration {step} | loss {loss:.4f} | perplexity {ppl:.3f}")
        if self.tb is not None:
            self.tb.add_scalar(f"{split}/loss", loss, step)
            self.tb.add_scalar(f"{split}/perplexity", ppl, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
