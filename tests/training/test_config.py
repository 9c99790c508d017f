"""Config loading, cross-field rules, the generated DeepSpeed JSON, the lr schedule, the FLOP count, --dry-run."""

from __future__ import annotations

import copy
import io
import os
import re

import pytest
import torch

from megatron_mega.model.config import MegaConfig
from megatron_mega.training.commands import dry_run, main
from megatron_mega.training.config import OptimConfig, TrainConfig, TrainConfigError, load_train_config
from megatron_mega.training.ds_config import build_ds_config
from megatron_mega.training.flops import forward_flops, train_flops
from megatron_mega.training.lr_schedule import lr_at

from tests.training.conftest import ROOT, TINY

CONFIGS = ["tiny.yaml", "demo.yaml", "wikitext103.yaml", "enwik8.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    config = load_train_config(f"{ROOT}/configs/train/{name}")
    assert config.layout(config.parallel.pipeline_stages).global_batch_size == config.optim.global_batch_size


def test_overrides_and_round_trip():
    config = load_train_config(TINY, ["optim.lr=1e-4", "parallel.zero_stage=2", "model.hidden_size=48"])
    assert config.optim.lr == 1e-4 and config.parallel.zero_stage == 2 and config.model.hidden_size == 48
    again = TrainConfig.from_dict(copy.deepcopy(config.to_dict()))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "ZeRO-2 cannot be combined with pipeline"),
    (["optim.global_batch_size=5"], "not a multiple of optim.micro_batch_size"),
    (["objective=mlm"], "model.is_decoder"),
    (["data.objective=mlm"], "data.objective"),
    (["optim.lr_max=1"], "optim.lr_max: unknown field"),
    (["model.hidden_sise=3"], "model.hidden_sise: unknown MegaConfig field"),
    (["optim.decay=step"], "optim.decay"),
    (["checkpoint.init_from_hf=a", "checkpoint.init_from_checkpoint=b"], "init_from_checkpoint: give it or"),
    (["optim.warmup_steps=10", "optim.decay_steps=8"], "optim.decay_steps: 8 must be above optim.warmup_steps 10"),
    (["model.use_chunking=false", "data.seq_len=4096"], "exceeds model.max_positions"),
    (["bogus.x=1"], "bogus: unknown section"),
    (["optim.train_steps=0"], "optim.train_steps: 0 writes the initial weights as a step-0 checkpoint"),
    (["optim.train_steps=-1"], "optim.train_steps: must be a positive integer"),
    (["parallel.selective_recompute=2"], "parallel.selective_recompute: expected true or false"),
    (["logging.eval_interval=2", "logging.eval_iters=0"], "logging.eval_iters: must be >= 1 when"),
    # DeepSpeed's ZeRO-0 pipeline: clipping by stage 0's norm only (fp32), the head bias's gradient cleared (bf16)
    (["parallel.pipeline_stages=2", "parallel.zero_stage=0"], r"pipeline stages need ZeRO-1 here"),
    (["logging.peak_tflops=-1"], "logging.peak_tflops: must be > 0 or null"),
    (["precision.initial_loss_scale_power=abc"], "precision.initial_loss_scale_power: must be an integer"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(TINY, overrides)


def test_zero_train_steps_means_a_step0_checkpoint():
    config = load_train_config(TINY, ["optim.train_steps=0", "checkpoint.dir=/tmp/x"])
    assert config.optim.train_steps == 0 and config.checkpoint.dir == "/tmp/x"


def test_layout_checks_the_batch_arithmetic():
    config = load_train_config(TINY, ["optim.global_batch_size=8", "optim.micro_batch_size=2"])
    layout = config.layout(2)
    assert (layout.data_parallel_size, layout.grad_accum) == (2, 2)
    with pytest.raises(TrainConfigError, match="global_batch_size: 8 is not a multiple"):
        config.layout(3)
    piped = load_train_config(TINY, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"])
    with pytest.raises(TrainConfigError, match="does not divide the world size 3"):
        piped.layout(3)


def test_ds_config_from_config_and_user_json():
    config = load_train_config(TINY, ["parallel.zero_stage=2", "precision.dtype=bf16", "optim.clip_grad=0.25",
                                      "deepspeed={zero_optimization: {overlap_comm: true}, "
                                      "wall_clock_breakdown: true}"])
    ds = build_ds_config(config, world_size=2)
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.25
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["wall_clock_breakdown"]
    bad = load_train_config(TINY, ["deepspeed={train_batch_size: 64}"])
    with pytest.raises(TrainConfigError, match="deepspeed.train_batch_size: 64 disagrees"):
        build_ds_config(bad, 2)
    bad = load_train_config(TINY, ["deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(TrainConfigError, match="disagrees with parallel.zero_stage"):
        build_ds_config(bad, 2)
    # keys the config owns: DeepSpeed would have trained in bf16 (or clipped at 0.5) while the trainer, the saved
    # config and MFU said otherwise
    for override, message in (("{bf16: {enabled: true}}", r"deepspeed.bf16.enabled: True disagrees with "
                                                          r"precision.dtype fp32"),
                              ("{gradient_clipping: 0.5}", r"deepspeed.gradient_clipping: 0.5 disagrees with "
                                                           r"optim.clip_grad 1.0"),
                              ("{zero_optimization: 3}", r"deepspeed.zero_optimization: expected a mapping, got 3")):
        with pytest.raises(TrainConfigError, match=message):
            build_ds_config(load_train_config(TINY, [f"deepspeed={override}"]), 2)
    same = load_train_config(TINY, ["deepspeed={gradient_clipping: 1.0, bf16: {enabled: false}}"])
    assert build_ds_config(same, 2)["gradient_clipping"] == 1.0


def test_bf16_gradients_accumulate_in_fp32_where_deepspeed_can():
    def accumulation(*overrides):
        return build_ds_config(load_train_config(TINY, list(overrides)), 2).get("data_types")

    for stage in (1, 2, 3):
        assert accumulation("precision.dtype=bf16", f"parallel.zero_stage={stage}") == {"grad_accum_dtype": "fp32"}
        ds = build_ds_config(load_train_config(TINY, ["precision.dtype=bf16", f"parallel.zero_stage={stage}"]), 2)
        assert ds["communication_data_type"] == "fp32"  # DeepSpeed reduces in the model's dtype otherwise
    assert accumulation("precision.dtype=bf16", "parallel.zero_stage=0") is None  # DeepSpeed has no such mode
    # nor on a pipeline: BF16_Optimizer's pipeline path drops the LM head bias's gradient
    pipe = ("precision.dtype=bf16", "parallel.zero_stage=1", "parallel.pipeline_stages=2")
    assert accumulation(*pipe) is None
    with pytest.raises(TrainConfigError, match="grad_accum_dtype: fp32 with bf16 pipeline stages runs DeepSpeed"):
        accumulation(*pipe, "deepspeed={data_types: {grad_accum_dtype: float32}}")
    assert accumulation("parallel.zero_stage=1") is None and accumulation("precision.dtype=fp16",
                                                                          "parallel.zero_stage=1") is None
    assert accumulation("precision.dtype=bf16", "parallel.zero_stage=1",
                        "deepspeed={data_types: {grad_accum_dtype: bf16}}") == {"grad_accum_dtype": "bf16"}


def test_lr_schedule():
    cos = OptimConfig(train_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine")
    assert [lr_at(s, cos) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, cos) == pytest.approx(0.55)   # half way through the decay: midpoint of lr and min_lr
    assert lr_at(110, cos) == pytest.approx(0.1) and lr_at(500, cos) == pytest.approx(0.1)
    lin = OptimConfig(train_steps=110, lr=1.0, min_lr=0.0, warmup_steps=10, decay="linear")
    assert lr_at(35, lin) == pytest.approx(0.75)


def test_a_resumed_bf16_run_keeps_its_gradient_accumulation_dtype_and_only_that():
    from megatron_mega.training.ds_config import accumulation_to_keep

    def ds(*overrides):
        return build_ds_config(load_train_config(TINY, list(overrides)), 2)

    bf16_zero1 = ds("precision.dtype=bf16", "parallel.zero_stage=1")
    legacy = {"config": {"precision": {"dtype": "bf16"}}}  # no grad_accum_dtype: saved before it was recorded
    assert accumulation_to_keep(legacy, bf16_zero1, universal=False) == "bf16"
    assert accumulation_to_keep(legacy, bf16_zero1, universal=True) is None  # loads parameter by parameter
    assert accumulation_to_keep({**legacy, "grad_accum_dtype": "fp32"}, bf16_zero1, universal=False) is None
    assert accumulation_to_keep(None, bf16_zero1, universal=False) is None
    # another precision, saved or now, takes the config's (fp16 gradients under bf16 weights, no loss scale)
    assert accumulation_to_keep({"config": {"precision": {"dtype": "fp16"}}}, bf16_zero1, universal=False) is None
    fp32 = ds("parallel.zero_stage=1")
    assert accumulation_to_keep({**legacy, "grad_accum_dtype": "bf16"}, fp32, universal=False) is None
    # the user's own DeepSpeed JSON of a run saved before the field existed
    asked = {"config": {"precision": {"dtype": "bf16"}, "deepspeed": {"data_types": {"grad_accum_dtype": "fp32"}}}}
    assert accumulation_to_keep(asked, bf16_zero1, universal=False) is None


def test_the_logged_loss_scale_is_the_optimizers():
    """DeepSpeed's fp16 optimizers for ZeRO-0 name their scale `loss_scale` (a property), its ZeRO ones
    `cur_scale`: the log read `cur_scale` only and showed 1 for fp16 with ZeRO-0."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from megatron_mega.training.trainer import loss_scale

    assert isinstance(FP16_Optimizer.loss_scale, property) and not hasattr(FP16_Optimizer, "cur_scale")
    assert isinstance(FP16_UnfusedOptimizer.loss_scale, property)
    assert isinstance(DeepSpeedZeroOptimizer.cur_scale, property)
    assert loss_scale(SimpleNamespace(loss_scale=65536.0)) == 65536.0
    assert loss_scale(SimpleNamespace(cur_scale=1024.0)) == 1024.0
    assert loss_scale(SimpleNamespace(loss_scale=None)) == 1.0 and loss_scale(object()) == 1.0


def test_a_resumed_schedule_sets_the_rates_without_torchs_warning(recwarn):
    import torch

    from megatron_mega.training.lr_schedule import WarmupDecay

    optim = OptimConfig(train_steps=20, lr=1.0, warmup_steps=4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    schedule = WarmupDecay(optimizer, optim)
    schedule.load_state_dict({"last_epoch": 7, "_step_count": 8})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(7, optim))
    assert not [w for w in recwarn if "get_last_lr" in str(w.message)]


def test_the_training_sample_count_does_not_depend_on_the_layout():
    """It is part of the index cache's key: a resume on another data-parallel size or micro-batch rebuilt the
    same indices (minutes, and gigabytes of duplicate files, at a billion samples)."""
    from megatron_mega.training.trainer import samples_wanted

    counts = []
    for world, micro in ((1, 2), (2, 2), (4, 1)):
        config = load_train_config(TINY, [f"optim.micro_batch_size={micro}"])
        counts.append(samples_wanted(config, config.layout(world))["train"])
    config = load_train_config(TINY)
    assert counts == [counts[0]] * 3 and counts[0] >= config.optim.train_steps * config.optim.global_batch_size


def test_flop_count_against_a_hand_count():
    config = MegaConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, intermediate_size=16,
                        shared_representation_size=4, ema_projection_size=2, nffn_hidden_size=12, use_chunking=True,
                        chunk_size=4, is_decoder=True, bidirectional=False)
    # one layer, one token, counted by hand:
    #   v_proj 2*8*16=256, mx_proj 2*8*(4+16+16)=576, h_proj 2*16*8=256, EMA 6*8*2=96,
    #   QK^T 2*4(chunk)*4=32, AV 2*4*16=128, NFFN 2*8*12 + 2*12*8 = 384      -> 1728
    # head per token: dense 2*8*8=128 + projection 2*8*100=1600               -> 1728
    # batch 3 x 10 tokens, 2 layers: 30*(2*1728) + 30*1728
    assert forward_flops(config, batch=3, seq_len=10) == 30 * 2 * 1728 + 30 * 1728
    assert train_flops(config, 3, 10) == 3 * (30 * 2 * 1728 + 30 * 1728)
    assert train_flops(config, 3, 10, activation_checkpointing=True) == 3 * 30 * 3 * 1728 + 30 * 2 * 1728
    assert forward_flops(config, 3, 10, predicted_tokens=5) == 30 * 2 * 1728 + 5 * 1728
    # selective recomputation redoes QK^T in backward: 2 * 4 (chunk) * 4 (z) per token and layer
    assert train_flops(config, 3, 10, selective_recompute=True) == train_flops(config, 3, 10) + 30 * 2 * 32


@pytest.mark.parametrize("selective_recompute", [True, False], ids=["selective", "keep"])
def test_flop_count_agrees_with_the_dispatched_matmuls_at_the_gpu_anchor(monkeypatch, selective_recompute):
    """train_flops (the MFU of the trainer's logs and gpu_bench) against the FLOPs of every matrix multiply a bf16
    training step of the 241M GPU anchor dispatches, counted on fake tensors with CUDA's paths taken
    (benchmarks/gpu_cost_model.py). They differ only in the EMA: train_flops counts the model's, its recurrence
    (6 d N per token), where the step computes it by chunked matrix products of its own (model/chunked_ema.py,
    2 (T + 2N) per token and channel each way: an implementation's FLOPs, left out of the dispatched count here).
    That leaves 0.2% at these widths, where the recomputed query-key product is 0.5%."""
    monkeypatch.syspath_prepend(f"{ROOT}/benchmarks")
    import gpu_cost_model as cost

    case = cost.Case("ours", 4, 4096, 1024)
    one, layer = cost.eager_layers("ours", case, cost.Rates(), keep=not selective_recompute, by_line=True)

    def ema_flops(ops) -> float:
        return sum(op.flops for op in ops.values() if op.name.startswith("chunked_ema.py"))

    assert ema_flops(layer) > 0
    dispatched = cost.model_total(one, layer, 16, "flops") - ema_flops(one.ops) - 15 * ema_flops(layer)
    counted = train_flops(MegaConfig(**cost.mega_kwargs(case)), 4, 4096, selective_recompute=selective_recompute)
    assert dispatched == pytest.approx(counted, rel=2.5e-3)  # the selective term alone is 0.5%


@pytest.fixture
def on_pydoc(pydoc_dataset) -> list[str]:
    """Overrides pointing configs/train/tiny.yaml at the test corpus (a dry run opens its data)."""
    return [f"data.paths=[{pydoc_dataset['dataset']}]", f"tokenizer={pydoc_dataset['tokenizer']}"]


def test_dry_run_prints_config_json_and_counts(capsys, on_pydoc):
    out = io.StringIO()
    dry_run(load_train_config(TINY, ["parallel.zero_stage=1", *on_pydoc]), world_size=2, out=out)
    text = out.getvalue()
    assert '"stage": 1' in text and "parameters:" in text and "global batch 4 = micro 2 x accumulation 1" in text
    assert main(["--config", TINY, "--dry-run", "--world-size", "2", *on_pydoc]) == 0
    assert main(["--config", TINY, "parallel.pipeline_stages=2", "parallel.zero_stage=3", "--dry-run"]) == 2
    assert "ZeRO-3 cannot be combined" in capsys.readouterr().err
    # a negative world planned "accumulation -1"; --world-size without --dry-run was silently ignored
    assert main(["--config", TINY, "--dry-run", "--world-size", "-2"]) == 2
    assert "world size: must be at least 1, got -2" in capsys.readouterr().err
    assert main(["--config", TINY, "--world-size", "2"]) == 2
    assert "--world-size: only with --dry-run" in capsys.readouterr().err


def test_dry_run_opens_the_data_a_run_would_read(capsys, monkeypatch, on_pydoc, pydoc_dataset):
    """The tokenizer and datasets are opened and checked as a run does, without building an index, and each
    split's samples are set against the tokens it holds; a bad path or a model that does not fit the tokenizer is
    the only line printed, and exits 2."""
    from megatron_mega.data.documents import DocumentSource

    source = DocumentSource(pydoc_dataset["dataset"])
    assert main(["--config", TINY, "--dry-run", "--world-size", "1", *on_pydoc]) == 0
    text = capsys.readouterr().out
    assert f"tokenizer: {pydoc_dataset['tokenizer']} (sha256 " in text and "2,000 tokens)" in text
    assert (f"data.paths[0]: {pydoc_dataset['dataset']}: {source.num_documents:,} documents, "
            f"{source.token_count():,} tokens in 1 shard(s)") in text
    # tiny.yaml: 20 steps of 4 samples and the slack for dropped micro-batches (4 x 5 non-finite steps x 4)
    train = re.search(r"^train: 160 samples of 65 tokens from [\d,]+ documents, ([\d,]+) tokens \(~([\d.]+) epochs\)$",
                      text, re.M)
    assert train and float(train[2]) == pytest.approx(160 * 64 / int(train[1].replace(",", "")), rel=1e-2)
    assert "start: iteration 0, seeded weights (seed 1234); checkpoint.dir is null: nothing is saved" in text
    assert not os.path.exists(os.path.join(os.path.dirname(pydoc_dataset["dataset"]), "index-cache"))
    # data.verify_checksums: the run deals the shards' hashing over its processes; one dry-run process reads none
    import megatron_mega.data.manifest as manifest_module

    hashed = []
    real_sha256_file = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file",
                        lambda path, *a: hashed.append(path) or real_sha256_file(path, *a))
    assert main(["--config", TINY, "--dry-run", *on_pydoc, "data.verify_checksums=true"]) == 0
    assert hashed == [] and "data.verify_checksums: the run hashes every shard" in capsys.readouterr().out
    assert main(["--config", TINY, "--dry-run", *on_pydoc, "data.paths=[/nowhere/dataset]"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "/nowhere/dataset: neither a manifest" in err
    assert main(["--config", TINY, "--dry-run", *on_pydoc, "model.vocab_size=1000"]) == 2
    assert "model.vocab_size: 1000 is smaller than the tokenizer's 2000" in capsys.readouterr().err
    assert main(["--config", TINY, "--dry-run", *on_pydoc, "tokenizer=/nowhere/tokenizer"]) == 2
    assert "/nowhere/tokenizer" in capsys.readouterr().err


def test_add_commands_registers_train_on_a_parser(capsys, on_pydoc):
    import argparse

    from megatron_mega.training.commands import add_commands

    parser = argparse.ArgumentParser(prog="megatron-mega")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--config", TINY, "--dry-run", "--world-size", "1", "optim.lr=1e-4",
                              *on_pydoc])
    assert args.func(args) == 0
    assert "lr: 0.0001" in capsys.readouterr().out


def test_rank_and_world_from_launcher_environments():
    from megatron_mega.training.distributed import env_context

    ctx, missing = env_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                                "MASTER_PORT": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, missing) == (3, 4, 1, {})
    ctx, missing = env_context({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
                                "MASTER_ADDR": "node0", "SLURM_JOB_ID": "12345"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (5, 8, 1)
    assert missing == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                       "MASTER_PORT": str(20000 + 12345 % 20000)}
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        env_context({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"})
    ctx, missing = env_context({})
    assert (ctx.rank, ctx.world_size) == (0, 1) and missing["WORLD_SIZE"] == "1" and int(missing["MASTER_PORT"]) > 0


def test_shutdown_destroys_the_process_group(tmp_path):
    # a process leaving with a live gloo group aborted at exit in ~1 of 8 four-rank worlds here (SIGABRT,
    # "terminate called without an active exception"), none of 30 after destroying it: the CLI and the test
    # worlds shut down through this
    import torch.distributed as dist

    from megatron_mega.training.distributed import shutdown_distributed

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    dist.all_reduce(torch.ones(3))
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # nothing to destroy: no error


def test_rng_state_holds_the_gpus_generator(monkeypatch):
    # dropout draws its masks from the GPU's generator there: a checkpoint without it resumed every rank with the
    # same masks (the seed the model was built under). No GPU here: torch.cuda's RNG calls stand in
    import random

    from megatron_mega.training import checkpointing

    device = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: device.update(state=state.clone()))
    saved = checkpointing.rng_state()
    assert torch.equal(saved["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    expected = (random.random(), torch.rand(2))
    device["state"] = torch.tensor([9], dtype=torch.uint8)
    assert checkpointing.set_rng_state(saved) is True
    assert torch.equal(device["state"], saved["cuda"])
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])
    # a checkpoint written without a GPU restores the CPU's generators and says the GPU's needs a seed
    del saved["cuda"]
    assert checkpointing.set_rng_state(saved) is False
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_each_process_gets_its_own_gpu(monkeypatch):
    from megatron_mega.training.distributed import gpu_for

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert gpu_for(3, 8) == 3 and os.environ["LOCAL_RANK"] == "3"
    # srun --gpus-per-task=1: each task sees one GPU, and DeepSpeed must look for it at index 0 too
    assert gpu_for(3, 1) == 0 and os.environ["LOCAL_RANK"] == "0"
    with pytest.raises(RuntimeError, match="local rank 9 on a node where this process sees 8 GPUs"):
        gpu_for(9, 8)


def test_no_empty_parameter_group():
    """A pipeline stage holding only the embedding has no parameter without weight decay: an empty group, which
    DeepSpeed drops, made the lr schedule's group count disagree (ValueError in zip at the first step)."""
    from torch import nn

    from megatron_mega.training.weight_decay import param_groups

    groups = param_groups(nn.Embedding(10, 4), weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1] and len(groups[0]["params"]) == 1
    assert [g["weight_decay"] for g in param_groups(nn.Linear(4, 4), 0.1)] == [0.1, 0.0]


def test_deepspeeds_memory_reports_are_dropped_and_other_output_kept(capsys):
    """BF16_Optimizer prints five memory reports (three lines each) with print() while it is built: the real
    function's output is dropped, lines printed around it are kept."""
    from deepspeed.runtime.utils import see_memory_usage

    from megatron_mega.training.memory_reports import without_memory_reports

    with without_memory_reports():
        print("before")
        see_memory_usage("begin bf16_optimizer", force=True)
        see_memory_usage("before initializing group 0", force=True)
        print("MA is not a report by itself")
    out = capsys.readouterr().out
    assert "before\nMA is not a report by itself\n" in out
    assert "bf16_optimizer" not in out and "initializing group" not in out and "CPU Virtual Memory" not in out
