"""The pipeline path of the trainer (megatron_mega.parallel's PipelineModule under DeepSpeed's pipeline engine),
against the plain path on the same data, in real gloo worlds."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron_mega.parallel")

import math  # noqa: E402

from tests.training.test_train_world import assert_checkpoint_holds, hf_directory, job, losses  # noqa: E402
from tests.training.world import run_jobs  # noqa: E402

STEPS = dict(optim__train_steps=6, optim__global_batch_size=8, optim__micro_batch_size=2)


@pytest.fixture(scope="module")
def pipe2(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe2")
    pipe = dict(parallel__pipeline_stages=2, parallel__zero_stage=1, **STEPS)
    hf = hf_directory(tiny_dict["model"], str(out / "hf"))
    jobs = [
        job(tiny_dict, parallel__zero_stage=0, **STEPS),                                               # 0 plain dp=2
        job(tiny_dict, **pipe),                                                                       # 1 2 stages
        job(tiny_dict, checkpoint__dir=str(out / "cut"), checkpoint__exit_at_step=3, **pipe),         # 2
        job(tiny_dict, checkpoint__dir=str(out / "cut"), logging__eval_interval=3, **pipe),           # 3 resumed
        job(tiny_dict, parallel__activation_checkpointing=True, **pipe),                              # 4
        job(tiny_dict, checkpoint__dir=str(out / "relayout"), checkpoint__exit_at_step=3, **pipe),    # 5
        # 6, 7: an inf loss on the last stage at step 2 (0-based 1), with and without activation checkpointing:
        # the step is not applied (ZeRO-0 pipelines are refused: DeepSpeed's ZeRO-0 pipeline clipping is wrong)
        job(tiny_dict, "pipe_inf", {"inf_at": [1]}, parallel__activation_checkpointing=True, **pipe),
        job(tiny_dict, "pipe_inf", {"inf_at": [1]}, **pipe),
        # 8: two in a row stop the run (K=2)
        job(tiny_dict, "pipe_inf", {"inf_at": [2, 3]}, optim__max_nonfinite_in_a_row=2, **pipe),
        # 9: a Hugging Face directory -> the 2-stage checkpoint of step 0 (optim.train_steps=0)
        job(tiny_dict, checkpoint__dir=str(out / "step0"), checkpoint__init_from_hf=hf,
            **{**pipe, "optim__train_steps": 0}),
        # 10: the inf loss under bf16 (DeepSpeed's BF16_Optimizer)
        job(tiny_dict, "pipe_inf", {"inf_at": [1]}, precision__dtype="bf16", **pipe),
        # 11: the plain path again after pipeline engines in the same processes
        job(tiny_dict, parallel__zero_stage=0, **STEPS),
        # 12: bf16
        job(tiny_dict, precision__dtype="bf16", **pipe),
    ]
    return run_jobs(2, jobs, str(out)), out


def test_pipeline_matches_plain(pipe2):
    pipe2, _ = pipe2
    plain, piped = losses(pipe2[0]), losses(pipe2[1])
    assert piped == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert losses(pipe2[4]) == pytest.approx(piped, rel=1e-5, abs=1e-5)  # activation checkpointing
    assert losses(pipe2[11]) == plain  # a plain run after pipeline runs in the same processes


def test_pipeline_exact_resume(pipe2):
    pipe2, _ = pipe2
    full, cut, resumed = pipe2[1], pipe2[2], pipe2[3]
    assert cut["step"] == 3 and resumed["resumed_from"] == 3
    assert losses(cut) + [resumed["losses"][str(s)] for s in (4, 5, 6)] == losses(full)
    assert set(resumed["eval_losses"]["valid"]) == {"6"}  # validation works on the pipeline path


def test_pipeline_resumed_as_two_by_two_on_four_processes(tiny_dict, tmp_path, pipe2):
    """Saved by 2 stages x 1 data-parallel rank, resumed by 2 stages x 2 data-parallel ranks on 4 processes (a
    universal checkpoint made by the trainer): the same samples follow, and the losses match the plain path's."""
    pipe2, out = pipe2
    [result] = run_jobs(4, [job(tiny_dict, parallel__pipeline_stages=2, parallel__zero_stage=1,
                                checkpoint__dir=str(out / "relayout"), **STEPS)], str(tmp_path))
    assert result["resumed_from"] == 3 and result["consumed_samples"] == 48
    assert any("resuming through a universal checkpoint" in l for l in result["lines"])
    resumed = [result["losses"][str(s)] for s in (4, 5, 6)]
    assert resumed == pytest.approx(losses(pipe2[0])[3:], rel=1e-5, abs=1e-5)


def test_pipeline_nonfinite_loss_skips_the_step_before_it_is_applied(pipe2):
    """The inf loss is seen on the last stage; every stage skips that optimizer step (weights equal before and after
    it on both ranks), it is counted, and the run continues."""
    pipe2, _ = pipe2
    for index in (6, 7, 10):
        result = pipe2[index]
        assert result["stopped"] == "finished" and result["step"] == 6, index
        assert result["skipped_steps"] == 1, index
        assert result["changed"] == {str(s): s != 2 for s in range(1, 7)}, (index, result["changed"])
        values = losses(result)
        assert not math.isfinite(values[1]) and all(math.isfinite(v) for i, v in enumerate(values) if i != 1)
        assert values[0] == pytest.approx(losses(pipe2[1])[0], rel=1e-5, abs=1e-5 if index != 10 else 0.05)
        assert any("iteration 2: non-finite loss or gradients on some rank; optimizer step skipped" in l
                   for l in result["lines"]), index
    # recomputed or not, the skipped step leaves the same run behind
    assert losses(pipe2[6])[2:] == pytest.approx(losses(pipe2[7])[2:], rel=1e-5, abs=1e-5)
    assert "2 non-finite loss or gradients in a row at iteration 4" in pipe2[8]["aborted"]


def test_pipeline_step0_checkpoint_from_hf_directory(pipe2):
    pipe2, out = pipe2
    assert pipe2[9]["step"] == 0 and pipe2[9]["losses"] == {}
    assert_checkpoint_holds(str(out / "step0"), str(out / "hf"))


def test_a_bf16_pipeline_follows_fp32(pipe2):
    """bf16 pipelines accumulate in bf16 (DeepSpeed's ZeRO-1 optimizer): with fp32 accumulation DeepSpeed builds
    BF16_Optimizer, whose pipeline path dropped the LM head bias's gradient and the last stage's share of the tied
    embedding's, 1e-2 off fp32 by step 4."""
    pipe2, _ = pipe2
    assert losses(pipe2[12]) == pytest.approx(losses(pipe2[1]), abs=1e-3)
    assert any("gradients are accumulated and reduced in bf16 (DeepSpeed's fp32 mode drops gradients on a "
               "pipeline)" in line for line in pipe2[12]["lines"])
