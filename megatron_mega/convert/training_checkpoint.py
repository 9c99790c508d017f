"""Read the weights of a training checkpoint (any ZeRO stage, any pipeline layout) under Hugging Face names.

A checkpoint folder is what megatron_mega.training writes: `<dir>/latest`, `<dir>/stepNNNNNNNN/` with DeepSpeed's
files and `trainer_state.json` (format version, step, consumed samples, resolved config, tokenizer sha256, layout).
A checkpoint whose `format_version` is newer than this code's (training.checkpointing.FORMAT_VERSION) is refused;
one without the field predates versioning and reads as version 1. The weights come from, by layout:
- pipeline (stages > 1): the per-layer files `layer_XX-model_states.pt`, mapped by megatron_mega.parallel's name map;
- bf16 with ZeRO-1 (DeepSpeed's BF16_Optimizer, fp32 gradient accumulation): the fp32 weights reassembled from its
  optimizer partitions, which `zero_to_fp32` does not read;
- ZeRO 1-3: DeepSpeed's own fp32 reconstruction from the optimizer partitions (`zero_to_fp32`);
- ZeRO 0: the module state in `mp_rank_00_model_states.pt`.
The plain path's module is the trainer's LMLoss wrapper, whose names are the HF names behind an `lm.` prefix.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_mega.model.config import MegaConfig

logger = logging.getLogger(__name__)
_WRAPPER_PREFIX = "lm."


class TrainingCheckpointError(ValueError):
    """A folder that is not a readable training checkpoint (missing files, unknown step, wrong layout)."""


@dataclass
class TrainingWeights:
    config: MegaConfig
    objective: str  # "causal" | "mlm"
    state: dict[str, torch.Tensor]  # HF names of MegaForCausalLM / MegaForMaskedLM
    step: int
    consumed_samples: int
    tokens_seen: int
    tokenizer_sha256: Optional[str]
    tokenizer_path: Optional[str]
    layout: dict[str, Any]
    tag_dir: str
    data_paths: list = field(default_factory=list)  # the run's data.paths (their manifests hold the tokenizer too)

    def model(self):
        """The training-side model (MegaForCausalLM or MegaForMaskedLM) holding these weights."""
        from megatron_mega.model import MegaForCausalLM, MegaForMaskedLM

        cls = MegaForCausalLM if self.objective == "causal" else MegaForMaskedLM
        from megatron_mega.model.pretrained import CheckpointError

        model = cls(self.config)
        own = model.state_dict()
        differ = [f"{k} {list(v.shape)} saved vs {list(own[k].shape)} configured" for k, v in self.state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if differ:
            raise TrainingCheckpointError(f"{os.path.join(self.tag_dir, 'trainer_state.json')}: its model config "
                                          f"does not match the saved weights ({len(differ)} tensors differ in shape, "
                                          f"e.g. {differ[0]})")
        try:
            report = model.load_checkpoint_state(self.state, source=self.tag_dir, source_architecture=cls.__name__)
        except CheckpointError as err:
            raise TrainingCheckpointError(f"{os.path.join(self.tag_dir, 'trainer_state.json')}: its model config "
                                          f"does not match the saved weights ({err})") from None
        if report.missing_keys or report.unexpected_keys:
            raise TrainingCheckpointError(
                f"{self.tag_dir}: weights do not match {cls.__name__}: missing {report.missing_keys[:5]}, "
                f"unexpected {report.unexpected_keys[:5]}")
        return model.eval()


def _tag(directory: str, step: Optional[int]) -> str:
    from megatron_mega.training import checkpointing

    if not os.path.isdir(directory):
        raise TrainingCheckpointError(f"{directory}: not a directory")
    if os.path.exists(os.path.join(directory, checkpointing.STATE_FILE)):
        step_here = _step_of_folder(directory)
        hint = f" --step {step_here}" if step_here is not None else ""
        raise TrainingCheckpointError(f"{directory}: one checkpoint of a run, not the run's checkpoint folder; pass "
                                      f"{os.path.dirname(directory)}{hint}")
    if step is not None:
        tag = checkpointing.tag_for(step)
        if not os.path.isdir(os.path.join(directory, tag)):
            available = sorted(n for n in os.listdir(directory) if n.startswith(checkpointing.TAG_PREFIX)
                               and not n.endswith(checkpointing.UNIVERSAL_SUFFIX))
            raise TrainingCheckpointError(f"{directory}: no checkpoint for step {step} (available: {available})")
        return tag
    tag = checkpointing.latest_tag(directory)
    if tag is None and os.path.exists(os.path.join(directory, "config.json")):
        raise TrainingCheckpointError(f"{directory}: a Hugging Face model directory (config.json), not a training "
                                      f"checkpoint folder; it needs no conversion (to continue pretraining from it, "
                                      f"set checkpoint.init_from_hf)")
    if tag is None:
        raise TrainingCheckpointError(f"{directory}: no `latest` file; not a training checkpoint folder "
                                      f"(or no checkpoint finished writing)")
    return tag


def _step_of_folder(directory: str) -> Optional[int]:
    """The step of `directory` when it is one step's folder of a run (`run/step00000600`: a trainer state inside,
    named by its step), else None."""
    from megatron_mega.training import checkpointing

    name = os.path.basename(os.path.normpath(directory))
    number = name[len(checkpointing.TAG_PREFIX):]
    if os.path.exists(os.path.join(directory, checkpointing.STATE_FILE)) and \
            name.startswith(checkpointing.TAG_PREFIX) and number.isdigit():
        return int(number)
    return None


def find_tokenizer(weights: TrainingWeights) -> Optional[str]:
    """The tokenizer the run trained with: its config's `tokenizer`, else the one prepared datasets keep beside
    their manifest (a run configured without `tokenizer:` still recorded the data's tokenizer sha256), when its
    sha256 is the run's; None when neither is found."""
    if weights.tokenizer_path:
        return weights.tokenizer_path
    from megatron_mega.data.documents import is_manifest_path
    from megatron_mega.data.manifest import Manifest, ManifestError
    from megatron_mega.data.tokenizer import Tokenizer, TokenizerError

    for path in weights.data_paths:
        if not isinstance(path, str) or not is_manifest_path(path):
            continue
        try:
            manifest = Manifest.load(path)
            candidate = os.path.join(manifest.root, manifest.tokenizer.model_file or "tokenizer.model")
            if os.path.exists(candidate) and (weights.tokenizer_sha256 is None
                                              or Tokenizer.load(candidate).sha256 == weights.tokenizer_sha256):
                return candidate
        except (ManifestError, TokenizerError, OSError):
            continue
    return None


@dataclass
class CheckpointHeader:
    """What a training checkpoint's trainer_state.json says, before any weight is read."""
    directory: str  # the run's checkpoint folder
    tag: str
    state: dict[str, Any]
    config: MegaConfig
    objective: str

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.directory, self.tag)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def read_checkpoint_header(directory: str, step: Optional[int] = None) -> CheckpointHeader:
    """The trainer state of the run in `directory` (its `latest`, or `step`), checked to be readable."""
    from megatron_mega.training import checkpointing

    directory = os.path.abspath(directory)
    tag = _tag(directory, step)
    tag_dir = os.path.join(directory, tag)
    if not os.path.isdir(tag_dir):
        raise TrainingCheckpointError(f"{os.path.join(directory, checkpointing.LATEST)}: names {tag}, which is "
                                      f"missing (an incomplete copy of the run?)")
    try:
        state = checkpointing.read_state(directory, tag)  # refuses an unsupported format_version
    except RuntimeError as err:
        raise TrainingCheckpointError(str(err)) from None
    config_dict = state.get("config") or {}
    try:
        config = MegaConfig.from_dict(config_dict["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise TrainingCheckpointError(f"{tag_dir}: trainer_state.json has no usable model config ({err})") from None
    return CheckpointHeader(directory=directory, tag=tag, state=state, config=config,
                            objective=config_dict.get("objective", "causal"))


def read_training_checkpoint(directory: str, step: Optional[int] = None) -> TrainingWeights:
    return _read_weights(read_checkpoint_header(directory, step))


def _read_weights(header: CheckpointHeader) -> TrainingWeights:
    state, config, objective, tag_dir = header.state, header.config, header.objective, header.tag_dir
    config_dict = state.get("config") or {}
    layout = dict(state.get("layout") or {})
    stages = int(layout.get("pipeline_stages", 1))
    if stages > 1:
        weights = _pipeline_weights(tag_dir, config, objective)
    elif int(layout.get("zero_stage", 0)) == 1 and (bf16_weights := _bf16_optimizer_weights(tag_dir)) is not None:
        weights = bf16_weights
    elif int(layout.get("zero_stage", 0)) > 0:
        weights = _zero_weights(header.directory, header.tag)
    else:
        weights = _module_weights(tag_dir, config, objective, state)
    seq_len = int((config_dict.get("data") or {}).get("seq_len", 0))
    consumed = int(state.get("consumed_samples", 0))
    return TrainingWeights(config=config, objective=objective, state=weights, step=header.step,
                           consumed_samples=consumed, tokens_seen=consumed * seq_len,
                           tokenizer_sha256=state.get("tokenizer_sha256"), tokenizer_path=config_dict.get("tokenizer"),
                           data_paths=list((config_dict.get("data") or {}).get("paths") or []),
                           layout=layout, tag_dir=tag_dir)


def check_init_checkpoint(directory: str, model_config: MegaConfig, objective: str) -> CheckpointHeader:
    """The checkpoint `checkpoint.init_from_checkpoint` names (a run's folder: its `latest`; or one step's folder),
    from its trainer state alone: the architecture and the objective must be the run's, and a change of either is
    one error naming the field. `train --dry-run` stops here; a run goes on to read the weights."""
    from megatron_mega.convert.hf_import import architecture_differences

    field_name = "checkpoint.init_from_checkpoint"
    directory = os.path.abspath(directory)
    step = _step_of_folder(directory)
    if step is not None:  # one step's folder (run/step00000600): that step, not the run's `latest`
        directory = os.path.dirname(directory)
    try:
        header = read_checkpoint_header(directory, step)
    except TrainingCheckpointError as err:
        raise TrainingCheckpointError(f"{field_name}: {err}") from None
    if header.objective != objective:
        hint = (" (`megatron-mega convert --bidirectional-to-causal` turns the encoder into a Hugging Face decoder "
                "that checkpoint.init_from_hf can start from)" if objective == "causal" else "")
        raise TrainingCheckpointError(
            f"{field_name}: {header.tag_dir} trained the {header.objective} objective, this run the {objective} "
            f"one{hint}")
    different = [f"model.{name}: {there!r} there, {here!r} here"
                 for name, there, here in architecture_differences(header.config, model_config)]
    if different:
        raise TrainingCheckpointError(f"{field_name}: {header.tag_dir} has another architecture: "
                                      f"{'; '.join(different)}")
    return header


def lm_state_from_training_checkpoint(directory: str, model_config: MegaConfig,
                                      objective: str) -> tuple[dict[str, torch.Tensor], int]:
    """(the complete state dict of the training LM, the step it was saved at) for a fresh run that starts from the
    weights of another run's checkpoint (`checkpoint.init_from_checkpoint`), checked by check_init_checkpoint."""
    header = check_init_checkpoint(directory, model_config, objective)
    try:
        weights = _read_weights(header)
    except TrainingCheckpointError as err:
        raise TrainingCheckpointError(f"checkpoint.init_from_checkpoint: {err}") from None
    return weights.model().state_dict(), weights.step


def _strip_wrapper(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if not state or not all(k.startswith(_WRAPPER_PREFIX) for k in state):
        raise TrainingCheckpointError(f"{where}: module weights are not the trainer's (expected names under "
                                      f"'{_WRAPPER_PREFIX}', got e.g. {sorted(state)[:3]})")
    return {k[len(_WRAPPER_PREFIX):]: v.detach().float().contiguous() for k, v in state.items()}


def _module_weights(tag_dir: str, config: Optional[MegaConfig] = None, objective: str = "causal",
                    trainer_state: Optional[dict[str, Any]] = None) -> dict[str, torch.Tensor]:
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(path):
        raise TrainingCheckpointError(f"{path}: missing (incomplete checkpoint?)")
    # DeepSpeed's own file of our own run: it holds non-tensor objects, so weights_only loading cannot read it
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise TrainingCheckpointError(f"{path}: cannot be read ({_first_line(err)}); the file is damaged or "
                                      f"incomplete (convert an earlier step with --step)") from None
    module = dict(blob["module"])
    if config is not None:
        module.update(_fp16_optimizer_masters(blob, module, config, objective, trainer_state or {}, path))
    return _strip_wrapper(module, path)


def _fp16_optimizer_masters(blob: dict[str, Any], module: dict[str, torch.Tensor], config: MegaConfig,
                            objective: str, trainer_state: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a bf16/fp16 ZeRO-0 checkpoint (DeepSpeed's FP16_UnfusedOptimizer), whose
    module state holds only their 16-bit copies; {} for any other. Its `fp32_groups` are lists of tensors in the
    order of the optimizer's parameter groups, which the trainer built with training.weight_decay.param_groups
    (by the rule the checkpoint records): the same groups, built on the meta device, name them. Each master must
    round to its module weight; otherwise the module's weights are kept, with a warning, rather than a guess."""
    optimizer = blob.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("fp32_groups"), list):
        return {}
    from megatron_mega.model import MegaForCausalLM, MegaForMaskedLM
    from megatron_mega.training.weight_decay import param_groups, rule_of_checkpoint

    with torch.device("meta"):
        lm = (MegaForCausalLM if objective == "causal" else MegaForMaskedLM)(config)
    named = {id(p): _WRAPPER_PREFIX + name for name, p in lm.named_parameters()}
    groups = [[named[id(p)] for p in group["params"]]
              for group in param_groups(lm, 0.0, rule_of_checkpoint(trainer_state))]
    masters = {}
    try:
        if [len(g) for g in groups] != [len(g) for g in optimizer["fp32_groups"]]:
            raise ValueError("other parameter groups")
        for names, tensors in zip(groups, optimizer["fp32_groups"]):
            for name, master in zip(names, tensors):
                weight = module[name]
                if master.shape != weight.shape or not torch.equal(master.to(weight.dtype), weight):
                    raise ValueError(f"{name} does not round to the module's weight")
                masters[name] = master
    except (ValueError, KeyError) as err:
        logger.warning("%s: the optimizer's fp32 weights do not match the module's (%s); converting the module's "
                       "16-bit weights", path, err)
        return {}
    return masters


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _zero_weights(directory: str, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # its progress bar goes to stderr: kept off the command's output, whose error is one line
        with contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingCheckpointError(f"{directory}/{tag}: cannot reconstruct the ZeRO weights ({err})") from None
    return _strip_wrapper(dict(state), f"{directory}/{tag}")


_BF16_FILE = re.compile(r"bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _bf16_optimizer_weights(tag_dir: str) -> Optional[dict[str, torch.Tensor]]:
    """The fp32 master weights of a checkpoint of DeepSpeed's BF16_Optimizer (bf16, ZeRO-1, fp32 gradient
    accumulation); None for any other checkpoint. Its files are named as a bf16 ZeRO optimizer's
    (`bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, one per data-parallel rank), but zero_to_fp32 cannot
    read them, and the module state holds only the weights' bf16 copies. Each holds the rank's partition of every
    parameter group as one flat fp32 tensor and, per parameter name, the fragment (start, numel) of it that lies
    there; a parameter is its fragments in rank order."""
    found = sorted((int(m.group(1)), name) for name in os.listdir(tag_dir) if (m := _BF16_FILE.match(name)))
    if not found:
        return None
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    try:
        fragments: dict[str, list[torch.Tensor]] = {}
        for rank, name in found:
            optimizer = torch.load(os.path.join(tag_dir, name), map_location="cpu",
                                   weights_only=False)["optimizer_state_dict"]
            if rank == found[0][0] and ("zero_stage" in optimizer or "param_slice_mappings" not in optimizer):
                return None  # DeepSpeedZeroOptimizer's state (bf16 accumulation): zero_to_fp32 reads it
            for flat, mapping in zip(optimizer["single_partition_of_fp32_groups"],
                                     optimizer["param_slice_mappings"]):
                for param, address in mapping.items():
                    fragments.setdefault(param, []).append(flat.narrow(0, address.start, address.numel))
        model = torch.load(model_file, map_location="cpu", weights_only=False)
        shapes = {param: shape for group in model["param_shapes"] for param, shape in group.items()}
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as err:
        raise TrainingCheckpointError(f"{tag_dir}: cannot read the bf16 optimizer's weights ({_first_line(err)}); "
                                      f"the checkpoint is damaged or incomplete (convert an earlier step with "
                                      f"--step)") from None
    state = {}
    for name, shape in shapes.items():
        pieces = fragments.get(name, [])
        flat = torch.cat(pieces) if pieces else torch.empty(0)
        if flat.numel() != shape.numel():
            raise TrainingCheckpointError(f"{tag_dir}: the bf16 optimizer files hold {flat.numel()} values of {name}, "
                                          f"its shape {list(shape)} has {shape.numel()} (a rank's file missing?)")
        state[name] = flat.view(shape).clone()
    for alias, source in (model.get("shared_params") or {}).items():
        state[alias] = state[source]
    return _strip_wrapper(state, tag_dir)


def _pipeline_weights(tag_dir: str, config: MegaConfig, objective: str) -> dict[str, torch.Tensor]:
    from megatron_mega.parallel import plain_model_from_pipeline_checkpoint

    try:
        model = plain_model_from_pipeline_checkpoint(tag_dir, config, objective=objective)
    except (FileNotFoundError, KeyError) as err:
        # a missing layer_XX-model_states.pt (an incomplete copy of the checkpoint) shows up as either
        raise TrainingCheckpointError(f"{tag_dir}: pipeline layer files missing ({err})") from None
    except RuntimeError as err:  # load_state_dict's size mismatches: the config is not the one the run trained
        detail = [line.strip() for line in str(err).splitlines() if "size mismatch" in line] or [str(err)]
        raise TrainingCheckpointError(f"{os.path.join(tag_dir, 'trainer_state.json')}: its model config does not "
                                      f"match the layer files ({len(detail)} tensors differ, e.g. {detail[0]})") \
            from None
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


EMA_PARAMETERS = ("damping_factor", "decay_factor", "ema_expansion_matrix", "kernel_projection_matrix")


def bidirectional_to_causal(state: dict[str, torch.Tensor], config: MegaConfig) -> tuple[dict, MegaConfig]:
    """The documented encoder -> decoder conversion: keep each EMA's forward (causal) half, drop the backward half
    (an encoder with a causal EMA keeps it whole).

    A bidirectional EMA is two EMAs, the first `hidden_size` rows reading the past and the last `hidden_size` rows
    the future; a causal model keeps the first. Attention becomes causal (is_decoder). The masked-LM head becomes
    the causal LM head (`mlm_head.*` -> `lm_head.*`, the trained output bias included). The result is a starting
    point for causal training, not an equivalent model: the encoder never learnt to work without the future."""
    hidden = config.hidden_size
    out = {}
    for key, value in state.items():
        if config.bidirectional and key.rsplit(".", 1)[-1] in EMA_PARAMETERS and ".ema_gate." in key:
            value = value[:hidden].clone()
        if key.startswith("mlm_head."):
            key = "lm_head." + key[len("mlm_head."):]
        out[key] = value
    return out, config.copy(bidirectional=False, is_decoder=True)
