"""The pipeline layout without torch.distributed: name maps both ways, stage partitions, config checks, and the
pipe layers run in sequence against the plain model."""

from __future__ import annotations

import pytest
import torch

from megatron_mega.parallel import (
    check_pipeline_compatible,
    describe_partition,
    hf_name_to_pipeline,
    hf_state_to_pipeline,
    pipeline_layout,
    pipeline_name_to_hf,
    pipeline_state_to_hf,
    plain_from_pipeline_state,
    plain_model,
    stage_partition,
)
from megatron_mega.parallel.layers import EmbeddingPipe, LMHeadPipe, MegaBlockPipe
from tests.helpers import tiny_config, token_ids

CASES = [
    ("causal", dict(decoder=True)),
    ("causal", dict(decoder=True, add_lm_hidden_dense_layer=False, num_hidden_layers=3)),
    ("causal", dict(decoder=True, tie_word_embeddings=False)),
    ("mlm", dict(add_token_type_embeddings=True)),
]


def _pipe_layers(config, objective):
    """The pipeline's layers in one process, indexed as in the layout (the tied copy is layer 0 again)."""
    layout = pipeline_layout(config, objective)
    layers = {0: EmbeddingPipe(config), layout.head_layer: LMHeadPipe(config)}
    layers.update({layout.block_layer(i): MegaBlockPipe(config) for i in range(layout.num_blocks)})
    return layout, layers


@pytest.mark.parametrize("objective,overrides", CASES)
def test_state_round_trip_through_the_pipeline_layers(objective, overrides):
    config = tiny_config(**overrides)
    model = plain_model(config, objective, seed=3)
    state = model.state_dict()
    layout, layers = _pipe_layers(config, objective)
    by_layer = hf_state_to_pipeline(layout, state)
    # every pipeline layer's own state dict is covered exactly: the layers load strictly
    assert set(by_layer) == set(layers)
    for index, module in layers.items():
        module.load_state_dict(by_layer[index], strict=True)
    back = pipeline_state_to_hf(layout, {i: m.state_dict() for i, m in layers.items()})
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    rebuilt = plain_from_pipeline_state(config, objective, {i: m.state_dict() for i, m in layers.items()})
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items())
    if layout.tied:
        assert rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight


def test_single_names_both_ways():
    config = tiny_config(decoder=True, num_hidden_layers=3)
    layout = pipeline_layout(config, "causal")
    assert layout.num_layers == 6 and layout.head_layer == 4
    pairs = [
        ((0, "word_embeddings.weight"), "mega.embedding_layer.word_embeddings.weight"),
        ((3, "mega_layer.ema_gate.damping_factor"), "mega.layers.2.mega_layer.ema_gate.damping_factor"),
        ((4, "dense.weight"), "dense.weight"),
        ((4, "bias"), "lm_head.bias"),
    ]
    for (layer, local), hf in pairs:
        assert pipeline_name_to_hf(layout, layer, local) == hf
        assert hf_name_to_pipeline(layout, hf) == (layer, local)
    # the tied output projection is the word embedding
    assert hf_name_to_pipeline(layout, "lm_head.weight") == (0, "word_embeddings.weight")
    mlm = pipeline_layout(tiny_config(), "mlm")
    assert pipeline_name_to_hf(mlm, mlm.head_layer, "bias") == "mlm_head.bias"
    with pytest.raises(KeyError, match="mega.pooler.dense.weight"):
        hf_name_to_pipeline(layout, "mega.pooler.dense.weight")
    with pytest.raises(KeyError, match="layer 4"):
        pipeline_name_to_hf(layout, 4, "weight")
    with pytest.raises(KeyError, match="mega.pooler.dense.bias, mega.pooler.dense.weight"):
        hf_state_to_pipeline(layout, {"mega.pooler.dense.weight": torch.zeros(1), "mega.pooler.dense.bias": 0})


