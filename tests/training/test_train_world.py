"""Real DeepSpeed training on CPU with gloo, no mocks. The jobs of one world run in the same spawned processes
(module fixtures), so DeepSpeed's import and process-group setup are paid once per world."""

from __future__ import annotations

import copy
import glob
import math
import os
import signal

import pytest
import torch

from tests.training.world import run_jobs


def job(base: dict, trainer: str = "plain", kwargs: dict | None = None, objective: str | None = None,
        **sections) -> dict:
    config = copy.deepcopy(base)
    if objective is not None:
        config["objective"] = objective
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        config.setdefault(section, {})[key] = value
    return {"config": config, "trainer": trainer, "kwargs": kwargs or {}}


def losses(result: dict) -> list[float]:
    return [result["losses"][k] for k in sorted(result["losses"], key=int)]


# ---- one process ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    tb = str(out / "tb")
    jobs = [
        # 0: loss goes down on real text
        job(tiny_dict, optim__train_steps=40, optim__lr=0.01, logging__interval=10),
        # 1: metrics: log lines, tensorboard, validation, final test
        job(tiny_dict, optim__train_steps=4, logging__interval=2, logging__tensorboard_dir=tb,
            logging__eval_interval=2, logging__eval_iters=2, logging__test_iters=2),
        # 2: masked LM (bidirectional encoder); 3: bf16
        job(tiny_dict, objective="mlm", model__is_decoder=False, model__bidirectional=True,
            optim__train_steps=12, optim__lr=0.01, logging__eval_interval=12),
        job(tiny_dict, optim__train_steps=4, precision__dtype="bf16"),
    ]
    return run_jobs(1, jobs, str(out)), tb


def test_loss_decreases_on_real_text(single):
    result = single[0][0]
    values = losses(result)
    assert len(values) == 40 and all(math.isfinite(v) for v in values)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1.0, values
    assert result["stopped"] == "finished"


def test_metrics_lines_tensorboard_and_evaluation(single):
    (_, result, *_), tb = single
    line = next(l for l in result["lines"] if l.startswith("iteration 2/4"))
    for field in ("consumed samples 8", "consumed tokens 512", "lr ", "loss ", "grad norm ", "loss scale ",
                  "skipped 0", "ms/iter ", "tokens/s ", "TFLOP/s/device ", "MFU n/a"):
        assert field in line, (field, line)
    assert set(result["eval_losses"]["valid"]) == {"2", "4"} and set(result["eval_losses"]["test"]) == {"4"}
    assert any(l.startswith("valid at iteration 2 | loss") and "perplexity" in l for l in result["lines"])
    assert glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tflops", "valid/loss", "valid/perplexity",
            "test/loss"} <= tags


def test_masked_lm_objective(single):
    result = single[0][2]
    values = losses(result)
    assert all(math.isfinite(v) for v in values) and sum(values[-3:]) < sum(values[:3])
    assert math.isfinite(result["eval_losses"]["valid"]["12"])


def test_bf16(single):
    fp32 = losses(single[0][1])
    bf16 = losses(single[0][3])
    assert bf16 == pytest.approx(fp32, abs=0.05) and bf16 != fp32


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
    ]
    return run_jobs(2, jobs, str(out)), out


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


def test_resume_with_another_data_parallel_size(world2, tiny_dict, tmp_path):
    """Saved by 2 ranks under ZeRO-2, resumed by 1 (gradient accumulation 4 instead of 2): the trainer converts
    the checkpoint to a universal one by itself; the same samples follow, so the losses match the uninterrupted
    2-rank run up to float reduction order."""
    results, out = world2
    full = results[4]
    steps = dict(optim__train_steps=6, optim__global_batch_size=8, optim__micro_batch_size=2)
    [resumed] = run_jobs(1, [job(tiny_dict, parallel__zero_stage=2, checkpoint__dir=str(out / "relayout"),
                                 **steps)], str(tmp_path))
    assert resumed["resumed_from"] == 3 and resumed["consumed_samples"] == 48
    assert any("resuming through a universal checkpoint" in l for l in resumed["lines"])
    assert [resumed["losses"][str(s)] for s in (4, 5, 6)] == pytest.approx(losses(full)[3:], rel=1e-5, abs=1e-5)


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
