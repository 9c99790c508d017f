"""The model's GPU code paths, run on a machine without a GPU.

Tensors on the meta device have shapes and no data: every branch the model takes by `device.type != "cpu"` (drop
masks drawn on the device, the LM loss over the whole vocabulary) is taken by them as on a GPU, and those taken by
`is_cuda` are forced (plain-matmul attention, its replay in backward, the fused RMS norm at every size). A CPU
tensor made without `device=` and mixed into such a pass fails as it would against CUDA tensors, and every read of
a value back to the host is recorded: on a GPU each one waits for the device. tests/model/test_cuda.py checks the
numbers where a GPU is lent; this checks, everywhere, that those paths run and where they synchronise.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megatron_mega.model.attention as attention
import megatron_mega.model.norms as norms
from megatron_mega import MegaForCausalLM, MegaForMaskedLM
from megatron_mega.model.cache import MegaStaticCache
from tests.helpers import tiny_config

META = torch.device("meta")
DROPOUTS = dict(dropout_prob=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                nffn_activation_dropout_prob=0.1)
# the two reads a training step makes: whether the attention mask hides anything (mega_model) and which rows have
# a label (the LM loss); none in a decoding step on a static cache
MASK_CHECK = ("_local_scalar_dense", "model/mega_model.py")
LABELLED_ROWS = ("nonzero", "model/lm_loss.py")


@pytest.fixture
def gpu_choices(monkeypatch):
    # autocast knows no meta device: asked as for the CPU, where it is off in these tests
    def as_cpu(device_type):
        return "cpu" if device_type == "meta" else device_type

    is_enabled, get_dtype, autocast = torch.is_autocast_enabled, torch.get_autocast_dtype, torch.autocast
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: is_enabled(*map(as_cpu, args)))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: get_dtype(as_cpu(device_type)))
    monkeypatch.setattr(torch, "autocast",
                        lambda device_type, *args, **kwargs: autocast(as_cpu(device_type), *args, **kwargs))
    monkeypatch.setattr(attention, "fused_softmax_attention", lambda query: False)
    monkeypatch.setattr(attention.ChunkedAttention, "replay_off_cuda", True)
    monkeypatch.setattr(norms, "_FEW_ROWS", 1 << 40)


class HostReads(TorchDispatchMode):
    """Records each read of a tensor's value by the host, as (op, file of the model's innermost frame), and
    answers it as data would: a mask that hides nothing, every row labelled."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            self._note("nonzero")
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.int64, device=x.device)
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                    torch.ops.aten.is_nonzero.default):
            self._note(func.__name__.split(".")[0])
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))

    def _note(self, name: str) -> None:
        frames = [f.filename for f in traceback.extract_stack() if "/megatron_mega/" in f.filename]
        self.reads[(name, frames[-1].split("/megatron_mega/")[-1] if frames else "?")] += 1


@pytest.mark.parametrize("cls,options", [
    (MegaForCausalLM, dict(decoder=True, use_chunking=True, chunk_size=8, relative_positional_bias="rotary",
                           **DROPOUTS)),
    (MegaForCausalLM, dict(decoder=True, attention_activation="laplace", normalization_type="layernorm")),
    (MegaForMaskedLM, dict(attention_activation="relu2", add_lm_hidden_dense_layer=True, **DROPOUTS)),
], ids=["causal-chunked-rotary-dropout", "causal-laplace-layernorm", "masked-relu2-dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_on_the_gpu_paths(gpu_choices, cls, options, dtype):
    model = cls(tiny_config(**options)).to(META, dtype).train()
    ids = torch.zeros(2, 40, dtype=torch.int64, device=META)
    reads = HostReads()
    with reads:
        loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
    assert loss.device == META
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
    assert reads.reads == {MASK_CHECK: 1, LABELLED_ROWS: 1}


@pytest.mark.parametrize("activation,chunked", [("softmax", True), ("laplace", False), ("relu2", True)])
def test_decoding_on_the_gpu_paths(gpu_choices, activation, chunked):
    model = MegaForCausalLM(tiny_config(decoder=True, attention_activation=activation, use_chunking=chunked,
                                        chunk_size=8, relative_positional_bias="rotary")).to(META).eval()
    ids = torch.zeros(2, 12, dtype=torch.int64, device=META)
    reads = HostReads()
    with torch.no_grad(), reads:
        out = model(ids[:, :5], use_cache=True)
        cache = out.past_key_values
        for t in range(5, 8):  # the dynamic cache
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    assert out.logits.device == META and not reads.reads
    static = MegaStaticCache.from_cache(cache, 8 if chunked else 12)
    with torch.no_grad(), reads:
        for t in range(8, 11):  # fixed buffers, what a CUDA graph replays
            out = model(ids[:, t:t + 1], past_key_values=static, use_cache=True)
    assert out.logits.device == META and not reads.reads
