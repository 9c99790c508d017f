"""The MEGA model in plain PyTorch: no parallelism, no I/O beyond Hugging Face-format save/load."""

from megatron_mega.model.cache import MegaCache, MegaLayerCache
from megatron_mega.model.config import ConfigError, MegaConfig
from megatron_mega.model.heads import (
    MEGA_HEADS,
    MegaForCausalLM,
    MegaForMaskedLM,
    MegaForMultipleChoice,
    MegaForQuestionAnswering,
    MegaForSequenceClassification,
    MegaForTokenClassification,
)
from megatron_mega.model.mega_model import MegaModel
from megatron_mega.model.pretrained import CheckpointError, LoadingReport, MegaPreTrainedModel

__all__ = [
    "CheckpointError", "ConfigError", "LoadingReport", "MEGA_HEADS", "MegaCache", "MegaConfig",
    "MegaForCausalLM", "MegaForMaskedLM", "MegaForMultipleChoice", "MegaForQuestionAnswering",
    "MegaForSequenceClassification", "MegaForTokenClassification", "MegaLayerCache", "MegaModel",
    "MegaPreTrainedModel",
]
