"""rms_norm, Triton kernels and their launchers (imported lazily, only where Triton runs).

Forward: one program per row, the whole row in registers (BLOCK = next power of two >= H), float32
math, the same rounding points as the C++ kernel (see the package doc).  Backward: G programs
(a few per SM), each takes a contiguous block of rows, writes dx per row and keeps its partial sum of
the weight gradient in registers; the [G, H] partials are added by ``sum(0)`` (deterministic).
Row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import out_dtype


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, stride_x, w_ptr, y_ptr, rstd_ptr, H, eps, offset,
                         CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps)
    n = x * rstd
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    if CAST_BEFORE_WEIGHT:
        y = w * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        y = n * w
    tl.store(y_ptr + row * H + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(g_ptr, stride_g, x_ptr, stride_x, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, H, offset,
                         rows_per_program, CAST_BEFORE_WEIGHT: tl.constexpr, NEED_DX: tl.constexpr,
                         NEED_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: the loop variable and offsets are int64
    end = tl.minimum(start + rows_per_program, M)
    for row in range(start, end):
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        if NEED_DX:
            dn = g * w
            c = tl.sum(dn * n, axis=0) / H
            tl.store(dx_ptr + row * H + cols, (rstd * (dn - n * c)).to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            if CAST_BEFORE_WEIGHT:
                n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += g * n
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _rows(t: torch.Tensor, M: int, H: int) -> torch.Tensor:
    """t as [M, H] with unit column stride (a view when possible)."""
    t2 = t.reshape(M, H)
    return t2.contiguous() if H > 1 and t2.stride(1) != 1 else t2


def _launch_config(H: int) -> tuple[int, int]:
    block = triton.next_power_of_2(H)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, warps


def _programs(device: torch.device, M: int) -> int:
    """Programs of the backward: a few per SM on a GPU (few under the interpreter)."""
    if device.type == "cuda":
        return max(1, min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(M, 4))


def rms_norm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                        cast_before_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    M = x.numel() // H
    x2 = _rows(x, M, H)
    # in x's shape (contiguous): the op returns a tensor, not a view (in-place ops on it must work)
    y = torch.empty(x.shape, dtype=out_dtype(x.dtype, weight.dtype, cast_before_weight), device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        block, warps = _launch_config(H)
        _rms_norm_fwd_kernel[(M,)](x2, x2.stride(0), weight, y, rstd, H, float(eps), float(offset),
                                   CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_bwd_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                        offset: float, cast_before_weight: bool, need_dx: bool,
                        need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    M = x.numel() // H
    x2, g2 = _rows(x, M, H), _rows(grad_y, M, H)
    dx = torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=x.device)
    G = _programs(x.device, M)
    partial = torch.zeros((G, H) if need_dweight else (1,), dtype=torch.float32, device=x.device)
    if M and (need_dx or need_dweight):
        block, warps = _launch_config(H)
        _rms_norm_bwd_kernel[(G,)](g2, g2.stride(0), x2, x2.stride(0), weight, rstd, dx, partial, M, H,
                                   float(offset), triton.cdiv(M, G), CAST_BEFORE_WEIGHT=cast_before_weight,
                                   NEED_DX=need_dx, NEED_DW=need_dweight, BLOCK=block, num_warps=warps)
    dw = partial.sum(0).to(weight.dtype) if need_dweight else weight.new_empty((0,))
    return dx, dw


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (the ahead-of-time check
    records them instead of running them and compiles each to a cubin)."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for wdt, cast in ((dt, False), (dt, True), (torch.float32, False), (torch.float32, True)):
            for H in (37, 2048, 8192, 32768):  # 4, 8, 16 and 32 warps
                x, w = torch.zeros(6, H, dtype=dt), torch.zeros(H, dtype=wdt)
                y, rstd = rms_norm_fwd_triton(x, w, 1e-6, 1.0, cast)
                rms_norm_bwd_triton(torch.zeros_like(y), x, w, rstd, 1.0, cast, True, True)
                rms_norm_bwd_triton(torch.zeros_like(y), x, w, rstd, 1.0, cast, True, False)
