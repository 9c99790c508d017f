"""The MEGA model in plain PyTorch: no parallelism, no I/O beyond Hugging Face-format save/load.

Names are imported on first use (PEP 562), so `from megatron_mega.model.config import MegaConfig` and the command
line's data subcommands do not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "MegaCache": "cache", "MegaLayerCache": "cache", "MegaStaticCache": "cache", "MegaStaticLayerCache": "cache",
    "ConfigError": "config", "MegaConfig": "config",
    "MEGA_HEADS": "heads", "MegaForCausalLM": "heads", "MegaForMaskedLM": "heads", "MegaForMultipleChoice": "heads",
    "MegaForQuestionAnswering": "heads", "MegaForSequenceClassification": "heads",
    "MegaForTokenClassification": "heads",
    "MegaModel": "mega_model",
    "CheckpointError": "pretrained", "LoadingReport": "pretrained", "MegaPreTrainedModel": "pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
