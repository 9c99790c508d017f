"""Hugging Face-format checkpoints: round trips, cross-head loading with a report, sharding, safe loading."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_mega import (
    MEGA_HEADS,
    CheckpointError,
    MegaForCausalLM,
    MegaForMaskedLM,
    MegaForSequenceClassification,
    MegaModel,
)
from tests.helpers import tiny_config, token_ids


def test_round_trip_is_exact_and_drops_the_tied_copy(tmp_path):
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MegaForCausalLM"] and config["model_type"] == "mega"
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and "mega.embedding_layer.word_embeddings.weight" in tensors
    loaded, report = MegaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not report.missing_keys and not report.unexpected_keys and not report.mismatched_keys
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    ids = token_ids(2, 9)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_an_untied_head_never_overwrites_the_embeddings_of_a_tied_model(tmp_path):
    """A directory saved with tie_word_embeddings=False holds two tensors; a tied model has one. The input
    embeddings are kept (as transformers does) and the head that differs is reported as unused, never copied over
    them: before, whichever of the two was loaded last silently became the embeddings."""
    torch.manual_seed(0)
    source = MegaForCausalLM(tiny_config(decoder=True, tie_word_embeddings=False))
    with torch.no_grad():
        source.lm_head.weight.normal_()
    source.save_pretrained(tmp_path)
    embeddings = source.get_input_embeddings().weight.detach().clone()
    tied, report = MegaForCausalLM.from_pretrained(tmp_path, tie_word_embeddings=True, output_loading_info=True)
    assert torch.equal(tied.get_input_embeddings().weight, embeddings)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert report.unexpected_keys == ["lm_head.weight"] and not report.missing_keys
    untied = MegaForCausalLM.from_pretrained(tmp_path)  # as saved: both kept
    assert torch.equal(untied.lm_head.weight, source.lm_head.weight)


@pytest.mark.parametrize("source", list(MEGA_HEADS))
def test_any_head_loads_into_any_other(tmp_path, source):
    """Shared weights are loaded (same MegaModel outputs), head weights are new and listed."""
    decoder = source == "causal-lm"
    model = MEGA_HEADS[source](tiny_config(decoder=decoder)).eval()
    model.save_pretrained(tmp_path)
    ids = token_ids(2, 8)
    with torch.no_grad():
        reference = model.mega(ids).last_hidden_state
    for target, cls in MEGA_HEADS.items():
        other, report = cls.from_pretrained(tmp_path, output_loading_info=True)
        with torch.no_grad():
            torch.testing.assert_close(other.mega(ids).last_hidden_state, reference, rtol=0, atol=0)
        own = set(other.state_dict())
        assert set(report.missing_keys) <= own
        assert not any(k.startswith("mega.layers") for k in report.missing_keys)
        if target != source:
            assert report.missing_keys or report.mismatched_keys, f"{source} -> {target} should initialise a head"
    base, report = MegaModel.from_pretrained(tmp_path, output_loading_info=True)
    torch.testing.assert_close(base(ids).last_hidden_state, reference, rtol=0, atol=0)


def test_bare_model_checkpoint_loads_into_a_head(tmp_path):
    base = MegaModel(tiny_config()).eval()
    base.save_pretrained(tmp_path)
    head, report = MegaForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "pooler.dense.weight" in report.unexpected_keys
    assert set(report.missing_keys) == {"dense.weight", "dense.bias", "mlm_head.bias"}
    ids = token_ids(1, 5)
    torch.testing.assert_close(head.mega(ids).last_hidden_state, base(ids).last_hidden_state, rtol=0, atol=0)


def test_label_count_change_needs_consent(tmp_path):
    MegaForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes") as error:
        MegaForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert "classifier.out_proj.weight [2, 32] vs [5, 32]" in str(error.value)
    assert "classifier.out_proj.bias [2] vs [5]" in str(error.value)
    model, report = MegaForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    assert model.config.num_labels == 5
    assert {k for k, _, _ in report.mismatched_keys} == {"classifier.out_proj.weight", "classifier.out_proj.bias"}


def test_bidirectional_checkpoint_into_a_causal_model_is_refused(tmp_path):
    MegaForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="bidirectional EMA"):
        MegaForCausalLM.from_pretrained(tmp_path, is_decoder=True, bidirectional=False)


def test_sharded_save_and_load(tmp_path):
    model = MegaForMaskedLM(tiny_config()).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = MegaForMaskedLM.from_pretrained(tmp_path)
    ids = token_ids(2, 6)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    os.remove(tmp_path / shards[0])
    with pytest.raises(CheckpointError, match="missing"):
        MegaForMaskedLM.from_pretrained(tmp_path)


def test_legacy_bin_is_read_without_unpickling_objects(tmp_path):
    model = MegaModel(tiny_config()).eval()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = MegaModel.from_pretrained(tmp_path)
    ids = token_ids(1, 4)
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        MegaModel.from_pretrained(tmp_path)


def test_missing_directory_and_weights_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        MegaModel.from_pretrained(tmp_path / "nope")
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        MegaModel.from_pretrained(tmp_path)


def test_dtype_on_load(tmp_path):
    MegaModel(tiny_config()).save_pretrained(tmp_path)
    model = MegaModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model(token_ids(1, 4)).last_hidden_state.dtype == torch.bfloat16


def test_dtype_names_auto_and_the_saved_dtype(tmp_path):
    """transformers' dtype forms: a name, "torch.<name>", "auto" (config.json's `dtype`, which save_pretrained
    records from the weights: a bfloat16 directory loads as bfloat16)."""
    MegaModel(tiny_config()).save_pretrained(tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    for name, expected in (("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("auto", torch.float32)):
        assert MegaModel.from_pretrained(tmp_path / "fp32", dtype=name).dtype == expected, name
    MegaModel.from_pretrained(tmp_path / "fp32", dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert MegaModel.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert MegaModel.from_pretrained(tmp_path / "bf16").dtype == torch.float32  # no dtype: float32, as transformers
    with pytest.raises(CheckpointError, match=r"^dtype: 'int8' is not a floating-point dtype"):
        MegaModel.from_pretrained(tmp_path / "fp32", dtype="int8")


def test_loading_keywords_are_options_config_fields_or_an_error(tmp_path):
    MegaForSequenceClassification(tiny_config()).save_pretrained(tmp_path)
    model = MegaForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, ignore_mismatched_sizes=True, device_map="cpu", local_files_only=True,
        low_cpu_mem_usage=True, revision="main")
    assert model.config.num_labels == 3 and model.device == torch.device("cpu")
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert not {"device_map", "local_files_only", "low_cpu_mem_usage", "revision"} & set(saved)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_label'\]"):
        MegaForSequenceClassification.from_pretrained(tmp_path, num_label=3)  # a typo is not a new config field
    with pytest.raises(CheckpointError, match="revision: 'v2'"):
        MegaForSequenceClassification.from_pretrained(tmp_path, revision="v2")
    with pytest.raises(CheckpointError, match="device_map: a per-module map is not supported"):
        MegaForSequenceClassification.from_pretrained(tmp_path, device_map={"": 0})


def test_resize_token_embeddings_keeps_rows_and_ties():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    ids = token_ids(1, 6)
    before = model(ids).logits
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.lm_head.bias.shape == (120,)
    torch.testing.assert_close(model(ids).logits[..., :97], before)
    model.resize_token_embeddings(50)
    assert model(token_ids(1, 6, vocab=50)).logits.shape == (1, 6, 50)


def test_input_embedding_accessors_and_parameter_counts():
    model = MegaForMaskedLM(tiny_config())
    new = torch.nn.Embedding(97, 32, padding_idx=1)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.mlm_head.weight is new.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - 97 * 32
    for p in model.mega.parameters():
        p.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("mega."))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=4)).train()
    ids = token_ids(2, 10)
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)
