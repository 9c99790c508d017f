"""MegaConfig: the model's hyper-parameters, field for field transformers' MegaConfig (4.57.6).

Every name and default matches `MegaConfig().to_dict()` of transformers, so a `config.json` written here loads in
transformers and one written by transformers loads here. Contradictions are refused when the config is built, one
message per problem, naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

NORMALIZATION_TYPES = ("layernorm", "scalenorm", "rmsnorm", "batchnorm", "syncbatchnorm")
ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
RELATIVE_POSITIONAL_BIASES = ("simple", "rotary")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "relu", "tanh", "sigmoid", "linear")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys that transformers derives or writes for bookkeeping; they are never model hyper-parameters.
_DERIVED_KEYS = ("num_labels", "use_return_dict")


class ConfigError(ValueError):
    """A MegaConfig whose fields contradict each other or are out of range."""


# transformers also accepts the string "never" (early_stopping) and lists of ids (several end-of-sequence tokens)
_LOOSELY_TYPED = frozenset({"early_stopping", "eos_token_id", "forced_eos_token_id"})


@functools.lru_cache(maxsize=None)
def _scalar_fields() -> dict[str, tuple[type, bool]]:
    """name -> (bool | int | float | str, Optional?) for MegaConfig's scalar fields."""
    out = {}
    for name, hint in typing.get_type_hints(MegaConfig).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        kind = next((a for a in args if a is not type(None)), None) if optional else hint
        if kind in (bool, int, float, str) and name not in _LOOSELY_TYPED:
            out[name] = (kind, optional)
    return out


