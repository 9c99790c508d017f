"""Real DeepSpeed training on CPU with gloo, no mocks. The jobs of one world run in the same spawned processes
(module fixtures), so DeepSpeed's import and process-group setup are paid once per world."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import re
import signal

import pytest
import torch

from megatron_mega.training.config import OptimConfig
from megatron_mega.training.lr_schedule import lr_at
from tests.training.world import run_jobs


def job(base: dict, trainer: str = "plain", kwargs: dict | None = None, objective: str | None = None,
        **sections) -> dict:
    config = copy.deepcopy(base)
    if objective is not None:
        config["objective"] = objective
    for dotted, value in sections.items():
        if "__" not in dotted:  # a top-level field (deepspeed)
            config[dotted] = value
            continue
        section, key = dotted.split("__")
        config.setdefault(section, {})[key] = value
    return {"config": config, "trainer": trainer, "kwargs": kwargs or {}}


def losses(result: dict) -> list[float]:
    return [result["losses"][k] for k in sorted(result["losses"], key=int)]


# ---- one process ---------------------------------------------------------------------------------------------------

def hf_directory(model: dict, folder: str, seed: int = 7) -> str:
    """A Hugging Face directory of the config's causal model with weights no seed of ours produces."""
    from megatron_mega import MegaConfig, MegaForCausalLM

    torch.manual_seed(seed)
    source = MegaForCausalLM(MegaConfig(**model))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    source.save_pretrained(folder)
    return folder


def assert_checkpoint_holds(checkpoint_dir: str, hf_dir: str) -> None:
    """The training checkpoint's `latest` is step 0, written without an optimizer step, and its weights are the
    Hugging Face directory's, tensor for tensor."""
    from safetensors.torch import load_file

    from megatron_mega.convert.training_checkpoint import read_training_checkpoint

    weights = read_training_checkpoint(checkpoint_dir)
    assert weights.step == 0 and weights.consumed_samples == 0
    assert (open(os.path.join(checkpoint_dir, "latest")).read().strip()) == "step00000000"
    source = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert source and set(source) <= set(weights.state)
    for name, tensor in source.items():
        assert torch.equal(weights.state[name], tensor), name


DROPOUTS = {f"model__{name}": 0.1 for name in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                                "nffn_activation_dropout_prob")}
POISON_STEP = 1  # 0-based: the second optimizer step gets inf/NaN gradients from a finite loss


