"""Starting weights from a Hugging Face directory: complete LM state, architecture mismatches refused."""

import pytest
import torch

from megatron_mega import CheckpointError, MegaForCausalLM, MegaForSequenceClassification
from megatron_mega.convert.hf_import import initial_lm_state
from tests.helpers import tiny_config


def test_lm_state_from_a_causal_directory(tmp_path):
    config = tiny_config(decoder=True)
    source = MegaForCausalLM(config)
    source.save_pretrained(tmp_path)
    state = initial_lm_state(str(tmp_path), config, "causal", seed=0)
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())


def test_classifier_directory_keeps_seeded_lm_head(tmp_path):
    config = tiny_config(decoder=True)
    MegaForSequenceClassification(config).save_pretrained(tmp_path)
    state = initial_lm_state(str(tmp_path), config, "causal", seed=5)
    torch.manual_seed(5)
    fresh = MegaForCausalLM(config).state_dict()
    assert torch.equal(state["lm_head.bias"], fresh["lm_head.bias"]) and torch.equal(state["dense.weight"],
                                                                                   fresh["dense.weight"])


def test_architecture_mismatch_names_the_fields(tmp_path):
    MegaForCausalLM(tiny_config(decoder=True, attention_activation="laplace")).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"attention_activation \('laplace' there, 'softmax' here\)"):
        initial_lm_state(str(tmp_path), tiny_config(decoder=True), "causal", seed=0)


def test_an_untied_directory_does_not_start_a_tied_run(tmp_path):
    MegaForCausalLM(tiny_config(decoder=True, tie_word_embeddings=False)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings \(False there, True here\)"):
        initial_lm_state(str(tmp_path), tiny_config(decoder=True), "causal", seed=0)
