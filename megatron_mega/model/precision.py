"""The dtype matrix multiplies compute in under the current autocast state."""

from __future__ import annotations

import torch

# what autocast casts to its dtype for a matmul; float64 (and integer) tensors it leaves alone
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `tensors` computes in: autocast's dtype when autocast is on for their device and would
    cast them all, else their promoted dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type) and all(t.dtype in _CASTABLE for t in tensors):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