@dataclass
class MegaConfig:
    # --- MEGA architecture (transformers' MegaConfig.__init__ arguments, same order) ---
    vocab_size: int = 30522
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 256
    ema_projection_size: int = 16
    bidirectional: bool = True
    shared_representation_size: int = 64
    use_chunking: bool = False
    chunk_size: int = -1
    truncation: Optional[int] = None
    normalize_before_mega: bool = True
    normalization_type: str = "scalenorm"
    norm_affine: bool = True
    activation: str = "silu"
    attention_activation: str = "softmax"
    dropout_prob: float = 0.1
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    use_feature_dropout: bool = False
    use_normalized_ffn: bool = True
    nffn_hidden_size: int = 256
    normalize_before_ffn: bool = True
    nffn_activation_dropout_prob: float = 0.1
    max_positions: int = 2048
    add_token_type_embeddings: bool = False
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    ema_delta_alpha_range: float = 0.2
    ema_beta_range: float = 0.02
    ema_gamma_omega_range: float = 1.0
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    relative_positional_bias: str = "rotary"
    classifier_dropout: Optional[float] = None
    use_cache: bool = True
    add_lm_hidden_dense_layer: bool = True
    num_attention_heads: int = 1

    # --- generic fields of transformers' PretrainedConfig that MEGA's config.json carries ---
    is_decoder: bool = False
    add_cross_attention: bool = False
    is_encoder_decoder: bool = False
    tie_word_embeddings: bool = True
    tie_encoder_decoder: bool = False
    architectures: Optional[list] = None
    id2label: Optional[dict] = None
    label2id: Optional[dict] = None
    problem_type: Optional[str] = None
    finetuning_task: Optional[str] = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    torchscript: bool = False
    dtype: Optional[str] = None
    use_bfloat16: bool = False
    tf_legacy_loss: bool = False
    pruned_heads: dict = field(default_factory=dict)
    chunk_size_feed_forward: int = 0
    cross_attention_hidden_size: Optional[int] = None
    tokenizer_class: Optional[str] = None
    prefix: Optional[str] = None
    sep_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None
    task_specific_params: Optional[dict] = None
    # generation defaults, read by `generate()` when an argument is not given
    max_length: int = 20
    min_length: int = 0
    do_sample: bool = False
    early_stopping: bool = False
    num_beams: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: Optional[list] = None
    num_return_sequences: int = 1
    output_scores: bool = False
    return_dict_in_generate: bool = False
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[int] = None
    remove_invalid_values: bool = False
    exponential_decay_length_penalty: Optional[list] = None
    suppress_tokens: Optional[list] = None
    begin_suppress_tokens: Optional[list] = None
    _name_or_path: str = ""

    # --- not a config.json key: HF's `MegaConfig(num_labels=3)` shorthand, turned into id2label ---
    num_labels: Optional[int] = field(default=None, repr=False)
    # keys of a config.json this version does not know (a newer transformers, a user's own), kept for the round trip
    extra: dict = field(default_factory=dict, repr=False)

    model_type = "mega"

    def __post_init__(self) -> None:
        self._normalize_labels()
        self.validate()

    # ------------------------------------------------------------------ labels
    def _normalize_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.num_labels is not None and (self.id2label is None or len(self.id2label) != self.num_labels):
            if not isinstance(self.num_labels, int) or self.num_labels < 1:
                raise ConfigError(f"num_labels: must be a positive integer, got {self.num_labels!r}")
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            self.label2id = None
        if self.id2label is None:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.num_labels = len(self.id2label)

    def _check_types(self) -> None:
        """Every bool, int, float and str field holds that type (None where Optional): a quoted "false" from a
        command line or a hand-edited config.json is a truthy string, which would silently turn a feature on."""
        for name, (kind, optional) in _scalar_fields().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if kind is bool:
                ok, wanted = isinstance(value, bool), "true or false"
            elif kind is int:
                ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
            elif kind is float:
                ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            else:
                ok, wanted = isinstance(value, str), "a string"
            if not ok:
                raise ConfigError(f"{name}: expected {wanted}{' or null' if optional else ''}, got {value!r}")

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.torchscript

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that contradicts another or is out of range."""
        self._check_types()
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size",
            "shared_representation_size", "nffn_hidden_size", "max_positions", "type_vocab_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "nffn_activation_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {value!r}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"classifier_dropout: must be in [0, 1) or null, got {self.classifier_dropout!r}")
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ConfigError(f"normalization_type: {self.normalization_type!r} is not one of {NORMALIZATION_TYPES}")
        if self.attention_activation not in ATTENTION_ACTIVATIONS:
            raise ConfigError(
                f"attention_activation: {self.attention_activation!r} is not one of {ATTENTION_ACTIVATIONS}")
        if self.relative_positional_bias not in RELATIVE_POSITIONAL_BIASES:
            raise ConfigError(
                f"relative_positional_bias: {self.relative_positional_bias!r} is not one of "
                f"{RELATIVE_POSITIONAL_BIASES}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: {self.activation!r} is not one of {ACTIVATIONS}")
        if self.relative_positional_bias == "rotary" and self.shared_representation_size % 2 != 0:
            # the rotary bias rotates vectors of size shared_representation_size in two halves
            raise ConfigError(
                f"shared_representation_size: rotary relative bias needs an even size, got "
                f"{self.shared_representation_size}")
        if self.use_chunking and self.chunk_size <= 0:
            raise ConfigError(f"chunk_size: use_chunking=True needs chunk_size > 0, got {self.chunk_size}")
        if self.is_decoder and self.bidirectional:
            raise ConfigError(
                "bidirectional: is_decoder=True needs bidirectional=False (a bidirectional EMA reads future "
                "tokens, so a decoder would see them)")
        if self.truncation is not None and (not isinstance(self.truncation, int) or self.truncation <= 0):
            raise ConfigError(f"truncation: must be a positive integer or null, got {self.truncation!r}")
        if self.num_attention_heads != 1:
            raise ConfigError(f"num_attention_heads: MEGA is single-headed, got {self.num_attention_heads}")
        if self.add_cross_attention:
            raise ConfigError("add_cross_attention: cross-attention (encoder-decoder MEGA) is not supported")
        if self.add_token_type_embeddings and self.type_vocab_size < 1:
            raise ConfigError("type_vocab_size: add_token_type_embeddings=True needs type_vocab_size >= 1")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id: {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type: {self.problem_type!r} is not one of {PROBLEM_TYPES} or null")

    # ------------------------------------------------------------------ dict / JSON round trip
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("num_labels", "extra"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            if name == "id2label":
                value = {str(k): v for k, v in value.items()}
            out[name] = value
        out.update(self.extra)
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "MegaConfig":
        data = {**data, **overrides}
        model_type = data.pop("model_type", "mega")
        if model_type != "mega":
            raise ConfigError(f"model_type: expected 'mega', got {model_type!r}")
        known = set(cls.field_names()) | {"num_labels"}
        # transformers writes null for generation settings it moved to generation_config.json: their defaults here
        scalars = _scalar_fields()
        kwargs = {k: v for k, v in data.items() if k in known and not (v is None and k in scalars
                                                                        and not scalars[k][1])}
        extra = {k: v for k, v in data.items() if k not in known and k not in _DERIVED_KEYS}
        if "torch_dtype" in extra and kwargs.get("dtype") is None:
            kwargs["dtype"] = extra.pop("torch_dtype")
        return cls(**kwargs, extra=extra)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        from megatron_mega.atomic_io import atomic_write_text

        atomic_write_text(path, self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "MegaConfig":
        from megatron_mega.json_file import load_json_object

        data = load_json_object(path, ConfigError, "a model config")
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, "config.json"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> "MegaConfig":
        path = os.path.join(directory, "config.json") if os.path.isdir(directory) else directory
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no config.json found")
        return cls.from_json_file(path, **overrides)

    def copy(self, **changes: Any) -> "MegaConfig":
        return MegaConfig.from_dict(self.to_dict(), **changes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MegaConfig) and self.to_dict() == other.to_dict()
