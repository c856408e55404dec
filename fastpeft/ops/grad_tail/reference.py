"""grad_tail, pure-PyTorch reference (the ``torch`` backend and the test oracle's shape).

It issues a few ops *per tensor* (that is what the fused kernels avoid) but needs no
host synchronisation either: everything stays on the device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def grad_tail_stats_reference(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor, max_norm: Optional[float],
                              norm_type: float, eps: float):
    """(multiplier, total_norm, found_inf), float32 scalars on ``inv_scale.device``.

    total_norm = ‖[g * inv_scale for g in grads]‖_p computed in fp32,
    found_inf  = 1.0 if any g has a non-finite value else 0.0,
    multiplier = 0 if found_inf else inv_scale * min(1, max_norm / (total_norm + eps)).
    """
    s = inv_scale.reshape(()).float()
    grads = [g for g in grads if g.numel() > 0]
    if grads:
        found = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()
        norms = [torch.linalg.vector_norm(g.float() * s, norm_type) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    else:
        found = torch.zeros((), dtype=torch.float32, device=s.device)
        norm = torch.zeros((), dtype=torch.float32, device=s.device)
    mult = s
    if max_norm is not None:
        mult = s * (max_norm / (norm + eps)).clamp(max=1.0)
    mult = torch.where(found > 0, torch.zeros_like(mult), mult)
    return mult, norm, found


def grad_tail_apply_reference(grads: Sequence[torch.Tensor], multiplier: torch.Tensor) -> None:
    """``g *= multiplier`` for every g (in place; computed in fp32 for half types)."""
    for g in grads:
        if g.numel():
            g.mul_(multiplier)
