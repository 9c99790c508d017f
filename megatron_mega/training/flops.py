"""Analytic FLOP count of a MEGA language model (the one function MFU and TFLOP/s use).

Convention (Megatron's): matrix multiplies only, 2 FLOPs per multiply-add, the attention counted over whole chunks
(no credit taken for the causal mask), backward = 2 x forward, and one more forward of the blocks when activation
checkpointing recomputes them. The EMA is counted as its recurrence (per token and channel: h = a*x + b*h and
y += eta*h for each of the N dimensions, 3 multiply-adds), which the FFT path computes equivalently.

Per layer and token, with D hidden, Z shared (query/key) size, V value size (intermediate_size), N EMA dimensions,
F the NFFN hidden size and C the attention span (chunk_size with chunking, else the sequence length):

    v_proj 2DV + mx_proj 2D(Z + V + 2D) + h_proj 2VD + EMA 6DN + QK^T 2CZ + AV 2CV + NFFN 4DF

and per predicted token the head: 2D^2 (the dense layer, if any) + 2D * vocab.
"""

from __future__ import annotations

from megatron_mega.model.config import MegaConfig


def _attention_span(config: MegaConfig, seq_len: int) -> int:
    return min(config.chunk_size, seq_len) if config.use_chunking else seq_len


def layer_flops_per_token(config: MegaConfig, seq_len: int) -> int:
    d, z, v = config.hidden_size, config.shared_representation_size, config.intermediate_size
    n, f = config.ema_projection_size, config.nffn_hidden_size
    span = _attention_span(config, seq_len)
    flops = 2 * d * v + 2 * d * (z + v + 2 * d) + 2 * v * d + 6 * d * n + 2 * span * z + 2 * span * v
    if config.use_normalized_ffn:
        flops += 4 * d * f
    return flops


def head_flops_per_token(config: MegaConfig) -> int:
    d = config.hidden_size
    return (2 * d * d if config.add_lm_hidden_dense_layer else 0) + 2 * d * config.vocab_size


def forward_flops(config: MegaConfig, batch: int, seq_len: int, predicted_tokens: int | None = None) -> int:
    """Forward FLOPs of `batch` sequences of `seq_len` tokens; the head runs on `predicted_tokens` rows (default
    all tokens: causal LM; masked LM predicts only the masked ones)."""
    tokens = batch * seq_len
    predicted = tokens if predicted_tokens is None else predicted_tokens
    return tokens * config.num_hidden_layers * layer_flops_per_token(config, seq_len) + \
        predicted * head_flops_per_token(config)


def train_flops(config: MegaConfig, batch: int, seq_len: int, predicted_tokens: int | None = None,
                activation_checkpointing: bool = False, selective_recompute: bool = False) -> int:
    """FLOPs of one forward + backward (+ recomputation of the blocks with activation checkpointing, + the query-key
    product the attention recomputes in backward with selective recomputation)."""
    total = 3 * forward_flops(config, batch, seq_len, predicted_tokens)
    if activation_checkpointing:
        total += batch * seq_len * config.num_hidden_layers * layer_flops_per_token(config, seq_len)
    if selective_recompute:
        span = _attention_span(config, seq_len)
        total += batch * seq_len * config.num_hidden_layers * 2 * span * config.shared_representation_size
    return total
