"""Run training jobs in a real multi-process gloo world (torch.multiprocessing.spawn), one after another in the
same processes (DeepSpeed's process group is set up once: the import and init cost is paid once per world).

Each job is {"config": dict, "trainer": name, "kwargs": {...}}; rank 0 (or every rank, with "all_ranks") writes
the TrainResult (or the abort message; with "raises", the error the job raised) and the log lines it printed as
JSON."""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import socket

import torch
import torch.multiprocessing as mp

from megatron_mega.training.config import TrainConfig
from megatron_mega.training.distributed import shutdown_distributed
from megatron_mega.training.trainer import Trainer, TrainingAborted, run_training


class NanTrainer(Trainer):
    """Returns a NaN loss for the micro-batches listed as (step, micro index, rank)."""

    def __init__(self, *args, nan_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at = {tuple(x) for x in nan_at}
        self.calls: dict[int, int] = {}

    def compute_loss(self, engine, batch, step):
        loss = super().compute_loss(engine, batch, step)
        index = self.calls.get(step, 0)
        self.calls[step] = index + 1
        if (step, index, self.context.rank) in self.nan_at:
            loss = loss * float("nan")
        return loss


class SignalTrainer(Trainer):
    """Sends itself `signum` during step `step` on rank `rank`, as SLURM would before preemption."""

    def __init__(self, *args, signal_at=(0, 0), signum=int(signal.SIGTERM), **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_at, self.signum, self.sent = tuple(signal_at), signum, False

    def compute_loss(self, engine, batch, step):
        if not self.sent and (step, self.context.rank) == self.signal_at:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return super().compute_loss(engine, batch, step)


class SlowTrainer(Trainer):
    """Every micro-batch takes at least `sleep_s` longer: a known lower bound for the logged ms/iter."""

    def __init__(self, *args, sleep_s=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.sleep_s = sleep_s

    def compute_loss(self, engine, batch, step):
        import time

        time.sleep(self.sleep_s)
        return super().compute_loss(engine, batch, step)


class HangTrainer(Trainer):
    """Rank `rank` stops taking part (sleeps) at step `step`: the others must fail on the collective timeout."""

    def __init__(self, *args, hang_at=(1, 1), **kwargs):
        super().__init__(*args, **kwargs)
        self.hang_at = tuple(hang_at)

    def compute_loss(self, engine, batch, step):
        if (step, self.context.rank) == self.hang_at:
            import time

            time.sleep(3600)
        return super().compute_loss(engine, batch, step)


class _PoisonGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite); the gradient flowing back is multiplied by inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _weights(engine) -> list[torch.Tensor]:
    """This rank's full copy of its module's weights (ZeRO-3: gathered)."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


class WatchedTrainer(Trainer):
    """Keeps the weights at the start of every step; the result gets `changed`: step (1-based) -> whether that
    optimizer step changed any weight on any rank (torch.equal, every tensor)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots: dict[int, list[torch.Tensor]] = {}

    def _watch(self, engine, step):
        if step not in self.snapshots:
            self.snapshots[step] = _weights(engine)

    def train(self):
        result = super().train()
        self._watch(self.engine, result.step)
        changed = {}
        for step in sorted(self.snapshots):
            if step + 1 in self.snapshots:
                local = any(not torch.equal(a, b) for a, b in zip(self.snapshots[step], self.snapshots[step + 1]))
                changed[step + 1] = self._all_max(1.0 if local else 0.0) > 0
        result.changed = changed
        return result


class GradNanTrainer(WatchedTrainer):
    """Finite losses, but the gradients of the micro-batches listed as (step, micro index, rank) are made inf/NaN."""

    def __init__(self, *args, nan_grad_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_grad_at = {tuple(x) for x in nan_grad_at}
        self.calls: dict[int, int] = {}

    def compute_loss(self, engine, batch, step):
        index = self.calls.get(step, 0)
        self.calls[step] = index + 1
        if index == 0:
            self._watch(engine, step)
        loss = super().compute_loss(engine, batch, step)
        if (step, index, self.context.rank) in self.nan_grad_at:
            loss = _PoisonGrad.apply(loss)
        return loss


class PipeInfTrainer(WatchedTrainer):
    """Pipeline path: the last stage's loss of the first micro-batch of the listed steps (0-based) is inf."""

    def __init__(self, *args, inf_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.inf_at = set(inf_at)

    def _pipeline_step(self, engine, it, sampler, step, result):
        self._watch(engine, step)
        module = engine.module
        if step not in self.inf_at or not engine.is_last_stage():
            return super()._pipeline_step(engine, it, sampler, step, result)
        original, calls = module.loss_fn, []

        def poisoned(outputs, labels):
            loss = original(outputs, labels)
            calls.append(1)
            return loss * float("inf") if len(calls) == 1 else loss

        module.loss_fn = poisoned
        try:
            return super()._pipeline_step(engine, it, sampler, step, result)
        finally:
            module.loss_fn = original


class FinalStateTrainer(Trainer):
    """After training, rank 0 saves the live engine's module state (ZeRO-3: gathered) to `path`: the weights the
    training process ends with, to compare a converted checkpoint against."""

    def __init__(self, *args, path=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path

    def train(self):
        result = super().train()
        names = [name for name, _ in self.engine.module.named_parameters()]
        weights = _weights(self.engine)
        if self.context.rank == 0:
            torch.save(dict(zip(names, weights)), self.path)
        return result


class OlderCodeTrainer(Trainer):
    """Trains as the code did before trainer_state.json recorded the weight decay rule and the gradient
    accumulation dtype: every tensor of rank >= 2 decayed, gradients accumulated in the model's dtype (bf16: with
    ZeRO-1 DeepSpeedZeroOptimizer, not BF16_Optimizer), and checkpoints without either field."""

    def _engine(self, model, universal=False):
        self.weight_decay_rule = "rank2"
        return super()._engine(model, universal)

    def _ds_config(self):
        ds = super()._ds_config()
        ds.pop("data_types", None)
        return ds

    def _save(self, engine, step, sampler, tokenizer_sha):
        from megatron_mega.training import checkpointing

        folder = super()._save(engine, step, sampler, tokenizer_sha)
        if self.context.rank == 0:
            path = os.path.join(folder, checkpointing.STATE_FILE)
            with open(path, encoding="utf-8") as fh:
                state = json.load(fh)
            state.pop("weight_decay_rule")
            state.pop("grad_accum_dtype")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(state, fh)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return folder


class DamagedOptimizerTrainer(Trainer):
    """Resumes after rank 0 cut its checkpoint's first optimizer file in half (a copy that went wrong)."""

    def train(self):
        from megatron_mega.training import checkpointing

        ck = self.config.checkpoint.dir
        if self.context.rank == 0:
            folder = os.path.join(ck, checkpointing.latest_tag(ck))
            path = os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith("optim_states.pt"))[0])
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return super().train()


TRAINERS = {"plain": Trainer, "older_code": OlderCodeTrainer, "damaged_optimizer": DamagedOptimizerTrainer,
            "final_state": FinalStateTrainer, "nan": NanTrainer, "signal": SignalTrainer, "hang": HangTrainer,
            "slow": SlowTrainer, "watched": WatchedTrainer, "nan_grad": GradNanTrainer, "pipe_inf": PipeInfTrainer}


def _worker(rank: int, world_size: int, port: int, jobs: list, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    for i, job in enumerate(jobs):
        config = TrainConfig.from_dict(copy.deepcopy(job["config"]))
        lines: list[str] = []
        trainer = functools.partial(TRAINERS[job.get("trainer", "plain")], **job.get("kwargs", {}))
        try:
            out = run_training(config, print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))),
                               trainer_cls=trainer).__dict__
        except TrainingAborted as err:
            out = {"aborted": str(err)}
        except Exception as err:  # a job that expects an error ("raises") records it; any other error fails the run
            if not job.get("raises"):
                raise
            out = {"raised": f"{type(err).__name__}: {err}"}
        out["lines"] = lines
        if rank == 0 or job.get("all_ranks"):
            with open(os.path.join(out_dir, f"job{i}-rank{rank}.json"), "w") as fh:
                json.dump(out, fh, default=str)
    shutdown_distributed()  # as the CLI does: an exit with gloo's threads alive can abort the process


def start_jobs(world_size: int, jobs: list, out_dir: str) -> list:
    """The processes of a world, started and not waited for (for tests that watch them fail)."""
    os.makedirs(out_dir, exist_ok=True)
    port = free_port()
    context = mp.get_context("spawn")
    procs = [context.Process(target=_worker, args=(rank, world_size, port, jobs, out_dir), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(world_size: int, jobs: list, out_dir: str) -> list[dict]:
    """Rank 0's result of each job (keys of TrainResult; `losses` keyed by str(step))."""
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(world_size, free_port(), jobs, out_dir), nprocs=world_size, join=True)
    results = []
    for i in range(len(jobs)):
        with open(os.path.join(out_dir, f"job{i}-rank0.json")) as fh:
            results.append(json.load(fh))
    return results
