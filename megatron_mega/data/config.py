"""DataConfig: what training reads, typed and checked when it is built (errors name the field).

    data:
      paths: [data/web, data/books/manifest.json]   # manifests (file or folder) or bare Megatron prefixes
      weights: [0.7, 0.3]                           # blend weights (null: proportional to the split's tokens)
      seq_len: 2048                                 # model sequence length; causal samples hold seq_len + 1 tokens
      split: "969,30,1"                             # train,valid,test shares of each dataset's documents
      seed: 1234
      cache_dir: null                               # index cache (null: index-cache/ beside the first path)
      objective: causal                             # or mlm
      mlm: {mask_prob: 0.15, mask_token_prob: 0.8, random_token_prob: 0.1}
      verify_checksums: false                       # sha256 every shard against its manifest (dealt over ranks)
      num_workers: 0                                # loader processes per training process (GPUs: 2)

The number of samples per split is not configuration: the trainer derives it (iterations x global batch) and
passes it to `build_datasets`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

OBJECTIVES = ("causal", "mlm")
SPLIT_NAMES = ("train", "valid", "test")


class DataConfigError(ValueError):
    """A data config field that is missing, of the wrong type or out of range; the message starts with its name."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def parse_split(split: str) -> tuple[float, float, float]:
    """`"969,30,1"` -> normalised (train, valid, test) fractions; fewer than three parts are padded with zeros."""
    if not isinstance(split, str):
        raise DataConfigError(f"split: expected a string like '969,30,1', got {split!r}")
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3:
        raise DataConfigError(f"split: expected 1 to 3 comma-separated numbers (train,valid,test), got {split!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise DataConfigError(f"split: {split!r} holds something that is not a number") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise DataConfigError(f"split: shares must be finite and non-negative, got {split!r}")
    total = sum(values)
    if total <= 0:
        raise DataConfigError(f"split: shares sum to zero in {split!r}")
    values += [0.0] * (3 - len(values))
    return tuple(v / total for v in values)  # type: ignore[return-value]


@dataclass
class MLMConfig:
    """BERT's masking: `mask_prob` of the non-special tokens are chosen; of those, `mask_token_prob` become the
    mask id, `random_token_prob` a random non-special token, the rest stay unchanged (all of them are predicted)."""

    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("mask_prob", "mask_token_prob", "random_token_prob"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise DataConfigError(f"mlm.{name}: must be a number in [0, 1], got {value!r}")
        if self.mask_prob == 0.0:
            raise DataConfigError("mlm.mask_prob: must be > 0 (nothing would be predicted)")
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-12:
            raise DataConfigError(
                f"mlm.random_token_prob: mask_token_prob + random_token_prob must be <= 1, got "
                f"{self.mask_token_prob} + {self.random_token_prob}")


@dataclass
class DataConfig:
    paths: list[str]
    weights: Optional[list[float]] = None
    seq_len: int = 2048
    split: str = "969,30,1"
    seed: int = 1234
    cache_dir: Optional[str] = None
    objective: str = "causal"
    mlm: MLMConfig = field(default_factory=MLMConfig)
    verify_checksums: bool = False
    # loader processes per training process (Megatron-LM's --num-workers): samples are read and packed off the
    # training loop's thread; 0 reads them in it (enough on CPUs, where the workers would compete for the cores)
    num_workers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.mlm, dict):
            self.mlm = _from_mapping(MLMConfig, self.mlm, "mlm.")
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not isinstance(self.paths, (list, tuple)) or not self.paths:
            raise DataConfigError(f"paths: expected a non-empty list of manifest paths or prefixes, got {self.paths!r}")
        for i, path in enumerate(self.paths):
            if not isinstance(path, str) or not path:
                raise DataConfigError(f"paths[{i}]: expected a non-empty string, got {path!r}")
        self.paths = list(self.paths)
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)):
                raise DataConfigError(f"weights: expected a list of numbers or null, got {self.weights!r}")
            if len(self.weights) != len(self.paths):
                raise DataConfigError(
                    f"weights: {len(self.weights)} weight(s) for {len(self.paths)} path(s); give one per path")
            for i, weight in enumerate(self.weights):
                if not _is_number(weight) or weight < 0:
                    raise DataConfigError(f"weights[{i}]: must be a finite number >= 0, got {weight!r}")
            if sum(self.weights) <= 0:
                raise DataConfigError("weights: all weights are zero")
            self.weights = [float(w) for w in self.weights]
        if not _is_int(self.seq_len) or self.seq_len <= 0:
            raise DataConfigError(f"seq_len: must be a positive integer, got {self.seq_len!r}")
        parse_split(self.split)
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise DataConfigError(f"seed: must be an integer in [0, 2^63), got {self.seed!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise DataConfigError(f"cache_dir: expected a folder path or null, got {self.cache_dir!r}")
        if self.objective not in OBJECTIVES:
            raise DataConfigError(f"objective: {self.objective!r} is not one of {OBJECTIVES}")
        if not isinstance(self.mlm, MLMConfig):
            raise DataConfigError(f"mlm: expected a mapping of MLM settings, got {self.mlm!r}")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise DataConfigError(f"num_workers: must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.verify_checksums, bool):
            raise DataConfigError(f"verify_checksums: expected true or false, got {self.verify_checksums!r}")

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        """Build from a YAML section; unknown keys are refused by name."""
        return _from_mapping(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_mapping(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise DataConfigError(f"{prefix.rstrip('.') or 'data'}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DataConfigError(f"{prefix}{unknown[0]}: unknown field (known: {sorted(names)})")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
    if missing:
        raise DataConfigError(f"{prefix}{missing[0]}: required field is missing")
    return cls(**data)
