"""The defaults `generate()` reads, with transformers' names: `model.generation_config`.

Built from the model's config.json (whose generation fields transformers keeps there too), or, when there is a
`generation_config.json` beside it, from that file alone (missing keys at their defaults), as transformers'
`from_pretrained` does. Arguments given to `generate()` override it. `save_pretrained` writes the file when the
model's generation config was set or edited apart from config.json. Keys this version does not use are kept
(`extra`); `generate()` refuses what it does not do (beam search, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_mega.json_file import load_json_object

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers 4.57 GenerationConfig keys this does not implement, at the values that ask for nothing: a key here at
# this value is ignored, any other value (or an unknown key) is refused by generate() rather than silently dropped
BOOKKEEPING = ("_from_model_config", "transformers_version")
HARMLESS_DEFAULTS = {
    "assistant_confidence_threshold": 0.4,
    "assistant_early_exit": None, "assistant_lookbehind": 10, "bad_words_ids": None, "begin_suppress_tokens": None,
    "cache_config": None, "cache_implementation": None, "constraints": None, "decoder_start_token_id": None,
    "disable_compile": False, "diversity_penalty": 0.0, "dola_layers": None, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "exponential_decay_length_penalty": None, "force_words_ids": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "guidance_scale": None, "is_assistant": False, "length_penalty": 1.0,
    "low_memory": None, "max_matching_ngram_size": None, "max_time": None, "min_p": None, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "num_beam_groups": 1, "output_attentions": False,
    "output_hidden_states": False, "penalty_alpha": None, "prefill_chunk_size": None,
    "prompt_lookup_num_tokens": None, "remove_invalid_values": False, "renormalize_logits": False,
    "return_legacy_cache": None, "sequence_bias": None, "stop_strings": None, "suppress_tokens": None,
    "target_lookbehind": 10, "token_healing": False, "typical_p": 1.0, "use_cache": True, "watermarking_config": None,
}


@dataclass
class GenerationConfig:
    max_length: int = 20
    max_new_tokens: Optional[int] = None
    min_length: int = 0
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    output_scores: bool = False
    output_logits: Optional[bool] = None
    return_dict_in_generate: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # an id or a list of ids
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The config's generation fields (copies: editing one never edits the config), including those a
        config.json holds that MegaConfig keeps only as unknown keys (max_new_tokens, ...)."""
        values = {name: getattr(config, name) for name in cls.field_names() if hasattr(config, name)}
        values.update({k: v for k, v in getattr(config, "extra", {}).items() if k in cls.field_names()})
        generation = cls(**copy.deepcopy(values))
        # what it was made from: while unedited, generate() reads the config's later values instead
        generation.origin = copy.deepcopy(generation.to_dict())
        return generation

    @classmethod
    def coerce(cls, value: Any) -> "GenerationConfig":
        """Ours, or anything with `to_dict()` (transformers' GenerationConfig) or a mapping, as ours: a copy, so
        what generate() fills in never reaches the caller's object."""
        if isinstance(value, cls):
            return copy.deepcopy(value)
        data = value.to_dict() if hasattr(value, "to_dict") else dict(value)
        generation = cls()
        generation.update({k: v for k, v in copy.deepcopy(data).items() if k not in BOOKKEEPING})
        return generation

    def unsupported(self) -> list[str]:
        """Keys asking for what generate() does not implement (beam groups, suppressed tokens, ...)."""
        return sorted(k for k, v in self.extra.items()
                      if k not in BOOKKEEPING and (k not in HARMLESS_DEFAULTS or v != HARMLESS_DEFAULTS[k]))

    @property
    def follows_model_config(self) -> bool:
        """Made from the model's config and not edited since (transformers' `_from_model_config`):
        save_pretrained writes no generation_config.json, and generate() follows later edits of the config's
        generation parameters (transformers' legacy rule)."""
        return getattr(self, "origin", None) == self.to_dict()

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key in self.field_names():
                setattr(self, key, value)
            else:
                self.extra[key] = value

    @classmethod
    def from_pretrained(cls, directory: str, base: Optional["GenerationConfig"] = None) -> "GenerationConfig":
        """DIRECTORY/generation_config.json when present (over the defaults, not over `base`); else `base` (the
        model config's generation fields)."""
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if not os.path.exists(path):
            return base if base is not None else cls()
        return cls.coerce(load_json_object(path, ValueError, "a generation config"))

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names()}
        out.update(self.extra)
        return out

    def save_pretrained(self, directory: str) -> None:
        from megatron_mega.atomic_io import atomic_write_text

        atomic_write_text(os.path.join(directory, GENERATION_CONFIG_NAME),
                          json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
