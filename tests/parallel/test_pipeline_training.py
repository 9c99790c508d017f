"""Real DeepSpeed pipelines on CPU (gloo, spawned processes) against the plain model trained in this process."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_mega.parallel import plain_model_from_pipeline_checkpoint
from tests.helpers import tiny_config
from tests.parallel.harness import causal_batches, padded_mlm_batches, run_world, train_pipeline, train_plain

SEED, LR = 1234, 1e-2


def _check(tmp_path, world_size: int, num_stages: int, zero_stage: int, checkpoint_interval: int = 0,
           clip: float = 0.0, steps: int = 3, gas: int = 2, objective: str = "causal"):
    """Initial weights equal, per-step losses equal, final weights close; the pipeline checkpoint's layer files
    give the gathered plain model back."""
    dp = world_size // num_stages
    if objective == "causal":
        config = tiny_config(decoder=True, num_hidden_layers=3)
        batches = causal_batches(steps, gas * dp, batch=2, length=16, vocab=config.vocab_size)
    else:
        config = tiny_config(num_hidden_layers=3)
        batches = padded_mlm_batches(steps, gas * dp, batch=2, length=16, vocab=config.vocab_size)
    out = str(tmp_path / "result.pt")
    ckpt = str(tmp_path / "ckpt")
    run_world(world_size, train_pipeline, config, objective, SEED, num_stages, zero_stage, batches, LR, clip,
              checkpoint_interval, out, ckpt)
    result = torch.load(out, weights_only=True)
    initial, losses, final = train_plain(config, objective, SEED, batches, LR, clip)
    assert result["initial"].keys() == initial.keys()
    for name, tensor in initial.items():
        assert torch.equal(result["initial"][name], tensor), name
    assert result["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert max((final[k] - initial[k]).abs().max().item() for k in final) > LR / 2  # the steps moved the weights
    if clip:
        assert all(norm > clip for norm in result["grad_norms"])  # the clipping acted
    # Adam turns round-off in near-zero gradients into parameter differences well above it; 1e-4 is still far
    # below the lr-sized (1e-2) steps an error would cause
    for name, tensor in final.items():
        torch.testing.assert_close(result["final"][name], tensor, rtol=1e-4, atol=1e-4, msg=name)
    from_checkpoint = plain_model_from_pipeline_checkpoint(os.path.join(ckpt, "last"), config, objective)
    from_checkpoint = from_checkpoint.state_dict()
    for name, tensor in result["final"].items():
        assert torch.equal(from_checkpoint[name], tensor), name
    return result


def test_two_stages_zero1_match_plain(tmp_path):
    _check(tmp_path, world_size=2, num_stages=2, zero_stage=1)


def test_two_data_parallel_by_two_stages_match_plain(tmp_path):
    _check(tmp_path, world_size=4, num_stages=2, zero_stage=1)


def test_activation_checkpointing_matches_plain(tmp_path):
    result = _check(tmp_path, world_size=2, num_stages=2, zero_stage=0, checkpoint_interval=1)
    # stage 0 holds the embedding (not recomputed: it takes integer ids) and blocks 0 and 1 (recomputed)
    assert result["checkpointed"] == [False, True, True]


def test_masked_lm_with_padding_and_gradient_clipping_matches_plain(tmp_path):
    """The (hidden, attention_mask) stage tuple, the mlm head, and DeepSpeed's clipping by the global norm (tied
    weight counted once) against torch's clip_grad_norm_."""
    _check(tmp_path, world_size=2, num_stages=2, zero_stage=1, objective="mlm", clip=0.05)