def test_objective_must_match_the_config():
    with pytest.raises(ValueError, match="is_decoder=True, bidirectional=False"):
        pipeline_layout(tiny_config(), "causal")
    with pytest.raises(ValueError, match="is_decoder=False"):
        pipeline_layout(tiny_config(decoder=True), "mlm")
    with pytest.raises(ValueError, match="objective"):
        pipeline_layout(tiny_config(), "seq2seq")


@pytest.mark.parametrize("objective,overrides", CASES)
def test_pipe_layers_in_sequence_give_the_plain_loss_and_gradients(objective, overrides):
    config = tiny_config(**overrides)
    model = plain_model(config, objective, seed=5)
    layout, layers = _pipe_layers(config, objective)
    for index, state in hf_state_to_pipeline(layout, model.state_dict()).items():
        layers[index].load_state_dict(state)
    ids = token_ids(2, 12, seed=1)
    targets = token_ids(2, 12, seed=2)
    targets[:, ::3] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding travels as the second tensor of the stage tuple
    targets[1, 9:] = -100

    x = (ids, mask)
    for index in range(layout.num_blocks + 2):
        x = layers[index](x)
    weight = None if not layout.tied else layers[0].word_embeddings.weight
    loss = layers[layout.head_layer].loss(x, targets, weight)
    expected = model.lm_loss(model.mega(ids, attention_mask=mask).last_hidden_state, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    expected.backward()
    grads = pipeline_state_to_hf(layout, {i: {n: p.grad for n, p in m.named_parameters()} for i, m in layers.items()})
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_stage_partitions():
    config = tiny_config(decoder=True, num_hidden_layers=5)
    layout = pipeline_layout(config)
    # layers: 0 embedding, 1-5 blocks, 6 head, 7 tied copy
    assert stage_partition(config, layout, 1) == [0, 8]
    assert stage_partition(config, layout, 2) == [0, 4, 8]
    assert stage_partition(config, layout, 3) == [0, 3, 5, 8]
    # the embedding never alone (both weight-decay groups on every stage); head and tied copy stay together
    assert stage_partition(config, layout, 6) == [0, 2, 3, 4, 5, 6, 8]
    assert stage_partition(config, layout, 2, "parameters") == [0, 4, 8]
    for stages in range(1, 7):
        for method in ("type:MegaBlockPipe", "parameters"):
            parts = stage_partition(config, layout, stages, method)
            assert parts[0] == 0 and parts[-1] == 8 and all(a < b for a, b in zip(parts, parts[1:]))
            assert parts[-2] <= layout.head_layer  # the head is on the last stage with the tied copy
            assert parts[1] >= 2  # the first stage holds a block besides the embedding
    # the last stage's tied copy counts: with a large vocabulary the blocks move to the first stage
    big_vocab = tiny_config(decoder=True, num_hidden_layers=3, vocab_size=30000)
    assert stage_partition(big_vocab, pipeline_layout(big_vocab), 2) == [0, 3, 6]
    assert stage_partition(big_vocab, pipeline_layout(big_vocab), 2, "parameters") == [0, 4, 6]
    assert "stage 1: layers 4-7: block 3, block 4, lm_head, tied embedding copy" in describe_partition(
        layout, stage_partition(config, layout, 2))
    with pytest.raises(ValueError, match="at most 6 pipeline stages"):
        stage_partition(config, layout, 7)
    with pytest.raises(ValueError, match="partition_method"):
        stage_partition(config, layout, 2, "uniform")


def test_zero_2_and_3_are_refused_with_a_pipeline():
    for zero in (0, 1):
        check_pipeline_compatible(zero, 2)
    for zero in (2, 3):
        check_pipeline_compatible(zero, 1)
        with pytest.raises(ValueError, match=f"ZeRO stage {zero} cannot be combined with pipeline parallelism"):
            check_pipeline_compatible(zero, 4)
    with pytest.raises(ValueError, match="zero stage"):
        check_pipeline_compatible(4, 1)
    with pytest.raises(ValueError, match="pipeline stages"):
        check_pipeline_compatible(0, 0)
