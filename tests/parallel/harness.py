"""A real multi-process DeepSpeed world on CPU (gloo) for the pipeline tests, and the plain reference."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket

import torch
import torch.multiprocessing as mp

from megatron_mega import MegaConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, threads: int, target, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)
    import deepspeed

    from megatron_mega.parallel import disable_shm_comm

    disable_shm_comm()
    # a missed collective fails in seconds instead of hanging
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    try:
        target(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


# The workers fork from a server process that imported these once (and never ran a parallel region, so forking
# it is safe): a world then starts in ~0.5 s instead of ~5 s of imports per process with "spawn".
_PRELOAD = ["torch", "deepspeed", "megatron_mega.parallel", "tests.parallel.harness"]


def run_world(world_size: int, target, *args) -> None:
    """target(rank, *args) in `world_size` processes; 4 processes on 2 cores need one thread each."""
    threads = 1 if world_size > 2 else max(1, (os.cpu_count() or 2) // world_size)
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    mp.start_processes(_entry, args=(world_size, free_port(), threads, target, args), nprocs=world_size,
                       join=True, start_method="forkserver")


def causal_batches(steps: int, micro_batches: int, batch: int, length: int, vocab: int, seed: int = 0):
    """steps x micro_batches of ((input_ids,), targets): next-token targets, aligned, -100 at the end and at a
    few random positions."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            ids = torch.randint(3, vocab, (batch, length), generator=generator)
            targets = torch.full_like(ids, -100)
            targets[:, :-1] = ids[:, 1:]
            targets[torch.rand(ids.shape, generator=generator) < 0.1] = -100
            step.append(((ids,), targets))
        out.append(step)
    return out


def padded_mlm_batches(steps: int, micro_batches: int, batch: int, length: int, vocab: int, seed: int = 0):
    """steps x micro_batches of ((input_ids, attention_mask), targets): ~30% of the real positions labelled, rows
    right-padded to random lengths (pad id 1, mask 0, no targets)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(micro_batches):
            ids = torch.randint(3, vocab, (batch, length), generator=generator)
            mask = torch.ones_like(ids)
            for row in range(batch):
                mask[row, int(torch.randint(length // 2, length + 1, (), generator=generator)):] = 0
            ids[mask == 0] = 1
            targets = ids.clone()
            targets[(torch.rand(ids.shape, generator=generator) > 0.3) | (mask == 0)] = -100
            step.append(((ids, mask), targets))
        out.append(step)
    return out


def train_plain(config: MegaConfig, objective: str, seed: int, batches, lr: float, clip: float = 0.0):
    """The reference: the plain model in one process, AdamW, the micro-batches of a step averaged."""
    from megatron_mega.parallel import plain_model

    model = plain_model(config, objective, seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in batches:
        total = 0.0
        for inputs, targets in step:
            mask = inputs[1] if len(inputs) > 1 else None
            loss = model.lm_loss(model.mega(inputs[0], attention_mask=mask).last_hidden_state, targets)
            (loss / len(step)).backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / len(step))
    return initial, losses, model.state_dict()


def train_pipeline(rank: int, config: MegaConfig, objective: str, seed: int, num_stages: int, zero_stage: int,
                   batches, lr: float, clip: float, checkpoint_interval: int, out_path: str,
                   checkpoint_dir: str) -> None:
    """Worker: the pipeline engine on the same batches; rank 0 saves losses and plain states to out_path."""
    import deepspeed

    from megatron_mega.parallel import build_pipeline_module, to_plain_model

    pipe = build_pipeline_module(config, num_stages, objective=objective, seed=seed,
                                 activation_checkpoint_interval=checkpoint_interval)
    initial = to_plain_model(pipe)
    initial = None if initial is None else {k: v.clone() for k, v in initial.state_dict().items()}
    dp = pipe.mpu().get_data_parallel_world_size()
    dp_rank = pipe.mpu().get_data_parallel_rank()
    gas = len(batches[0]) // dp
    ds_config = {
        "train_micro_batch_size_per_gpu": batches[0][0][1].shape[0],
        "gradient_accumulation_steps": gas,
        "train_batch_size": batches[0][0][1].shape[0] * gas * dp,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=lr)
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config)
    checkpointed = list(pipe.is_checkpointable_results)  # per chunk of activation_checkpoint_interval layers
    losses, norms = [], []
    for step in batches:
        mine = step[dp_rank * gas:(dp_rank + 1) * gas]
        loss = engine.train_batch(data_iter=iter(mine))
        losses.append(float(loss))
        norms.append(engine.get_global_grad_norm())
    final = to_plain_model(pipe)
    engine.save_checkpoint(checkpoint_dir, tag="last")
    torch.distributed.barrier()
    if rank == 0:
        torch.save({"initial": initial, "losses": losses, "final": final.state_dict(), "checkpointed": checkpointed,
                    "grad_norms": norms},
                   out_path)
