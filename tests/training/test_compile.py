"""parallel.compile_blocks: the trainer compiles every MEGA block before DeepSpeed wraps the model, and training
through the compiled blocks gives the eager losses. One process (the plain path), tiny config, few steps: the first
compiled step costs about a minute of CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from megatron_mega.model.block import MegaBlock
from megatron_mega.training.trainer import Trainer
from tests.training import world
from tests.training.test_train_world import job, losses

STEPS = dict(optim__train_steps=3, optim__global_batch_size=4, optim__micro_batch_size=2)


class CompileWatchTrainer(Trainer):
    """After training, records whether each MEGA block of the engine's module is compiled, and how many graphs
    dynamo produced in this process."""

    def train(self):
        import torch._dynamo.utils

        result = super().train()
        result.compiled = [block._compiled_call_impl is not None
                           for block in self.engine.module.modules() if isinstance(block, MegaBlock)]
        result.dynamo_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        return result


def _worker(rank, world_size, port, jobs, out_dir):
    # world's worker looks trainers up by name in its own module, imported afresh in the spawned process
    world.TRAINERS["compile_watch"] = CompileWatchTrainer
    world._worker(rank, world_size, port, jobs, out_dir)


def test_compiled_blocks_train_as_the_eager_model(tiny_dict, tmp_path):
    # tiny.yaml has no dropout, so eager and compiled runs draw nothing random and must agree; activation
    # checkpointing on the compiled run: recomputing through a compiled block must give the same gradients
    assert all(tiny_dict["model"][k] == 0.0 for k in tiny_dict["model"] if k.endswith("dropout_prob"))
    jobs = [job(tiny_dict, "compile_watch", **STEPS),
            job(tiny_dict, "compile_watch", parallel__compile_blocks=True, parallel__activation_checkpointing=True,
                **STEPS)]
    mp.spawn(_worker, args=(1, world.free_port(), jobs, str(tmp_path)), nprocs=1, join=True)
    eager, compiled = (json.load(open(os.path.join(tmp_path, f"job{i}-rank0.json"))) for i in range(2))

    assert eager["compiled"] == [False, False] and eager["dynamo_graphs"] == 0
    assert compiled["compiled"] == [True, True] and compiled["dynamo_graphs"] > 0
    assert any("2 MEGA block(s) compiled" in line for line in compiled["lines"])
    assert len(losses(compiled)) == 3
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-6, abs=0)
