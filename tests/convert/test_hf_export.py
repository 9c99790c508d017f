"""Hugging Face export: loads into every head with the same hidden states, self-check, no partial output."""

import json
import os

import pytest
import torch

from megatron_mega import MEGA_HEADS, MegaForCausalLM
from megatron_mega.convert import hf_export
from tests.helpers import tiny_config, token_ids


@pytest.fixture()
def trained_like():
    torch.manual_seed(3)
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=8))
    with torch.no_grad():  # move every weight away from its initial value, as training would
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_export_loads_into_every_head_with_identical_hidden_states(tmp_path, trained_like):
    report = hf_export.export_hf(trained_like, str(tmp_path / "out"), metadata={"step": 7, "tokens": 1234})
    assert report.max_relative_error == 0.0 and report.architecture == "MegaForCausalLM"
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "README.md", "conversion.json"} <= files
    assert "| step | 7 |" in (tmp_path / "out" / "README.md").read_text()
    ids = token_ids(2, 12)
    with torch.no_grad():
        expected = trained_like.mega(ids).last_hidden_state
        for cls in MEGA_HEADS.values():
            head = cls.from_pretrained(tmp_path / "out")
            assert torch.equal(head.mega(ids).last_hidden_state, expected), cls.__name__
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


@pytest.mark.parametrize("head", ["sequence-classification", "token-classification", "question-answering"])
def test_export_as_another_head_records_new_weights(tmp_path, trained_like, head):
    report = hf_export.export_hf(trained_like, str(tmp_path / head), head=head,
                                 num_labels=None if head == "question-answering" else 3)
    config = json.loads((tmp_path / head / "config.json").read_text())
    assert config["architectures"] == [report.architecture] and config["model_type"] == "mega"
    assert report.newly_initialised and all(not k.startswith("mega.") for k in report.newly_initialised)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(tmp_path, trained_like, dtype):
    from safetensors.torch import load_file

    report = hf_export.export_hf(trained_like, str(tmp_path / dtype), dtype=dtype)
    tensors = load_file(tmp_path / dtype / "model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {f"torch.{dtype}"}
    assert report.max_relative_error <= hf_export.SELF_CHECK_RTOL[dtype]


def test_refuses_to_overwrite_without_force(tmp_path, trained_like):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(hf_export.ExportError, match="exists"):
        hf_export.export_hf(trained_like, str(out))
    assert (out / "keep.txt").read_text() == "mine"
    hf_export.export_hf(trained_like, str(out), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_self_check_leaves_nothing(tmp_path, trained_like, monkeypatch):
    monkeypatch.setitem(hf_export.SELF_CHECK_RTOL, "float32", -1.0)
    with pytest.raises(hf_export.ExportError, match="self-check failed"):
        hf_export.export_hf(trained_like, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_bad_arguments(tmp_path, trained_like):
    with pytest.raises(hf_export.ExportError, match="head"):
        hf_export.export_hf(trained_like, str(tmp_path / "x"), head="seq2seq")
    with pytest.raises(hf_export.ExportError, match="dtype"):
        hf_export.export_hf(trained_like, str(tmp_path / "x"), dtype="int8")
    # a question-answering head with 3 outputs would save, then fail in every forward (ours and transformers')
    with pytest.raises(hf_export.ExportError, match=r"^num_labels 3: the question-answering head has exactly 2"):
        hf_export.export_hf(trained_like, str(tmp_path / "x"), head="question-answering", num_labels=3)
    assert os.listdir(tmp_path) == []
