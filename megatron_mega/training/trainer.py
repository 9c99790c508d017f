"""The training loop: DeepSpeed engine over a MEGA LM, resumable exactly, with metrics and safe stops.

    context = init_distributed(config.parallel.timeout_s)
    result = Trainer(config, context).train()      # TrainResult: per-step losses, final step, why it stopped

Plain path (pipeline_stages == 1): `deepspeed.initialize` on a module computing the loss, ZeRO 0-3. One optimizer
step = grad_accum micro-batches of micro_batch_size per data-parallel rank. A micro-batch whose loss is not finite
on any rank is dropped before its backward (no DeepSpeed counter moves) and the next one is read instead; K in a row
stop the run. SIGTERM/SIGUSR1 finish the step, save, and return with `stopped="signal"`.

Non-finite gradients (any path, any ZeRO stage) and a non-finite loss on the pipeline path (whose schedule runs the
micro-batches and the optimizer step in one call) are caught by `FiniteStepGuard`, which wraps the engine's optimizer
step: the step is skipped before the optimizer applies it (weights, Adam moments and the lr schedule unchanged), the
iteration and its data still count, and K skipped steps in a row stop the run.

`optim.train_steps: 0` on a fresh run writes the initial weights (seeded, or `checkpoint.init_from_hf`'s) as the
checkpoint of step 0 and stops: "Hugging Face directory -> training checkpoint" without an optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_mega.atomic_io import atomic_write_with
from megatron_mega.model.block import compile_blocks, set_selective_recompute
from megatron_mega.model.gated_attention import MegaMovingAverageGatedAttention
from megatron_mega.training import checkpointing, preflight
from megatron_mega.training.config import TrainConfig, TrainConfigError
from megatron_mega.training.distributed import DistContext
from megatron_mega.training.ds_config import (accumulation_to_keep, build_ds_config, fp32_gradients,
                                               gradient_accumulation_dtype)
from megatron_mega.training.flops import train_flops
from megatron_mega.training.lr_schedule import WarmupDecay
from megatron_mega.training.memory_reports import without_memory_reports
from megatron_mega.training.metrics import MetricsWriter, peak_tflops
from megatron_mega.training.signals import StopRequest
from megatron_mega.training.weight_decay import param_groups, rule_of_checkpoint


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainResult:
    step: int = 0
    consumed_samples: int = 0
    losses: dict[int, float] = field(default_factory=dict)   # step -> mean loss over the global batch
    grad_norms: dict[int, Optional[float]] = field(default_factory=dict)
    eval_losses: dict[str, dict[int, float]] = field(default_factory=dict)
    skipped_micro_batches: int = 0   # micro-batches dropped for a non-finite loss (plain path) before backward
    skipped_steps: int = 0           # optimizer steps not applied (non-finite gradients, or loss on the pipeline)
    data_wait_share: Optional[float] = None  # fraction of the loop's time spent waiting for batches (logged windows)
    stopped: str = "finished"   # finished | exit_at_step | signal
    resumed_from: Optional[int] = None
    checkpoint: Optional[str] = None
    tokens_per_s: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, default=str)


class FiniteStepGuard:
    """Wraps `engine.optimizer.step` so that a step with non-finite gradients (or, on the pipeline path, a
    non-finite loss on the last stage) is not applied on any rank.

    Every rank reports whether it sees a problem, and one all-reduce (MAX, whole world) makes the decision common,
    before anything is changed. A skipped step leaves the weights and the optimizer state as they were, clears the
    gradients, and sets `optimizer.overflow`, which DeepSpeed's engine reads to count the step as skipped and to
    leave the lr schedule where it is.

    Where the check happens, per optimizer DeepSpeed builds (DeepSpeed 0.19.8):
    - ZeRO-0 in fp32: the engine's optimizer is torch's AdamW itself, which would apply anything; the guard checks
      the (already reduced, clipped) `.grad` of every parameter and skips the step itself.
    - ZeRO-1/2 (DeepSpeedZeroOptimizer), ZeRO-3 and bf16: they compute the global gradient norm over their
      partitions and skip on a non-finite one (`overflow`); the guard counts those. For a reason only the guard
      knows (the pipeline's non-finite loss), a ZeRO-1/2 optimizer or BF16_Optimizer is made to take its own
      overflow path.
    The decision costs one 8-byte all-reduce per optimizer step.
    """

    def __init__(self, engine, world_all_max):
        self.engine = engine
        self.optimizer = engine.optimizer
        self._all_max = world_all_max
        self._inner = self.optimizer.step
        self._plain_torch = isinstance(self.optimizer, torch.optim.Optimizer)
        # fp16's dynamic loss scaling skips overflowing steps as part of finding its scale: counted apart
        self._fp16 = bool(getattr(engine, "fp16_enabled", lambda: False)())
        self.skipped = 0          # since the last take(): non-finite steps not applied
        self.scale_skipped = 0    # since the last take(): fp16 loss-scale overflows (DeepSpeed's own skips)

        def step(*args, **kwargs):
            return self.step(*args, **kwargs)

        # the step replaced is the lr scheduler's counting wrapper (fp32 ZeRO-0), which this one still calls: the
        # mark keeps torch from warning, at every scheduler step, that the optimizer's step was overridden
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self.optimizer.step = step

    def take(self) -> Optional[str]:
        """How the last optimizer step(s) ended: None (applied), "nonfinite" or "loss_scale" (skipped)."""
        status = "nonfinite" if self.skipped else "loss_scale" if self.scale_skipped else None
        self.skipped = self.scale_skipped = 0
        return status

    def _local_problem(self) -> bool:
        engine = self.engine
        if getattr(engine, "is_pipe_parallel", False) and engine.is_last_stage():
            total = getattr(engine, "total_loss", None)
            if torch.is_tensor(total) and not bool(torch.isfinite(total).all()):
                return True
        if self._plain_torch:
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                     if p.grad is not None and p.grad.numel()]
            if grads:
                # every gradient's largest magnitude (inf or NaN exactly when one of its entries is), read back
                # once: a check per parameter would wait on the GPU once per parameter
                peaks = torch._foreach_norm(grads, ord=float("inf"))
                return not bool(torch.stack([peak.float() for peak in peaks]).isfinite().all())
        return False

    def step(self, *args, **kwargs):
        bad = self._all_max(1.0 if self._local_problem() else 0.0) > 0
        if bad and self._plain_torch:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.optimizer.overflow = True
            self.skipped += 1
            return None
        if self._plain_torch:
            self.optimizer.overflow = False
            return self._inner(*args, **kwargs)
        if bad and hasattr(self.optimizer, "clear_hp_grads") and hasattr(self.optimizer, "clear_lp_grads"):
            # BF16_Optimizer (bf16 with ZeRO-0/1): what its own step does on a non-finite norm
            self.optimizer.clear_hp_grads()
            self.optimizer.clear_lp_grads()
            self.optimizer.overflow = True
            self.optimizer._global_grad_norm = float("inf")
            self.skipped += 1
            return None
        if bad:
            # DeepSpeedZeroOptimizer (ZeRO-1/2; ZeRO-3 is never combined with a pipeline): take its overflow path,
            # which clears its partitioned gradients and buffers without touching weights or moments
            if not hasattr(self.optimizer, "has_overflow") or not hasattr(self.optimizer, "check_grad_overflow"):
                raise RuntimeError(f"cannot skip a step of {type(self.optimizer).__name__}")
            saved = self.optimizer.check_grad_overflow
            self.optimizer.check_grad_overflow = True
            self.optimizer.has_overflow = lambda *a, **k: True
            try:
                out = self._inner(*args, **kwargs)
            finally:
                del self.optimizer.has_overflow
                self.optimizer.check_grad_overflow = saved
            assert self.optimizer.overflow
        else:
            out = self._inner(*args, **kwargs)
        if getattr(self.optimizer, "overflow", False):
            if self._fp16:
                self.scale_skipped += 1
            else:
                self.skipped += 1
        return out


def loss_scale(optimizer) -> float:
    """fp16's current loss scale (1 without one). DeepSpeed's ZeRO optimizers call it `cur_scale`, its
    FP16_Optimizer and FP16_UnfusedOptimizer (fp16 with ZeRO-0) `loss_scale`."""
    for name in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return 1.0


class TimedIterator:
    """An iterator that adds the time spent waiting for each item to `wait_s`."""

    def __init__(self, iterator):
        self._it = iterator
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_s += time.perf_counter() - start


class LMLoss(nn.Module):
    """The module DeepSpeed wraps: a MEGA LM head model plus the objective, returning the mean loss.

    Causal batches are {"tokens": (B, seq_len + 1)}: inputs tokens[:, :-1], targets tokens[:, 1:].
    MLM batches are {"input_ids", "labels": (B, seq_len)} with -100 where nothing is predicted."""

    def __init__(self, lm: nn.Module, objective: str):
        super().__init__()
        self.lm = lm
        self.objective = objective

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # no cache: a decoder's config defaults use_cache on, which would build one (memory) in evaluation
        hidden = self.lm.mega(inputs, use_cache=False).last_hidden_state  # (B, L, D)
        return self.lm.lm_loss(hidden, labels)


def split_batch(batch: dict[str, torch.Tensor], objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    if objective == "causal":
        tokens = batch["tokens"]
        return tokens[:, :-1], tokens[:, 1:]
    return batch["input_ids"], batch["labels"]


def build_model(config: TrainConfig, init_state: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """The same initial weights on every rank and whatever the layout: built under the config's seed, or
    `init_state` (a complete LM state dict, e.g. from `checkpoint.init_from_hf`)."""
    from megatron_mega.model import MegaForCausalLM, MegaForMaskedLM

    torch.manual_seed(config.seed)
    cls = MegaForCausalLM if config.objective == "causal" else MegaForMaskedLM
    lm = cls(config.model)
    if init_state is not None:
        lm.load_state_dict(init_state)
    if config.parallel.activation_checkpointing:
        lm.gradient_checkpointing_enable()
    return LMLoss(lm, config.objective)


def samples_wanted(config: TrainConfig, layout) -> dict[str, int]:
    """How many samples each split must hold. The training count (part of its index cache's key) does not
    depend on the data-parallel size or the micro-batch: a run resumed under another layout finds its indices in
    the cache instead of rebuilding the same arrays, which takes minutes at a billion samples."""
    per_micro = layout.micro_batch_size * layout.data_parallel_size
    # room for micro-batches that non-finite losses drop (each is replaced by the next): 4 x the most in a row a
    # run survives, in global batches, so that no layout needs more
    slack = 4 * config.optim.max_nonfinite_in_a_row * layout.global_batch_size
    return {"train": config.optim.train_steps * layout.global_batch_size + slack,
            "valid": max(1, config.logging.eval_iters) * per_micro + 1,
            "test": max(1, config.logging.test_iters) * per_micro + 1}


class Trainer:
    def __init__(self, config: TrainConfig, context: DistContext, print_fn=print):
        self.config = config
        self.context = context
        self._print = print_fn
        self.layout = config.layout(context.world_size)
        self.weight_decay_rule = "weights"  # a resumed run takes its checkpoint's (train())
        self._saved_state: Optional[dict[str, Any]] = None  # the trainer state resumed from
        self._grad_accum_dtype = config.precision.dtype
        self.pipeline = config.parallel.pipeline_stages > 1
        if self.pipeline:
            try:
                import megatron_mega.parallel  # noqa: F401
            except ImportError:
                raise TrainConfigError("parallel.pipeline_stages: the pipeline path needs megatron_mega.parallel, "
                                       "which this installation lacks; use parallel.pipeline_stages=1") from None
        if config.precision.dtype == "fp16" and not torch.cuda.is_available():
            raise TrainConfigError("precision.dtype: fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16 or fp32")
        self.dp_rank = context.rank  # plain path: every process is a data-parallel rank (pipeline: set in _engine)
        self.stop = StopRequest()

    def log(self, message: str) -> None:
        if self.context.is_main:
            self._print(message, flush=True)

    # ---- setup ---------------------------------------------------------------------------------------------------

    def _datasets(self):
        from megatron_mega.data.builder import build_datasets
        from megatron_mega.data.tokenizer import Tokenizer

        cfg, lay = self.config, self.layout
        sha = Tokenizer.load(cfg.tokenizer).sha256 if cfg.tokenizer else None
        wanted = samples_wanted(cfg, lay)
        data = cfg.data
        if data.verify_checksums:  # hashed once across the job here, not by every process inside build_datasets
            self._verify_checksums(data)
            data = replace(data, verify_checksums=False)
        splits = build_datasets(data, wanted, tokenizer_sha256=sha)
        preflight.check_tokenizer_fits_model(cfg, splits.tokenizer)
        return splits

    def _verify_checksums(self, data) -> None:
        """Every rank hashes its share of the shards; all see every problem, so all stop together (a rank that
        raised alone would leave the others waiting in their next collective until the timeout)."""
        from megatron_mega.data.builder import checksum_problems
        from megatron_mega.data.manifest import ManifestError

        ctx = self.context
        problems = checksum_problems(data, ctx.rank, ctx.world_size)
        if ctx.world_size > 1 and dist.is_initialized():
            gathered: list[Optional[list[str]]] = [None] * ctx.world_size
            dist.all_gather_object(gathered, problems)
            problems = [p for share in gathered for p in share or []]
        if problems:
            more = f" (and {len(problems) - 1} more shard files)" if len(problems) > 1 else ""
            raise ManifestError(f"data.verify_checksums: {problems[0]}{more}")

    def _pipeline_module(self, init_state: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
        from megatron_mega.parallel import build_pipeline_module

        cfg = self.config
        kwargs = {} if cfg.parallel.partition_method is None else {"partition_method": cfg.parallel.partition_method}
        if init_state is not None:
            kwargs["init_state"] = init_state
        return build_pipeline_module(cfg.model, cfg.parallel.pipeline_stages, objective=cfg.objective,
                                     activation_checkpoint_interval=1 if cfg.parallel.activation_checkpointing else 0,
                                     seed=cfg.seed, **kwargs)

    def _resume_plan(self) -> tuple[Optional[str], Optional[str], bool]:
        """(folder, tag, universal) of the checkpoint to resume from, or (None, None, False) for a fresh start.
        A checkpoint saved under another layout (data-parallel size, pipeline stages, ZeRO stage) is converted to a
        DeepSpeed universal checkpoint first, without the user doing anything."""
        load_dir, tag = preflight.resume_source(self.config)
        if tag is None:
            return None, None, False
        saved = checkpointing.read_state(load_dir, tag)["layout"]
        now = self._layout_dict()
        route = preflight.resume_route(saved, now, self.config.checkpoint.universal, f"{load_dir}/{tag}")
        if route == preflight.ZERO_0_ANY_DP:
            # ZeRO-0 keeps the whole optimizer state in one file every rank reads: nothing to re-cut
            self.log(f"{load_dir}/{tag} was saved under {saved}, now {now}: ZeRO-0 state is the same for any "
                     f"data-parallel size")
        if route != preflight.UNIVERSAL:
            return load_dir, tag, False
        if saved != now:
            self.log(f"{load_dir}/{tag} was saved under {saved}, now {now}: resuming through a universal checkpoint")
        return load_dir, checkpointing.convert_to_universal(load_dir, tag, self.context.rank), True

    def _layout_dict(self) -> dict[str, int]:
        return preflight.layout_of(self.config, self.context.world_size)

    def _engine(self, model: nn.Module, universal: bool = False):
        import deepspeed

        cfg = self.config
        groups = param_groups(model, cfg.optim.weight_decay, self.weight_decay_rule)
        self._group_decays = [group["weight_decay"] for group in groups]  # in DeepSpeed's order, for a repair
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = WarmupDecay(optimizer, cfg.optim)
        ds_config = self._ds_config()
        if universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        kept = accumulation_to_keep(self._saved_state, ds_config, universal)
        if kept is not None:
            ds_config["data_types"] = {**ds_config.get("data_types", {}), "grad_accum_dtype": kept}
            ds_config.pop("communication_data_type", None)
            self.log(f"the checkpoint's run accumulated gradients in {kept}: this run keeps it")
        self._grad_accum_dtype = gradient_accumulation_dtype(ds_config)
        if cfg.parallel.zero_stage == 3 and not self.pipeline:
            # lm_loss reads the head's weight outside the head's own forward: ZeRO-3 must gather it for LMLoss
            from deepspeed.runtime.zero import register_external_parameter

            head = model.lm.get_output_embeddings()
            for p in (head.weight, head.bias):
                if p is not None:
                    register_external_parameter(model, p)
        if not self.pipeline:
            # a pipeline engine earlier in this process left its grid as DeepSpeed's global model-parallel unit, and
            # a plain engine would take it for tensor parallelism and fail (notebooks, sweeps, the test worlds)
            from deepspeed.utils import groups

            groups.mpu = None
        # DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 with ZeRO-0) runs one AdamW step on zero gradients while it
        # is built: with the lr at 0 it moves nothing, and its step count is undone below (it made the first real
        # step a second one: Adam's bias correction off by one, every early update ~0.74x the lr)
        rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        with without_memory_reports():
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        self._undo_initial_step(optimizer)
        if self.pipeline:
            self.dp_rank = engine.grid.get_data_parallel_rank()
        self.guard = FiniteStepGuard(engine, self._all_max)
        return engine

    def _weights_of_checkpoint(self, source: str) -> tuple[dict[str, torch.Tensor], int]:
        """(the LM state dict, its step) of another run's checkpoint, for checkpoint.init_from_checkpoint.

        Reading a ZeRO checkpoint loads every partition with its Adam moments (12+ bytes a parameter): with 8
        processes a node doing it each, a 7B model needs ~0.7 TB of host memory. So rank 0 reads it and writes the
        weights once into checkpoint.dir; every process maps that file (4 bytes a parameter, shared in each node's
        page cache), and it is deleted once all have."""
        from megatron_mega.convert.training_checkpoint import (TrainingCheckpointError,
                                                               lm_state_from_training_checkpoint)

        cfg, ctx = self.config, self.context

        def read() -> tuple[dict[str, torch.Tensor], int]:
            try:
                return lm_state_from_training_checkpoint(source, cfg.model, cfg.objective)
            except TrainingCheckpointError as err:
                raise TrainConfigError(str(err)) from None

        if ctx.world_size == 1 or not cfg.checkpoint.dir:
            return read()
        digest = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:12]
        path = os.path.join(cfg.checkpoint.dir, f".init-weights-{digest}.pt")
        if ctx.rank == 0 and os.path.exists(path):
            os.remove(path)  # an interrupted earlier start's; the source may have a newer `latest` since

        def write() -> None:
            state, step = read()
            atomic_write_with(path, lambda tmp: torch.save({"state": state, "step": step}, tmp))

        checkpointing.made_by_rank_0(path, write, ctx.rank, f"the weights of {source}")
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        dist.barrier()  # every process has it mapped: the name can go
        if ctx.rank == 0:
            os.remove(path)
        return blob["state"], int(blob["step"])

    def _ds_config(self) -> dict[str, Any]:
        return build_ds_config(self.config, self.context.world_size)

    @staticmethod
    def _undo_initial_step(optimizer: torch.optim.Optimizer) -> None:
        """Reset the step count an optimizer wrapper's initialisation step left (zero gradients: the moments are
        still zero), so that training's first step is Adam's first."""
        for state in optimizer.state.values():
            step = state.get("step")
            if step is not None:
                state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else 0

    # ---- one step ------------------------------------------------------------------------------------------------

    def compute_loss(self, engine, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The loss of one micro-batch (a hook: tests override it to inject faults)."""
        inputs, labels = split_batch(batch, self.config.objective)
        return engine(inputs.to(engine.device), labels.to(engine.device))

    def _replays_attention(self, module) -> bool:
        """Whether backward replays the attention's query-key product (selective recomputation, eager blocks), for
        the FLOP count."""
        layers = [m for m in module.modules() if isinstance(m, MegaMovingAverageGatedAttention)]
        return (bool(layers) and layers[0].recompute and not self.config.parallel.compile_blocks
                and layers[0].attention.worth_recomputing(self._device()))

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _all_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _all_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item()) / self.context.world_size

    def _train_step(self, engine, it, sampler, step: int,
                    result: TrainResult) -> tuple[float, Optional[float], Optional[str]]:
        """(mean loss over the global batch, gradient norm, None or why the optimizer step was skipped)."""
        lay, cfg = self.layout, self.config
        per_micro = lay.micro_batch_size * lay.data_parallel_size
        losses = []
        in_a_row = 0
        while len(losses) < lay.grad_accum:
            batch = next(it)
            loss = self.compute_loss(engine, batch, step)
            value = float(loss.detach().float().item())
            bad = self._all_max(0.0 if math.isfinite(value) else 1.0)
            sampler.advance(per_micro)
            if bad:
                in_a_row += 1
                result.skipped_micro_batches += 1
                self.log(f"iteration {step + 1}: non-finite loss on some rank; micro-batch dropped "
                         f"({in_a_row} in a row)")
                if in_a_row >= cfg.optim.max_nonfinite_in_a_row:
                    raise TrainingAborted(
                        f"{in_a_row} non-finite losses in a row at iteration {step + 1} (optim.max_nonfinite_in_a_row"
                        f"={cfg.optim.max_nonfinite_in_a_row}): lower optim.lr, check the data, or resume from an "
                        f"earlier checkpoint")
                continue
            in_a_row = 0
            engine.backward(loss)
            grad_norm = self._zero0_grad_norm(engine) if engine.is_gradient_accumulation_boundary() else None
            engine.step()
            losses.append(value)
        skipped = self.guard.take()
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = grad_norm
        norm = None if norm is None else float(norm)
        return self._all_mean(sum(losses) / len(losses)), norm, skipped

    def _pipeline_step(self, engine, it, sampler, step: int,
                       result: TrainResult) -> tuple[float, Optional[float], Optional[str]]:
        """DeepSpeed's pipeline schedule runs the grad_accum micro-batches and the optimizer step in one call; a
        non-finite loss (seen on the last stage) or non-finite gradients make `FiniteStepGuard` skip that step
        before the optimizer applies it, on every stage."""
        objective = self.config.objective

        def micro_batches():
            while True:
                inputs, labels = split_batch(next(it), objective)
                yield (inputs,), labels

        loss = float(engine.train_batch(data_iter=micro_batches()).float().item())
        sampler.advance(self.layout.global_batch_size)
        skipped = self.guard.take()
        norm = engine.get_global_grad_norm()
        return loss, None if norm is None else float(norm), skipped

    def _zero0_grad_norm(self, engine) -> Optional[float]:
        """ZeRO-0 in fp32 does not report a gradient norm; after the boundary backward the gradients are averaged
        across ranks, so the norm is the same everywhere."""
        if self.config.parallel.zero_stage != 0 or self.config.precision.dtype != "fp32":
            return None
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.nn.utils.get_total_norm(grads))

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, engine, dataset, iters: int) -> float:
        from megatron_mega.data.loader import make_loader

        loader, _ = make_loader(dataset, self.layout.micro_batch_size, self.dp_rank, self.layout.data_parallel_size)
        if self.pipeline:
            objective = self.config.objective
            batches = (((inp,), lab) for inp, lab in (split_batch(b, objective) for b in loader))
            loss = engine.eval_batch(batches, num_micro_batches=iters)
            engine.train()
            return self._all_mean(float(loss.float().item()))
        engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= iters:
                    break
                inputs, labels = split_batch(batch, self.config.objective)
                total += float(engine(inputs.to(engine.device), labels.to(engine.device)).float().item())
                count += 1
        engine.train()
        return self._all_mean(total / max(count, 1))

    # ---- the loop ------------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        from megatron_mega.data.loader import make_loader

        cfg, lay, ctx = self.config, self.layout, self.context
        splits = self._datasets()
        tokenizer_sha = preflight.data_tokenizer_sha256(splits.tokenizer)
        ck = cfg.checkpoint
        load_dir, tag, universal = self._resume_plan()
        saved = checkpointing.read_state(load_dir, tag) if tag is not None else None
        self._saved_state = saved
        if saved is not None:
            preflight.check_resumable(saved, cfg, tokenizer_sha, f"{load_dir}/{tag}")
        self.weight_decay_rule = rule_of_checkpoint(saved)
        if saved is not None and self.weight_decay_rule != "weights":
            self.log(f"{load_dir}/{tag} predates the weight decay rule of new runs: this run keeps decaying every "
                     f"tensor of rank >= 2 (EMA and relative-position parameters, qk_weight/qk_bias included)")
        init_state = None
        if tag is None and ck.init_from_hf:
            from megatron_mega.convert.hf_import import initial_lm_state

            init_state = initial_lm_state(ck.init_from_hf, cfg.model, cfg.objective, cfg.seed)
            self.log(f"starting from the weights of {ck.init_from_hf}")
        elif tag is None and ck.init_from_checkpoint:
            init_state, source_step = self._weights_of_checkpoint(ck.init_from_checkpoint)
            self.log(f"starting from the weights of {ck.init_from_checkpoint} (its iteration {source_step}): "
                     f"iteration 0, a new optimizer, lr schedule and data order")
        model = self._pipeline_module(init_state) if self.pipeline else build_model(cfg, init_state)
        if not cfg.parallel.selective_recompute:
            set_selective_recompute(model, False)
            self.log("parallel.selective_recompute: off (backward keeps every intermediate of the MEGA blocks)")
        if cfg.parallel.compile_blocks:
            where = " on stage 0" if self.pipeline else ""  # rank 0 logs; every stage compiles its own blocks
            self.log(f"parallel.compile_blocks: {compile_blocks(model)} MEGA block(s){where} compiled with "
                     f"torch.compile (the first step compiles them)")
        # what Megatron-LM's first lines say: the layout, the precision and the model's size (on a pipeline, the
        # first stage's share)
        own = sum(p.numel() for p in model.parameters())
        self.log(f"layout: {lay.describe()}; ZeRO-{cfg.parallel.zero_stage}, {cfg.precision.dtype}, sequence "
                 f"{cfg.data.seq_len} ({lay.global_batch_size * cfg.data.seq_len:,} tokens a step)")
        self.log(f"parameters: {own:,}" + (" on pipeline stage 0" if self.pipeline else ""))
        if cfg.precision.dtype == "bf16" and not fp32_gradients(cfg):
            why = ("DeepSpeed's fp32 mode drops gradients on a pipeline" if self.pipeline else
                   "DeepSpeed has no fp32 accumulation without ZeRO; parallel.zero_stage >= 1 has")
            self.log(f"precision.dtype bf16: gradients are accumulated and reduced in bf16 ({why})")
        engine = self._engine(model, universal)
        step_fn = self._pipeline_step if self.pipeline else self._train_step
        result = TrainResult()
        step, sampler_state = 0, None
        if tag is not None:
            state = checkpointing.load(engine, load_dir, ctx.rank, tag)
            self._sync_lr(engine)
            self._repair_optimizer_after_load(engine)
            step, sampler_state = state["step"], state["sampler"]
            result.resumed_from = step
            if state.get("_rng_missing"):
                self._reseed(step)
            elif state.get("_device_rng_missing"):
                torch.cuda.manual_seed(self._seed(step))
            self.log(f"resumed from {load_dir}/{tag} at iteration {step}, consumed samples "
                     f"{state['consumed_samples']} (saved under {state['layout']})")
            self._note_schedule_change(state.get("config", {}).get("optim"), step)
            if step >= cfg.optim.train_steps > 0:
                self.log(f"the checkpoint's iteration {step} is optim.train_steps {cfg.optim.train_steps} or more: "
                         f"nothing to train (raise optim.train_steps to go on)")
        else:
            self._reseed(0)
        workers = cfg.data.num_workers
        loader, sampler = make_loader(splits.train, lay.micro_batch_size, self.dp_rank, lay.data_parallel_size,
                                      state=sampler_state, num_workers=workers,
                                      pin_memory=workers > 0 and torch.cuda.is_available())
        it = TimedIterator(iter(loader))
        if cfg.optim.train_steps == 0:
            return self._save_step0(engine, sampler, tokenizer_sha, result)
        writer = MetricsWriter(ctx.is_main, cfg.logging.tensorboard_dir, print_fn=self._print)
        seq = cfg.data.seq_len
        engine.train()
        predicted = None if cfg.objective == "causal" else int(lay.global_batch_size * seq * cfg.data.mlm.mask_prob)
        # TFLOP/s and MFU count the model's FLOPs (PaLM's MFU, Megatron-LM's TFLOP/s): recomputation is work the
        # hardware does, not progress, and goes into HFU (tensorboard) only
        flops_step = train_flops(cfg.model, lay.global_batch_size, seq, predicted_tokens=predicted)
        hardware_flops_step = train_flops(cfg.model, lay.global_batch_size, seq, predicted_tokens=predicted,
                                          activation_checkpointing=cfg.parallel.activation_checkpointing,
                                          selective_recompute=self._replays_attention(engine.module))
        peak = peak_tflops(cfg.precision.dtype, cfg.logging.peak_tflops)
        self.stop.install()
        # a window is the steps since the last log line; time spent evaluating and saving inside it is left out
        window_start, window_steps, window_paused, rates = time.perf_counter(), 0, 0.0, []
        window_wait, waited, timed = it.wait_s, 0.0, 0.0
        window_losses: list[float] = []  # the logged loss is the window's mean, as Megatron-LM's and NeoX's
        try:
            while step < cfg.optim.train_steps:
                lr = engine.get_lr()[0]
                loss, norm, skipped = step_fn(engine, it, sampler, step, result)
                self._count_skipped(skipped, loss, norm, step + 1, result)
                step += 1
                window_steps += 1
                result.losses[step] = loss
                result.grad_norms[step] = norm
                if math.isfinite(loss):  # a skipped step's non-finite loss is counted in `skipped`, not averaged
                    window_losses.append(loss)
                if step % cfg.logging.interval == 0 or step == cfg.optim.train_steps:
                    elapsed = time.perf_counter() - window_start - window_paused
                    per_iter = elapsed / window_steps
                    wait = it.wait_s - window_wait  # this rank's time blocked in next(loader) in the window
                    waited, timed = waited + wait, timed + elapsed
                    tflops = flops_step / per_iter / ctx.world_size / 1e12
                    rates.append(lay.global_batch_size * seq / per_iter)
                    writer.log_train(step, cfg.optim.train_steps, {
                        "consumed_samples": sampler.consumed_samples,
                        "consumed_tokens": sampler.consumed_samples * seq, "lr": lr,
                        "loss": sum(window_losses) / len(window_losses) if window_losses else loss,
                        "grad_norm": norm, "loss_scale": loss_scale(engine.optimizer),
                        "skipped": result.skipped_steps, "dropped": result.skipped_micro_batches,
                        "ms_per_iter": 1000 * per_iter, "data_wait_ms": 1000 * wait / window_steps,
                        "data_wait_share": wait / elapsed if elapsed > 0 else 0.0,
                        "tokens_per_s": rates[-1], "tflops": tflops,
                        "mfu": None if peak is None else tflops / peak,
                        "hfu": None if peak is None else tflops * hardware_flops_step / flops_step / peak})
                    window_start, window_steps, window_paused, window_wait = time.perf_counter(), 0, 0.0, it.wait_s
                    window_losses = []
                if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0 and splits.valid is not None:
                    paused_at = time.perf_counter()
                    loss_v = self.evaluate(engine, splits.valid, cfg.logging.eval_iters)
                    result.eval_losses.setdefault("valid", {})[step] = loss_v
                    writer.log_eval(step, "valid", loss_v)
                    window_paused += time.perf_counter() - paused_at
                signal_now = self._all_max(1.0 if self.stop.requested else 0.0) > 0
                exit_now = ck.exit_at_step is not None and step == ck.exit_at_step
                if signal_now or exit_now:
                    result.stopped = "signal" if signal_now else "exit_at_step"
                    break
                if ck.dir and ck.interval and step % ck.interval == 0 and step < cfg.optim.train_steps:
                    paused_at = time.perf_counter()
                    result.checkpoint = self._save(engine, step, sampler, tokenizer_sha)
                    window_paused += time.perf_counter() - paused_at  # saving is not part of ms/iter
            result.step, result.consumed_samples = step, sampler.consumed_samples
            if ck.dir and (ck.save_final or result.stopped != "finished") and step != result.resumed_from:
                # (a resume with nothing to train leaves its checkpoint alone: saving the same step again would
                # rewrite, in place, the one `latest` names)
                result.checkpoint = self._save(engine, step, sampler, tokenizer_sha)
            if (result.stopped == "finished" and cfg.logging.eval_interval and splits.valid is not None
                    and step not in result.eval_losses.get("valid", {})):
                # the final weights are validated even when eval_interval does not divide train_steps (Megatron-LM
                # evaluates at the end too)
                loss_v = self.evaluate(engine, splits.valid, cfg.logging.eval_iters)
                result.eval_losses.setdefault("valid", {})[step] = loss_v
                writer.log_eval(step, "valid", loss_v)
            if result.stopped == "finished" and cfg.logging.test_iters and splits.test is not None:
                loss_t = self.evaluate(engine, splits.test, cfg.logging.test_iters)
                result.eval_losses.setdefault("test", {})[step] = loss_t
                writer.log_eval(step, "test", loss_t)
            if result.stopped == "signal":
                self.log(f"stopped by signal at iteration {step}; checkpoint {result.checkpoint}")
        finally:
            self.stop.restore()
            writer.close()
        result.tokens_per_s = sum(rates) / len(rates) if rates else None
        result.data_wait_share = waited / timed if timed > 0 else None
        self.engine = engine
        return result

    def _save_step0(self, engine, sampler, tokenizer_sha: Optional[str], result: TrainResult) -> TrainResult:
        """optim.train_steps=0: the initial weights as the checkpoint of step 0 (tagged, with the client state and
        `latest` as any other), no optimizer step."""
        result.checkpoint = self._save(engine, 0, sampler, tokenizer_sha)
        result.step, result.consumed_samples = 0, sampler.consumed_samples
        self.engine = engine
        self.log(f"optim.train_steps=0: wrote the initial weights as {result.checkpoint}; no training step")
        return result

    def _note_schedule_change(self, saved_optim: Optional[dict], step: int) -> None:
        """The lr schedule is the config's, also on resume (Megatron-LM refuses a changed one unless told which
        to use): say so when it differs from the checkpoint's, e.g. more train_steps stretch a cosine decay."""
        from megatron_mega.training.config import OptimConfig
        from megatron_mega.training.lr_schedule import lr_at

        if not isinstance(saved_optim, dict):
            return
        fields = ("train_steps", "lr", "min_lr", "warmup_steps", "decay", "decay_steps")
        current = self.config.optim
        changed = [f"optim.{name} {saved_optim.get(name)!r} -> {getattr(current, name)!r}" for name in fields
                   if name in saved_optim and saved_optim[name] != getattr(current, name)]
        if not changed:
            return
        try:
            before = lr_at(step, OptimConfig(**saved_optim))
        except (TypeError, ValueError):
            before = None
        now = lr_at(step, current)
        was = "" if before is None else f", was {before:.3E}"
        self.log(f"the lr schedule differs from the checkpoint's ({'; '.join(changed)}): it follows the config, "
                 f"lr at iteration {step} is {now:.3E}{was}")

    @staticmethod
    def _sync_lr(engine) -> None:
        """DeepSpeed restores the optimizer's param groups (their saved lr) after the schedule's step count, so a
        resumed run with a changed schedule would take one step at the old rate: set the schedule's rate now (the
        same number when nothing changed)."""
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.apply_rates()

    def _count_skipped(self, skipped: Optional[str], loss: float, norm: Optional[float], iteration: int,
                       result: TrainResult) -> None:
        """A skipped optimizer step is counted; K non-finite ones in a row stop the run (fp16 loss-scale overflows
        are counted but are part of finding the scale). A non-finite norm or loss on a step that was applied anyway
        would be a hole in `FiniteStepGuard`: refuse to go on with a broken model."""
        if skipped == "loss_scale":
            result.skipped_steps += 1
            self.log(f"iteration {iteration}: fp16 loss-scale overflow; optimizer step skipped, the scale lowered")
            return
        if not skipped:
            if (norm is not None and not math.isfinite(norm)) or not math.isfinite(loss):
                raise TrainingAborted(f"iteration {iteration}: a non-finite loss ({loss}) or gradient norm ({norm}) "
                                      f"reached an optimizer step that was applied; the weights are not trustworthy")
            self._bad_steps = 0
            return
        result.skipped_steps += 1
        self._bad_steps = getattr(self, "_bad_steps", 0) + 1
        what = "loss or gradients" if self.pipeline else "gradients"
        self.log(f"iteration {iteration}: non-finite {what} on some rank; optimizer step skipped "
                 f"({self._bad_steps} in a row)")
        limit = self.config.optim.max_nonfinite_in_a_row
        if self._bad_steps >= limit:
            raise TrainingAborted(
                f"{self._bad_steps} non-finite {what} in a row at iteration {iteration} (optim.max_nonfinite_in_a_row"
                f"={limit}): lower optim.lr, check the data, or resume from an earlier checkpoint")

    def _repair_optimizer_after_load(self, engine) -> None:
        """Undo two defects of DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load
        (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`), which made a ZeRO-3
        layout-change resume drift from the uninterrupted run (tiny config, 2 ranks -> 1, and even 2 -> 2 through the
        universal checkpoint: +2.6e-4 in the loss one step after the resume, +1.3e-3 after two; the weights, Adam
        moments and step counts it loads are exact):
        - it stores ONE `step` tensor object in the state of every sub-group's flat fp32 partition; torch's AdamW
          increments `step` in place once per sub-group step, so with two sub-groups (our decay / no-decay groups)
          the second one saw step k+1 at step k, then k+3, k+5...: a wrong Adam bias correction. Each state gets
          its own copy here (a no-op for unshared steps, ZeRO-0/1/2).
        - it copies the hyperparameters of the saved group 0 into every group, so the no-decay group (biases,
          norms, EMA coefficients) came back with the matrices' weight decay. The groups' weight decay, betas and
          eps are set from the config here, as `param_groups` builds them; the lr is the schedule's (`_sync_lr`).
        """
        scheduler = engine.lr_scheduler
        optimizer = scheduler.optimizer if scheduler is not None else engine.optimizer
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        optim = self.config.optim
        wanted = self._group_decays  # set by _engine, which built these groups
        if len(optimizer.param_groups) != len(wanted):
            return
        for group, decay in zip(optimizer.param_groups, wanted):
            group["weight_decay"] = decay
            group["betas"] = tuple(optim.betas)
            group["eps"] = optim.eps

    def _seed(self, step: int) -> int:
        """Each rank's own seed for the generators from `step` on (dropout masks differ across ranks)."""
        return (self.config.seed * 1_000_003 + step * 9973 + self.context.rank) % (2 ** 31)

    def _reseed(self, step: int) -> None:
        seed = self._seed(step)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _save(self, engine, step: int, sampler, tokenizer_sha: Optional[str]) -> str:
        client = {"step": step, "consumed_samples": sampler.consumed_samples, "sampler": sampler.state_dict(),
                  "config": self.config.to_dict(), "tokenizer_sha256": tokenizer_sha,
                  "world_size": self.context.world_size, "layout": self._layout_dict(),
                  "weight_decay_rule": self.weight_decay_rule, "grad_accum_dtype": self._grad_accum_dtype}
        folder = checkpointing.save(engine, self.config.checkpoint.dir, step, client, self.context.rank,
                                    self.config.checkpoint.keep_last)
        self.log(f"saved checkpoint {folder}")
        return folder


def run_training(config: TrainConfig, print_fn=print, trainer_cls=Trainer) -> TrainResult:
    """Set up the process group from the launcher's environment and train."""
    from megatron_mega.training.distributed import init_distributed

    config.layout(_world_size_from_env())  # refuse a bad layout before DeepSpeed starts
    context = init_distributed(config.parallel.timeout_s, config.parallel.cpu_shm_allreduce)
    return trainer_cls(config, context, print_fn=print_fn).train()


def _world_size_from_env() -> int:
    from megatron_mega.training.distributed import env_context

    return env_context()[0].world_size