@pytest.fixture(scope="module")
def single(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    tb = str(out / "tb")
    hf = hf_directory(tiny_dict["model"], str(out / "hf"))
    poison = {"nan_grad_at": [[POISON_STEP, 0, 0]]}
    jobs = [
        # 0: loss goes down on real text
        job(tiny_dict, optim__train_steps=40, optim__lr=0.01, logging__interval=10),
        # 1: metrics: log lines, tensorboard, validation, final test
        job(tiny_dict, optim__train_steps=4, logging__interval=2, logging__tensorboard_dir=tb,
            logging__eval_interval=2, logging__eval_iters=2, logging__test_iters=2),
        # 2: masked LM (bidirectional encoder); 3: bf16
        job(tiny_dict, objective="mlm", model__is_decoder=False, model__bidirectional=True,
            optim__train_steps=12, optim__lr=0.01, logging__eval_interval=12),
        job(tiny_dict, optim__train_steps=4, precision__dtype="bf16", checkpoint__dir=str(out / "bf16_zero0")),
        # 4-7: fp32, ZeRO 0-3: a finite loss with non-finite gradients at step 2 -> that step is not applied
        *[job(tiny_dict, "nan_grad", poison, parallel__zero_stage=stage, optim__train_steps=4) for stage in range(4)],
        # 8: two such steps in a row stop the run (K=2)
        job(tiny_dict, "nan_grad", {"nan_grad_at": [[1, 0, 0], [2, 1, 0]]}, optim__train_steps=4,
            optim__max_nonfinite_in_a_row=2),
        # 9: a Hugging Face directory -> the training checkpoint of step 0 (optim.train_steps=0), no step
        job(tiny_dict, optim__train_steps=0, checkpoint__dir=str(out / "step0"), checkpoint__init_from_hf=hf),
        # 10, 11: every dropout on, selective recomputation on (the default) and off
        *[job(tiny_dict, optim__train_steps=4, parallel__selective_recompute=on, **DROPOUTS) for on in (True, False)],
        # 12: >= 0.1 s a micro-batch (2 a step), one log line over 4 steps with a validation and a save inside it
        job(tiny_dict, "slow", {"sleep_s": 0.1}, optim__train_steps=4, logging__interval=4, logging__eval_interval=3,
            logging__eval_iters=1, checkpoint__dir=str(out / "slow"), checkpoint__interval=3),
        # 13, 14: 2 steps, then resumed with train_steps 4 (the cosine decay is stretched)
        job(tiny_dict, optim__train_steps=2, checkpoint__dir=str(out / "longer")),
        job(tiny_dict, optim__train_steps=4, checkpoint__dir=str(out / "longer")),
        # 15, 16: 2 steps as the code before the weight decay rule was recorded trained, then resumed to 3
        job(tiny_dict, "older_code", optim__train_steps=2, checkpoint__dir=str(out / "older")),
        job(tiny_dict, optim__train_steps=3, checkpoint__dir=str(out / "older")),
        # 17: resumed at step 4 with train_steps 4: nothing to train, and it says so
        job(tiny_dict, optim__train_steps=4, checkpoint__dir=str(out / "longer")),
        # 18-20: bf16 with ZeRO-1 (DeepSpeed's BF16_Optimizer: fp32 gradient accumulation and master weights): 4
        # steps; stopped at 2 and resumed; inf/NaN gradients at step 2
        *[job(tiny_dict, optim__train_steps=4, precision__dtype="bf16", parallel__zero_stage=1,
              checkpoint__dir=str(out / folder), **more)
          for folder, more in (("bf16_full", {}), ("bf16_cut", {"checkpoint__exit_at_step": 2}), ("bf16_cut", {}))],
        job(tiny_dict, "nan_grad", poison, precision__dtype="bf16", parallel__zero_stage=1, optim__train_steps=4),
        # 22-24: bf16 ZeRO-1 as the code before fp32 accumulation trained it: 4 steps; stopped at 2, then resumed
        # by today's
        *[job(tiny_dict, trainer, optim__train_steps=4, precision__dtype="bf16", parallel__zero_stage=1,
              checkpoint__dir=str(out / folder), **more)
          for trainer, folder, more in (("older_code", "bf16acc_full", {}),
                                        ("older_code", "bf16acc_cut", {"checkpoint__exit_at_step": 2}),
                                        ("plain", "bf16acc_cut", {}))],
        # 25: 3 steps; 26: its weights as a step-0 checkpoint of a new run; 27: a new run of 2 steps from them
        job(tiny_dict, optim__train_steps=3, checkpoint__dir=str(out / "source")),
        job(tiny_dict, optim__train_steps=0, checkpoint__dir=str(out / "from_source"),
            checkpoint__init_from_checkpoint=str(out / "source")),
        job(tiny_dict, optim__train_steps=2, checkpoint__dir=str(out / "continued"),
            checkpoint__init_from_checkpoint=str(out / "source")),
        # 28: job 1's run with a loader worker process
        job(tiny_dict, optim__train_steps=4, data__num_workers=1),
    ]
    return run_jobs(1, jobs, str(out)), tb, out, hf


def test_loss_decreases_on_real_text(single):
    result = single[0][0]
    values = losses(result)
    assert len(values) == 40 and all(math.isfinite(v) for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1.0, values
    assert result["stopped"] == "finished"


def test_metrics_lines_tensorboard_and_evaluation(single):
    (_, result, *_), tb, *_ = single
    line = next(l for l in result["lines"] if "] iteration 2/4 |" in l)
    assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration 2/4 \| consumed samples", line), line
    assert result["lines"][0].startswith("layout: 1 process(es) = 1 pipeline stage(s) x 1 data-parallel; global "
                                         "batch 4 = micro 2 x accumulation 2 x data-parallel 1; ZeRO-0, fp32")
    assert any(l.startswith("parameters: ") for l in result["lines"][:3])
    # the logged loss is the mean over the steps since the last line (Megatron-LM's), not the last step's
    logged = float(line.split("| loss ")[1].split()[0])
    assert logged == pytest.approx((result["losses"]["1"] + result["losses"]["2"]) / 2, abs=6e-5)
    assert abs(result["losses"]["1"] - result["losses"]["2"]) > 1e-3
    for field in ("consumed samples 8", "consumed tokens 512", "lr ", "loss ", "grad norm ", "loss scale ",
                  "skipped 0", "dropped 0", "ms/iter ", "data wait ", "tokens/s ", "TFLOP/s/device ", "MFU n/a"):
        assert field in line, (field, line)
    assert set(result["eval_losses"]["valid"]) == {"2", "4"} and set(result["eval_losses"]["test"]) == {"4"}
    assert any(l.startswith("valid at iteration 2 | loss") and "perplexity" in l for l in result["lines"])
    assert glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tflops", "train/data_wait_ms",
            "train/data_wait_share", "valid/loss", "valid/perplexity", "test/loss"} <= tags
    assert 0 <= result["data_wait_share"] < 1


def test_masked_lm_objective(single):
    result = single[0][2]
    values = losses(result)
    assert all(math.isfinite(v) for v in values) and sum(values[-3:]) < sum(values[:3])
    assert math.isfinite(result["eval_losses"]["valid"]["12"])


def test_nonfinite_gradients_skip_the_step_in_fp32_zero_0_to_3(single, tiny_dict):
    """A finite loss whose gradients are inf/NaN: the optimizer step is not applied (every weight equal before and
    after it), it is counted, the lr schedule does not advance, and the run goes on to change the weights again."""
    results = single[0]
    for stage in range(4):
        result = results[4 + stage]
        assert result["stopped"] == "finished" and result["step"] == 4, stage
        assert result["skipped_steps"] == 1 and result["skipped_micro_batches"] == 0, stage
        assert result["changed"] == {"1": True, "2": False, "3": True, "4": True}, (stage, result["changed"])
        assert all(math.isfinite(v) for v in losses(result)), stage
        assert any("iteration 2: non-finite gradients on some rank; optimizer step skipped (1 in a row)" in l
                   for l in result["lines"]), stage
        # iteration 4 runs at the schedule's third rate (lr_at(2)): the skipped step did not advance it
        line = next(l for l in result["lines"] if "] iteration 4/4 |" in l)
        optim = OptimConfig(**{**tiny_dict["optim"], "train_steps": 4})
        assert f"lr {lr_at(2, optim):.3E}" in line and lr_at(2, optim) != lr_at(3, optim), (stage, line)
    # the same data and no other difference: every stage skipped the same step and continued alike
    for stage in (1, 2, 3):
        assert losses(results[4 + stage]) == pytest.approx(losses(results[4]), rel=1e-5, abs=1e-5), stage
    aborted = results[8]
    assert "2 non-finite gradients in a row at iteration 3 (optim.max_nonfinite_in_a_row=2)" in aborted["aborted"]


def test_step0_checkpoint_from_hf_directory(single):
    results, _, out, hf = single
    result = results[9]
    assert result["step"] == 0 and result["losses"] == {} and result["checkpoint"].endswith("step00000000")
    assert_checkpoint_holds(str(out / "step0"), hf)


def test_selective_recompute_off_keeps_the_losses(single):
    # the same dropout masks either way (drawn ahead or not, the same draws): the same losses, up to the order
    # in which a few gradients are summed
    on, off = single[0][10], single[0][11]
    assert any("parallel.selective_recompute: off" in line for line in off["lines"])
    assert len(losses(on)) == 4 and losses(off) == pytest.approx(losses(on), rel=1e-6, abs=0)


def test_ms_per_iter_leaves_out_evaluation_and_saving_but_not_steps(single):
    """A validation or save inside a log window used to restart the window's clock without its step count: the
    4-step window below was timed over its last step only and divided by 4 (ms/iter, tokens/s, MFU ~4x off)."""
    line = next(l for l in single[0][12]["lines"] if "] iteration 4/4 |" in l)
    ms_per_iter = float(line.split("ms/iter ")[1].split()[0])
    assert ms_per_iter >= 200, line  # 2 micro-batches of >= 100 ms each
    # validated at step 3 (eval_interval) and at the end, although 3 does not divide 4
    assert set(single[0][12]["eval_losses"]["valid"]) == {"3", "4"}


def test_a_resume_says_when_the_lr_schedule_changed(single):
    results = single[0]
    assert not any("lr schedule differs" in l for l in results[13]["lines"])
    note = next(l for l in results[14]["lines"] if "lr schedule differs" in l)
    assert "(optim.train_steps 2 -> 4): it follows the config, lr at iteration 2 is " in note and ", was " in note
    assert results[14]["resumed_from"] == 2 and results[14]["step"] == 4
    # the weight decay rule is recorded, so that a later change of the default cannot regroup a resumed run
    state = json.loads((single[2] / "longer" / "step00000004" / "trainer_state.json").read_text())
    assert state["weight_decay_rule"] == "weights"
    assert not any("predates the weight decay rule" in l for l in results[14]["lines"])
    # a checkpoint without the field resumes with the groups it was saved with (torch's load_state_dict refuses
    # groups of other sizes), and says so
    older = results[16]
    assert older["resumed_from"] == 2 and older["step"] == 3
    assert any("predates the weight decay rule of new runs: this run keeps decaying every tensor of rank >= 2" in l
               for l in older["lines"])
    state = json.loads((single[2] / "older" / "step00000003" / "trainer_state.json").read_text())
    assert state["weight_decay_rule"] == "rank2"  # and its later checkpoints say so
    done = results[17]
    assert done["resumed_from"] == 4 and done["step"] == 4 and not done["losses"]
    assert any("iteration 4 is optim.train_steps 4 or more: nothing to train" in l for l in done["lines"])
    assert not any("saved checkpoint" in l for l in done["lines"])  # its checkpoint is not rewritten in place


def test_bf16(single):
    """bf16 with ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer) follows fp32 closely. Its initialisation used to run
    one AdamW step on zero gradients, which made every later step's bias correction off by one (the first update
    0.74x the lr): 5e-3 off fp32 by step 4, against 1e-4 now."""
    fp32 = losses(single[0][1])
    bf16 = losses(single[0][3])
    assert bf16 == pytest.approx(fp32, abs=1e-3)
    # its checkpoint converts with the optimizer's fp32 weights, which the module's bf16 ones are rounded from
    from megatron_mega.convert.training_checkpoint import read_training_checkpoint

    folder = single[2] / "bf16_zero0"
    weights = read_training_checkpoint(str(folder))
    module = torch.load(folder / "step00000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    names = [k for k in module if k[3:] in weights.state]
    assert len(names) == len(weights.state)
    assert all(torch.equal(weights.state[k[3:]].to(torch.bfloat16), module[k]) for k in names)
    assert sum(not torch.equal(weights.state[k[3:]], module[k].float()) for k in names) > len(names) // 2


def test_bf16_with_zero_1_accumulates_in_fp32_and_resumes_exactly(single):
    """bf16 with ZeRO-1 runs DeepSpeed's BF16_Optimizer (the config asks for fp32 gradient accumulation): it
    follows fp32 as closely as ZeRO-0's bf16, resumes bit for bit, and skips a step with inf/NaN gradients."""
    results = single[0]
    full, cut, resumed, poisoned = results[18], results[19], results[20], results[21]
    assert losses(full) == pytest.approx(losses(results[1]), abs=1e-3)
    assert cut["step"] == 2 and resumed["resumed_from"] == 2
    assert losses(cut) + [resumed["losses"][str(s)] for s in (3, 4)] == losses(full)
    assert poisoned["skipped_steps"] == 1
    assert poisoned["changed"] == {"1": True, str(POISON_STEP + 1): False, "3": True, "4": True}
    # a checkpoint of DeepSpeed's ZeRO-1 optimizer with bf16 accumulation, saved before the dtype was recorded,
    # resumes into that optimizer, exactly
    old_full, old_cut, old_resumed = results[22], results[23], results[24]
    assert any("the checkpoint's run accumulated gradients in bf16: this run keeps it" in l
               for l in old_resumed["lines"])
    state = json.loads((single[2] / "bf16acc_cut" / "step00000004" / "trainer_state.json").read_text())
    assert state["grad_accum_dtype"] == "bf16" and state["weight_decay_rule"] == "rank2"
    state = json.loads((single[2] / "bf16_full" / "step00000004" / "trainer_state.json").read_text())
    assert state["grad_accum_dtype"] == "fp32" and state["weight_decay_rule"] == "weights"
    assert losses(old_cut) + [old_resumed["losses"][str(s)] for s in (3, 4)] == losses(old_full)
    assert losses(old_full) != losses(full)


def test_a_loader_worker_process_serves_the_same_batches(single):
    results = single[0]
    assert losses(results[28]) == losses(results[1]) and len(losses(results[1])) == 4


def test_a_run_starts_from_another_runs_checkpoint(single):
    """checkpoint.init_from_checkpoint (Megatron-LM's --finetune): the weights of another run's newest checkpoint,
    iteration 0, a fresh optimizer and schedule."""
    from megatron_mega.convert.training_checkpoint import (TrainingCheckpointError, lm_state_from_training_checkpoint,
                                                           read_training_checkpoint)

    results, _, out, _ = single
    source = read_training_checkpoint(str(out / "source"))
    started = read_training_checkpoint(str(out / "from_source"))
    assert source.step == 3 and started.step == 0
    assert started.state.keys() == source.state.keys()
    assert all(torch.equal(started.state[k], source.state[k]) for k in source.state)
    continued = results[27]
    assert continued["resumed_from"] is None and continued["step"] == 2
    assert any(f"starting from the weights of {out / 'source'} (its iteration 3): iteration 0" in l
               for l in continued["lines"])
    # the first batch is the source run's first batch: its trained weights do better on it than a fresh start
    assert continued["losses"]["1"] < results[25]["losses"]["1"] - 0.01
    # a step's own folder names that step
    state, step = lm_state_from_training_checkpoint(str(out / "source" / "step00000003"), source.config, "causal")
    assert step == 3 and torch.equal(state["lm_head.bias"], source.state["lm_head.bias"])
    with pytest.raises(TrainingCheckpointError, match=r"^checkpoint.init_from_checkpoint: .*nowhere: not a dir"):
        lm_state_from_training_checkpoint(str(out / "nowhere"), source.config, "causal")
    model = source.config
    with pytest.raises(TrainingCheckpointError, match="trained the causal objective, this run the mlm one$"):
        lm_state_from_training_checkpoint(str(out / "source"), model, "mlm")
    with pytest.raises(TrainingCheckpointError, match=r"model.num_hidden_layers: 2 there, 3 here"):
        lm_state_from_training_checkpoint(str(out / "source"), model.copy(num_hidden_layers=3), "causal")



def test_a_dry_run_checks_the_checkpoint_a_run_would_start_from(single, tiny_dict, tmp_path, capsys):
    """`train --dry-run` reads trainer_state.json or config.json, never the weights, and refuses what the run would
    refuse (a changed model field, a ZeRO-0 checkpoint under ZeRO-1, a folder that is not a checkpoint) as one
    line; it says how a changed layout resumes."""
    import shutil
    from pathlib import Path

    import yaml

    from megatron_mega.training.commands import main

    _, _, out, hf = single
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))

    def dry(*overrides: str) -> tuple[int, str, str]:
        rc = main(["--config", str(config), "--dry-run", "--world-size", overrides[0], *overrides[1:]])
        captured = capsys.readouterr()
        start = [line for line in captured.out.splitlines() if line.startswith("start: ")]
        return rc, start[0] if start else "", captured.err

    source = out / "source"
    # the same run, recorded as trained on another tokenizer's data
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(source, other_tokenizer)
    state_file = other_tokenizer / "step00000003" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "tokenizer_sha256": "cd" * 32}))
    # a bare prefix records no tokenizer: the run resumes it whatever its config's `tokenizer` (and so does the dry run)
    manifest = json.loads((Path(tiny_dict["data"]["paths"][0]) / "manifest.json").read_text())
    bare = os.path.join(tiny_dict["data"]["paths"][0], manifest["shards"][0]["prefix"])
    assert dry("1", f"checkpoint.dir={other_tokenizer}", f"data.paths=[{bare}]")[0] == 0
    assert dry("1", f"checkpoint.dir={source}") == (
        0, f"start: resumes {source}/step00000003 (iteration 3, 12 samples consumed)", "")
    rc, start, _ = dry("2", f"checkpoint.dir={source}")
    assert rc == 0 and start.endswith("samples consumed, saved with 1 pipeline stage(s) x 1 data-parallel, ZeRO-0: "
                                      "resumes through ZeRO-0, any data-parallel size)")
    for overrides, message in (
            ((f"checkpoint.dir={source}", "parallel.zero_stage=1"), "a ZeRO-0 checkpoint resumes only under ZeRO-0"),
            ((f"checkpoint.dir={source}", "model.num_hidden_layers=3"),
             "model.num_hidden_layers: 3 here, 2 in the checkpoint"),
            ((f"checkpoint.load={out / 'nowhere'}",), "holds no checkpoint ('latest' is missing)"),
            ((f"checkpoint.init_from_hf={source}",), "no config.json; not a Hugging Face model directory (a "
                                                     "training checkpoint folder"),
            ((f"checkpoint.init_from_checkpoint={source}", "model.num_hidden_layers=3"),
             "model.num_hidden_layers: 2 there, 3 here"),
            ((f"checkpoint.dir={source}", "optim.train_steps=0"), "holds a checkpoint of step 3 to resume from"),
            ((f"checkpoint.dir={other_tokenizer}",),
             "was trained on data tokenized with tokenizer sha256 cdcdcdcdcdcd")):
        rc, start, err = dry("1", *overrides)
        assert rc == 2 and start == "" and err.count("\n") == 1 and message in err, (overrides, err)
    assert dry("1", f"checkpoint.init_from_hf={hf}")[:2] == (0, f"start: iteration 0 from the weights of {hf}")
    assert dry("1", f"checkpoint.init_from_checkpoint={source}")[:2] == (
        0, f"start: iteration 0 from the weights of {source}/step00000003 (its iteration 3)")


