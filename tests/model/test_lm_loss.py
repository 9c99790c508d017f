"""The chunked linear cross-entropy of the LM heads, and logits computed on first read."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mega import MegaForCausalLM, MegaForMaskedLM
from megatron_mega.model import lm_loss
from tests.helpers import tiny_config, token_ids


def test_equals_cross_entropy_of_the_logits_in_value_and_gradient(monkeypatch):
    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMENTS", 50 * 7)  # several chunks, the last one short
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
