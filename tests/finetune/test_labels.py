"""Fine-tuning's labels: how the label column becomes head ids (as transformers' run_glue / run_ner map them), and
the refusals that replace a bare IndexError or ValueError in the middle of training."""

from __future__ import annotations

import datasets
import pytest

from megatron_mega.finetune.examples import ExamplesError, Labels, infer_labels
from megatron_mega.finetune.loop import FinetuneSettings, finetune
from megatron_mega.model.heads import MEGA_HEADS
from tests.helpers import tiny_config

SEQ, TOK = "sequence-classification", "token-classification"


def rows(labels, key="label"):
    return datasets.Dataset.from_dict({"text": ["w"] * len(labels), key: labels})


def test_string_labels_are_numbered_in_sorted_order_over_both_splits():
    labels = infer_labels([("train", rows(["pos", "neg", "pos"])), ("eval", rows(["neutral"]))], SEQ, "label")
    assert labels == Labels(3, ("neg", "neutral", "pos"), by_value=True)
    assert [labels.id_of(v) for v in ("neg", "neutral", "pos")] == [0, 1, 2]
    assert labels.config_overrides() == {"num_labels": 3, "id2label": {0: "neg", 1: "neutral", 2: "pos"},
                                         "label2id": {"neg": 0, "neutral": 1, "pos": 2}, "problem_type": None}
    # a directory fine-tuned before keeps its classifier's order when it names every label
    again = infer_labels([("train", rows(["pos", "neg"]))], SEQ, "label", known_label2id={"pos": 0, "neg": 1})
    assert again.names == ("pos", "neg") and again.id_of("neg") == 1


def test_int_labels_are_their_own_ids_and_are_range_checked():
    assert infer_labels([("train", rows([0, 3, 1]))], SEQ, "label") == Labels(4)
    assert infer_labels([("train", rows([0, 1]))], SEQ, "label", known_label2id={"a": 0, "b": 1, "c": 2}) == Labels(3)
    with pytest.raises(ExamplesError, match=r"^eval: label 2 in 'label' is outside \[0, 2\) \(--num-labels 2\)$"):
        infer_labels([("train", rows([0, 1])), ("eval", rows([2]))], SEQ, "label", num_labels=2)
    with pytest.raises(ExamplesError, match=r"^train: label -1 in 'label' is outside \[0, 2\)$"):
        infer_labels([("train", rows([-1, 1]))], SEQ, "label")


def test_float_labels_and_num_labels_1_are_regression():
    assert infer_labels([("train", rows([0.5, 2.0]))], SEQ, "label") == Labels(1, regression=True)
    assert infer_labels([("train", rows([1, 5, 3]))], SEQ, "label", num_labels=1) == Labels(1, regression=True)
    with pytest.raises(ExamplesError, match=r"^--num-labels 3: the labels in 'label' are floats"):
        infer_labels([("train", rows([0.5, 2.0]))], SEQ, "label", num_labels=3)


def test_class_label_features_and_token_tags():
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "maybe", "yes"])})
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [2, 0]}, features=features)
    assert infer_labels([("train", dataset)], SEQ, "label") == Labels(3, ("no", "maybe", "yes"))
    tags = datasets.Dataset.from_dict({"text": [["a", "b"], ["c"]], "tags": [["B-PER", "O"], ["O"]]})
    labels = infer_labels([("train", tags)], TOK, "tags")
    assert labels.names == ("B-PER", "O") and labels.id_of("O") == 1
    ints = datasets.Dataset.from_dict({"text": [["a", "b"]], "tags": [[4, -100]]})
    assert infer_labels([("train", ints)], TOK, "tags") == Labels(5)  # -100: an ignored word


