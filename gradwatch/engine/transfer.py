"""The only place where gradwatch moves tensors from the device to the host."""

from __future__ import annotations

import numpy as np
import torch


def to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Copies ``tensors`` to the host in one transfer and returns them as float arrays.

    The tensors are flattened, cast to float32 (float64 when any input is float64) and concatenated
    on the device, so the whole flush costs exactly one device-to-host copy.
    """
    if not tensors:
        return []
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, dtype) for t in tensors])
    host = flat.cpu().numpy()
    out = []
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        out.append(host[offset : offset + size].reshape(tuple(tensor.shape)))
        offset += size
    return out
