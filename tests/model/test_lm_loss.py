"""The chunked linear cross-entropy of the LM heads, and logits computed on first read."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mega import MegaForCausalLM, MegaForMaskedLM
from megatron_mega.model import lm_loss
from tests.helpers import tiny_config, token_ids


@pytest.mark.parametrize("whole", [False, True], ids=["cpu-blocks", "whole-vocabulary"])
def test_equals_cross_entropy_of_the_logits_in_value_and_gradient(monkeypatch, whole):
    # several chunks, the last one short; the accelerator's whole-vocabulary path forced on the CPU
    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMENTS", 50 * 7)
    monkeypatch.setattr(lm_loss, "_WIDE_CHUNK_ELEMENTS", 50 * 7)
    monkeypatch.setattr(lm_loss, "whole_vocabulary", lambda device: whole)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    ref = F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, 50), labels.reshape(-1))
    rows, targets = lm_loss.labelled_rows(hidden, labels)
    out = lm_loss.linear_cross_entropy(rows, weight, bias, targets)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(2.5 * out, (hidden, weight, bias)),
                    torch.autograd.grad(2.5 * ref, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w, b: lm_loss.linear_cross_entropy(h, w, b, targets),
                                    (rows.detach().requires_grad_(), weight, bias))


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("confidence", [0.0, 0.4], ids=["uncertain", "confident"])
def test_whole_vocabulary_under_autocast_is_as_exact_as_autocast_cross_entropy_in_few_passes(
        monkeypatch, with_bias, confidence):
    """The accelerator's path under bf16 autocast, against the exact (float64) gradients: no further from them than
    autocast's own cross-entropy of bf16 logits, also when the model is confident (target probabilities ~0.9998,
    where rounding the softmax before subtracting the one-hot would lose the gradient); the loss to float32
    precision. And few operations read or write the (rows x vocab) logits (each a pass over them in eager
    PyTorch): the product, the cast and log-softmax, gather, softmax, the two products that read it, the bias's
    sum (the scatter of the rows' target entries writes one entry per row). On the CPU too: half-precision products
    take this path on every device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(lm_loss, "_WIDE_CHUNK_ELEMENTS", 300 * 40)  # 2 chunks of 40 rows
    torch.manual_seed(0)
    rows, vocab, dim = 80, 300, 64
    weight = torch.randn(vocab, dim)
    targets = torch.randint(0, vocab, (rows,))
    hidden = (confidence * weight[targets] + torch.randn(rows, dim) * (0.02 if confidence else 0.2)).requires_grad_()
    weight = (weight if confidence else 0.2 * weight).requires_grad_()
    bias = (0.1 * torch.randn(vocab)).requires_grad_() if with_bias else None
    params = (hidden, weight) + ((bias,) if with_bias else ())
    exact_params = [t.detach().double().requires_grad_() for t in params]
    exact = F.cross_entropy(F.linear(*exact_params[:2], exact_params[2] if with_bias else None), targets)
    exact_grads = torch.autograd.grad(exact, exact_params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)
    ref_grads = torch.autograd.grad(ref, params)

    passes = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
            if not func.is_view and func is not torch.ops.aten.index_put_.default and any(
                    t.numel() == 40 * vocab for t in tensors):
                passes.append(str(func))
            return out

    with Count(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss.linear_cross_entropy(hidden, weight, bias, targets)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    for got, want, exact_grad in zip(torch.autograd.grad(out, params), ref_grads, exact_grads):
        assert _relative_error(got, exact_grad) < 1.5 * _relative_error(want, exact_grad) + 1e-3
    assert len(passes) == 2 * (8 if with_bias else 7), passes


@pytest.mark.parametrize("case", ["bf16-weights", "frozen-weight", "one-row"])
def test_whole_vocabulary_other_precisions_and_inputs(monkeypatch, case):
    """bf16 weights without autocast (DeepSpeed's bf16 mode): as exact as bf16 autograd of cross-entropy; a frozen
    weight with a trained bias, and a single row, in float64 (the path forced on the CPU): cross-entropy's values
    and gradients."""
    monkeypatch.setattr(lm_loss, "whole_vocabulary", lambda device: True)
    torch.manual_seed(1)
    rows = 1 if case == "one-row" else 50
    dtype = torch.bfloat16 if case == "bf16-weights" else torch.float64
    hidden = torch.randn(rows, 32, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(200, 32, dtype=dtype)).requires_grad_(case != "frozen-weight")
    bias = (0.1 * torch.randn(200, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, 200, (rows,))
    params = [t for t in (hidden, weight, bias) if t.requires_grad]
    out = lm_loss.linear_cross_entropy(hidden, weight, bias, targets)
    got = torch.autograd.grad(out, params)
    ref = F.cross_entropy(F.linear(hidden, weight, bias).to(torch.promote_types(dtype, torch.float32)), targets)
    want = torch.autograd.grad(ref, params)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        return
    exact_params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    exact = F.cross_entropy(F.linear(*exact_params), targets)
    exact_grads = torch.autograd.grad(exact, exact_params)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)
    for a, b, e in zip(got, want, exact_grads):
        assert a.dtype == b.dtype and _relative_error(a, e) < 1.5 * _relative_error(b, e) + 1e-3


def test_fp16_row_gradients_survive_the_loss_scale():
    """DeepSpeed's fp16 mode: float16 weights and activations, the loss multiplied by a scale (2^16) before
    backward. The rows' gradients (~7e-6 here, divided by the row count) are below float16's normal range until
    that scale reaches them, so the loss keeps them in float32 until backward: as exact as float16 logits with a
    float32 cross-entropy, no gradient rounded to zero (kept in float16 before: 1.8e-3 off against 3.3e-4, 0.24%
    of them zero)."""
    torch.manual_seed(0)
    rows, vocab, width, scale = 2048, 256, 64, 2.0 ** 16
    hidden, weight = torch.randn(rows, width), 0.02 * torch.randn(vocab, width)
    targets = torch.randint(0, vocab, (rows,))
    exact_hidden = hidden.double().requires_grad_()
    F.cross_entropy(F.linear(exact_hidden, weight.double()), targets).backward()
    assert exact_hidden.grad.abs().median() < 6.1e-5  # float16's smallest normal number

    def grad_rows(loss_fn):
        h, w = hidden.half().requires_grad_(), weight.half().requires_grad_()
        (loss_fn(h, w) * scale).backward()
        return h.grad.double() / scale

    ours = grad_rows(lambda h, w: lm_loss.linear_cross_entropy(h, w, None, targets))
    plain = grad_rows(lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets))
    assert _relative_error(ours, exact_hidden.grad) < 1.5 * _relative_error(plain, exact_hidden.grad)
    assert not (ours == 0).any()


def test_no_label_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(2, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    rows, targets = lm_loss.labelled_rows(hidden, torch.full((2,), -100))
    assert torch.isnan(lm_loss.linear_cross_entropy(rows, weight, None, targets))


@pytest.mark.parametrize("cls", [MegaForCausalLM, MegaForMaskedLM])
def test_heads_read_logits_lazily_and_refuse_stale_ones(cls):
    model = cls(tiny_config(decoder=cls is MegaForCausalLM)).train()
    ids = token_ids(2, 8)
    out = model(ids, labels=ids)
    assert "logits" in out.__dict__["_lazy"]  # not computed by the forward
    logits = out.logits
    assert logits.shape == (2, 8, 97) and logits.requires_grad
    torch.testing.assert_close(logits, model(ids).logits)
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="read out.logits before updating the weights"):
        out.logits
