"""Write a Hugging Face-format MEGA directory from model weights under HF names, and prove it.

The directory gets `config.json` (`model_type: "mega"`, the head's architecture), `model.safetensors` (sharded past a
size limit), the tokenizer files, and a README with where the weights came from. It is written to a temporary
sibling folder, reloaded with the requested head and compared against the source model on a fixed batch; only a
directory that reproduces the source is moved into place. An existing output is replaced only with `force`, and
never when it holds one of the `protect`ed paths (the training checkpoint being converted, its tokenizer). The
temporary folder of an export killed before it could clean up (`.OUTPUT.xxxxxxxx.partial`) is removed by the next
export to the same output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from megatron_mega.atomic_io import atomic_directory, atomic_write_text, is_within, remove_partial_directories
from megatron_mega.model.config import MegaConfig
from megatron_mega.model.heads import MEGA_HEADS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# relative tolerance of the self-check per precision: the reload must reproduce the source's outputs
SELF_CHECK_RTOL = {"float32": 1e-6, "bfloat16": 2e-2, "float16": 2e-3}


class ExportError(ValueError):
    """The export was refused or failed its self-check; nothing was left at the output path."""


@dataclass
class ExportReport:
    output_dir: str
    head: str
    architecture: str
    dtype: str
    max_relative_error: float
    newly_initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    removed_partial: list[str] = field(default_factory=list)  # folders of earlier exports that were killed


def _check_batch(config: MegaConfig, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    # ids >= 3 (never bos/pad/eos): a pad id at an unmasked position compares noise, not the model
    generator = torch.Generator().manual_seed(seed)
    low = min(3, config.vocab_size - 1)
    return torch.randint(low, config.vocab_size, (batch, length), generator=generator)


def _hidden_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(ids).last_hidden_state.float()


def _write_readme(directory: str, architecture: str, dtype: str, config: MegaConfig, metadata: dict[str, Any]) -> None:
    lines = [f"# MEGA ({architecture})", "",
             "Converted by megatron_mega from a pretraining checkpoint. Load it with "
             f"`megatron_mega.{architecture}.from_pretrained(path)` or transformers' class of the same name "
             "(transformers 4.57.6).", "", "| | |", "|---|---|"]
    for key, value in metadata.items():
        lines.append(f"| {key} | {value} |")
    lines += [f"| weights dtype | {dtype} |",
              f"| layers x hidden | {config.num_hidden_layers} x {config.hidden_size} |",
              f"| z / v / ffn / N | {config.shared_representation_size} / {config.intermediate_size} / "
              f"{config.nffn_hidden_size} / {config.ema_projection_size} |",
              f"| attention | {config.attention_activation}, {config.relative_positional_bias} bias, chunk "
              f"{config.chunk_size if config.use_chunking else 'none'} |",
              f"| direction | {'causal decoder' if config.is_decoder else 'bidirectional encoder'} |",
              f"| vocabulary | {config.vocab_size} |", ""]
    atomic_write_text(os.path.join(directory, "README.md"), "\n".join(lines))


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:  # deepest first
        try:
            os.rmdir(directory)
        except OSError:
            pass


def export_hf(
    source: nn.Module,
    output_dir: str,
    *,
    head: str = "causal-lm",
    num_labels: Optional[int] = None,
    dtype: str = "float32",
    tokenizer=None,
    metadata: Optional[dict[str, Any]] = None,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    protect: Sequence[str] = (),
) -> ExportReport:
    """Export `source` (a megatron_mega MEGA model whose state dict has HF names, e.g. the MegaForCausalLM the
    training weights were loaded into) as a Hugging Face directory for `head`, self-checked. `protect`: paths the
    output must not be or contain (replacing it would delete them)."""
    if head not in MEGA_HEADS:
        raise ExportError(f"head {head!r} is not one of {sorted(MEGA_HEADS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if head == "question-answering" and num_labels not in (None, 2):
        raise ExportError(f"num_labels {num_labels}: the question-answering head has exactly 2 outputs (start and "
                          f"end logits), as in transformers")
    output_dir = os.path.abspath(output_dir)
    for path in protect:
        if path and is_within(path, output_dir):
            raise ExportError(f"{output_dir}: holds {path}, which this export reads; writing there would delete "
                              f"it. Choose another output directory")
    if os.path.exists(output_dir) and not force:
        raise ExportError(f"{output_dir}: exists; pass --force (force=True) to replace it")
    cls = MEGA_HEADS[head]
    overrides: dict[str, Any] = {}
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    config = source.config.copy(**overrides)
    parent = os.path.dirname(output_dir)
    # parents made here are removed again on failure: a refused export leaves the file system as it found it
    made = []
    missing = parent
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    try:
        removed_partial = remove_partial_directories(output_dir)
        with atomic_directory(output_dir) as tmp:
            report, error = _write_and_check(source, tmp, cls, config, head, dtype, tokenizer, metadata,
                                             max_shard_size, output_dir)
    except BaseException:
        _remove_empty(made)
        raise
    return ExportReport(output_dir, head, cls.__name__, dtype, error, report.missing_keys, report.unexpected_keys,
                        removed_partial)


def _write_and_check(source: nn.Module, tmp: str, cls, config: MegaConfig, head: str, dtype: str, tokenizer,
                     metadata: Optional[dict[str, Any]], max_shard_size: int | str, output_dir: str):
    """Write the directory into `tmp` and prove it: (loading report, relative self-check error)."""
    target = cls(config)
    report = target.load_checkpoint_state(source.state_dict(), source=type(source).__name__,
                                          source_architecture=type(source).__name__)
    target.to(DTYPES[dtype]).save_pretrained(tmp, max_shard_size=max_shard_size)
    del target  # the reload below is the third copy of the weights otherwise (a 1B model: 4 GB more at the peak)
    if tokenizer is not None:
        tokenizer.save(tmp)
    _write_readme(tmp, cls.__name__, dtype, config, dict(metadata or {}))

    # self-check: the written directory, loaded as the requested head, reproduces the source's hidden states
    reloaded = cls.from_pretrained(tmp).float().eval()
    ids = _check_batch(config)
    was_training = source.training
    source.eval()
    try:
        expected = _hidden_states(source, ids)
    finally:
        source.train(was_training)
    got = _hidden_states(reloaded, ids)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    if not error <= SELF_CHECK_RTOL[dtype]:
        raise ExportError(f"self-check failed: the written {cls.__name__} differs from the source by "
                          f"{error:.3g} (relative, limit {SELF_CHECK_RTOL[dtype]:g} for {dtype}); "
                          f"nothing was written to {output_dir}")
    with open(os.path.join(tmp, "conversion.json"), "w", encoding="utf-8") as fh:
        json.dump({"head": head, "architecture": cls.__name__, "dtype": dtype, "self_check_relative_error": error,
                   "newly_initialised": report.missing_keys, "unused": report.unexpected_keys,
                   **{k: v for k, v in (metadata or {}).items() if isinstance(v, (int, float, str))}},
                  fh, indent=2)
    return report, error
