"""What every MEGA model class shares: weight initialisation, Hugging Face-format save/load, embedding resizing.

Checkpoints are `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`), the layout
transformers writes. Loading never unpickles: safetensors, or `torch.load(weights_only=True)` for a legacy
`pytorch_model.bin`. Any head's checkpoint loads into any other head: shared weights are taken, head weights
that are new stay freshly initialised, and both lists are reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from megatron_mega.atomic_io import atomic_write_text, atomic_write_with
from megatron_mega.model.config import MegaConfig
from megatron_mega.model.ema import MegaMultiDimensionDampedEma
from megatron_mega.model.gated_attention import MegaMovingAverageGatedAttention
from megatron_mega.model.norms import MegaRMSNorm, MegaScaleNorm
from megatron_mega.model.positional_bias import MegaRotaryRelativePositionalBias, MegaSimpleRelativePositionalBias

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default "5GB"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the requested model."""


@dataclass
class LoadingReport:
    """What `from_pretrained` did with each weight."""

    loaded_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: initialised
    unexpected_keys: list[str] = field(default_factory=list)  # in the checkpoint, not used by this model
    mismatched_keys: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # reinitialised, by request

    def __getitem__(self, name: str) -> Any:  # transformers' loading_info is a dict
        return getattr(self, name)

    def summary(self, model_name: str, path: str) -> str:
        lines = [f"{model_name} from {path}: {len(self.loaded_keys)} tensors loaded"]
        if self.missing_keys:
            lines.append(f"  newly initialised (not in the checkpoint): {', '.join(self.missing_keys)}")
        if self.unexpected_keys:
            lines.append(f"  unused (in the checkpoint, not in {model_name}): {', '.join(self.unexpected_keys)}")
        for key, saved, wanted in self.mismatched_keys:
            lines.append(f"  reinitialised, shape {list(saved)} in the checkpoint vs {list(wanted)}: {key}")
        return "\n".join(lines)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: cannot read {size!r}; use bytes or e.g. '2GB', '500MB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def _weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"a {type(weight_map).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index_path}: not a safetensors index (field 'weight_map': {err!r})") from None
    return weight_map


