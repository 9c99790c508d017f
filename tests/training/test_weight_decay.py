"""Which parameters AdamW decays, by name, for the plain model and the pipeline's layers, and the legacy rule a run
resumed from an older checkpoint keeps."""

from __future__ import annotations

import pytest

from megatron_mega import MegaConfig, MegaForCausalLM
from megatron_mega.parallel.pipeline import layer_specs
from megatron_mega.training.weight_decay import param_groups, rule_of_checkpoint

SMALL = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=32, ema_projection_size=4,
             shared_representation_size=8, max_positions=64, add_token_type_embeddings=True,
             add_lm_hidden_dense_layer=True)


def decayed(model, rule="weights") -> set[str]:
    groups = param_groups(model, 0.1, rule)
    ids = {id(p) for group in groups if group["weight_decay"] for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("bias", ["rotary", "simple"])
def test_only_weight_matrices_are_decayed(bias):
    model = MegaForCausalLM(MegaConfig(**SMALL, relative_positional_bias=bias, is_decoder=True, bidirectional=False))
    layer = {f"mega.layers.{i}.{name}.weight" for i in range(2)
             for name in ("mega_layer.v_proj", "mega_layer.mx_proj", "mega_layer.h_proj", "nffn.fc1", "nffn.fc2")}
    assert decayed(model) == layer | {"mega.embedding_layer.word_embeddings.weight",
                                      "mega.embedding_layer.token_type_embeddings.weight", "dense.weight"}
    # the rule of checkpoints that predate the recorded rule: every tensor of rank >= 2
    legacy = decayed(model, "rank2")
    assert {"mega.layers.0.mega_layer.ema_gate.damping_factor", "mega.layers.1.mega_layer.qk_bias"} <= legacy
    assert legacy == {name for name, p in model.named_parameters() if p.ndim >= 2}


def test_the_pipeline_layers_decay_the_same_parameters():
    config = MegaConfig(**SMALL, relative_positional_bias="rotary", is_decoder=True, bidirectional=False)
    plain = MegaForCausalLM(config)
    plain_names = {name.rsplit(".", 1)[0].split(".")[-1] + "." + name.rsplit(".", 1)[1] for name in decayed(plain)}
    piped = set()
    for spec in layer_specs(config, "causal"):
        module = spec.build()
        piped |= {name.rsplit(".", 1)[0].split(".")[-1] + "." + name.rsplit(".", 1)[1] for name in decayed(module)}
    assert piped == plain_names


def test_a_checkpoint_without_a_recorded_rule_keeps_the_legacy_one():
    assert rule_of_checkpoint(None) == "weights"
    assert rule_of_checkpoint({"step": 4}) == "rank2"
    assert rule_of_checkpoint({"step": 4, "weight_decay_rule": "weights"}) == "weights"
    with pytest.raises(ValueError, match="weight_decay_rule 'x'"):
        rule_of_checkpoint({"weight_decay_rule": "x"})
