"""TrainConfig: one typed, validated dataclass per component, loaded from YAML with dotted overrides.

    config = load_train_config("configs/train/tiny.yaml", ["optim.lr=1e-3", "parallel.zero_stage=2"])
    layout = config.layout(world_size=2)     # data-parallel size and gradient accumulation, checked

Each section is built by its own component's class (the model by MegaConfig, the data by DataConfig); the rules that
involve two sections (objective vs model direction, ZeRO-2/3 with pipeline stages, the batch arithmetic) are checked
here, before anything heavy starts. Errors are `TrainConfigError` and start with the dotted field name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megatron_mega.data.config import DataConfig, DataConfigError
from megatron_mega.model.config import ConfigError, MegaConfig
from megatron_mega.yaml_config import ConfigFileError, apply_overrides, load_yaml

OBJECTIVES = ("causal", "mlm")
DTYPES = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")


class TrainConfigError(ValueError):
    """A training config field that is missing, of the wrong type, out of range or contradicting another."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TrainConfigError(message)


def _floats(obj: Any, *names: str) -> None:
    """YAML 1.1 reads `1e-4` (no dot) as a string: accept such strings where a float is expected."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str):
            try:
                setattr(obj, name, float(value))
            except ValueError:
                pass


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine/linear decay to min_lr over decay_steps (default: train_steps)."""

    train_steps: int = 100          # 0: write the initial weights as a step-0 checkpoint and stop (fresh runs)
    global_batch_size: int = 8
    micro_batch_size: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "cosine"
    decay_steps: Optional[int] = None
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    clip_grad: float = 1.0          # 0 disables clipping
    max_nonfinite_in_a_row: int = 5  # this many non-finite losses in a row stop the run

    def __post_init__(self) -> None:
        _floats(self, "lr", "min_lr", "weight_decay", "eps", "clip_grad")
        if isinstance(self.betas, (list, tuple)):
            self.betas = [float(b) if isinstance(b, str) else b for b in self.betas]
        for name in ("global_batch_size", "micro_batch_size", "max_nonfinite_in_a_row"):
            v = getattr(self, name)
            _check(_is_int(v) and v > 0, f"optim.{name}: must be a positive integer, got {v!r}")
        _check(_is_int(self.train_steps) and self.train_steps >= 0,
               f"optim.train_steps: must be a positive integer (or 0 for a step-0 checkpoint), got "
               f"{self.train_steps!r}")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
               f"optim.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        _check(self.decay_steps is None or (_is_int(self.decay_steps) and self.decay_steps > 0),
               f"optim.decay_steps: must be a positive integer or null, got {self.decay_steps!r}")
        for name in ("lr", "min_lr", "weight_decay", "eps", "clip_grad"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0, f"optim.{name}: must be a finite number >= 0, got {v!r}")
        _check(self.lr > 0, f"optim.lr: must be > 0, got {self.lr!r}")
        _check(self.min_lr <= self.lr, f"optim.min_lr: {self.min_lr} is above optim.lr {self.lr}")
        _check(self.decay in DECAYS, f"optim.decay: {self.decay!r} is not one of {DECAYS}")
        # decay runs over steps [warmup_steps, decay_steps]: an empty range would hold the peak lr for ever
        _check(self.decay == "constant" or self.decay_steps is None or self.decay_steps > self.warmup_steps,
               f"optim.decay_steps: {self.decay_steps} must be above optim.warmup_steps {self.warmup_steps} "
               f"(the {self.decay} decay runs between them)")
        _check(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
               and all(_is_num(b) and 0 <= b < 1 for b in self.betas),
               f"optim.betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.train_steps


@dataclass
class ParallelConfig:
    pipeline_stages: int = 1
    zero_stage: int = 0
    activation_checkpointing: bool = False
    # each MEGA block recomputes its cheap intermediates in backward (attention scores and weights, activated and
    # dropped projection inputs): 40% less activation memory at the GPU anchor for one more query-key product
    # (model/block.py's set_selective_recompute); off keeps them, as plain autograd would
    selective_recompute: bool = True
    # torch.compile each MEGA block (nn.Module.compile) before DeepSpeed wraps the model: one fused graph per block.
    # Measured on an H200: +20% training tokens/s and 37% less peak memory (benchmarks/gpu_bench.py's compiled case);
    # The first step pays the compilation (tiny test config on a CPU: ~60 s; inductor's on-disk cache shortens reruns).
    compile_blocks: bool = False
    partition_method: Optional[str] = None  # pipeline only (null: megatron_mega.parallel's default)
    # DeepSpeed's CPU shared-memory all-reduce: a C++ op JIT-compiled (~64 s) on first use. gloo does the same job,
    # so it is off unless asked for.
    cpu_shm_allreduce: bool = False
    timeout_s: int = 600  # collectives: a dead rank fails the job after this many seconds instead of hanging it

    def __post_init__(self) -> None:
        _check(_is_int(self.pipeline_stages) and self.pipeline_stages >= 1,
               f"parallel.pipeline_stages: must be an integer >= 1, got {self.pipeline_stages!r}")
        _check(self.zero_stage in (0, 1, 2, 3) and _is_int(self.zero_stage),
               f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _check(self.pipeline_stages == 1 or self.zero_stage <= 1,
               f"parallel.zero_stage: ZeRO-{self.zero_stage} cannot be combined with pipeline parallelism "
               f"(parallel.pipeline_stages={self.pipeline_stages}); use ZeRO-1 with pipelines")
        for name in ("activation_checkpointing", "selective_recompute", "compile_blocks", "cpu_shm_allreduce"):
            _check(isinstance(getattr(self, name), bool), f"parallel.{name}: expected true or false")
        # ZeRO-3 gathers each submodule's parameters in hooks that then run inside the compiled block: torch.compile
        # splits the block at every hook and recompiles the hooks until it hits its recompile limit (measured, tiny
        # config on CPU: same losses, 1.5x the eager ZeRO-3 step time), so the combination buys nothing
        _check(not (self.compile_blocks and self.zero_stage == 3),
               "parallel.compile_blocks: cannot be combined with parallel.zero_stage=3 (ZeRO-3's parameter-gathering "
               "hooks break each compiled block into pieces); use parallel.zero_stage 0-2 or "
               "parallel.compile_blocks=false")
        _check(_is_int(self.timeout_s) and self.timeout_s > 0,
               f"parallel.timeout_s: must be a positive integer, got {self.timeout_s!r}")


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    initial_loss_scale_power: int = 16  # fp16 only

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"precision.dtype: {self.dtype!r} is not one of {DTYPES}")
        _check(_is_int(self.initial_loss_scale_power) and 0 <= self.initial_loss_scale_power <= 64,
               f"precision.initial_loss_scale_power: must be an integer in [0, 64], got "
               f"{self.initial_loss_scale_power!r}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None     # null: no checkpoints
    interval: int = 0             # steps between saves (0: only at the end and on a signal)
    keep_last: int = 2            # older checkpoints are deleted once a newer one is complete (0: keep all)
    load: Optional[str] = "auto"  # "auto": resume from dir's newest if there is one; a folder; or null
    save_final: bool = True
    universal: bool = False       # the checkpoint to load is a DeepSpeed universal checkpoint
    exit_at_step: Optional[int] = None  # save and stop when this step is reached (ignored when resumed past it)
    init_from_hf: Optional[str] = None  # a Hugging Face-format MEGA directory whose weights start a fresh run
    # a training checkpoint folder (any layout; its `latest`) whose weights start a fresh run: iteration 0, a new
    # optimizer, schedule and data order (Megatron-LM's --finetune)
    init_from_checkpoint: Optional[str] = None

    def __post_init__(self) -> None:
        _check(not (self.init_from_hf and self.init_from_checkpoint),
               "checkpoint.init_from_checkpoint: give it or checkpoint.init_from_hf, not both")
        _check(_is_int(self.interval) and self.interval >= 0,
               f"checkpoint.interval: must be an integer >= 0, got {self.interval!r}")
        _check(_is_int(self.keep_last) and self.keep_last >= 0,
               f"checkpoint.keep_last: must be an integer >= 0, got {self.keep_last!r}")


@dataclass
class LoggingConfig:
    interval: int = 10
    tensorboard_dir: Optional[str] = None
    eval_interval: int = 0   # steps between validations (0: none during training)
    eval_iters: int = 2      # micro-batches per rank in one validation
    test_iters: int = 0      # micro-batches per rank in the final test evaluation (0: none)
    peak_tflops: Optional[float] = None  # per device, for MFU (null: looked up, see metrics.peak_tflops)

    def __post_init__(self) -> None:
        _floats(self, "peak_tflops")
        for name in ("interval",):
            _check(_is_int(getattr(self, name)) and getattr(self, name) > 0, f"logging.{name}: must be > 0")
        for name in ("eval_interval", "eval_iters", "test_iters"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, f"logging.{name}: must be an integer >= 0, got {v!r}")
        # zero micro-batches would log a loss of 0 (perplexity 1) on the plain path and crash the pipeline's
        _check(not (self.eval_interval and not self.eval_iters),
               f"logging.eval_iters: must be >= 1 when logging.eval_interval ({self.eval_interval}) asks for "
               f"validations")
        _check(self.peak_tflops is None or self.peak_tflops > 0,
               f"logging.peak_tflops: must be > 0 or null, got {self.peak_tflops!r}")


@dataclass
class Layout:
    world_size: int
    pipeline_stages: int
    data_parallel_size: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int

    def describe(self) -> str:
        return (f"{self.world_size} process(es) = {self.pipeline_stages} pipeline stage(s) x "
                f"{self.data_parallel_size} data-parallel; global batch {self.global_batch_size} = micro "
                f"{self.micro_batch_size} x accumulation {self.grad_accum} x data-parallel {self.data_parallel_size}")


SECTIONS = {"optim": OptimConfig, "parallel": ParallelConfig, "precision": PrecisionConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass
class TrainConfig:
    model: MegaConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234
    objective: str = "causal"
    tokenizer: Optional[str] = None   # tokenizer folder; its sha256 must match the manifests' (null: trust them)
    deepspeed: Optional[dict] = None  # merged over the generated DeepSpeed JSON (or a path to a JSON file)

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, f"objective: {self.objective!r} is not one of {OBJECTIVES}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2 ** 31, "seed: must be an integer in [0, 2^31)")
        _check(self.data.objective == self.objective,
               f"data.objective: {self.data.objective!r} differs from objective {self.objective!r}")
        if self.objective == "causal":
            _check(self.model.is_decoder and not self.model.bidirectional,
                   "model.is_decoder: the causal objective needs model.is_decoder=true and model.bidirectional=false")
        else:
            _check(not self.model.is_decoder, "model.is_decoder: the mlm objective needs model.is_decoder=false")
        if not self.model.use_chunking:
            _check(self.data.seq_len <= self.model.max_positions,
                   f"data.seq_len: {self.data.seq_len} exceeds model.max_positions {self.model.max_positions} "
                   f"(without chunking attention spans the whole sequence)")
        else:
            _check(self.model.chunk_size <= self.model.max_positions,
                   f"model.chunk_size: {self.model.chunk_size} exceeds model.max_positions")
        _check(self.optim.global_batch_size % self.optim.micro_batch_size == 0,
               f"optim.global_batch_size: {self.optim.global_batch_size} is not a multiple of "
               f"optim.micro_batch_size {self.optim.micro_batch_size}")
        _check(self.parallel.pipeline_stages <= self.model.num_hidden_layers + 1,
               f"parallel.pipeline_stages: {self.parallel.pipeline_stages} stages for "
               f"{self.model.num_hidden_layers} layers (at most one stage per layer, plus one for the head)")
        # DeepSpeed's ZeRO-0 pipeline optimizers go wrong where ZeRO-1 is right: fp32 clips by stage 0's gradient
        # norm alone (and reports none), bf16 clears the gradients of what only the loss uses (the LM head's bias)
        _check(self.parallel.pipeline_stages == 1 or self.parallel.zero_stage == 1,
               "parallel.zero_stage: pipeline stages need ZeRO-1 here (parallel.zero_stage=1): with ZeRO-0 "
               "DeepSpeed clips by stage 0's gradients only (fp32) or drops the LM head bias's gradient (bf16)")
        if self.optim.train_steps == 0:
            # the one meaning of 0 steps: build the model (seeded or checkpoint.init_from_hf), save it as the
            # checkpoint of step 0, stop; without a checkpoint folder that would do nothing
            _check(self.checkpoint.dir is not None,
                   "optim.train_steps: 0 writes the initial weights as a step-0 checkpoint and stops; it needs "
                   "checkpoint.dir (or give a positive number of steps)")
        _check(self.deepspeed is None or isinstance(self.deepspeed, (dict, str)),
               "deepspeed: expected a mapping of DeepSpeed settings or a path to a JSON file")

    def layout(self, world_size: int) -> Layout:
        """The data-parallel size and gradient accumulation for `world_size` processes; refuses what does not
        divide (global batch = micro batch x gradient accumulation x data-parallel size)."""
        stages = self.parallel.pipeline_stages
        _check(isinstance(world_size, int) and world_size >= 1, f"world size: must be at least 1, got {world_size}")
        _check(world_size % stages == 0,
               f"parallel.pipeline_stages: {stages} does not divide the world size {world_size}")
        dp = world_size // stages
        per_step = self.optim.micro_batch_size * dp
        _check(self.optim.global_batch_size % per_step == 0,
               f"optim.global_batch_size: {self.optim.global_batch_size} is not a multiple of micro_batch_size "
               f"{self.optim.micro_batch_size} x data-parallel size {dp} = {per_step}")
        return Layout(world_size, stages, dp, self.optim.micro_batch_size,
                      self.optim.global_batch_size // per_step, self.optim.global_batch_size)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": _model_dict(self.model), "data": self.data.to_dict()}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out.update(seed=self.seed, objective=self.objective, tokenizer=self.tokenizer, deepspeed=self.deepspeed)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        _check(isinstance(data, dict), "the config must be a mapping of sections")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"{unknown[0] if unknown else ''}: unknown section (known: {sorted(known)})")
        _check("model" in data, "model: required section is missing")
        _check("data" in data, "data: required section is missing")
        kwargs: dict[str, Any] = {}
        model = data["model"]
        _check(isinstance(model, dict), "model: expected a mapping of MegaConfig fields")
        bad = sorted(set(model) - set(MegaConfig.field_names()) - {"num_labels"})
        _check(not bad, f"model.{bad[0] if bad else ''}: unknown MegaConfig field")
        try:
            kwargs["model"] = MegaConfig(**model)
        except (ConfigError, TypeError) as err:
            raise TrainConfigError(f"model.{err}") from None
        objective = data.get("objective", "causal")
        section = dict(data["data"]) if isinstance(data["data"], dict) else data["data"]
        if isinstance(section, dict):
            section.setdefault("objective", objective)
        try:
            kwargs["data"] = DataConfig.from_dict(section)
        except (DataConfigError, TypeError) as err:
            raise TrainConfigError(f"data.{err}") from None
        for name, klass in SECTIONS.items():
            value = data.get(name) or {}
            _check(isinstance(value, dict), f"{name}: expected a mapping")
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = sorted(set(value) - names)
            _check(not unknown, f"{name}.{unknown[0] if unknown else ''}: unknown field (known: {sorted(names)})")
            try:
                kwargs[name] = klass(**value)
            except TypeError as err:
                raise TrainConfigError(f"{name}: {err}") from None
        for name in ("seed", "objective", "tokenizer", "deepspeed"):
            if name in data:
                kwargs[name] = data[name]
        return cls(**kwargs)


def _model_dict(model: MegaConfig) -> dict[str, Any]:
    """The model fields that differ from MegaConfig's defaults (what a user would write in YAML)."""
    default = MegaConfig().to_dict()
    mine = model.to_dict()
    return {k: v for k, v in mine.items() if k in MegaConfig.field_names() and v != default.get(k)}


def load_train_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (or start empty when `path` is None), apply `a.b=c` overrides, build and check."""
    try:
        data = apply_overrides(load_yaml(path) if path else {}, overrides)
    except ConfigFileError as err:
        raise TrainConfigError(str(err)) from None
    try:
        return TrainConfig.from_dict(data)
    except TrainConfigError as err:
        raise TrainConfigError(f"{path}: {err}" if path else str(err)) from None