def _shard_paths(directory: str, index_path: str, weight_map: dict[str, str]) -> list[str]:
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not os.path.exists(os.path.join(directory, shard))]
    if missing:
        raise CheckpointError(f"{index_path}: lists shard {missing[0]}, which is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [os.path.join(directory, shard) for shard in shards]


def safetensors_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index lists (all
    present, else CheckpointError naming the index and the first missing shard); [] when it has neither."""
    single_path = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.exists(single_path):
        return [single_path]
    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.exists(index_path):
        return []
    return _shard_paths(directory, index_path, _weight_map(index_path))


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face-format checkpoint directory, without unpickling anything."""
    from safetensors.torch import load_file

    index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    single_path = os.path.join(directory, SAFE_WEIGHTS_NAME)
    legacy_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.exists(single_path):
        return load_file(single_path)
    if os.path.exists(index_path):
        weight_map = _weight_map(index_path)
        state: dict[str, torch.Tensor] = {}
        for path in _shard_paths(directory, index_path, weight_map):
            state.update(load_file(path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index_path}: tensors listed but not found in the shards: {missing[:5]}")
        return state
    if os.path.exists(legacy_path):
        return torch.load(legacy_path, map_location="cpu", weights_only=True)
    raise CheckpointError(
        f"{directory}: no weights found (expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or "
        f"{LEGACY_WEIGHTS_NAME})")


def _saved_architectures(directory: str) -> list[str]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return json.load(fh).get("architectures") or []


# transformers' loading options that change nothing for a local directory: accepted (code written for transformers
# passes them) and neither stored nor acted on
_LOCAL_NO_OPS = frozenset({"local_files_only", "low_cpu_mem_usage", "use_safetensors", "trust_remote_code",
                           "cache_dir", "force_download", "token", "proxies", "attn_implementation"})


def _resolve_dtype(value: Any, config: MegaConfig, state: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    """transformers' `dtype` argument: a torch dtype, its name ("bfloat16", "torch.float16"), or "auto" (config.json's
    `dtype`, else the checkpoint's floating-point dtype); None keeps float32."""
    if value is None:
        return None
    given = value
    if value == "auto":
        if config.dtype is None:
            return next((t.dtype for t in state.values() if t.is_floating_point()), None)
        value = config.dtype
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CheckpointError(f"dtype: {given!r} is not a floating-point dtype (torch.bfloat16, 'float16', "
                              f"'auto', ...)")
    return value


def _device_for(device_map: Any) -> torch.device:
    """transformers' `device_map` as one device: "auto" (the GPU when there is one), "cuda", "cpu", 0, ..."""
    if isinstance(device_map, dict):
        raise CheckpointError("device_map: a per-module map is not supported (MEGA models are loaded whole); pass one "
                              "device: 'auto', 'cuda', 'cpu' or a GPU index")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"device_map: {device_map!r} is not a device") from None


class MegaPreTrainedModel(nn.Module):
    config_class = MegaConfig
    base_model_prefix = "mega"
    # tensors tied to the input embeddings, never stored twice
    _tied_weights_keys: list[str] = []
    # buffers that carry no information (transformers keeps them in its state dict)
    _keys_to_ignore_on_load_missing = [r"rel_pos_bias\._float_tensor$"]

    def __init__(self, config: MegaConfig):
        super().__init__()
        if not isinstance(config, MegaConfig):
            raise TypeError(f"config must be a MegaConfig, got {type(config).__name__}")
        self.config = config

    # ------------------------------------------------------------------ initialisation
    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' MEGA initialisation, so a fresh model here and there are drawn from one distribution."""
        config = self.config
        if isinstance(module, MegaMultiDimensionDampedEma):
            nn.init.normal_(module.damping_factor, mean=0.0, std=config.ema_delta_alpha_range)
            nn.init.normal_(module.decay_factor, mean=0.0, std=config.ema_delta_alpha_range)
            # beta alternates +1, -1 over the N dimensions (the reference notes it is more stable)
            signs = torch.ones(config.ema_projection_size, 1)
            signs[1::2] = -1.0
            module.ema_expansion_matrix.normal_(mean=0.0, std=config.ema_beta_range).add_(signs)
            nn.init.normal_(module.kernel_projection_matrix, mean=0.0, std=config.ema_gamma_omega_range)
            nn.init.normal_(module.residual_weight, mean=0.0, std=config.ema_gamma_omega_range)
        elif isinstance(module, MegaSimpleRelativePositionalBias):
            nn.init.normal_(module.rel_pos_bias, mean=0.0, std=config.initializer_range)
        elif isinstance(module, MegaRotaryRelativePositionalBias):
            nn.init.normal_(module.alpha, mean=0.0, std=config.initializer_range)
            nn.init.normal_(module.b_param, mean=0.0, std=config.initializer_range)
        elif isinstance(module, MegaScaleNorm) and module.scalar is not None:
            nn.init.constant_(module.scalar, 1.0)
        elif isinstance(module, MegaRMSNorm) and module.weight is not None:
            nn.init.constant_(module.weight, 1.0)
        elif isinstance(module, MegaMovingAverageGatedAttention):
            nn.init.normal_(module.qk_weight, mean=0.0, std=config.initializer_range)
            nn.init.constant_(module.qk_bias, 0.0)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=config.initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=config.initializer_range)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            # affine=False norms have no parameters (transformers' defect 6 crashes here)
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()

    # ------------------------------------------------------------------ embeddings
    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embedding_layer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embedding_layer.word_embeddings = value
        self.tie_weights()

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return None

    def tie_weights(self) -> None:
        output = self.get_output_embeddings()
        if output is not None and self.config.tie_word_embeddings:
            output.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None,
                                pad_to_multiple_of: Optional[int] = None) -> nn.Embedding:
        """Grow or shrink the vocabulary; old rows are kept, new rows initialised; the LM head follows."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        keep = min(old.num_embeddings, new_num_tokens)
        padding_idx = old.padding_idx if old.padding_idx is not None and old.padding_idx < new_num_tokens else None
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        self._init_weights(new)
        with torch.no_grad():
            new.weight[:keep] = old.weight[:keep]
        self.base_model.embedding_layer.word_embeddings = new
        output = self.get_output_embeddings()
        if output is not None:
            new_head = nn.Linear(old.embedding_dim, new_num_tokens, bias=output.bias is not None,
                                 device=output.weight.device, dtype=output.weight.dtype)
            self._init_weights(new_head)
            with torch.no_grad():
                new_head.weight[:keep] = output.weight[:keep]
                if output.bias is not None:
                    new_head.bias[:keep] = output.bias[:keep]
            self.set_output_embeddings(new_head)
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return new

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no output embeddings")

    # ------------------------------------------------------------------ conveniences
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        embedding_ids = set()
        if exclude_embeddings:
            embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in embedding_ids)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Recompute each MEGA block in the backward pass instead of storing its activations."""
        self.base_model.gradient_checkpointing = True
        self.base_model.gradient_checkpointing_kwargs = dict(gradient_checkpointing_kwargs or {})

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "gradient_checkpointing", False))

    # ------------------------------------------------------------------ save
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
                        state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write config.json and the weights (safetensors, sharded past `max_shard_size`); each file atomically."""
        from safetensors.torch import save_file

        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"{save_directory}: exists and is a file")
        os.makedirs(save_directory, exist_ok=True)
        state = dict(self.state_dict() if state_dict is None else state_dict)
        if self.config.tie_word_embeddings:
            for key in self._tied_weights_keys:
                state.pop(key, None)
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        limit = parse_size(max_shard_size)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        metadata = {"format": "pt"}
        stale = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME] + [
            f for f in os.listdir(save_directory) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
        if len(shards) == 1:
            names = [SAFE_WEIGHTS_NAME]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name in stale:
            if name not in names and os.path.exists(os.path.join(save_directory, name)):
                os.remove(os.path.join(save_directory, name))
        for name, shard in zip(names, shards):
            atomic_write_with(os.path.join(save_directory, name),
                              lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
            atomic_write_text(os.path.join(save_directory, SAFE_WEIGHTS_INDEX_NAME),
                              json.dumps(index, indent=2, sort_keys=True) + "\n")
        # the weights' dtype, as transformers records it (dtype="auto" loads them so)
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        config = self.config.copy(architectures=[type(self).__name__], dtype=str(dtype).removeprefix("torch."))
        config.to_json_file(os.path.join(save_directory, CONFIG_NAME))
        if hasattr(self, "_write_generation_config"):  # generative heads (model/generation.py)
            self._write_generation_config(save_directory)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: Optional[MegaConfig] = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        device_map: Any = None,
        revision: Optional[str] = None,
        **config_overrides: Any,
    ):
        """transformers' signature: keyword arguments that are config fields (or keys of the saved config.json)
        override the config; `dtype` may be a name or "auto"; `device_map` one device; an unknown keyword is a
        TypeError, as transformers' model constructor raises, rather than a field silently saved with the model."""
        directory = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(directory):
            raise CheckpointError(
                f"{directory}: not a directory (only local checkpoint directories can be loaded; nothing is "
                f"downloaded)")
        if revision not in (None, "main"):
            raise CheckpointError(f"revision: {revision!r}; only a local directory's files can be loaded")
        for name in _LOCAL_NO_OPS & set(config_overrides):
            config_overrides.pop(name)
        if config is None:
            config = MegaConfig.from_pretrained(directory)
        known = set(MegaConfig.field_names()) | {"num_labels"} | set(config.extra)
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) {unknown}: neither "
                            f"MegaConfig fields nor loading options")
        if config_overrides:
            config = config.copy(**config_overrides)
        model = cls(config)
        state = read_state_dict(directory)
        target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config, state)
        saved_architectures = _saved_architectures(directory)
        report = model.load_checkpoint_state(state, ignore_mismatched_sizes=ignore_mismatched_sizes,
                                             source=directory,
                                             source_architecture=saved_architectures[0] if saved_architectures
                                             else None)
        if hasattr(model, "_read_generation_config"):  # generative heads (model/generation.py)
            try:
                model._read_generation_config(directory)
            except ValueError as err:
                raise CheckpointError(str(err)) from None
        if target_dtype is not None:
            model.to(target_dtype)
        if device_map is not None:
            model.to(_device_for(device_map))
        model.eval()
        message = report.summary(cls.__name__, directory)
        (logger.warning if report.missing_keys or report.unexpected_keys else logger.info)(message)
        return (model, report) if output_loading_info else model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False,
                              source: str = "checkpoint",
                              source_architecture: Optional[str] = None) -> LoadingReport:
        """Load a Hugging Face-format state dict of any MEGA class into this model (prefix-aware)."""
        own = self.state_dict()
        prefix = self.base_model_prefix + "."
        has_base = self.base_model is not self
        checkpoint_has_prefix = any(k.startswith(prefix) for k in state)
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if has_base and not checkpoint_has_prefix and (prefix + key) in own:
                key = prefix + key  # a bare MegaModel checkpoint into a head
            elif not has_base and key.startswith(prefix):
                key = key[len(prefix):]  # a head checkpoint into the bare MegaModel
            renamed[key] = tensor
        report = LoadingReport()
        to_load: dict[str, torch.Tensor] = {}
        refused: list[str] = []
        # a head weight of another architecture that happens to share a name (MultipleChoice's and
        # TokenClassification's `classifier`) is not a shared weight: it is reinitialised and reported
        other_head = source_architecture is not None and source_architecture != type(self).__name__
        for key, tensor in renamed.items():
            if key not in own:
                report.unexpected_keys.append(key)
                continue
            if tuple(tensor.shape) != tuple(own[key].shape):
                if ".ema_gate." in key and tensor.shape[0] == 2 * own[key].shape[0]:
                    raise CheckpointError(
                        f"{source}: {key} is a bidirectional EMA ({list(tensor.shape)}) but the config has "
                        f"bidirectional=False ({list(own[key].shape)}); a bidirectional (encoder) checkpoint does not "
                        f"load into a causal model")
                if ".ema_gate." in key and 2 * tensor.shape[0] == own[key].shape[0]:
                    raise CheckpointError(
                        f"{source}: {key} is a causal EMA ({list(tensor.shape)}) but the config has "
                        f"bidirectional=True ({list(own[key].shape)})")
                is_head = has_base and not key.startswith(prefix)
                if not (ignore_mismatched_sizes or (other_head and is_head)):
                    refused.append(f"{key} {list(tensor.shape)} vs {list(own[key].shape)}")
                report.mismatched_keys.append((key, tuple(tensor.shape), tuple(own[key].shape)))
                continue
            to_load[key] = tensor
        if refused:
            raise CheckpointError(
                f"{source}: shapes in the checkpoint differ from {type(self).__name__}'s (checkpoint vs model): "
                f"{'; '.join(refused)}. Pass ignore_mismatched_sizes=True to reinitialise them, e.g. for a new "
                f"number of labels")
        tied = set(self._tied_weights_keys) if self.config.tie_word_embeddings else set()
        embedding_key = (prefix if has_base else "") + "embedding_layer.word_embeddings.weight"
        for key in tied & set(to_load):
            # one tensor here, two in an untied checkpoint: the input embeddings win (as in transformers), and a
            # head that differs is reported as unused rather than copied over them
            head = to_load.pop(key)
            if embedding_key in to_load and not torch.equal(head, to_load[embedding_key]):
                report.unexpected_keys.append(key)
        ignore = [re.compile(p) for p in self._keys_to_ignore_on_load_missing]
        report.missing_keys = [k for k in own if k not in to_load and k not in tied
                               and not any(p.search(k) for p in ignore)
                               and k not in {m[0] for m in report.mismatched_keys}]
        report.loaded_keys = sorted(to_load)
        self.load_state_dict(to_load, strict=False)
        self.tie_weights()
        return report
