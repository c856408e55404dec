"""adv_perturb_update / adv_perturb_init, pure-PyTorch references (the ``torch``
backend and the test oracle), plus the eager FreeLB sequence used as the
benchmark baseline.

Semantics (shared by every backend; ``delta``, ``grad``: [B, L, H]; ``mask``: [B, L],
nonzero = real token; every norm is taken over real tokens only)::

    m     = (mask != 0)[..., None]                     # all ones without a mask
    g     = grad * m
    linf:       d' = delta + step * sign(g);           clamp to [-eps, eps]
    l2_token:   a  = step / max(||g[b, l, :]||, 1e-8); d' = delta + a * g
                d' *= min(1, eps / ||d'[b, l, :]||)    # per-token projection
    l2_example: a  = step / max(||g[b]||_F, 1e-8);     d' = delta + a * g
                d' *= min(1, eps / ||d'[b]||_F)        # per-example projection
    delta <- d' * m                                    # padding is exactly zero

``eps <= 0`` (or None in the public function) means no projection (FreeLB's
``adv_max_norm = 0``).  The floor 1e-8 is FreeLB's ``clamp(min=1e-8)``: a zero
gradient gives a zero step, never 0/0.  Half-precision inputs are computed in
fp32 and rounded once, like the kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...kernels.philox import random_bits

NORMS = ("linf", "l2_token", "l2_example")
INIT_KINDS = ("uniform", "normal")
NORM_FLOOR = 1e-8
INIT_STREAM = 2  # Philox stream id of adversarial random init (dropout uses others)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _active(mask: Optional[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """Bool [B, L, 1]: real tokens (where, not a product, so non-finite padding values never leak)."""
    if mask is None:
        return torch.ones(delta.shape[:2] + (1,), dtype=torch.bool, device=delta.device)
    return (mask != 0).unsqueeze(-1)


def adv_perturb_update_reference(delta: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor],
                                 norm: str, step_size: float, epsilon: float) -> None:
    """In-place update of ``delta`` (see module doc)."""
    delta.copy_(adv_perturb_update_value(delta, grad, mask, norm, step_size, epsilon))


def adv_perturb_update_value(delta, grad, mask, norm, step_size, epsilon) -> torch.Tensor:
    """The updated delta as a new tensor of delta's dtype."""
    dt = _compute_dtype(delta)
    m = _active(mask, delta)
    zero = torch.zeros((), dtype=dt, device=delta.device)
    d, g = torch.where(m, delta.to(dt), zero), torch.where(m, grad.to(dt), zero)
    if norm == "linf":
        new = d + step_size * torch.sign(g)
        if epsilon > 0:
            new = new.clamp(-epsilon, epsilon)
    elif norm in ("l2_token", "l2_example"):
        dims = (-1,) if norm == "l2_token" else (-2, -1)
        gn = g.square().sum(dims, keepdim=True).sqrt()
        a = step_size / gn.clamp_min(NORM_FLOOR)
        new = d + a * g
        if epsilon > 0:
            nn_ = new.square().sum(dims, keepdim=True).sqrt()
            new = torch.where(nn_ > epsilon, new * (epsilon / nn_.clamp_min(1e-30)), new)
    else:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    return torch.where(m, new, zero).to(delta.dtype)


