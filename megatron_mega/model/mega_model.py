"""MegaModel: embeddings, a stack of MEGA blocks and an optional pooler. Batch-first throughout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_mega.model.block import MegaBlock
from megatron_mega.model.cache import MegaCache, MegaStaticCache
from megatron_mega.model.config import MegaConfig
from megatron_mega.model.derived import memoising
from megatron_mega.model.embeddings import MegaEmbeddings
from megatron_mega.model.outputs import BaseModelOutputWithPoolingAndCrossAttentions
from megatron_mega.model.pretrained import MegaPreTrainedModel


class MegaPooler(nn.Module):
    """tanh(dense(first token)), as BERT/RoBERTa."""

    def __init__(self, config: MegaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


def padding_mask_from(attention_mask: Optional[torch.Tensor], length: int, past: int) -> Optional[torch.Tensor]:
    """The (B, L) bool mask of the new tokens from a user's 1/0 mask, or None when there is no padding.

    With a cache the user may pass the mask of the whole sequence (past + new), as transformers' generate does."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq_len), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] == past + length and past:
        attention_mask = attention_mask[:, past:]
    if attention_mask.shape[1] != length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions; the input has {length} new tokens"
            + (f" after {past} cached ones" if past else ""))
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


class MegaModel(MegaPreTrainedModel):
    def __init__(self, config: MegaConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embedding_layer = MegaEmbeddings(config)
        self.layers = nn.ModuleList([MegaBlock(config) for _ in range(config.num_hidden_layers)])
        self.pooler = MegaPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.gradient_checkpointing_kwargs: dict = {}
        self.post_init()

    @property
    def base_model(self) -> nn.Module:
        return self

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[MegaCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.use_return_dict if return_dict is None else return_dict
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("MEGA cross-attention is not supported: encoder_hidden_states must be None")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("give either input_ids or inputs_embeds, not both")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("give input_ids or inputs_embeds")
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        static = isinstance(past_key_values, MegaStaticCache)
        if static:
            past_key_values.check_step(config, length, use_cache=use_cache, training=self.training,
                                       output_attentions=bool(output_attentions))
            use_cache = True  # its buffers are the state: a step always advances them
        if config.is_decoder:
            use_cache = config.use_cache if use_cache is None else use_cache
        elif use_cache or past_key_values is not None:
            raise ValueError("use_cache / past_key_values need a decoder: set is_decoder=True, bidirectional=False")
        else:
            use_cache = False
        if use_cache and self.training and self.gradient_checkpointing:
            use_cache = False
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        past = 0 if past_key_values is None else past_key_values.seen_tokens
        mask = padding_mask_from(attention_mask, length, past)

        hidden_states = self.embedding_layer(input_ids=input_ids, token_type_ids=token_type_ids,
                                             inputs_embeds=inputs_embeds)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        new_layers = []
        # decoding memoises what it derives from the parameters (model/derived.py)
        with memoising(use_cache, new_sequence=past == 0):
            for index, layer in enumerate(self.layers):
                layer_cache = None if past_key_values is None else past_key_values[index]
                if self.gradient_checkpointing and self.training:
                    hidden_states, new_cache, weights = checkpoint(
                        layer, hidden_states, mask, layer_cache, use_cache, output_attentions,
                        use_reentrant=False, **self.gradient_checkpointing_kwargs)
                else:
                    hidden_states, new_cache, weights = layer(
                        hidden_states, mask, cache=layer_cache, use_cache=use_cache,
                        output_attentions=output_attentions)
                new_layers.append(new_cache)
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                if output_attentions:
                    all_attentions += (weights,)
        if static:
            past_key_values.advance(length)  # the layers wrote into its buffers in place
            next_cache = past_key_values
        else:
            next_cache = MegaCache(new_layers, past + length) if use_cache else None
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states,
            past_key_values=next_cache, attentions=all_attentions)
        if not return_dict:
            return (hidden_states, pooled, all_hidden_states, next_cache, all_attentions, None)  # transformers' order
        return output
