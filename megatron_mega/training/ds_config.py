"""The DeepSpeed JSON, derived from a TrainConfig (one source of truth), with a user's JSON merged over it.

The batch arithmetic (train_batch_size = micro x accumulation x data-parallel size) comes from `TrainConfig.layout`;
a user JSON may add or change any other setting, but a key the config owns (the batch, the ZeRO stage, gradient
clipping, bf16/fp16 on or off) that disagrees with it is refused rather than silently winning: the trainer, the
saved config and the MFU figure go by the config. The optimizer and the lr schedule are not in the JSON: the
trainer passes torch's AdamW and its own schedule as client objects (DeepSpeed's fused/CPU Adam would JIT-compile
a C++ op).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

from megatron_mega.training.config import TrainConfig, TrainConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_json(config: TrainConfig) -> dict[str, Any]:
    if config.deepspeed is None:
        return {}
    if isinstance(config.deepspeed, dict):
        return config.deepspeed
    try:
        with open(config.deepspeed, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as err:
        raise TrainConfigError(f"deepspeed: cannot read {config.deepspeed}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise TrainConfigError(f"deepspeed: {config.deepspeed}: line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"deepspeed: {config.deepspeed}: expected a JSON object")
    return data


def fp32_gradients(config: TrainConfig) -> bool:
    """Whether a bf16 run accumulates and reduces its gradients in fp32: with ZeRO 1-3 on the plain model.
    Not with ZeRO-0 (DeepSpeed has no such mode: NotImplementedError) nor with pipeline stages, where it would be
    BF16_Optimizer, whose pipeline path drops the gradients of what only the last stage's loss uses (the LM head's
    bias, the last stage's share of the tied embedding's): 4 steps of the tiny model were off fp32 by 1e-2."""
    return (config.precision.dtype == "bf16" and config.parallel.zero_stage >= 1
            and config.parallel.pipeline_stages == 1)


def build_ds_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    layout = config.layout(world_size)
    dtype = config.precision.dtype
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": config.precision.initial_loss_scale_power},
        "steps_per_print": 10 ** 9,   # the trainer logs; DeepSpeed's own progress lines are off
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
    }
    if fp32_gradients(config):
        # gradients accumulated (over micro-batches) and reduced (over ranks) in fp32, as Megatron-LM always does
        # for bf16: in bf16 16 micro-batches were ~1% off. DeepSpeed then builds BF16_Optimizer for ZeRO-1 (fp32
        # gradients and master weights) and keeps ZeRO-2/3's averaged gradients in fp32; its reductions default
        # to the model's dtype, hence the communication dtype too
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if config.checkpoint.universal:
        ds["checkpoint"] = {"load_universal": True}
    if config.parallel.pipeline_stages > 1 and config.parallel.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    extra = user_json(config)
    for key in BATCH_KEYS:
        if key in extra and extra[key] != ds[key]:
            raise TrainConfigError(f"deepspeed.{key}: {extra[key]} disagrees with the config's {ds[key]} (set the "
                                   f"batch in optim.global_batch_size / optim.micro_batch_size)")
    for section in ("zero_optimization", "bf16", "fp16"):
        if section in extra and not isinstance(extra[section], dict):
            raise TrainConfigError(f"deepspeed.{section}: expected a mapping, got {extra[section]!r}")
    owned = {("gradient_clipping",): (f"optim.clip_grad {config.optim.clip_grad}", ds["gradient_clipping"]),
             ("bf16", "enabled"): (f"precision.dtype {dtype}", ds["bf16"]["enabled"]),
             ("fp16", "enabled"): (f"precision.dtype {dtype}", ds["fp16"]["enabled"])}
    for path, (field_value, ours) in owned.items():
        node: Any = extra
        for part in path:
            node = node.get(part, ours) if isinstance(node, dict) else ours
        if node != ours:
            raise TrainConfigError(f"deepspeed.{'.'.join(path)}: {node!r} disagrees with {field_value}; set it "
                                   f"there")
    stage = extra.get("zero_optimization", {}).get("stage", ds["zero_optimization"]["stage"])
    if stage != config.parallel.zero_stage:
        raise TrainConfigError(f"deepspeed.zero_optimization.stage: {stage} disagrees with parallel.zero_stage "
                               f"{config.parallel.zero_stage}")
    if (dtype == "bf16" and config.parallel.pipeline_stages > 1 and isinstance(extra.get("data_types"), dict)
            and gradient_accumulation_dtype({**ds, "data_types": extra["data_types"]}) == "fp32"):
        raise TrainConfigError(
            "deepspeed.data_types.grad_accum_dtype: fp32 with bf16 pipeline stages runs DeepSpeed's BF16_Optimizer "
            "on the pipeline, which drops the gradients of the LM head's bias and the last stage's share of the "
            "tied embedding's; leave it out (bf16 pipelines accumulate in bf16)")
    if "optimizer" in extra or "scheduler" in extra:
        raise TrainConfigError("deepspeed.optimizer/scheduler: set them in the optim section (the trainer passes "
                               "torch's AdamW and its own lr schedule)")
    return deep_merge(ds, extra)


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _model_dtype(ds: dict[str, Any]) -> str:
    return "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp16" if (ds.get("fp16") or {}).get("enabled") \
        else "fp32"


def gradient_accumulation_dtype(ds: dict[str, Any]) -> str:
    """The dtype DeepSpeed accumulates and reduces gradients in under this JSON: data_types.grad_accum_dtype, by
    default the model's."""
    given = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return _model_dtype(ds) if given is None else _DTYPE_NAMES.get(str(given).lower(), str(given))


def saved_gradient_accumulation_dtype(trainer_state: dict[str, Any]) -> str:
    """What a checkpoint's run accumulated gradients in: recorded in trainer_state.json, or for a checkpoint from
    before it was (when fp32 was not yet the default for bf16), what its config's own DeepSpeed JSON asked for, else
    the model's dtype."""
    if "grad_accum_dtype" in trainer_state:
        return str(trainer_state["grad_accum_dtype"])
    config = trainer_state.get("config") or {}
    user = config.get("deepspeed")
    if isinstance(user, str):
        try:
            with open(user, encoding="utf-8") as fh:
                user = json.load(fh)
        except (OSError, ValueError):
            user = None
    dtype = (config.get("precision") or {}).get("dtype", "fp32")
    ds = {"bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}
    if isinstance(user, dict) and isinstance(user.get("data_types"), dict):
        ds["data_types"] = user["data_types"]
    return gradient_accumulation_dtype(ds)


def accumulation_to_keep(trainer_state: Optional[dict[str, Any]], ds: dict[str, Any],
                         universal: bool) -> Optional[str]:
    """The gradient accumulation dtype a resumed bf16 run must keep instead of the one `ds` asks for, or None.
    A bf16 run from before fp32 was the default holds DeepSpeedZeroOptimizer's state at ZeRO-1, which
    BF16_Optimizer cannot load. Only bf16 to bf16 and not through a universal checkpoint (which loads into
    either, parameter by parameter); another precision takes the config's."""
    if trainer_state is None or universal:
        return None
    saved_dtype = ((trainer_state.get("config") or {}).get("precision") or {}).get("dtype", "fp32")
    if saved_dtype != "bf16" or _model_dtype(ds) != "bf16":
        return None
    saved = saved_gradient_accumulation_dtype(trainer_state)
    return saved if saved != gradient_accumulation_dtype(ds) else None
