"""rope, Triton kernel and launcher (imported lazily, only where Triton runs).

One program per token (b, s): it loads that position's cos/sin row once and rotates all heads of q,
then of k, in tiles of [BLOCK_H heads, BLOCK_D dims].  Each element j of the rotated part reads its
partner j ± rd/2 with a second (cached) load, so the rotated part, the passed-through part and every
head layout are one code path.  Float32 math; each product and the sum are rounded to the output dtype
where transformers' unfused composition rounds, and fp contraction is off (no FMA) so float32 results
match it too.  All offsets int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import out_like


@triton.jit
def _rotate_heads(x_ptr, xsh, y_ptr, ysh, H, d, partner, in_d, in_rot, c, s, sgn, BLOCK_H: tl.constexpr):
    # y = where(rotated, O(O(x_d c) + sgn O(x_partner s)), x_d) for BLOCK_H heads at a time.
    OUT = y_ptr.dtype.element_ty
    for h0 in range(0, H, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        hm = (h < H)[:, None]
        rows_x = x_ptr + h[:, None] * xsh
        x1 = tl.load(rows_x + d[None, :], mask=hm & in_d[None, :], other=0.0).to(tl.float32)
        x2 = tl.load(rows_x + partner[None, :], mask=hm & in_rot[None, :], other=0.0).to(tl.float32)
        t1 = (x1 * c[None, :]).to(OUT).to(tl.float32)
        t2 = (x2 * s[None, :]).to(OUT).to(tl.float32)
        y = tl.where(in_rot[None, :], t1 + sgn[None, :] * t2, x1)
        tl.store(y_ptr + h[:, None] * ysh + d[None, :], y.to(OUT), mask=hm & in_d[None, :])


@triton.jit
def _rope_kernel(q_ptr, qsb, qss, qsh, qo_ptr, qosb, qoss, qosh, Hq,
                 k_ptr, ksb, kss, ksh, ko_ptr, kosb, koss, kosh, Hk,
                 cos_ptr, sin_ptr, csb, S, D, RD,
                 TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // S
    pos = tok % S
    d = tl.arange(0, BLOCK_D)
    half = RD // 2
    in_d = d < D
    in_rot = d < RD
    lo = d < half
    partner = tl.where(lo, d + half, d - half)
    table = b * csb + pos * RD
    c = tl.load(cos_ptr + table + d, mask=in_rot, other=0.0).to(tl.float32)
    if TRANSPOSE:  # dx_j = c_j dy_j + s_{j+h} dy_{j+h};  dx_{j+h} = c_{j+h} dy_{j+h} - s_j dy_j
        s = tl.load(sin_ptr + table + partner, mask=in_rot, other=0.0).to(tl.float32)
        sgn = tl.where(lo, 1.0, -1.0)
    else:  # y_j = c_j x_j - s_j x_{j+h};  y_{j+h} = c_{j+h} x_{j+h} + s_{j+h} x_j
        s = tl.load(sin_ptr + table + d, mask=in_rot, other=0.0).to(tl.float32)
        sgn = tl.where(lo, -1.0, 1.0)
    _rotate_heads(q_ptr + b * qsb + pos * qss, qsh, qo_ptr + b * qosb + pos * qoss, qosh, Hq, d, partner, in_d,
                  in_rot, c, s, sgn, BLOCK_H)
    _rotate_heads(k_ptr + b * ksb + pos * kss, ksh, ko_ptr + b * kosb + pos * koss, kosh, Hk, d, partner, in_d,
                  in_rot, c, s, sgn, BLOCK_H)


def _bsh_strides(t: torch.Tensor, unsqueeze_dim: int) -> tuple[int, int, int]:
    """Element strides of t's batch, position and head dims."""
    return (t.stride(0), t.stride(1), t.stride(2)) if unsqueeze_dim == 2 else (t.stride(0), t.stride(2), t.stride(1))


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(q.dtype, cos.dtype)
    qo, ko = out_like(q, dtype), out_like(k, dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, D = q.shape[0], q.shape[3]
    S = q.shape[3 - unsqueeze_dim]
    Hq, Hk = q.shape[unsqueeze_dim], k.shape[unsqueeze_dim]
    RD = cos.shape[-1]
    if B * S and (Hq or Hk):
        block_d = triton.next_power_of_2(D)
        block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), 4096 // block_d))
        csb = 0 if cos.shape[0] == 1 else S * RD
        _rope_kernel[(B * S,)](q, *_bsh_strides(q, unsqueeze_dim), qo, *_bsh_strides(qo, unsqueeze_dim), Hq,
                               k, *_bsh_strides(k, unsqueeze_dim), ko, *_bsh_strides(ko, unsqueeze_dim), Hk,
                               cos, sin, csb, S, D, RD, TRANSPOSE=transpose, BLOCK_H=block_h, BLOCK_D=block_d,
                               num_warps=4, enable_fp_fusion=False)
    return qo, ko


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (the ahead-of-time check
    records them instead of running them and compiles each to a cubin)."""
    dts = (torch.float32, torch.float16, torch.bfloat16)
    for dt, cdt in [(dt, dt) for dt in dts] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        for D, rd in ((64, 64), (128, 128), (96, 32)):
            q, k = torch.zeros(2, 8, 5, D, dtype=dt), torch.zeros(2, 2, 5, D, dtype=dt)
            cos = torch.zeros(1, 5, rd, dtype=cdt)
            for transpose in (False, True):
                rope_triton(q, k, cos, cos, 1, transpose)
