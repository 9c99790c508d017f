"""Label conventions and outputs of the six heads (transformers' conventions)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mega import (
    MegaForCausalLM,
    MegaForMaskedLM,
    MegaForMultipleChoice,
    MegaForQuestionAnswering,
    MegaForSequenceClassification,
    MegaForTokenClassification,
    MegaModel,
)
from tests.helpers import tiny_config, token_ids


def test_causal_lm_shifts_labels_and_ignores_minus_100():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    ids = token_ids(2, 10)
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape == (2, 10, 97)


def test_masked_lm_does_not_shift():
    model = MegaForMaskedLM(tiny_config()).eval()
    ids = token_ids(2, 10)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 3], ids[:, 3]))


def test_lm_heads_are_tied_to_the_embeddings():
    for cls, name in [(MegaForCausalLM, "lm_head"), (MegaForMaskedLM, "mlm_head")]:
        model = cls(tiny_config(decoder=cls is MegaForCausalLM))
        assert getattr(model, name).weight is model.get_input_embeddings().weight
        untied = cls(tiny_config(decoder=cls is MegaForCausalLM, tie_word_embeddings=False))
        assert getattr(untied, name).weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize("num_labels, labels, expected", [
    (1, torch.tensor([0.5, -1.0]), "regression"),
    (3, torch.tensor([2, 0]), "single_label_classification"),
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
])
def test_sequence_classification_problem_types(num_labels, labels, expected):
    model = MegaForSequenceClassification(tiny_config(num_labels=num_labels)).eval()
    out = model(token_ids(2, 7), labels=labels)
    assert model.config.problem_type == expected
    logits = out.logits
    if expected == "regression":
        ref = F.mse_loss(logits.squeeze(), labels)
    elif expected == "single_label_classification":
        ref = F.cross_entropy(logits, labels)
    else:
        ref = F.binary_cross_entropy_with_logits(logits, labels)
    torch.testing.assert_close(out.loss, ref)


def test_multiple_choice_scores_each_choice():
    model = MegaForMultipleChoice(tiny_config()).eval()
    ids = token_ids(6, 8).view(2, 3, 8)
    out = model(ids, labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 3)
    flat = model.classifier(model.mega(ids.view(6, 8)).pooler_output).view(2, 3)
    torch.testing.assert_close(out.logits, flat)
    torch.testing.assert_close(out.loss, F.cross_entropy(flat, torch.tensor([1, 2])))


def test_token_classification_ignores_minus_100():
    model = MegaForTokenClassification(tiny_config(num_labels=4)).eval()
    labels = torch.tensor([[0, 1, -100, 3, 2], [-100, -100, 1, 1, 0]])
    out = model(token_ids(2, 5), labels=labels)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))


def test_question_answering_clamps_positions_outside_the_sequence():
    model = MegaForQuestionAnswering(tiny_config()).eval()
    out = model(token_ids(2, 6), start_positions=torch.tensor([1, 50]), end_positions=torch.tensor([3, 60]))
    # the second example's positions are clamped to 6 = ignore_index, so only the first counts
    ref = (F.cross_entropy(out.start_logits[:1], torch.tensor([1]))
           + F.cross_entropy(out.end_logits[:1], torch.tensor([3]))) / 2
    torch.testing.assert_close(out.loss, ref)
    assert out.start_logits.shape == out.end_logits.shape == (2, 6)


def test_outputs_expose_hidden_states_attentions_and_tuples():
    model = MegaForMaskedLM(tiny_config()).eval()
    ids = token_ids(2, 6)
    out = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 6, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 1, 6, 6)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 1, 6))
    assert torch.equal(out["logits"], out.logits) and torch.equal(out[0], out.logits)
    as_tuple = model(ids, return_dict=False)
    assert torch.equal(as_tuple[0], out.logits)
    assert "logits" in out and "loss" not in out and out.get("loss", 1) == 1 and dict(out.items()).keys() == {
        "logits", "hidden_states", "attentions"}


def test_a_key_test_does_not_compute_deferred_logits():
    """With labels the causal LM defers its logits; `"loss" in out`, `keys()` and `get("loss")` must not compute
    them (a tokens x vocabulary product, refused once the weights changed)."""
    model = MegaForCausalLM(tiny_config(decoder=True))
    ids = token_ids(2, 8)
    out = model(ids, labels=ids)
    assert "logits" in out and "loss" in out and out.keys() == ["loss", "logits"]
    assert out.get("loss") is out.loss and "logits" in out.__dict__["_lazy"]  # still deferred


def test_tuples_keep_transformers_positions():
    """return_dict=False gives transformers' MEGA tuples position for position, Nones kept: (loss?, head outputs,
    hidden_states, past_key_values, attentions, cross_attentions) — so `outputs[2]` means the same in both."""
    ids = token_ids(2, 6)
    classifier = MegaForSequenceClassification(tiny_config(num_labels=3)).eval()
    out = classifier(ids, labels=torch.tensor([0, 2]), output_hidden_states=True, return_dict=False)
    assert len(out) == 6 and out[0].ndim == 0 and out[1].shape == (2, 3) and len(out[2]) == 3
    assert out[3] is None and out[4] is None and out[5] is None
    causal = MegaForCausalLM(tiny_config(decoder=True)).eval()
    out = causal(ids, use_cache=True, output_attentions=True, return_dict=False)
    assert len(out) == 5 and out[0].shape == (2, 6, 97) and out[1] is None  # no hidden states asked for
    assert type(out[2]).__name__ == "MegaCache"
    assert len(out[3]) == 2 and out[4] is None
    qa = MegaForQuestionAnswering(tiny_config()).eval()
    start, end, hidden, cache, attentions, cross = qa(ids, return_dict=False)
    assert start.shape == end.shape == (2, 6) and hidden is cache is attentions is cross is None
    base = MegaModel(tiny_config()).eval()(ids, return_dict=False)
    assert len(base) == 6 and base[0].shape == (2, 6, 32)


def test_token_types_change_the_output_and_default_to_type_zero():
    model = MegaModel(tiny_config(add_token_type_embeddings=True)).eval()
    ids = token_ids(2, 6)
    zeros = torch.zeros_like(ids)
    default = model(ids).last_hidden_state
    torch.testing.assert_close(model(ids, token_type_ids=zeros).last_hidden_state, default)
    assert not torch.allclose(model(ids, token_type_ids=torch.ones_like(ids)).last_hidden_state, default)


def test_inputs_embeds_equal_input_ids():
    model = MegaModel(tiny_config()).eval()
    ids = token_ids(2, 6)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).last_hidden_state, model(ids).last_hidden_state)
    with pytest.raises(ValueError):
        model(ids, inputs_embeds=embeds)


@pytest.mark.parametrize("config", [
    dict(normalize_before_mega=False, normalize_before_ffn=False),
    dict(use_normalized_ffn=False),
    dict(normalization_type="layernorm", norm_affine=False),
    dict(normalization_type="batchnorm"),
    dict(use_feature_dropout=True, dropout_prob=0.2, hidden_dropout_prob=0.2),
    dict(activation="gelu", attention_activation="relu2", relative_positional_bias="simple"),
])
def test_variants_train(config):
    model = MegaForMaskedLM(tiny_config(**config)).train()
    ids = token_ids(4, 12)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_logits_to_keep_computes_the_last_rows_only():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    ids = token_ids(2, 9)
    full = model(ids).logits
    last = model(ids, logits_to_keep=2).logits
    assert last.shape == (2, 2, 97)
    torch.testing.assert_close(last, full[:, -2:])
