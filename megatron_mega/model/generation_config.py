"""The defaults `generate()` reads, with transformers' names: `model.generation_config`.

Built from the model's config.json (whose generation fields transformers keeps there too), or, when there is a
`generation_config.json` beside it, from that file alone (missing keys at their defaults), as transformers'
`from_pretrained` does. Arguments given to `generate()` override it. `save_pretrained` writes the file when the
model's generation config was set or edited apart from config.json. Keys this version does not use are kept
(`extra`); `generate()` refuses what it does not do (beam search, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_mega.json_file import load_json_object

GENERATION_CONFIG_NAME = "generation_config.json"


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
    output_logits: bool = False
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
        generation = cls(**{name: getattr(config, name) for name in cls.field_names() if hasattr(config, name)})
        generation.origin = generation.to_dict()  # what it was made from: unedited, the config's later values win
        return generation

    @property
    def follows_model_config(self) -> bool:
        """Made from the model's config and not edited since (transformers' `_from_model_config`): generate()
        then reads the config's current values, and save_pretrained writes no generation_config.json."""
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
        generation = cls()
        data = load_json_object(path, ValueError, "a generation config")
        bookkeeping = ("transformers_version", "_from_model_config")
        generation.update({k: v for k, v in data.items() if k not in bookkeeping})
        return generation

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names()}
        out.update(self.extra)
        return out

    def save_pretrained(self, directory: str) -> None:
        from megatron_mega.atomic_io import atomic_write_text

        atomic_write_text(os.path.join(directory, GENERATION_CONFIG_NAME),
                          json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
