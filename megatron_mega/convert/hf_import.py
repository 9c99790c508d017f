"""A Hugging Face-format MEGA directory (ours or transformers 4.57.6's) as the starting weights of a training run.

The trainer calls `initial_lm_state` for a fresh run with `checkpoint.init_from_hf`; the plain path loads the state
into its LM model, the pipeline path hands it to `build_pipeline_module(init_state=...)`, so any layout starts from
the same weights and the first checkpoint is a training checkpoint of that layout.

Before any weight is read, `check_hf_directory` refuses what it cannot be sure to read right: a directory that is
not MEGA (config.json's model_type), a config.json written by a transformers major version other than 4 (MEGA lived
in transformers 4.x only; 5.0 removed it), and weight files in another framework's format (safetensors metadata
`format` other than 'pt').
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import torch

from megatron_mega.model.config import MegaConfig
from megatron_mega.model.pretrained import CheckpointError, read_state_dict, safetensors_files
from megatron_mega.training.config import TrainConfigError

# the transformers major versions whose MEGA config.json / weight layout this code reads (MEGA was in 4.x only)
SUPPORTED_TRANSFORMERS_MAJORS = (4,)

logger = logging.getLogger(__name__)

# fields that change what the weights compute: a directory must agree with the training config on all of them
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size", "bidirectional",
    "shared_representation_size", "use_chunking", "chunk_size", "truncation", "normalize_before_mega",
    "normalization_type", "norm_affine", "activation", "attention_activation", "use_normalized_ffn",
    "nffn_hidden_size", "normalize_before_ffn", "max_positions", "add_token_type_embeddings", "type_vocab_size",
    "relative_positional_bias", "add_lm_hidden_dense_layer", "is_decoder", "tie_word_embeddings",
)


def architecture_differences(theirs: MegaConfig, ours: MegaConfig) -> list[tuple[str, Any, Any]]:
    """(field, their value, our value) for every architecture field on which the two configs disagree."""
    return [(name, getattr(theirs, name), getattr(ours, name)) for name in ARCHITECTURE_FIELDS
            if getattr(theirs, name) != getattr(ours, name)]


def check_hf_directory(directory: str) -> dict:
    """config.json of a Hugging Face-format MEGA directory this code can read; raises CheckpointError naming the file
    and field of the first thing it cannot read (nothing else is read or written)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        hint = (" (a training checkpoint folder: convert it with `megatron-mega convert`, or resume it with "
                "checkpoint.load)" if os.path.exists(os.path.join(directory, "latest")) else "")
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face model directory{hint}")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    model_type = config.get("model_type")
    if model_type != "mega":
        raise CheckpointError(f"{path}: field 'model_type' is {model_type!r}, not 'mega'; not a MEGA model")
    written_by = config.get("transformers_version")
    if written_by is not None:
        major = str(written_by).split(".", 1)[0]
        if not major.isdigit() or int(major) not in SUPPORTED_TRANSFORMERS_MAJORS:
            raise CheckpointError(f"{path}: field 'transformers_version' is {written_by!r}; MEGA checkpoints are "
                                  f"read from transformers 4.x only (5.0 removed MEGA), so this format is unknown")
    for weights in safetensors_files(directory):
        try:
            with safe_open(weights, framework="pt") as fh:
                metadata = fh.metadata()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
        weight_format = (metadata or {}).get("format", "pt")
        if weight_format != "pt":
            raise CheckpointError(f"{weights}: metadata field 'format' is {weight_format!r}, not 'pt' (weights "
                                  f"saved by another framework; load and save them with PyTorch first)")
    return config


class InitFromHFError(CheckpointError, TrainConfigError):
    """checkpoint.init_from_hf names a directory that cannot start the run: `megatron-mega train` reports it as one
    line, as it does any config error."""


def initial_lm_state(directory: str, model_config: MegaConfig, objective: str, seed: int) -> dict[str, torch.Tensor]:
    """The complete state dict of the training LM (MegaForCausalLM / MegaForMaskedLM) starting from `directory`.

    Weights the directory lacks (e.g. the LM head of a classifier checkpoint) keep the seeded initialisation and
    are logged. Raises InitFromHFError (a CheckpointError) naming the file and field of what it refuses."""
    with _as_init_from_hf_error():
        return _initial_lm_state(directory, check_init_from_hf(directory, model_config), model_config, objective,
                                 seed)


def check_init_from_hf(directory: str, model_config: MegaConfig) -> MegaConfig:
    """The config of the directory `checkpoint.init_from_hf` names, from config.json and the safetensors headers
    alone: its architecture must be the training config's. `train --dry-run` stops here."""
    from megatron_mega.model.config import ConfigError

    with _as_init_from_hf_error():
        try:
            saved = MegaConfig.from_dict(check_hf_directory(directory))
        except ConfigError as err:
            raise CheckpointError(f"{os.path.join(directory, 'config.json')}: {err}") from None
        different = [f"{name} ({there!r} there, {here!r} here)"
                     for name, there, here in architecture_differences(saved, model_config)]
        if different:
            raise CheckpointError(f"{directory}: its architecture differs from the training config's model "
                                  f"section: {'; '.join(different)}")
        return saved


@contextlib.contextmanager
def _as_init_from_hf_error():
    try:
        yield
    except InitFromHFError:
        raise
    except CheckpointError as err:
        raise InitFromHFError(f"checkpoint.init_from_hf: {err}") from None


def _initial_lm_state(directory: str, saved: MegaConfig, model_config: MegaConfig, objective: str,
                      seed: int) -> dict[str, torch.Tensor]:
    from megatron_mega.model import MegaForCausalLM, MegaForMaskedLM

    cls = MegaForCausalLM if objective == "causal" else MegaForMaskedLM
    torch.manual_seed(seed)
    model = cls(model_config)
    architectures = saved.architectures or []
    report = model.load_checkpoint_state(read_state_dict(directory), source=directory,
                                         source_architecture=architectures[0] if architectures else None)
    backbone = [k for k in report.missing_keys if k.startswith(model.base_model_prefix + ".")]
    if backbone:
        # a head may be missing (a classifier's directory has no LM head) but not the MEGA body itself
        raise CheckpointError(f"{directory}: the weights lack {len(backbone)} of the MEGA model's own tensors "
                              f"(e.g. {backbone[:3]}); not this architecture's weights")
    if report.missing_keys or report.mismatched_keys:
        logger.warning("%s", report.summary(cls.__name__, directory))
    return model.state_dict()
