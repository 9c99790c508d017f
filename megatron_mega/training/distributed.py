"""Rank and world from the launcher's environment, and process-group setup with a timeout.

Recognised launchers: torchrun and the `deepspeed` launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), SLURM
`srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR must be exported by the batch script, or the job is on
one node), and a plain `python` (one process). The result is a small `DistContext` passed to whoever needs it;
nothing is kept in module globals.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_context(env: Optional[Mapping[str, str]] = None) -> tuple[DistContext, dict[str, str]]:
    """(context, the variables torch.distributed's env:// init still needs) from `env` (default os.environ)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        missing = {}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        if "MASTER_ADDR" not in env and nodes > 1:
            raise RuntimeError("SLURM job on several nodes: export MASTER_ADDR (the first node's address, e.g. "
                               "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) and MASTER_PORT")
        # every task must agree on the port, so it derives from the job id when not given
        port = env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        missing = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                   "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": port}
    else:
        rank, world, local = 0, 1, 0
        missing = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                   "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                   "MASTER_PORT": env.get("MASTER_PORT", str(_free_port()))}
    if not 0 <= rank < world or not 0 <= local < world:
        raise RuntimeError(f"inconsistent launcher environment: rank {rank}, local rank {local}, world {world}")
    return DistContext(rank, world, local), missing


def init_distributed(timeout_s: int, cpu_shm_allreduce: bool = False) -> DistContext:
    """Set up torch.distributed (gloo on CPU, DeepSpeed's accelerator backend otherwise) through DeepSpeed.

    On CPU, DeepSpeed builds its shared-memory all-reduce op (a ~64 s JIT compile on a fresh machine) inside
    `init_distributed`, even when torch.distributed is already initialised. Unless `cpu_shm_allreduce` is asked for,
    the op is marked incompatible first, so DeepSpeed uses plain gloo (measured: init 0.01 s instead of ~64 s).
    """
    context, missing = env_context()
    for key, value in missing.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    if _has_cuda():
        import torch

        torch.cuda.set_device(gpu_for(context.local_rank, torch.cuda.device_count()))  # before NCCL starts
    import deepspeed

    from megatron_mega.parallel.dist_setup import disable_shm_comm

    if not cpu_shm_allreduce:
        disable_shm_comm()
    # DeepSpeed 0.19.8 calls the collectives torch 2.13 renamed: a FutureWarning per process the user can do
    # nothing about, at the top of every training log
    for renamed in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=f".*torch.distributed.{renamed}` is deprecated",
                                category=FutureWarning)
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
    return context


def gpu_for(local_rank: int, visible: int) -> int:
    """The GPU of this process, one per process. A launcher that shows each task only its own GPU (srun
    --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank) leaves one device whatever the local rank: device 0, and
    LOCAL_RANK is set to it, since DeepSpeed picks its device by that variable (in init_process_group and
    deepspeed.initialize). More local ranks than GPUs otherwise is a launch mistake: two processes would share one
    GPU, which NCCL refuses later with a less clear message."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        os.environ["LOCAL_RANK"] = "0"
        return 0
    raise RuntimeError(f"local rank {local_rank} on a node where this process sees {visible} GPUs: launch one "
                       f"process per GPU (--nproc-per-node / --gpus-per-node), or give each task its own GPU")


def shutdown_distributed() -> None:
    """Destroy the process group after a normal end of training. A process that exits with it alive can abort in
    interpreter finalisation when gloo's worker threads still hold work ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489). Not after an error: other ranks may still be inside a collective,
    and destroying would wait on them (torchtitan does the same, pytorch/torchtitan#1342)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
