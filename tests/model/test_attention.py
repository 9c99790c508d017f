"""Chunked attention against a slow per-query reference, and the positional biases against their formulas."""

import math

import pytest
import torch

from megatron_mega.model.activations import laplace, relu2
from megatron_mega.model.attention import ChunkedAttention
from megatron_mega.model.positional_bias import MegaRotaryRelativePositionalBias, MegaSimpleRelativePositionalBias
from tests.helpers import tiny_config


def slow_attention(q, k, v, key_mask, bias_fn, activation, causal, chunk):
    """Loop over queries: keys are those of the query's chunk, visible if real and (causal) not in the future."""
    batch, length, z = q.shape
    out = torch.zeros(batch, length, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        for i in range(length):
            start = (i // chunk) * chunk if chunk else 0
            stop = min(start + chunk, length) if chunk else length
            keys = [j for j in range(start, stop) if (key_mask is None or key_mask[b, j]) and (not causal or j <= i)]
            if not keys:
                continue
            pos_q, pos_k = i - start, torch.tensor(keys) - start
            bias = bias_fn(torch.tensor([pos_q]), pos_k)[0]
            if activation == "softmax":
                w = torch.softmax(q[b, i] @ k[b, keys].T / math.sqrt(z) + bias, -1)
            else:
                act = laplace if activation == "laplace" else relu2
                w = act(q[b, i] @ k[b, keys].T / len(keys) + bias)
            out[b, i] = w @ v[b, keys]
    return out


@pytest.mark.parametrize("activation", ["softmax", "laplace", "relu2"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_chunked_attention_matches_slow_reference(activation, causal, chunk, padded, explicit):
    """`explicit` (the weights asked for) takes the matmul path that CUDA always takes, fused the CPU's SDPA."""
    config = tiny_config(attention_activation=activation, relative_positional_bias="simple",
                         use_chunking=chunk is not None, chunk_size=chunk or -1, decoder=causal)
    bias = MegaSimpleRelativePositionalBias(config).double()
    torch.nn.init.normal_(bias.rel_pos_bias, std=0.5)
    attention = ChunkedAttention(config, 0.0)
    q, k = torch.randn(2, 13, 16, dtype=torch.float64), torch.randn(2, 13, 16, dtype=torch.float64)
    v = torch.randn(2, 13, 48, dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[0, :3] = False  # left padding
        mask[1, 10:] = False  # right padding
    out, _ = attention(q, k, v, mask, bias, output_attentions=explicit)
    ref = slow_attention(q, k, v, mask, bias, activation, causal, chunk)
    if padded:  # only real queries have defined outputs
        out, ref = out[mask], ref[mask]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_explicit_weights_path_equals_fused_path():
    config = tiny_config(use_chunking=True, chunk_size=4, decoder=True)
    bias = MegaRotaryRelativePositionalBias(config)
    torch.nn.init.normal_(bias.alpha)
    torch.nn.init.normal_(bias.b_param)
    attention = ChunkedAttention(config, 0.0)
    q, k, v = torch.randn(2, 10, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 48)
    fused, none = attention(q, k, v, None, bias)
    explicit, weights = attention(q, k, v, None, bias, output_attentions=True)
    assert none is None and weights.shape == (2, 3, 4, 4)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_simple_bias_reads_the_learned_distance():
    config = tiny_config(relative_positional_bias="simple", max_positions=8)
    bias = MegaSimpleRelativePositionalBias(config)
    with torch.no_grad():
        bias.rel_pos_bias.copy_(torch.arange(15, dtype=torch.float32))
    table = bias(torch.arange(6), torch.arange(6))
    for i in range(6):
        for j in range(6):
            assert table[i, j] == 7 + j - i
    # beyond the learned range the outermost distance is reused (transformers raises: defect 4)
    far = bias(torch.tensor([0]), torch.tensor([20]))
    assert far.item() == 14


def test_rotary_bias_is_the_rotated_inner_product_and_relative():
    config = tiny_config(relative_positional_bias="rotary")
    bias = MegaRotaryRelativePositionalBias(config).double()
    torch.nn.init.normal_(bias.alpha)
    torch.nn.init.normal_(bias.b_param)
    half = 8
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / half))

    def rotate(vec, pos):
        a, b = vec[0, :half], vec[0, half:]
        angle = pos * freq
        return torch.cat([a * torch.cos(angle) - b * torch.sin(angle), b * torch.cos(angle) + a * torch.sin(angle)])

    table = bias(torch.arange(5), torch.arange(5))
    for i in range(5):
        for j in range(5):
            ref = rotate(bias.alpha.detach(), i) @ rotate(bias.b_param.detach(), j)
            assert abs(table[i, j].item() - ref.item()) < 1e-5
    shifted = bias(torch.arange(100, 105), torch.arange(100, 105))
    torch.testing.assert_close(shifted, table, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "scalenorm", "rmsnorm", "batchnorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_norms_against_formulas(norm, affine):
    from megatron_mega.model.norms import MegaSequenceNorm

    layer = MegaSequenceNorm(norm, 32, affine=affine).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 7, 32, dtype=torch.float64) * 3 + 1
    out = layer(x)
    eps = 1e-5
    if norm == "layernorm":
        ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        if affine:
            ref = ref * layer.norm.weight + layer.norm.bias
    elif norm in ("scalenorm", "rmsnorm"):
        ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
        if affine:
            ref = ref * (layer.norm.scalar if norm == "scalenorm" else layer.norm.weight)
    else:
        mean, var = x.mean((0, 1)), x.var((0, 1), unbiased=False)
        ref = (x - mean) / torch.sqrt(var + eps)
        if affine:
            ref = ref * layer.norm.weight + layer.norm.bias
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("norm", ["layernorm", "scalenorm"])
@pytest.mark.parametrize("along", [False, True], ids=["random-grad", "grad-along-output"])
def test_half_precision_norms_on_the_cpu_round_once(norm, along):
    """bfloat16 weights and inputs on the CPU (4096 rows, over the decoding step's single-op size): the output and
    every gradient within bfloat16's rounding of the float64 values of the same bfloat16 numbers. The CPU's own
    bfloat16 layer_norm sums the weight's gradient in low precision (5e-2 off, 0.5 for the bias with a gradient
    along the output), and the scale norm's g - x r^2 mean(g x) cancels there (0.6 off) unless formed in float32.
    """
    import copy

    from megatron_mega.model.norms import MegaSequenceNorm

    torch.manual_seed(0)
    layer = MegaSequenceNorm(norm, 64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p))
    layer = layer.bfloat16()
    x = (torch.randn(2, 2048, 64) * 2 + 0.5).bfloat16()
    with torch.no_grad():
        exact = copy.deepcopy(layer).double()(x.double())
    noise = 1 + 0.01 * torch.randn(exact.shape, dtype=torch.float64)
    grad = (exact * noise if along else torch.randn(exact.shape)).bfloat16()

    def run(dtype):
        module = copy.deepcopy(layer).to(dtype)
        inputs = x.to(dtype).clone().requires_grad_()
        out = module(inputs)
        out.backward(grad.to(dtype))
        return [out, inputs.grad, *(p.grad for p in module.parameters())]

    for half, ref in zip(run(torch.bfloat16), run(torch.float64)):
        assert half.dtype == torch.bfloat16
        assert float((half.double() - ref).norm() / ref.norm()) < 3e-3


def test_feature_dropout_drops_whole_channels():
    from megatron_mega.model.dropout import MegaDropout

    layer = MegaDropout(0.5, is_featurewise=True).train()
    out = layer(torch.ones(4, 50, 64))
    per_channel = out.transpose(1, 2).reshape(4 * 64, 50)
    assert all(len(set(row.tolist())) == 1 for row in per_channel)  # a channel is kept or dropped as a whole
    assert 0.3 < (per_channel[:, 0] == 0).float().mean() < 0.7


def test_the_cuda_attention_path_in_a_model_on_the_cpu(monkeypatch):
    """The matmul path CUDA takes, forced on the CPU: the same model outputs and gradients as SDPA in float32, and
    under bfloat16 autocast (weights in bfloat16 after softmax) a loss and gradients close to float32's."""
    import megatron_mega.model.attention as attention_module
    from megatron_mega import MegaForCausalLM
    from tests.helpers import token_ids
    from tests.reference.perturb import perturb_weights

    config = tiny_config(decoder=True, use_chunking=True, chunk_size=8, relative_positional_bias="rotary")
    model = MegaForCausalLM(config)
    perturb_weights(model, 0, scale=0.05)
    ids = token_ids(2, 40)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fused = loss_and_grads()
    monkeypatch.setattr(attention_module, "fused_softmax_attention", lambda q: False)
    explicit = loss_and_grads()
    torch.testing.assert_close(explicit[0], fused[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explicit[1], fused[1], rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_and_grads()
    assert abs(float(low[0]) - float(fused[0])) / float(fused[0]) < 0.02
    assert torch.nn.functional.cosine_similarity(low[1], fused[1], dim=0) > 0.98
