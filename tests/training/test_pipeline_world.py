"""The pipeline path of the trainer (megatron_mega.parallel's PipelineModule under DeepSpeed's pipeline engine),
against the plain path on the same data, in real gloo worlds."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron_mega.parallel")

from tests.training.test_train_world import job, losses  # noqa: E402
from tests.training.world import run_jobs  # noqa: E402

STEPS = dict(optim__train_steps=6, optim__global_batch_size=8, optim__micro_batch_size=2)


@pytest.fixture(scope="module")
def pipe2(tiny_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe2")
    pipe = dict(parallel__pipeline_stages=2, parallel__zero_stage=1, **STEPS)
    jobs = [
        job(tiny_dict, parallel__zero_stage=0, **STEPS),                                               # 0 plain dp=2
        job(tiny_dict, **pipe),                                                                       # 1 2 stages
        job(tiny_dict, checkpoint__dir=str(out / "cut"), checkpoint__exit_at_step=3, **pipe),         # 2
        job(tiny_dict, checkpoint__dir=str(out / "cut"), logging__eval_interval=3, **pipe),           # 3 resumed
        job(tiny_dict, parallel__activation_checkpointing=True, **pipe),                              # 4
        job(tiny_dict, checkpoint__dir=str(out / "relayout"), checkpoint__exit_at_step=3, **pipe),    # 5
    ]
    return run_jobs(2, jobs, str(out)), out


def test_pipeline_matches_plain(pipe2):
    pipe2, _ = pipe2
    plain, piped = losses(pipe2[0]), losses(pipe2[1])
    assert piped == pytest.approx(plain, rel=1e-5, abs=1e-5)
    assert losses(pipe2[4]) == pytest.approx(piped, rel=1e-5, abs=1e-5)  # activation checkpointing


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
