"""What backward recomputes instead of keeping: linears that recompute their input (model/recomputed_linear.py),
regions recomputed whole (model/recompute.py: the attention, the gated output) and the pre-drawn dropout masks they
recompute with. Values and gradients equal the plain path's, and exactly the expected bytes are no longer kept,
alone and in a whole MEGA block with the gates of model/gates.py."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_mega.model import dropout as dropout_module
from megatron_mega.model import gated_attention, gates, recomputed_linear
from megatron_mega.model.attention import ChunkedAttention
from megatron_mega.model.block import MegaBlock, set_selective_recompute
from megatron_mega.model.gates import gate_values_plain
from megatron_mega.model.recomputed_linear import RecomputedInputLinear
from tests.helpers import kept_bytes, kept_for_backward, tiny_config


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_linear_of_a_recomputed_input_is_bit_identical_and_keeps_only_the_inputs(autocast, bias):
    torch.manual_seed(0)
    linear = RecomputedInputLinear(6, 4, bias=bias)
    attended, gate = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 6, requires_grad=True)
    with _autocast(autocast):
        out, kept = kept_for_backward(lambda: linear(attended, gate, prologue=gate_values_plain))
        ref = F.linear(gate_values_plain(attended, gate), linear.weight, linear.bias)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    # kept: the two inputs and the weight (its bfloat16 copy under autocast), not the (2, 5, 6) product
    assert kept_bytes(kept, exclude=[attended, gate, linear.weight]) == (2 * 6 * 4 if autocast else 0)
    grad = torch.randn_like(out)
    params = [attended, gate, *linear.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with _autocast(autocast):
        with torch.no_grad():
            assert torch.equal(linear(attended, gate, prologue=gate_values_plain), ref)
        assert torch.equal(linear(gate_values_plain(attended, gate)), ref)


def test_only_the_inputs_that_need_grad_get_one():
    torch.manual_seed(0)
    linear = RecomputedInputLinear(3, 2)
    attended, gate = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64)
    linear.double()
    out = linear(attended, gate, prologue=gate_values_plain)
    grads = torch.autograd.grad(out.sum(), [attended, *linear.parameters()])
    ref = torch.autograd.grad(F.linear(gate_values_plain(attended, gate), linear.weight, linear.bias).sum(),
                              [attended, *linear.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads, ref))
    assert torch.autograd.gradcheck(lambda a, g, w, b: recomputed_linear._RecomputedInputLinear.apply(
        gate_values_plain, ("cpu", False, torch.bfloat16), w, b, a, g),
        (attended, gate.requires_grad_(), linear.weight, linear.bias))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_a_drawn_mask_drops_like_dropout_and_recomputes_to_the_bit(p):
    x = torch.randn(64, 300, requires_grad=True)
    torch.manual_seed(3)
    mask = dropout_module.drop_mask(x.shape, p)
    # the CPU's geometric draw for p <= 0.25 (the same numbers `dropout` draws), a bool keep-mask above
    assert mask.dtype == (torch.int64 if p <= 0.25 else torch.bool)
    out = dropout_module.apply_drop_mask(x, mask, p)
    if p <= 0.25:
        torch.manual_seed(3)
        assert torch.equal(out, dropout_module.dropout(x, p))
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.02
    assert torch.equal(out[~dropped], x[~dropped] * (1.0 / (1 - p)))
    assert torch.equal(dropout_module.apply_drop_mask(x.detach(), mask, p), out.detach())
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad, (~dropped).float() * (1.0 / (1 - p)))


def _perturbed_block(config) -> MegaBlock:
    torch.manual_seed(0)
    block = MegaBlock(config).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)  # not the init's zeros and ones: every gate and bias is exercised
    return block


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunked", [False, True])
def test_block_recomputation_is_bit_identical_and_keeps_less(monkeypatch, autocast, chunked):
    monkeypatch.setattr(ChunkedAttention, "replay_off_cuda", True)  # the attention's replay, as on CUDA
    config = tiny_config(decoder=True, dropout_prob=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                         nffn_activation_dropout_prob=0.1, use_chunking=chunked, chunk_size=8,
                         relative_positional_bias="rotary")
    block = _perturbed_block(config)
    batch = 2

    def run(length):
        torch.manual_seed(1)
        x = torch.randn(batch, length, config.hidden_size, requires_grad=True)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[1, :5] = False  # left padding in one row
        with _autocast(autocast):
            out, kept = kept_for_backward(lambda: block(x, mask)[0])
        grads = torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))
        return out, grads, kept_bytes(kept, exclude=[x, *block.parameters()])

    lengths = (24, 48)
    ours = [run(length) for length in lengths]
    for name in ("query_key", "gated_residual"):
        monkeypatch.setattr(gated_attention, name, getattr(gates, name + "_plain"))
    assert set_selective_recompute(block, False) == 5  # the gated attention, v_proj, mx_proj, h_proj and fc2
    plain = [run(length) for length in lengths]
    for (out, grads, _), (ref_out, ref_grads, _) in zip(ours, plain):
        assert torch.equal(out, ref_out)
        # each part's gradients are bit-identical (above); in a block some are summed in another order (the gated
        # residual hands the layer input one term, not two; the query's gradient leaves the recomputed attention
        # in another layout, so the query-key affine map reduces it in another order): the last bits can move
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    saved = [ref[2] - our[2] for our, ref in zip(ours, plain)]
    assert all(s > 0 for s in saved)
    if not chunked:
        return  # the weights grow with the square of the length: the per-token count below is for chunks
    # no longer kept per token (the slope between the two lengths; per-layer terms such as the bias matrix cancel):
    # - the gates: sigmoid(residual gate) (d), silu of the query-key gate (z), the float32 difference out - residual
    #   (d), the activated, dropped output the residual gate mixes in (d)
    # - h_proj's input and silu of the attention gate (2v); fc2's input, the activated, dropped FFN state (f);
    #   mx_proj's input, the activated, dropped EMA output (d); under autocast, v_proj's bfloat16 copy of its input
    #   (d)
    # - the attention: the query and key (2z), the activated, dropped values (v), the weights and the dropped
    #   weights (2 x chunk); newly kept: the padding mask it reads (1 byte, bool)
    d, z, v, f = (config.hidden_size, config.shared_representation_size, config.intermediate_size,
                  config.nffn_hidden_size)
    half = 2 if autocast else 4
    per_token = ((2 if autocast else 0) * d + 2 * half * d + half * z + 4 * d + 2 * half * v + half * f
                 + 2 * half * z + half * v + 2 * half * config.chunk_size - 1)
    assert saved[1] - saved[0] == batch * (lengths[1] - lengths[0]) * per_token


@pytest.mark.parametrize("overrides", [
    dict(chunk_size=8, use_chunking=True, decoder=True, attention_activation="laplace"),  # 20 = 2 chunks + a tail
    dict(use_chunking=False, attention_activation="relu2", relative_positional_bias="simple"),  # encoder
    dict(use_chunking=False, dropout_prob=0.3, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3),  # bool masks
    dict(chunk_size=8, use_chunking=True, decoder=True, normalize_before_mega=False, normalize_before_ffn=False),
], ids=["laplace-decoder-tail", "relu2-encoder", "p0.3-encoder", "post-norm"])
@pytest.mark.parametrize("replay", [True, False], ids=["replayed", "kept"])
def test_recomputation_equals_keeping_across_configs(monkeypatch, overrides, replay):
    monkeypatch.setattr(ChunkedAttention, "replay_off_cuda", replay)
    dropouts = dict(dropout_prob=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                    nffn_activation_dropout_prob=0.1)
    block = _perturbed_block(tiny_config(**{**dropouts, **overrides}))
    x = torch.randn(2, 20, block.mega_layer.hidden_size, requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, -6:] = False  # right padding

    def run():
        torch.manual_seed(1)
        out = block(x, mask)[0]
        return out, torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))

    out, grads = run()
    set_selective_recompute(block, False)
    ref_out, ref_grads = run()
    assert torch.equal(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_a_region_inside_a_replay_computes_its_value():
    # a region entered while another is replayed: its own `product` is read, so it must be computed
    from megatron_mega.model.recompute import product, recomputed

    u = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = recomputed(lambda a, b: torch.tanh(recomputed(lambda c, d: product(c, d), a, b)) * 2, u, v)
    torch.testing.assert_close(out, torch.tanh(u @ v) * 2)
    grads = torch.autograd.grad(out.sum(), (u, v))
    ref = torch.autograd.grad((torch.tanh(u @ v) * 2).sum(), (u, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_feature_dropout_and_no_grad_take_the_plain_path():
    config = tiny_config(dropout_prob=0.1, hidden_dropout_prob=0.1, nffn_activation_dropout_prob=0.3,
                         use_feature_dropout=True)
    block = _perturbed_block(config)
    x = torch.randn(2, 12, config.hidden_size, requires_grad=True)
    assert not block.nffn.hidden_dropout.maskable
    torch.manual_seed(1)
    out = block(x)[0]
    out.sum().backward()  # feature-wise masks are drawn by dropout1d: no mask to recompute with
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x)[0], block(x)[0])
