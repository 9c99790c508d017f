"""Process-level DeepSpeed setup for CPU runs."""

from __future__ import annotations


def disable_shm_comm() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory all-reduce op (`deepspeed_shm_comm`, ~64 s on a fresh
    machine) when it initialises torch.distributed: collectives then go through the process group (gloo on CPU).

    Call it in each process before `deepspeed.init_distributed` / `deepspeed.initialize`. DeepSpeed 0.19.8 builds
    the op in every TorchBackend (also when torch.distributed was initialised first) unless
    `deepspeed.ops.__compatible_ops__` marks it incompatible; that dict is computed once per process and kept,
    so marking it here is enough. Only CPU runs use the op; on GPUs this changes nothing.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
