"""DeepSpeed checkpoints plus the trainer's own state, resumable exactly.

    <dir>/step00000040/          DeepSpeed's files (model, optimizer partitions, lr schedule) + client state
    <dir>/step00000040/rng-rank00003.pt   each rank's RNG states (python, numpy, torch)
    <dir>/latest                 the newest complete tag (the file DeepSpeed's load_checkpoint reads)

Every rank writes its part, then all wait at a barrier; only then does rank 0 move `latest` (atomically) and delete
checkpoints beyond `keep_last`. A run killed while saving leaves `latest` at the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mega.atomic_io import atomic_write_text

logger = logging.getLogger(__name__)
LATEST = "latest"
TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_tag(directory: str) -> Optional[str]:
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip() or None


def save(engine, directory: str, step: int, client_state: dict[str, Any], rank: int, keep_last: int) -> str:
    tag = tag_for(step)
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    folder = os.path.join(directory, tag)
    os.makedirs(folder, exist_ok=True)
    torch.save(rng_state(), os.path.join(folder, f"rng-rank{rank:05d}.pt"))
    dist.barrier()  # every rank has written its part
    if rank == 0:
        atomic_write_text(os.path.join(directory, LATEST), tag + "\n")
        if keep_last > 0:
            _prune(directory, keep_last)
    dist.barrier()
    return folder


def _prune(directory: str, keep_last: int) -> None:
    tags = sorted(name for name in os.listdir(directory)
                  if name.startswith(TAG_PREFIX) and os.path.isdir(os.path.join(directory, name)))
    for old in tags[:-keep_last]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)


def load(engine, directory: str, rank: int, tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Load the checkpoint `tag` (default: `latest`) into the engine; returns the client state (None: nothing to
    load). Restores this rank's RNG state when the checkpoint has one for this rank."""
    tag = tag or latest_tag(directory)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"{directory}/{tag}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(directory, tag, f"rng-rank{rank:05d}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("%s: no RNG state for rank %d (the layout changed); RNG reseeded", rng_file, rank)
        client["_rng_missing"] = True
    return client
