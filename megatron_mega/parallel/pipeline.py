"""MEGA as a DeepSpeed PipelineModule: a flat list of layer specs built from the model's own layer classes.

    pipe = build_pipeline_module(config, num_stages=2, objective="causal", seed=1234)
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.AdamW(pipe.parameters()), config=ds_json)
    loss = engine.train_batch(data_iter)  # micro-batches ((input_ids,), targets), targets aligned, -100 ignored

The initial weights are those of the plain MegaForCausalLM / MegaForMaskedLM built after torch.manual_seed(seed),
whatever the partitioning: the plain model is built once (on the CPU, without touching the caller's RNG) and every
stage copies its layers' tensors through the name map of `layout.py`.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from megatron_mega.model.config import MegaConfig
from megatron_mega.model.heads import MegaForCausalLM, MegaForMaskedLM
from megatron_mega.parallel.layers import EmbeddingPipe, LMHeadPipe, MegaBlockPipe, tied_embedding_passthrough
from megatron_mega.parallel.layout import (
    TIED_KEY,
    WORD_EMBEDDING,
    PipelineLayout,
    hf_state_to_pipeline,
    pipeline_layout,
    pipeline_state_to_hf,
)
from megatron_mega.parallel.partition import stage_partition

PLAIN_CLASSES = {"causal": MegaForCausalLM, "mlm": MegaForMaskedLM}
CHECKPOINTABLE_LAYERS = ["MegaBlockPipe"]


def layer_specs(config: MegaConfig, objective: str = "causal") -> list:
    """The flat list of DeepSpeed layer specs (indices as in `layout.py`)."""
    layout = pipeline_layout(config, objective)
    if layout.tied:
        specs = [TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, tied_weight_attr=[WORD_EMBEDDING])]
    else:
        specs = [LayerSpec(EmbeddingPipe, config)]
    specs += [LayerSpec(MegaBlockPipe, config) for _ in range(layout.num_blocks)]
    specs.append(LayerSpec(LMHeadPipe, config))
    if layout.tied:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, forward_fn=tied_embedding_passthrough,
                                   tied_weight_attr=[WORD_EMBEDDING]))
    assert len(specs) == layout.num_layers
    return specs


def plain_model(config: MegaConfig, objective: str = "causal", seed: int = 0) -> nn.Module:
    """The plain model whose weights a pipeline built with the same seed starts from; the caller's RNG is kept
    (the GPU's too: manual_seed reseeds every device)."""
    cls = PLAIN_CLASSES[objective]
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        return cls(config)


class MegaPipelineModule(PipelineModule):
    """PipelineModule with MEGA's own stage partition (embedding first, head and tied copy together last) and
    the LM loss on the last stage, which reads the head layer and the local copy of the tied embedding."""

    def __init__(self, specs, *, config: MegaConfig, objective: str, layout: PipelineLayout,
                 parts: list[int], **kwargs):
        self._mega_parts = list(parts)
        super().__init__(specs, loss_fn=None, **kwargs)
        self.mega_config = config
        self.objective = objective
        self.layout = layout
        self.loss_fn = self.lm_loss  # DeepSpeed calls loss_fn(outputs, labels) on the last stage

    def _partition_layers(self, method="uniform"):  # DeepSpeed calls this from __init__
        self.parts = list(self._mega_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def local_layers(self) -> dict[int, nn.Module]:
        """Global layer index -> module, for the layers of this stage that have a state (the last stage's tied
        copy has none of its own: it is the module of key "embed")."""
        layers = {}
        for local, func in enumerate(self.forward_funcs):
            if isinstance(func, nn.Module):
                layers[self._local_start + local] = func
        return layers

    def lm_loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions, from the hidden states the blocks produced, the head's
        dense/bias and this stage's copy of the tied word embedding; no (tokens x vocab) logits exist at once."""
        head = self.forward_funcs[self.fwd_map[str(self.layout.head_layer)]]
        weight = self.tied_modules[TIED_KEY].word_embeddings.weight if self.layout.tied else None
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs
        return head.loss(hidden, labels, weight)


def build_pipeline_module(model_config: MegaConfig, num_stages: int, *, objective: str = "causal",
                          activation_checkpoint_interval: int = 0, seed: int = 0,
                          partition_method: str = "type:MegaBlockPipe",
                          init_state: Optional[dict[str, torch.Tensor]] = None) -> MegaPipelineModule:
    """A deepspeed.pipe.PipelineModule of MEGA with `num_stages` stages (torch.distributed must be initialised; the
    world size must be a multiple of num_stages, the rest is data parallelism).

    objective: "causal" (is_decoder=True, bidirectional=False; head lm_head) or "mlm" (encoder; head mlm_head).
    Batches: ((input_ids,), targets) or ((input_ids, attention_mask), targets); targets (B, L) already aligned
    with the positions (no shift inside), -100 where there is no target. The loss is the mean cross-entropy over
    the labelled positions of a micro-batch, as `MegaForCausalLM.lm_loss(hidden, targets)`.
    activation_checkpoint_interval: recompute every `k` consecutive MEGA blocks in the backward pass (0: off; 1 is
    the natural choice: chunks that would include the embedding or the head are not checkpointed).
    init_state: the complete `state_dict()` of a plain model to start from instead of the seeded fresh one, e.g.
    `MegaForCausalLM.from_pretrained(path).state_dict()` (from_pretrained fills what a file may omit).
    """
    if activation_checkpoint_interval < 0:
        raise ValueError(f"activation_checkpoint_interval: must be >= 0, got {activation_checkpoint_interval}")
    if not dist.is_initialized():
        raise RuntimeError("build_pipeline_module needs torch.distributed initialised (deepspeed.init_distributed)")
    layout = pipeline_layout(model_config, objective)
    parts = stage_partition(model_config, layout, num_stages, partition_method)
    if init_state is None:
        init_state = plain_model(model_config, objective, seed).state_dict()
    by_layer = hf_state_to_pipeline(layout, init_state)

    pipe = MegaPipelineModule(layer_specs(model_config, objective), config=model_config, objective=objective,
                              layout=layout, parts=parts, num_stages=num_stages, partition_method=partition_method,
                              activation_checkpoint_interval=activation_checkpoint_interval,
                              checkpointable_layers=list(CHECKPOINTABLE_LAYERS))
    with torch.no_grad():
        for index, module in pipe.local_layers().items():
            module.load_state_dict(by_layer.get(index, {}), strict=True)
        if layout.tied and TIED_KEY in pipe.tied_modules:  # the last stage's copy, when it is not layer 0
            pipe.tied_modules[TIED_KEY].load_state_dict(by_layer[layout.embedding_layer], strict=True)
    return pipe


def check_pipeline_compatible(zero_stage: int, num_stages: int) -> None:
    """Refuse, before anything starts, what DeepSpeed's pipeline engine would assert on: ZeRO-2/3 partition the
    gradients, which the pipeline's own gradient accumulation and tied-weight reduction do not support."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"pipeline stages: must be a positive integer, got {num_stages!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage: must be 0, 1, 2 or 3, got {zero_stage!r}")
    if num_stages > 1 and zero_stage >= 2:
        raise ValueError(f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism "
                         f"({num_stages} stages): use ZeRO stage 0 or 1 with pipeline stages > 1, or one pipeline "
                         f"stage with ZeRO-2/3")


# ---------------------------------------------------------------------------------------------- back to plain

def gather_pipeline_state(pipe, dst: int = 0) -> Optional[dict[int, dict[str, torch.Tensor]]]:
    """Layer index -> that layer's state dict (CPU copies), gathered on global rank `dst` from the data-parallel
    rank 0 of every stage; None elsewhere. Every rank must call it (a collective)."""
    local = {}
    if pipe.mpu().get_data_parallel_rank() == 0:
        local = {index: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                 for index, module in pipe.local_layers().items()}
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(local, gathered, dst=dst)
    if rank != dst:
        return None
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for part in gathered:
        merged.update(part)
    return merged


def plain_from_pipeline_state(config: MegaConfig, objective: str,
                              state_by_layer: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
    """The plain model holding the tensors of pipeline layer states (every layer must be present)."""
    layout = pipeline_layout(config, objective)
    missing = [i for i in range(layout.num_layers) if i not in state_by_layer and
               not (layout.tied and i == layout.num_layers - 1)]
    if missing:
        raise KeyError(f"pipeline layer states missing for layers {missing}")
    model = plain_model(config, objective, seed=0)
    model.load_state_dict(pipeline_state_to_hf(layout, state_by_layer), strict=True)
    return model


def to_plain_model(pipe, dst: int = 0) -> Optional[nn.Module]:
    """The plain MegaForCausalLM / MegaForMaskedLM of a live pipeline, on global rank `dst` (None elsewhere).
    A collective: every rank calls it."""
    state = gather_pipeline_state(pipe, dst)
    if state is None:
        return None
    return plain_from_pipeline_state(pipe.mega_config, pipe.objective, state)


_LAYER_FILE = re.compile(r"layer_(\d+)-(?:.*-)?model_states\.pt$")


def read_pipeline_checkpoint(checkpoint_dir: str) -> dict[int, dict[str, torch.Tensor]]:
    """Layer index -> state dict from the `layer_XX-model_states.pt` files of a DeepSpeed pipeline checkpoint
    folder (the folder of one tag, e.g. `ckpt/global_step100`). Nothing is unpickled beyond tensors."""
    states: dict[int, dict[str, torch.Tensor]] = {}
    for path in sorted(glob.glob(os.path.join(checkpoint_dir, "layer_*-model_states.pt"))):
        match = _LAYER_FILE.search(os.path.basename(path))
        if match is None:
            continue
        states[int(match.group(1))] = torch.load(path, map_location="cpu", weights_only=True)
    if not states:
        raise FileNotFoundError(f"{checkpoint_dir}: no layer_XX-model_states.pt files (a pipeline checkpoint tag "
                                f"folder is expected)")
    return states


def plain_model_from_pipeline_checkpoint(checkpoint_dir: str, config: MegaConfig,
                                         objective: str = "causal") -> nn.Module:
    """The plain model of a DeepSpeed pipeline checkpoint folder, without torch.distributed."""
    return plain_from_pipeline_state(config, objective, read_pipeline_checkpoint(checkpoint_dir))
