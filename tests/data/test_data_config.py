"""DataConfig is checked when built; every error names the field."""

import pytest

from megatron_mega.data.config import DataConfig, DataConfigError, MLMConfig, parse_split


def test_defaults_and_from_dict():
    config = DataConfig.from_dict({"paths": ["a", "b"], "weights": [3, 1], "split": "98,2", "objective": "mlm",
                                   "mlm": {"mask_prob": 0.2}})
    assert config.weights == [3.0, 1.0] and config.split_fractions == (0.98, 0.02, 0.0)
    assert config.mlm == MLMConfig(mask_prob=0.2) and config.seq_len == 2048
    assert DataConfig.from_dict(config.to_dict()) == config
    assert DataConfig(paths="one").paths == ["one"]
    assert parse_split("969,30,1") == pytest.approx((0.969, 0.030, 0.001))


@pytest.mark.parametrize("fields, message", [
    ({"paths": []}, r"^paths: "),
    ({"paths": ["a", 3]}, r"^paths\[1\]: "),
    ({"weights": [1.0]}, r"^weights: 1 weight\(s\) for 2 path"),
    ({"weights": [1.0, -1.0]}, r"^weights\[1\]: "),
    ({"weights": [1.0, float("nan")]}, r"^weights\[1\]: "),
    ({"weights": [0, 0]}, r"^weights: all weights are zero"),
    ({"seq_len": 0}, r"^seq_len: "),
    ({"seq_len": 12.5}, r"^seq_len: "),
    ({"seq_len": True}, r"^seq_len: "),
    ({"split": "90,x,1"}, r"^split: "),
    ({"split": "1,2,3,4"}, r"^split: "),
    ({"split": "0,0,0"}, r"^split: "),
    ({"split": "-1,2"}, r"^split: "),
    ({"seed": -1}, r"^seed: "),
    ({"cache_dir": ""}, r"^cache_dir: "),
    ({"objective": "prefix"}, r"^objective: 'prefix' is not one of"),
    ({"mlm": {"mask_prob": 1.5}}, r"^mlm.mask_prob: "),
    ({"mlm": {"mask_prob": 0.0}}, r"^mlm.mask_prob: "),
    ({"mlm": {"mask_token_prob": 0.8, "random_token_prob": 0.3}}, r"^mlm.random_token_prob: "),
    ({"mlm": {"mask_fraction": 0.1}}, r"^mlm.mask_fraction: unknown field"),
    ({"verify_checksums": "yes"}, r"^verify_checksums: "),
    ({"num_workers": -1}, r"^num_workers: must be an integer >= 0"),
    ({"seqlen": 5}, r"^seqlen: unknown field"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(DataConfigError, match=message):
        DataConfig.from_dict({"paths": ["a", "b"], **fields})


def test_paths_are_required():
    with pytest.raises(DataConfigError, match=r"^paths: required field is missing"):
        DataConfig.from_dict({"seq_len": 8})
