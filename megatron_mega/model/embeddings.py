"""Token (and optional token-type) embeddings. MEGA has no absolute positions: order comes from the EMA."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class MegaEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.use_token_types = config.add_token_type_embeddings
        if self.use_token_types:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.use_token_types:
            if token_type_ids is None:
                # type 0 everywhere: one row broadcast, no (B, L) index tensor
                embeddings = embeddings + self.token_type_embeddings.weight[0]
            else:
                embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return embeddings
