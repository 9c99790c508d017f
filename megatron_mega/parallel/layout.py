"""The pipeline's layer list as data: which layer index holds what, and its Hugging Face state-dict names.

Layer indices of a pipeline for a config with N MEGA blocks (tied word embeddings, the default):

    0        embedding     MegaEmbeddings (tied, key "embed")      <-> mega.embedding_layer.*
    1..N     MEGA block i  MegaBlock                               <-> mega.layers.{i-1}.*
    N+1      LM head       dense (+tanh), un-tied output bias      <-> dense.*, {head}.bias
    N+2      tied copy     the embedding again, on the last stage  (no state of its own)

`{head}` is `lm_head` (causal) or `mlm_head` (masked LM); `{head}.weight` is the word-embedding matrix. Without
tied embeddings (`tie_word_embeddings=False`) the LM head layer owns `weight` (<-> {head}.weight) and there is no
tied copy. Everything here is pure: no torch.distributed, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from megatron_mega.model.config import MegaConfig

OBJECTIVES = {"causal": "lm_head", "mlm": "mlm_head"}
TIED_KEY = "embed"
WORD_EMBEDDING = "word_embeddings.weight"


def check_objective(config: MegaConfig, objective: str) -> str:
    """The head name of `objective`; refuses configs that contradict it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: {objective!r} is not one of {sorted(OBJECTIVES)}")
    if objective == "causal" and (not config.is_decoder or config.bidirectional):
        raise ValueError("objective 'causal' needs a decoder config: is_decoder=True, bidirectional=False "
                         f"(got is_decoder={config.is_decoder}, bidirectional={config.bidirectional})")
    if objective == "mlm" and config.is_decoder:
        raise ValueError("objective 'mlm' needs an encoder config: is_decoder=False")
    return OBJECTIVES[objective]


@dataclass(frozen=True)
class NameRule:
    """Names in pipeline layer `layer`'s state dict that start with `local` are the Hugging Face names starting with
    `hf` (the rest of the name unchanged) when `hf` ends with '.'; otherwise the rule maps one exact name."""

    layer: int
    local: str
    hf: str

    @property
    def is_prefix(self) -> bool:
        return self.hf.endswith(".")

    def local_to_hf(self, name: str) -> str | None:
        if self.is_prefix:
            return self.hf + name[len(self.local):] if name.startswith(self.local) else None
        return self.hf if name == self.local else None

    def hf_to_local(self, name: str) -> str | None:
        if self.is_prefix:
            return self.local + name[len(self.hf):] if name.startswith(self.hf) else None
        return self.local if name == self.hf else None


@dataclass(frozen=True)
class PipelineLayout:
    """Where everything sits in the flat layer list of one config and objective."""

    num_blocks: int
    head: str  # "lm_head" or "mlm_head"
    tied: bool

    @property
    def embedding_layer(self) -> int:
        return 0

    def block_layer(self, block: int) -> int:
        return 1 + block

    @property
    def head_layer(self) -> int:
        return self.num_blocks + 1

    @property
    def num_layers(self) -> int:
        return self.num_blocks + (3 if self.tied else 2)

    @property
    def rules(self) -> tuple[NameRule, ...]:
        rules = [NameRule(0, "", "mega.embedding_layer.")]
        rules += [NameRule(self.block_layer(i), "", f"mega.layers.{i}.") for i in range(self.num_blocks)]
        rules += [NameRule(self.head_layer, "dense.", "dense."), NameRule(self.head_layer, "bias", f"{self.head}.bias")]
        if not self.tied:
            rules.append(NameRule(self.head_layer, "weight", f"{self.head}.weight"))
        return tuple(rules)

    @property
    def aliases(self) -> dict[str, str]:
        """Hugging Face names that are another name's tensor (the tied output projection)."""
        return {f"{self.head}.weight": f"mega.embedding_layer.{WORD_EMBEDDING}"} if self.tied else {}


def pipeline_layout(config: MegaConfig, objective: str = "causal") -> PipelineLayout:
    head = check_objective(config, objective)
    return PipelineLayout(num_blocks=config.num_hidden_layers, head=head, tied=bool(config.tie_word_embeddings))


def pipeline_name_to_hf(layout: PipelineLayout, layer: int, name: str) -> str:
    """The Hugging Face name of `name` in pipeline layer `layer`'s state dict."""
    for rule in layout.rules:
        if rule.layer == layer:
            hf = rule.local_to_hf(name)
            if hf is not None:
                return hf
    raise KeyError(f"pipeline layer {layer} has no tensor {name!r} in the MEGA layout")


def hf_name_to_pipeline(layout: PipelineLayout, name: str) -> tuple[int, str]:
    """(pipeline layer index, name in that layer's state dict) of a Hugging Face name; tied names resolve to the
    embedding they share."""
    name = layout.aliases.get(name, name)
    for rule in layout.rules:
        local = rule.hf_to_local(name)
        if local is not None:
            return rule.layer, local
    raise KeyError(f"{name!r} has no place in the pipeline layout (heads: {layout.head}; blocks: {layout.num_blocks})")


def pipeline_state_to_hf(layout: PipelineLayout,
                         state_by_layer: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One Hugging Face state dict (the plain model's `state_dict()` keys, tied names included) from the
    state dicts of the pipeline layers, keyed by layer index. Unknown names are reported all at once."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for layer in sorted(state_by_layer):
        for name, tensor in state_by_layer[layer].items():
            try:
                state[pipeline_name_to_hf(layout, layer, name)] = tensor
            except KeyError:
                unknown.append(f"layer {layer}: {name}")
    if unknown:
        raise KeyError(f"tensors outside the MEGA pipeline layout: {', '.join(unknown)}")
    for alias, target in layout.aliases.items():
        if target in state:
            state[alias] = state[target]
    return state


def hf_state_to_pipeline(layout: PipelineLayout,
                         state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse: pipeline layer index -> that layer's state dict. Tied aliases are dropped (their tensor is the
    embedding's); names without a place in the layout (e.g. a pooler) are reported all at once."""
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in state.items():
        if name in layout.aliases:
            continue
        try:
            layer, local = hf_name_to_pipeline(layout, name)
        except KeyError:
            unknown.append(name)
            continue
        by_layer.setdefault(layer, {})[local] = tensor
    if unknown:
        raise KeyError(f"tensors without a place in the MEGA pipeline layout: {', '.join(sorted(unknown))}")
    return by_layer
