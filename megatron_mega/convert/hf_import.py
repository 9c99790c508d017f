"""A Hugging Face-format MEGA directory (ours or transformers 4.57.6's) as the starting weights of a training run.

The trainer calls `initial_lm_state` for a fresh run with `checkpoint.init_from_hf`; the plain path loads the state
into its LM model, the pipeline path hands it to `build_pipeline_module(init_state=...)`, so any layout starts from
the same weights and the first checkpoint is a training checkpoint of that layout.
"""

from __future__ import annotations

import logging

import torch

from megatron_mega.model.config import MegaConfig
from megatron_mega.model.pretrained import CheckpointError, read_state_dict

logger = logging.getLogger(__name__)

# fields that change what the weights compute: a directory must agree with the training config on all of them
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size", "bidirectional",
    "shared_representation_size", "use_chunking", "chunk_size", "truncation", "normalize_before_mega",
    "normalization_type", "norm_affine", "activation", "attention_activation", "use_normalized_ffn",
    "nffn_hidden_size", "normalize_before_ffn", "max_positions", "add_token_type_embeddings", "type_vocab_size",
    "relative_positional_bias", "add_lm_hidden_dense_layer", "is_decoder",
)


def initial_lm_state(directory: str, model_config: MegaConfig, objective: str, seed: int) -> dict[str, torch.Tensor]:
    """The complete state dict of the training LM (MegaForCausalLM / MegaForMaskedLM) starting from `directory`.

    Weights the directory lacks (e.g. the LM head of a classifier checkpoint) keep the seeded initialisation and
    are logged."""
    from megatron_mega.model import MegaForCausalLM, MegaForMaskedLM

    saved = MegaConfig.from_pretrained(directory)
    different = [f"{name} ({getattr(saved, name)!r} there, {getattr(model_config, name)!r} here)"
                 for name in ARCHITECTURE_FIELDS if getattr(saved, name) != getattr(model_config, name)]
    if different:
        raise CheckpointError(f"{directory}: its architecture differs from the training config's model section: "
                              f"{'; '.join(different)}")
    cls = MegaForCausalLM if objective == "causal" else MegaForMaskedLM
    torch.manual_seed(seed)
    model = cls(model_config)
    architectures = saved.architectures or []
    report = model.load_checkpoint_state(read_state_dict(directory), source=directory,
                                         source_architecture=architectures[0] if architectures else None)
    if report.missing_keys or report.mismatched_keys:
        logger.warning("%s", report.summary(cls.__name__, directory))
    return model.state_dict()