def freelb_eager_update(delta: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor],
                        norm: str, step_size: float, epsilon: float) -> torch.Tensor:
    """The eager PyTorch sequence of the FreeLB reference code (huggingface FreeLB,
    ``adv_norm_type`` l2) - the benchmark baseline, about nine kernels::

        denorm = torch.norm(grad.view(B, -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
        delta = delta + step * grad / denorm
        dnorm = torch.norm(delta.view(B, -1).float(), p=2, dim=1)
        exceed = (dnorm > eps).to(delta)
        w = (eps / dnorm * exceed + (1 - exceed)).view(-1, 1, 1)
        delta = delta * w
    (``linf``: ``delta + step * grad.sign()`` then ``clamp``; ``l2_token``: the
    per-token version with ``dim=-1``).  Masking is applied to the gradient first.
    Like the FreeLB code, ``l2_example`` gives NaN for an all-padding example.
    """
    B = delta.shape[0]
    if mask is not None:
        grad = grad * mask.unsqueeze(-1).to(grad.dtype)
    if norm == "linf":
        delta = delta + step_size * grad.sign()
        return delta.clamp(-epsilon, epsilon) if epsilon > 0 else delta
    if norm == "l2_example":
        denorm = torch.norm(grad.reshape(B, -1), dim=1).view(-1, 1, 1).clamp(min=NORM_FLOOR)
        delta = delta + step_size * grad / denorm
        if epsilon > 0:
            dnorm = torch.norm(delta.reshape(B, -1).float(), p=2, dim=1)
            exceed = (dnorm > epsilon).to(delta)
            w = (epsilon / dnorm * exceed + (1 - exceed)).view(-1, 1, 1)
            delta = delta * w
        return delta
    denorm = torch.norm(grad, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    delta = delta + step_size * grad / denorm
    if epsilon > 0:
        dnorm = torch.norm(delta.float(), dim=-1, keepdim=True).clamp_min(1e-30)  # padding tokens: 0
        exceed = (dnorm > epsilon).to(delta)
        delta = delta * (epsilon / dnorm * exceed + (1 - exceed))
    return delta


def init_scale(mask: Optional[torch.Tensor], B: int, L: int, H: int, norm: str, scale: float,
               device) -> torch.Tensor:
    """Per-example multiplier [B, 1, 1] (float64) of the unit random values."""
    if norm == "l2_example":
        if mask is None:
            n = torch.full((B,), float(L * H), dtype=torch.float64, device=device)
        else:
            n = (mask != 0).sum(1).to(torch.float64) * H
        s = scale / n.clamp_min(1.0).sqrt()
    elif norm == "l2_token":
        s = torch.full((B,), scale / math.sqrt(max(H, 1)), dtype=torch.float64, device=device)
    else:
        s = torch.full((B,), float(scale), dtype=torch.float64, device=device)
    return s.view(B, 1, 1)


def unit_random(seed: int, B: int, L: int, H: int, kind: str, device=None) -> torch.Tensor:
    """float32 [B, L, H] unit random values on Philox stream ``INIT_STREAM``.

    Element (b, l, h) uses counter (h // 4, b * L + l, INIT_STREAM, 0); with
    u_j = (bits_j >> 8) * 2**-24 of the four outputs of its group:
      uniform: 2 * u_{h % 4} - 1                               in [-1, 1)
      normal:  Box-Muller on the pairs (u0, u1), (u2, u3) of the group:
               r = sqrt(-2 ln(1 - u_even)), z_even = r cos(2 pi u_odd), z_odd = r sin(2 pi u_odd)
    """
    rows = B * L
    Hp = (H + 3) // 4 * 4
    if rows == 0 or H == 0:
        return torch.zeros(B, L, H, dtype=torch.float32, device=device)
    u = (random_bits(seed, rows, Hp, INIT_STREAM, device) >> 8).to(torch.float64) * (1.0 / 16777216.0)
    if kind == "uniform":
        v = 2.0 * u - 1.0
    elif kind == "normal":
        u = u.view(rows, Hp // 2, 2)
        r = torch.sqrt(-2.0 * torch.log1p(-u[..., 0]))
        t = 2.0 * math.pi * u[..., 1]
        v = torch.stack((r * torch.cos(t), r * torch.sin(t)), dim=-1).view(rows, Hp)
    else:
        raise ValueError(f"kind: expected one of {INIT_KINDS}, got {kind!r}")
    return v[:, :H].to(torch.float32).view(B, L, H)


def adv_perturb_init_reference(delta: torch.Tensor, mask: Optional[torch.Tensor], kind: str, norm: str,
                               scale: float, seed: int) -> None:
    """Fill ``delta`` [B, L, H] in place: unit random values x per-example scale x mask."""
    B, L, H = delta.shape
    v = unit_random(seed, B, L, H, kind, delta.device).to(torch.float64)
    v = v * init_scale(mask, B, L, H, norm, scale, delta.device)
    if mask is not None:
        v = v * (mask != 0).to(torch.float64).unsqueeze(-1)
    delta.copy_(v.to(torch.float32).to(delta.dtype) if delta.dtype != torch.float64 else v)