# ---- two processes -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world2(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    steps = dict(optim__train_steps=6, optim__global_batch_size=8, optim__micro_batch_size=2)  # 2 accumulation
    jobs = [job(tiny_dict, parallel__zero_stage=stage, **steps) for stage in (0, 1, 2, 3)]       # 0-3
    ck_full, ck_cut = str(out / "full"), str(out / "cut")
    jobs += [
        job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=ck_full, checkpoint__interval=2, **steps),   # 4
        job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=ck_cut, checkpoint__exit_at_step=3, **steps),  # 5
        job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=ck_cut, **steps),                              # 6
        # 7: SIGTERM reaches rank 1 only, during step 3 (0-based 2)
        job(tiny_dict, "signal", {"signal_at": [2, 1]}, checkpoint__dir=str(out / "sig"), **steps),
        # 8: one NaN micro-batch on rank 1 at step 2 is dropped; 9: three in a row stop the run
        job(tiny_dict, "nan", {"nan_at": [[1, 0, 1]]}, **steps),
        job(tiny_dict, "nan", {"nan_at": [[1, 0, 0], [1, 1, 0], [1, 2, 0]]}, optim__max_nonfinite_in_a_row=3,
            **steps),
        # 10: stopped at step 3, resumed by test_resume_with_another_data_parallel_size in one process
        job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=str(out / "relayout"), checkpoint__exit_at_step=3,
            **steps),
        # 11: activation checkpointing of the MEGA blocks under ZeRO-3
        job(tiny_dict, parallel__zero_stage=3, parallel__activation_checkpointing=True, **steps),
        # 12: SIGUSR1 on rank 0 during step 2
        job(tiny_dict, "signal", {"signal_at": [1, 0], "signum": int(signal.SIGUSR1)},
            checkpoint__dir=str(out / "usr1"), **steps),
        # 13, 14: ZeRO-3 stopped at step 3 and resumed (same layout)
        job(tiny_dict, parallel__zero_stage=3, checkpoint__dir=str(out / "z3"), checkpoint__exit_at_step=3, **steps),
        job(tiny_dict, parallel__zero_stage=3, checkpoint__dir=str(out / "z3"), **steps),
        # 15: ZeRO-3 stopped at step 3, resumed by test_resume_with_another_data_parallel_size in one process
        job(tiny_dict, parallel__zero_stage=3, checkpoint__dir=str(out / "relayout3"), checkpoint__exit_at_step=3,
            **steps),
        # 16: a shard whose bytes changed after preparation, with data.verify_checksums on
        {**job(tiny_dict, data__paths=[_corrupted_copy(tiny_dict["data"]["paths"][0], out / "corrupt")],
               data__verify_checksums=True, **steps), "raises": True, "all_ranks": True},
        # 17: bf16 with ZeRO-1 on 2 ranks (BF16_Optimizer, each rank's file one partition of the fp32 weights)
        job(tiny_dict, precision__dtype="bf16", parallel__zero_stage=1, checkpoint__dir=str(out / "bf16"), **steps),
        # 18: the same stopped at step 3, resumed by test_resume_with_another_data_parallel_size in one process
        job(tiny_dict, precision__dtype="bf16", parallel__zero_stage=1, checkpoint__dir=str(out / "relayout_bf16"),
            checkpoint__exit_at_step=3, **steps),
        # 19, 20: ZeRO-1 stopped at step 3, resumed on both ranks through a universal checkpoint: rank 0 converts,
        # rank 1 waits for its folder
        job(tiny_dict, parallel__zero_stage=1, checkpoint__dir=str(out / "universal"), checkpoint__exit_at_step=3,
            **steps),
        job(tiny_dict, parallel__zero_stage=1, checkpoint__dir=str(out / "universal"), checkpoint__universal=True,
            **steps),
        # 21: the ZeRO-2 run of job 4 as the step-0 checkpoint of a new ZeRO-3 run (rank 0 reads it, both map it)
        job(tiny_dict, parallel__zero_stage=3, checkpoint__dir=str(out / "init2"),
            checkpoint__init_from_checkpoint=str(out / "full"), **{**steps, "optim__train_steps": 0}),
        # 22: the same from a folder that holds no checkpoint: rank 0's error, on both ranks
        {**job(tiny_dict, checkpoint__dir=str(out / "init_bad"), checkpoint__init_from_checkpoint=str(out / "hf0"),
               **steps), "raises": True, "all_ranks": True},
        # 23: ZeRO-0 stopped at step 3, resumed by test_resume_with_another_data_parallel_size in one process
        job(tiny_dict, parallel__zero_stage=0, checkpoint__dir=str(out / "relayout0"), checkpoint__exit_at_step=3,
            **steps),
        # 24, 25: ZeRO-2 stopped at step 3; a universal resume of it after its optimizer file was damaged
        job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=str(out / "universal_bad"), checkpoint__exit_at_step=3,
            **steps),
        {**job(tiny_dict, "damaged_optimizer", parallel__zero_stage=2, checkpoint__dir=str(out / "universal_bad"),
               checkpoint__universal=True, **steps), "raises": True, "all_ranks": True},
    ]
    return run_jobs(2, jobs, str(out)), out