def test_unusable_label_columns_are_named():
    with pytest.raises(ExamplesError, match=r"^train: column 'label' mixes label types \(int, str\)"):
        infer_labels([("train", rows(["a", "b"])), ("eval", rows([1]))], SEQ, "label")
    with pytest.raises(ExamplesError, match=r"^eval: column 'label' has examples without a label"):
        infer_labels([("train", rows([0, 1])), ("eval", rows([None]))], SEQ, "label")
    with pytest.raises(ExamplesError, match=r"^--num-labels 3: the labels in 'label' name 2 classes \(a, b\)"):
        infer_labels([("train", rows(["a", "b"]))], SEQ, "label", num_labels=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data_prep.train_tokenizer import TrainSettings, train
    from tests.data_prep.conftest import topics

    return train(topics()[:200], TrainSettings(vocab_size=400, threads=1))


def test_string_labels_fine_tune_and_a_second_run_keeps_the_classifier(tmp_path, tokenizer):
    """End to end: string labels train, the saved directory names them, and fine-tuning it again on the same
    classes (num_labels not given) keeps its trained classifier instead of reinitialising it."""
    MEGA_HEADS["masked-lm"](tiny_config(vocab_size=400)).save_pretrained(tmp_path / "base")
    data = datasets.Dataset.from_dict({"text": ["the cat sat", "a dog ran", "the cat ran", "a dog sat"] * 4,
                                       "label": ["cat", "dog", "cat", "dog"] * 4})
    settings = FinetuneSettings(epochs=1, batch_size=4, max_length=16)
    lines: list[str] = []
    result = finetune(str(tmp_path / "base"), data, data, settings, tokenizer, output_dir=str(tmp_path / "tuned"),
                      print_fn=lines.append)
    assert set(result.eval_after) == {"loss", "accuracy"}
    tuned = MEGA_HEADS[SEQ].from_pretrained(tmp_path / "tuned")
    assert tuned.config.id2label == {0: "cat", 1: "dog"} and tuned.config.label2id == {"cat": 0, "dog": 1}
    lines.clear()
    finetune(str(tmp_path / "tuned"), data, data, settings, tokenizer, print_fn=lines.append)
    assert lines[0].endswith("tensors; new: none; 2 label(s): cat, dog"), lines[0]


def test_regression_reports_no_accuracy(tmp_path, tokenizer):
    MEGA_HEADS["masked-lm"](tiny_config(vocab_size=400)).save_pretrained(tmp_path / "base")
    data = datasets.Dataset.from_dict({"text": ["good", "bad", "fine", "awful"], "label": [5, 1, 4, 1]})
    result = finetune(str(tmp_path / "base"), data, data, FinetuneSettings(num_labels=1, epochs=1, batch_size=2),
                      tokenizer, print_fn=lambda *a: None)
    assert set(result.eval_after) == {"loss"}


def test_a_folder_without_a_model_is_one_error(tmp_path, tokenizer):
    from megatron_mega.model.pretrained import CheckpointError

    data = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(CheckpointError, match="no config.json; not a Hugging Face model directory"):
        finetune(str(tmp_path / "missing"), data, data, FinetuneSettings(), tokenizer, print_fn=lambda *a: None)


def test_the_output_is_new_or_forced_and_never_the_model_read(tmp_path, tokenizer):
    """--output used to be written into whatever was there, the model being read included (a causal directory
    became a classifier with the old README and conversion.json beside it)."""
    from megatron_mega.model.pretrained import CheckpointError

    MEGA_HEADS["masked-lm"](tiny_config(vocab_size=400)).save_pretrained(tmp_path / "base")
    data = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [0, 1]})
    settings = FinetuneSettings(epochs=1, batch_size=2)
    quiet = dict(print_fn=lambda *a: None)
    for output in (tmp_path / "base", tmp_path):
        with pytest.raises(CheckpointError, match="holds the model being fine-tuned"):
            finetune(str(tmp_path / "base"), data, data, settings, tokenizer, output_dir=str(output), force=True,
                     **quiet)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with pytest.raises(CheckpointError, match=r"out: exists; pass --force to replace it"):
        finetune(str(tmp_path / "base"), data, data, settings, tokenizer, output_dir=str(tmp_path / "out"), **quiet)
    finetune(str(tmp_path / "base"), data, data, settings, tokenizer, output_dir=str(tmp_path / "out"), force=True,
             **quiet)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "megatron_mega_tokenizer.json", "model.safetensors", "tokenizer.model"]  # no stale file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_examples_that_cannot_be_read_are_named_at_once(tmp_path):
    from megatron_mega.finetune.examples import load_examples

    with pytest.raises(ExamplesError, match=r"missing.jsonl: no such file$"):
        load_examples(str(tmp_path / "missing.jsonl"))  # not looked up on the hub (30 s of retries offline)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{"text": oops}\n')
    with pytest.raises(ExamplesError, match=r"bad.jsonl: not readable as jsonl"):
        load_examples(str(tmp_path / "bad.jsonl"))


def test_token_classification_with_string_tags(tmp_path, tokenizer):
    """Tags named by strings (as conll-style datasets hold them) are numbered, saved as id2label, and trained on."""
    MEGA_HEADS["masked-lm"](tiny_config(vocab_size=400)).save_pretrained(tmp_path / "base")
    data = datasets.Dataset.from_dict({"text": [["the", "cat", "sat"], ["a", "dog", "ran"]] * 4,
                                       "tags": [["O", "B-ANIMAL", "O"], ["O", "B-ANIMAL", "O"]] * 4})
    settings = FinetuneSettings(task=TOK, epochs=1, batch_size=4, max_length=16, label_key="tags")
    result = finetune(str(tmp_path / "base"), data, data, settings, tokenizer, output_dir=str(tmp_path / "ner"),
                      print_fn=lambda *a: None)
    assert 0.0 <= result.eval_after["accuracy"] <= 1.0
    tuned = MEGA_HEADS[TOK].from_pretrained(tmp_path / "ner")
    assert tuned.config.id2label == {0: "B-ANIMAL", 1: "O"} and tuned.config.num_labels == 2
