import json
from pathlib import Path

import pytest

from megatron_mega import ConfigError, MegaConfig

DEFAULTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "hf_mega" / "megaconfig_defaults.json"


@pytest.fixture(scope="module")
def reference_defaults() -> dict:
    if not DEFAULTS.exists():
        pytest.skip(f"{DEFAULTS} not present")
    data = json.loads(DEFAULTS.read_text())
    data.pop("transformers_version")  # written by transformers about itself, not a hyper-parameter
    return data


def test_every_transformers_field_with_the_same_default(reference_defaults):
    ours = MegaConfig().to_dict()
    assert set(ours) == set(reference_defaults)
    for key, value in reference_defaults.items():
        assert ours[key] == value, key


def test_json_round_trip(tmp_path):
    config = MegaConfig(hidden_size=64, num_labels=3, use_chunking=True, chunk_size=16, problem_type="regression",
                        extra={"custom_key": [1, 2]})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "mega"
    assert data["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert data["custom_key"] == [1, 2]
    loaded = MegaConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.num_labels == 3 and loaded.id2label[2] == "LABEL_2"


def test_num_labels_shorthand_and_override(tmp_path):
    MegaConfig(num_labels=5).save_pretrained(tmp_path)
    assert MegaConfig.from_pretrained(tmp_path).num_labels == 5
    assert MegaConfig.from_pretrained(tmp_path, num_labels=2).num_labels == 2


@pytest.mark.parametrize("fields, message", [
    (dict(relative_positional_bias="rotary", shared_representation_size=31), "shared_representation_size"),
    (dict(is_decoder=True, bidirectional=True), "bidirectional"),
    (dict(use_chunking=True, chunk_size=0), "chunk_size"),
    (dict(use_chunking=True, chunk_size=-1), "chunk_size"),
    (dict(normalization_type="groupnorm"), "normalization_type"),
    (dict(attention_activation="gelu"), "attention_activation"),
    (dict(relative_positional_bias="alibi"), "relative_positional_bias"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dropout_prob=1.5), "dropout_prob"),
    (dict(truncation=0), "truncation"),
    (dict(num_attention_heads=2), "num_attention_heads"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(pad_token_id=40000), "pad_token_id"),
    (dict(problem_type="ranking"), "problem_type"),
    # a quoted "false" is a truthy string: it used to turn the feature on
    (dict(add_lm_hidden_dense_layer="false"), r"^add_lm_hidden_dense_layer: expected true or false, got 'false'$"),
    (dict(use_chunking="maybe"), r"^use_chunking: expected true or false"),
    (dict(chunk_size=128.0), r"^chunk_size: expected an integer, got 128.0$"),
    (dict(truncation="none"), r"^truncation: expected an integer or null"),
    (dict(dropout_prob="0.1"), r"^dropout_prob: expected a number"),
    (dict(activation=1), r"^activation: expected a string"),
])
def test_contradictions_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        MegaConfig(**fields)


def test_rotary_checks_the_rotated_size_not_hidden_size():
    # transformers' defect 5: it checks hidden_size % 2 although it rotates shared_representation_size
    MegaConfig(hidden_size=33, shared_representation_size=16, relative_positional_bias="rotary")
    with pytest.raises(ConfigError):
        MegaConfig(hidden_size=32, shared_representation_size=15, relative_positional_bias="rotary")


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  oops\n}\n')
    with pytest.raises(ConfigError, match=r"config.json: line 3"):
        MegaConfig.from_json_file(path)
    path.write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type"):
        MegaConfig.from_json_file(path)


def test_a_list_of_end_of_sequence_ids_loads(tmp_path):
    """transformers allows several eos ids (generation stops at any); the scalar type checks must not refuse it."""
    config = MegaConfig(eos_token_id=[2, 3])
    config.to_json_file(tmp_path / "config.json")
    assert MegaConfig.from_pretrained(tmp_path).eos_token_id == [2, 3]