def _corrupted_copy(dataset: str, folder) -> str:
    """A copy of the prepared dataset whose first shard has one bit flipped (same sizes, so only sha256 tells)."""
    import shutil

    shutil.copytree(dataset, folder)
    path = folder / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return str(folder)


def test_zero_stages_give_the_same_losses(world2):
    results, _ = world2
    reference = losses(results[0])
    assert len(reference) == 6 and reference[-1] < reference[0]
    for stage in (1, 2, 3):
        assert losses(results[stage]) == pytest.approx(reference, rel=1e-5, abs=1e-5), stage


def test_activation_checkpointing_gives_the_same_losses(world2):
    results, _ = world2
    assert losses(results[11]) == pytest.approx(losses(results[0]), rel=1e-5, abs=1e-5)


def test_exact_resume(world2):
    results, out = world2
    full, cut, resumed = results[4], results[5], results[6]
    assert cut["stopped"] == "exit_at_step" and cut["step"] == 3
    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    assert losses(cut) == losses(full)[:3]
    # float32 on CPU: bit-identical continuation
    assert [resumed["losses"][str(s)] for s in (4, 5, 6)] == losses(full)[3:]
    assert resumed["consumed_samples"] == full["consumed_samples"] == 48
    # and the final weights are equal, tensor for tensor
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    a = get_fp32_state_dict_from_zero_checkpoint(str(out / "full"), tag="step00000006")
    b = get_fp32_state_dict_from_zero_checkpoint(str(out / "cut"), tag="step00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2: the older checkpoints of the full run were deleted once newer ones were complete
    assert sorted(n for n in os.listdir(out / "full") if n.startswith("step")) == ["step00000004", "step00000006"]
    assert (out / "full" / "latest").read_text().strip() == "step00000006"


def test_exact_resume_zero3(world2):
    results, _ = world2
    full, cut, resumed = results[3], results[13], results[14]
    assert losses(cut) + [resumed["losses"][str(s)] for s in (4, 5, 6)] == losses(full)


def test_sigterm_finishes_the_step_saves_and_stops(world2):
    results, out = world2
    result = results[7]
    assert result["stopped"] == "signal" and result["step"] == 3
    assert (out / "sig" / "latest").read_text().strip() == "step00000003"
    assert any("stopped by signal at iteration 3" in l for l in result["lines"])
    usr1 = results[12]
    assert usr1["stopped"] == "signal" and usr1["step"] == 2
    assert (out / "usr1" / "latest").read_text().strip() == "step00000002"


def test_nonfinite_loss_is_skipped_then_aborts(world2):
    results, _ = world2
    skipped, aborted = results[8], results[9]
    assert skipped["skipped_micro_batches"] == 1 and skipped["step"] == 6
    assert all(math.isfinite(v) for v in losses(skipped))
    assert losses(skipped)[0] == losses(results[0])[0]
    assert "3 non-finite losses in a row at iteration 2" in aborted["aborted"]


def test_checksum_failure_stops_every_rank(world2):
    """The shards are dealt over the ranks, so only rank 0 hashes shard 0; both ranks must stop with its error
    (a rank that raised alone would leave the other in its next collective until the timeout)."""
    _, out = world2
    for rank in (0, 1):
        raised = json.loads((out / f"job16-rank{rank}.json").read_text())["raised"]
        assert raised.startswith("ManifestError: data.verify_checksums: ")
        assert "shard-00000.bin: sha256 " in raised and "!= manifest" in raised


def test_a_bf16_optimizer_checkpoint_converts_with_its_fp32_weights(world2):
    """DeepSpeed's zero_to_fp32 cannot read BF16_Optimizer's files; the converter reassembles the fp32 master
    weights from both ranks' partitions: they round to the module's bf16 weights exactly and hold more."""
    from megatron_mega.convert.training_checkpoint import read_training_checkpoint

    results, out = world2
    assert results[17]["step"] == 6
    folder = out / "bf16" / "step00000006"
    assert sorted(p.name for p in folder.glob("bf16_zero_pp_rank_*")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    weights = read_training_checkpoint(str(out / "bf16"))
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    names = [k for k in module if k[3:] in weights.state]
    assert len(names) == len(weights.state)
    for name in names:
        assert weights.state[name[3:]].dtype == torch.float32
        assert torch.equal(weights.state[name[3:]].to(torch.bfloat16), module[name]), name
    assert any(not torch.equal(weights.state[n[3:]], module[n].float()) for n in names)
    weights.model()  # and it loads into the training-side model


def test_resume_with_another_data_parallel_size(world2, tiny_dict, tmp_path):
    """Saved by 2 ranks under ZeRO-2 and ZeRO-3, resumed by 1 (gradient accumulation 4 instead of 2): the trainer
    converts the checkpoint to a universal one by itself; the same samples follow, so the losses match the
    uninterrupted 2-rank run up to float reduction order. ZeRO-3 drifted by 2.6e-4, then 1.3e-3, before the
    trainer repaired what DeepSpeed's ZeRO-3 universal load gets wrong (a shared Adam step, group 0's weight decay
    everywhere; see Trainer._repair_optimizer_after_load): the bound below is 50x tighter than that."""
    results, out = world2
    steps = dict(optim__train_steps=6, optim__global_batch_size=8, optim__micro_batch_size=2)
    bf16 = dict(precision__dtype="bf16", parallel__zero_stage=1)
    resumed = run_jobs(1, [job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=str(out / "relayout"), **steps),
                           job(tiny_dict, parallel__zero_stage=3, checkpoint__dir=str(out / "relayout3"), **steps),
                           job(tiny_dict, checkpoint__dir=str(out / "relayout_bf16"), **bf16, **steps),
                           # ZeRO-0: the same file for any data-parallel size; another ZeRO stage is refused
                           job(tiny_dict, parallel__zero_stage=0, checkpoint__dir=str(out / "relayout0"), **steps),
                           {**job(tiny_dict, parallel__zero_stage=1, checkpoint__dir=str(out / "relayout0"),
                                  **steps), "raises": True}],
                       str(tmp_path))
    zero0 = resumed[3]
    assert zero0["resumed_from"] == 3 and any("ZeRO-0 state is the same for any data-parallel size" in l
                                              for l in zero0["lines"])
    assert [zero0["losses"][str(s)] for s in (4, 5, 6)] == pytest.approx(losses(results[0])[3:], rel=0, abs=1e-5)
    raised = json.loads((tmp_path / "job4-rank0.json").read_text())["raised"]
    assert raised.startswith("TrainConfigError: parallel.zero_stage: ") and "init_from_checkpoint" in raised
    # bf16 (BF16_Optimizer through a universal checkpoint; 9e-6 measured): bf16 rounds another reduction order
    for result, full, tolerance in ((resumed[0], results[4], 1e-5), (resumed[1], results[3], 5e-6),
                                    (resumed[2], results[17], 5e-5)):
        assert result["resumed_from"] == 3 and result["consumed_samples"] == 48
        assert any("resuming through a universal checkpoint" in l for l in result["lines"])
        assert [result["losses"][str(s)] for s in (4, 5, 6)] == pytest.approx(losses(full)[3:], rel=0,
                                                                                abs=tolerance)


def test_every_rank_resumes_through_a_universal_checkpoint_rank_0_makes(world2):
    """The conversion runs on rank 0 while the others wait for its folder on the file system (a barrier would
    time out on a large model); both ranks then go on with the uninterrupted run's losses."""
    results, out = world2
    resumed = results[20]
    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    assert (out / "universal" / "step00000003-universal" / "zero").is_dir()
    assert not (out / "universal" / "step00000003-universal.failed").exists()
    assert [resumed["losses"][str(s)] for s in (4, 5, 6)] == pytest.approx(losses(results[1])[3:], rel=0, abs=1e-5)


def test_a_failed_universal_conversion_fails_every_rank_with_its_message(world2):
    """Rank 0's conversion fails on a damaged optimizer file: rank 1, waiting on the file system, stops with rank
    0's message at once (in a barrier it waited for the collective timeout)."""
    _, out = world2
    rank0 = json.loads((out / "job25-rank0.json").read_text())["raised"]
    rank1 = json.loads((out / "job25-rank1.json").read_text())["raised"]
    assert rank0.startswith("RuntimeError: converting ") and "to a universal checkpoint failed" in rank0
    assert rank1.startswith("RuntimeError: rank 0 could not make the universal checkpoint of ")
    assert "to a universal checkpoint failed" in rank1
    assert not (out / "universal_bad" / "step00000003-universal").exists()


def test_a_new_run_on_two_ranks_starts_from_another_runs_checkpoint(world2):
    from megatron_mega.convert.training_checkpoint import read_training_checkpoint

    results, out = world2
    assert results[21]["step"] == 0
    source, started = read_training_checkpoint(str(out / "full")), read_training_checkpoint(str(out / "init2"))
    assert source.step == 6 and started.step == 0 and started.layout["zero_stage"] == 3
    assert started.state.keys() == source.state.keys()
    assert all(torch.equal(started.state[k], source.state[k]) for k in source.state)
    assert not list((out / "init2").glob(".init-weights-*"))  # the shared copy is gone once every rank has it
    # a source that cannot be read: rank 0's config error, one line, on every rank (not a timeout on rank 1)
    for rank in (0, 1):
        raised = json.loads((out / f"job22-rank{rank}.json").read_text())["raised"]
        assert raised.startswith("TrainConfigError: ") and f"{out / 'hf0'}: not a directory" in raised, raised


def test_a_hung_rank_fails_the_job_after_the_timeout(tiny_dict, tmp_path):
    """Rank 1 stops taking part at step 2; rank 0 fails on the collective timeout (parallel.timeout_s) instead of
    waiting forever."""
    import time

    from tests.training.world import start_jobs

    config = job(tiny_dict, "hang", {"hang_at": [1, 1]}, parallel__timeout_s=5, optim__train_steps=4)
    procs = start_jobs(2, [config], str(tmp_path))
    try:
        start = time.monotonic()
        procs[0].join(timeout=120)
        assert procs[0].exitcode not in (None, 0), "rank 0 still waiting: no collective timeout"
        assert time.monotonic() - start < 120
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
