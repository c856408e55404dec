"""grad_tail Triton kernels (multi-tensor, pointer tables) and their launchers.

Imported lazily (inside the custom ops) so importing fastpeft never imports Triton.
The tensor list becomes a table of chunk start addresses and lengths (int64), one
upload per call; chunks are grouped by dtype (the pointer type is a compile-time
constant), so a call launches at most one stats kernel per dtype present (<= 3)
plus one finalisation kernel, and one apply kernel per dtype: the number of
launches does not depend on the number of tensors.  The reduction is two-stage
and deterministic: per-chunk fp32 partial sums, then one program adds them in
chunk order in fp64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

CHUNK = 16384
BLOCK = 1024
FIN_BLOCK = 1024
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _stats_kernel(addr_ptr, len_ptr, partial_ptr, bad_ptr, inv_scale_ptr,
                  DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    p = tl.load(addr_ptr + pid).to(tl.pointer_type(DTYPE), bitcast=True)
    n = tl.load(len_ptr + pid)
    s = tl.load(inv_scale_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):  # n <= CHUNK
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(p + offs, mask=offs < n, other=0.0).to(tl.float32)
        u = v * s
        acc += u * u
        bad = tl.maximum(bad, ((v - v) != 0).to(tl.int32))  # v - v is NaN exactly for inf / NaN
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))
    tl.store(bad_ptr + pid, tl.max(bad, axis=0))


@triton.jit
def _finalize_kernel(partial_ptr, bad_ptr, n, inv_scale_ptr, mult_ptr, norm_ptr, found_ptr, max_norm, eps,
                     HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        acc += tl.load(partial_ptr + offs, mask=m, other=0.0).to(tl.float64)
        bad = tl.maximum(bad, tl.load(bad_ptr + offs, mask=m, other=0))
    norm = tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32)
    found = tl.max(bad, axis=0) > 0
    s = tl.load(inv_scale_ptr)
    clip = 1.0
    if HAS_CLIP:
        clip = tl.minimum(max_norm / (norm + eps), 1.0)
    tl.store(norm_ptr, norm)
    tl.store(found_ptr, tl.where(found, 1.0, 0.0))
    tl.store(mult_ptr, tl.where(found, 0.0, s * clip))


@triton.jit
def _apply_kernel(addr_ptr, len_ptr, mult_ptr, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.load(mult_ptr)
    if m != 1.0:  # g * 1 == g: nothing to write
        p = tl.load(addr_ptr + pid).to(tl.pointer_type(DTYPE), bitcast=True)
        n = tl.load(len_ptr + pid)
        for start in range(0, n, BLOCK):  # n <= CHUNK
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(p + offs, (v * m).to(DTYPE), mask=mask)


def _chunk_tables(grads: Sequence[torch.Tensor], device: torch.device):
    """{dtype: (addrs, lens)} device int64 tensors (one upload) and the chunk count per dtype."""
    per_dtype: dict = {}
    for g in grads:
        n = g.numel()
        if n == 0:
            continue
        addrs, lens = per_dtype.setdefault(g.dtype, ([], []))
        base, es = g.data_ptr(), g.element_size()
        for s in range(0, n, CHUNK):
            addrs.append(base + s * es)
            lens.append(min(CHUNK, n - s))
    flat, layout = [], []
    for dtype, (addrs, lens) in per_dtype.items():
        layout.append((dtype, len(flat), len(addrs)))
        flat += addrs
        flat += lens
    table = torch.tensor(flat, dtype=torch.int64).to(device) if flat else None
    return table, layout


def grad_tail_stats_triton(grads: Sequence[torch.Tensor], inv_scale: torch.Tensor, max_norm: Optional[float],
                           eps: float):
    device = inv_scale.device
    keep = [g if g.is_contiguous() else g.contiguous() for g in grads]  # read-only pass: copies are fine
    table, layout = _chunk_tables(keep, device)
    total = sum(n for _, _, n in layout)
    partial = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    bad = torch.empty(max(total, 1), dtype=torch.int32, device=device)
    s = inv_scale.reshape(1).to(torch.float32)
    done = 0
    for dtype, off, n in layout:
        _stats_kernel[(n,)](table[off:], table[off + n:], partial[done:], bad[done:], s,
                            DTYPE=_TL[dtype], CHUNK=CHUNK, BLOCK=BLOCK)
        done += n
    mult, norm, found = (torch.empty((), dtype=torch.float32, device=device) for _ in range(3))
    _finalize_kernel[(1,)](partial, bad, total, s, mult, norm, found,
                           float(max_norm) if max_norm is not None else 0.0, float(eps),
                           HAS_CLIP=max_norm is not None, BLOCK=FIN_BLOCK)
    return mult, norm, found


def grad_tail_apply_triton(grads: Sequence[torch.Tensor], multiplier: torch.Tensor) -> None:
    contiguous = []
    for g in grads:
        if g.is_contiguous():
            contiguous.append(g)
        else:
            g.mul_(multiplier)  # rare: strided grads are scaled one by one
    table, layout = _chunk_tables(contiguous, multiplier.device)
    m = multiplier.reshape(1).to(torch.float32)
    for dtype, off, n in layout:
        _apply_kernel[(n,)](table[off:], table[off + n:], m, DTYPE=_TL[dtype], CHUNK=CHUNK, BLOCK=BLOCK)


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py
    records them instead of running them): fp32, fp16 and bf16 gradients, clipping on and off."""
    for max_norm in (None, 1.0):
        grads = [torch.zeros(33, dtype=d) for d in (torch.float32, torch.float16, torch.bfloat16)]
        mult, _, _ = grad_tail_stats_triton(grads, torch.ones(()), max_norm, 1e-6)
        grad_tail_apply_triton(grads, mult)
