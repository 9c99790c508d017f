"""One regression test per defect of transformers 4.57.6's MEGA (../shared/reference/hf_mega/README.md)."""

import pytest
import torch

from megatron_mega import ConfigError, MegaConfig, MegaForCausalLM, MegaForMaskedLM, MegaModel
from megatron_mega.model.ema import MegaMultiDimensionDampedEma
from megatron_mega.model.norms import MegaRMSNorm
from tests.helpers import decode_stepwise, tiny_config, token_ids


def test_1_rmsnorm_normalises():
    norm = MegaRMSNorm(16)
    x = torch.randn(3, 5, 16) * 7
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, 5), rtol=1e-3, atol=1e-3)


def test_2_chunking_accepts_any_length():
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=8)).eval()
    ids = token_ids(2, 16)
    with torch.no_grad():
        full = model(ids).logits
        twelve = model(ids[:, :12]).logits
        eight = model(ids[:, :8]).logits
    # a decoder's first 12 positions do not depend on the 4 after them, however the chunks are padded
    torch.testing.assert_close(twelve, full[:, :12], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eight, full[:, :8], rtol=1e-5, atol=1e-6)
    encoder = MegaForMaskedLM(tiny_config(use_chunking=True, chunk_size=8)).eval()
    assert encoder(token_ids(2, 12)).logits.shape == (2, 12, 97)


def test_3_chunked_decoder_shorter_than_a_chunk_and_cached():
    model = MegaForCausalLM(tiny_config(decoder=True, use_chunking=True, chunk_size=8)).eval()
    ids = token_ids(1, 5)
    with torch.no_grad():
        full = model(ids).logits
    stepped, _ = decode_stepwise(model, ids, first=2)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-6)


def test_4_simple_bias_without_chunking_spans_max_positions_and_beyond():
    config = tiny_config(relative_positional_bias="simple", chunk_size=4, use_chunking=False, max_positions=16)
    model = MegaModel(config).eval()
    bias = model.layers[0].mega_layer.rel_pos_bias
    assert bias.center == 15  # max_positions - 1, not chunk_size - 1
    assert torch.isfinite(model(token_ids(1, 40)).last_hidden_state).all()  # longer than max_positions


def test_5_rotary_validates_the_rotated_size():
    MegaModel(tiny_config(hidden_size=33, shared_representation_size=16, relative_positional_bias="rotary"))
    with pytest.raises(ConfigError, match="shared_representation_size"):
        tiny_config(shared_representation_size=15, relative_positional_bias="rotary")


def test_6_layernorm_without_affine_builds():
    model = MegaModel(tiny_config(normalization_type="layernorm", norm_affine=False))
    assert model.layers[0].mega_layer.norm.norm.weight is None


def test_7_loading_weights_in_eval_mode_changes_the_output():
    a = MegaModel(tiny_config()).eval()
    b = MegaModel(tiny_config()).eval()
    ids = token_ids(1, 8)
    with torch.no_grad():
        a(ids)  # a forward in eval mode first: any cached EMA kernel would now be stale
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(ids).last_hidden_state, b(ids).last_hidden_state, rtol=0, atol=0)


def test_8_decoder_never_sees_the_future():
    with pytest.raises(ConfigError, match="bidirectional"):
        MegaConfig(is_decoder=True)  # transformers' default bidirectional=True would leak future tokens
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    ids = token_ids(1, 10)
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] - 2) % 94 + 3  # other real ids
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    # equal up to FFT round-off (~1e-10); a leak would move them by ~1e-2
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(before[:, 6:], after[:, 6:], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("activation", ["laplace", "relu2"])
def test_9_cached_decoding_of_element_attention(activation):
    model = MegaForCausalLM(tiny_config(decoder=True, attention_activation=activation)).eval()
    ids = token_ids(1, 7)
    with torch.no_grad():
        full = model(ids).logits
    stepped, _ = decode_stepwise(model, ids)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-6)


def test_10_left_padding_with_causal_softmax_is_finite():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        logits = model(token_ids(1, 6), attention_mask=mask).logits
    assert torch.isfinite(logits).all()


def test_11_cached_steps_keep_earlier_padding_masked():
    model = MegaForCausalLM(tiny_config(decoder=True)).eval()
    ids = token_ids(1, 8)
    mask = torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]])  # a masked token inside the context
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    stepped, _ = decode_stepwise(model, ids, mask, first=3)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-5, atol=1e-6)


def test_12_float64_model_smooths_in_float64():
    config = tiny_config()
    ema = MegaMultiDimensionDampedEma(config)
    MegaModel(config)._init_weights(ema)
    ema = ema.double()
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    out64, _ = ema(x)
    # float32 FFT round-off is ~1e-7; float64 agrees with the recurrence to ~1e-15
    u = x.transpose(1, 2)
    kernel = ema.kernel(64, torch.float64)
    forward, backward = kernel[:32], kernel[32:]
    y = torch.zeros_like(u)
    for t in range(64):
        y[..., t] = (forward[:, :t + 1].flip(-1) * u[..., :t + 1]).sum(-1) + (backward[:, :64 - t] * u[..., t:]).sum(-1)
    ref = torch.nn.functional.silu(y.transpose(1, 2) + x * ema.residual_weight)
    assert (out64 - ref).abs().max() < 1e-12


def test_13_pad_id_inputs_are_finite_and_tests_use_real_ids():
    ids = token_ids(4, 50)
    assert int(ids.min()) >= 3  # the helpers never feed bos/pad/eos, whose embedding is zero at init
    model = MegaModel(tiny_config()).eval()
    pads = torch.full((2, 10), model.config.pad_token_id)
    with torch.no_grad():
        out = model(pads).last_hidden_state
    assert torch.isfinite(out).all() and torch.equal(out, model(pads).last_hidden_state)
