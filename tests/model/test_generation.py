"""generate() with transformers' semantics beyond greedy/sampling parity (tests/model/test_masks_and_decoding.py):
lengths, generation settings from the config and generation_config.json, transformers' logits processors
(repetition penalty, n-gram blocking, minimum lengths), several samples per prompt, dict outputs, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_mega import MegaForCausalLM
from megatron_mega.model.generation_config import GenerationConfig
from tests.helpers import tiny_config, token_ids
from tests.reference.perturb import perturb_weights


def _model(**config) -> MegaForCausalLM:
    torch.manual_seed(0)
    model = MegaForCausalLM(tiny_config(decoder=True, **config)).eval()
    perturb_weights(model, 0, scale=0.05)
    return model


def test_lengths_follow_transformers():
    model = _model()
    assert model.generate(token_ids(1, 24)).shape[1] == 24 + 20  # default max_length 20: 20 new tokens
    assert model.generate(token_ids(1, 6), max_length=9).shape[1] == 9  # max_length counts the prompt
    model.generation_config.max_length = 30  # a configured max_length counts the prompt too
    assert model.generate(token_ids(1, 6)).shape[1] == 30
    with pytest.raises(ValueError, match="the input is 6 tokens long, but max_length is 4"):
        model.generate(token_ids(1, 6), max_length=4)  # returned the prompt silently before
    with pytest.raises(ValueError, match="max_new_tokens must be greater than 0"):
        model.generate(token_ids(1, 6), max_new_tokens=0)


def test_processors_match_transformers_definitions():
    model = _model()
    ids = token_ids(2, 7)
    out = model.generate(ids, max_new_tokens=6, repetition_penalty=1.7, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert len(out.scores) == len(out.logits) == 6 and out.sequences.shape == (2, 13)
    # step 0: every prompt token's score divided (positive) or multiplied (negative) by the penalty
    raw, processed = out.logits[0], out.scores[0]
    expected = raw.clone()
    for row in range(2):
        for token in set(ids[row].tolist()):
            value = raw[row, token]
            expected[row, token] = value * 1.7 if value < 0 else value / 1.7
    torch.testing.assert_close(processed, expected, rtol=0, atol=0)
    assert torch.equal(out.sequences[:, 7:], torch.stack([s.argmax(-1) for s in out.scores], 1))
    # no repeated bigram anywhere in the rows
    blocked = model.generate(ids, max_new_tokens=12, no_repeat_ngram_size=2)
    for row in blocked.tolist():
        pairs = list(zip(row, row[1:]))
        assert len(pairs) == len(set(pairs))
    # eos is suppressed until min_new_tokens
    first = model.generate(ids[:1], max_new_tokens=1)[0, -1].item()
    stopped = model.generate(ids[:1], max_new_tokens=5, eos_token_id=first)
    assert stopped.shape[1] == 8
    held = model.generate(ids[:1], max_new_tokens=5, eos_token_id=first, min_new_tokens=3)
    assert held.shape[1] >= 10 and first not in held[0, 7:10].tolist()


def test_settings_come_from_the_config_and_generation_config_json(tmp_path):
    model = _model()
    ids = token_ids(1, 6)
    penalised = model.generate(ids, max_new_tokens=8, repetition_penalty=5.0)
    model.config.repetition_penalty = 5.0
    model.save_pretrained(tmp_path)
    loaded = MegaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.generate(ids, max_new_tokens=8), penalised)  # was ignored: plain greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "transformers_version": "4"}))
    loaded = MegaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, GenerationConfig) and loaded.generate(ids).shape[1] == 9
    # transformers' idiom: finished rows are padded with the id set there
    first = loaded.generate(ids, max_new_tokens=1)[0, -1].item()
    loaded.generation_config.eos_token_id = first
    loaded.generation_config.pad_token_id = 7
    other = next(p for p in (token_ids(1, 6, seed=k) for k in range(1, 20))
                 if loaded.generate(p, max_new_tokens=1)[0, -1].item() != first)
    rows = loaded.generate(torch.cat([ids, other]), max_new_tokens=4)
    assert rows.shape[1] > 7 and set(rows[0, 7:].tolist()) == {7}


def test_several_samples_dict_outputs_and_eos_types():
    model = _model()
    ids = token_ids(2, 5)
    samples = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=3,
                             generator=torch.Generator().manual_seed(1))
    assert samples.shape == (6, 9) and torch.equal(samples[:3, :5], ids[:1].expand(3, 5))
    with pytest.raises(ValueError, match="num_return_sequences=2: more than one needs do_sample=True"):
        model.generate(ids, max_new_tokens=4, num_return_sequences=2)
    reference = model.generate(ids, max_new_tokens=6, eos_token_id=[int(ids[0, 0])])
    for eos in (np.int64(ids[0, 0]), torch.tensor(int(ids[0, 0]))):
        assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=eos), reference)


def test_the_models_output_settings_do_not_change_generation():
    """return_dict=False, output_attentions=True in the config crashed generate (and the static cache)."""
    reference = _model().generate(token_ids(2, 5), max_new_tokens=5)
    model = _model(return_dict=False, output_attentions=True, output_hidden_states=True)
    for options in ({}, {"use_cache": False}, {"cache_implementation": "static"}):
        assert torch.equal(model.generate(token_ids(2, 5), max_new_tokens=5, **options), reference), options


def test_what_is_not_implemented_is_refused_by_name():
    model = _model()
    with pytest.raises(ValueError, match=r"generate\(\): \['stopping_criteria'\] not supported here"):
        model.generate(token_ids(1, 4), max_new_tokens=2, stopping_criteria=[])
    model.generation_config.num_beams = 3  # e.g. from a config.json
    with pytest.raises(ValueError, match=r"beam search is not implemented \(num_beams=3\)"):
        model.generate(token_ids(1, 4), max_new_tokens=2)


def test_generation_config_json_replaces_and_survives_a_save(tmp_path):
    """As transformers: generation_config.json alone (not laid over config.json) gives the defaults, an edited
    generation config is saved beside config.json, and an unedited one writes nothing."""
    model = _model()
    model.config.repetition_penalty = 5.0
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()
    (tmp_path / "plain" / "generation_config.json").write_text(json.dumps({"max_new_tokens": 4}))
    loaded = MegaForCausalLM.from_pretrained(tmp_path / "plain")
    assert loaded.generation_config.repetition_penalty == 1.0 and loaded.generation_config.eos_token_id is None
    loaded.generation_config.max_new_tokens = 2
    loaded.save_pretrained(tmp_path / "edited")
    again = MegaForCausalLM.from_pretrained(tmp_path / "edited")
    assert again.generate(token_ids(1, 5)).shape[1] == 7


def test_length_and_minimum_precedence_and_explicit_none():
    model = _model()
    ids = token_ids(1, 6)
    model.generation_config.max_new_tokens = 4
    assert model.generate(ids, max_length=12).shape[1] == 10  # max_new_tokens wins over max_length
    model = _model()
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    # min_new_tokens replaces min_length: 1 new token, then eos may stop it
    assert model.generate(ids, max_new_tokens=8, eos_token_id=first, min_length=14, min_new_tokens=1).shape[1] == 8
    model.generation_config.eos_token_id = first
    assert model.generate(ids, max_new_tokens=5).shape[1] == 7
    assert model.generate(ids, max_new_tokens=5, eos_token_id=None).shape[1] == 11  # None given: no eos


def test_returned_logits_are_the_raw_ones():
    """no_repeat_ngram_size wrote -inf into the logits returned as output_logits (the same tensor)."""
    model = _model()
    out = model.generate(token_ids(1, 6), max_new_tokens=8, no_repeat_ngram_size=1, return_dict_in_generate=True,
                         output_logits=True, output_scores=True)
    assert all(torch.isfinite(l).all() for l in out.logits)
    assert any(torch.isinf(s).any() for s in out.scores)


def test_an_unedited_generation_config_follows_config_edits_and_shares_nothing_with_it():
    model = _model()
    ids = token_ids(1, 6)
    plain = model.generate(ids, max_new_tokens=8)
    model.config.repetition_penalty = 5.0  # after the generation config was made
    penalised = model.generate(ids, max_new_tokens=8)
    assert not torch.equal(plain, penalised)
    assert torch.equal(penalised, _model().generate(ids, max_new_tokens=8, repetition_penalty=5.0))
    model = _model(eos_token_id=[2, 5])
    model.generation_config.eos_token_id.append(7)
    assert model.config.eos_token_id == [2, 5]


def test_a_passed_generation_config_takes_the_models_values_for_its_defaults(tmp_path):
    model = _model()
    ids = token_ids(1, 6)
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    model.generation_config.eos_token_id = first
    passed = GenerationConfig(max_new_tokens=6)  # eos left at its default: the model's applies, as transformers
    assert model.generate(ids, generation_config=passed).shape[1] == 7
    fresh = _model()  # a passed config is used as given where it is not at a default (here max_length)
    assert torch.equal(fresh.generate(ids, generation_config={"max_length": 9}), fresh.generate(ids, max_length=9))
    model.generation_config = {"max_new_tokens": 2}  # a mapping (or transformers' GenerationConfig) is converted
    model.save_pretrained(tmp_path)
    assert MegaForCausalLM.from_pretrained(tmp_path).generate(ids).shape[1] == 8


def test_unsupported_generation_settings_from_files_are_refused_and_bad_files_named(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"suppress_tokens": [90], "num_beam_groups": 1}))
    loaded = MegaForCausalLM.from_pretrained(tmp_path)  # num_beam_groups at its default is harmless
    with pytest.raises(ValueError, match=r"generation config asks for \['suppress_tokens'\], which is not"):
        loaded.generate(token_ids(1, 4), max_new_tokens=2)
    (tmp_path / "generation_config.json").write_bytes(b'{"max_new_tokens": \xff}')
    from megatron_mega.model.pretrained import CheckpointError

    with pytest.raises(CheckpointError, match=r"generation_config.json: not UTF-8 text \(byte 0xff"):
        MegaForCausalLM.from_pretrained(tmp_path)


def test_a_passed_config_is_not_changed_and_transformers_nulls_load(tmp_path):
    """generate() filled the model's values into the caller's generation config; and transformers' save writes
    null in config.json for the generation settings it moves to generation_config.json."""
    sampler = _model()
    sampler.generation_config.do_sample, sampler.generation_config.top_k = True, 3
    passed = GenerationConfig(max_new_tokens=4)
    sampler.generate(token_ids(1, 5), generation_config=passed)
    assert passed.do_sample is False and passed.top_k == 50
    # temperature 0 with sampling is greedy decoding, as in transformers
    greedy = _model().generate(token_ids(1, 5), max_new_tokens=4)
    assert torch.equal(_model().generate(token_ids(1, 5), max_new_tokens=4, do_sample=True, temperature=0.0), greedy)
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(do_sample=None, top_k=None, temperature=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = MegaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.do_sample is False and loaded.config.top_k == 50 and loaded.config.temperature == 1.0
