"""megatron_mega: distributed pretraining of MEGA language models, Hugging Face-compatible checkpoints.

The model classes (`MegaConfig`, `MegaForCausalLM`, ...) are importable from here; they load on first use.
"""

from megatron_mega import model as _model

__version__ = "0.1.0"
__all__ = list(_model.__all__)


def __getattr__(name: str):
    if name in _model.__all__:
        return getattr(_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
