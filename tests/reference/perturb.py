"""Seeded perturbation of a MEGA model's weights, shared by the parity tests and hf_runner.py.

Imports only torch, so it runs in both virtual environments (it never imports megatron_mega or transformers).
A freshly initialised MEGA has many weights at constants (norm scales 1, biases and qk_bias 0, batch-norm
statistics 0/1): a parity check on such a model would not notice a weight that one side ignores. Every parameter
gets a small seeded offset, and batch-norm running statistics are set to non-trivial values.
"""

import torch


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):  # tied weights come once
        param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * scale)
    for name, buffer in sorted(model.named_buffers(), key=lambda item: item[0]):
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
