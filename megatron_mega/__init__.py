"""megatron_mega: distributed pretraining of MEGA language models, Hugging Face-compatible checkpoints."""

from megatron_mega.model import *  # noqa: F401,F403
from megatron_mega.model import __all__ as _model_all

__version__ = "0.1.0"
__all__ = list(_model_all)
