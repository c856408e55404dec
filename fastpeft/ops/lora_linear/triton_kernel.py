"""lora_linear, Triton kernels (GPU; CPU only through the interpreter).

Forward::

    _shrink_kernel      U0 = drop(x) Aᵀ             [M, r]   mask generated in-kernel, never stored
    _fwd_gemm_kernel    y  = x Wᵀ + b + s·U0 Bᵀ     [M, N]   low-rank update fused in the GEMM epilogue

Backward (G = s·dY B and dB = s·dYᵀ U0 are [M, r] / [N, r] products done by torch)::

    _dx_gemm_kernel     dX = dY W + (G A) ∘ keep/(1-p)     mask regenerated in the epilogue
    _da_kernel          dA = Gᵀ drop(x)                    mask regenerated, fp32 partial sums over row splits

The rank is padded internally to a power of two >= 16 (``R_PAD``) for ``tl.dot``.
fp32 dots use IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import autotune_configs, interpreter_on
from ...kernels.philox import dropout_threshold
from ...kernels.triton_philox import dropout_keep

STREAM = 0  # Philox stream of the LoRA dropout mask (same as the torch and cpu backends)


# Tiles. Ranks up to 64 (R_PAD <= 64) use the common Hopper/Ampere tiles, the first of which fits the
# shared memory of every supported GPU in every dtype (FASTPEFT_TRITON_AUTOTUNE=off keeps only it); wider ranks
# (R_PAD 128 / 256) hold [BLOCK_M, R_PAD] epilogue tiles and an R_PAD-wide operand, so they get their own
# small-footprint tiles (BLOCK_M * R_PAD <= 128 * 128, BLOCK_K 32) that also fit the 163 KiB of shared
# memory of an A100 in fp32 (checked by tests/triton_aot.py for sm_80 and sm_90).
WIDE_RANK = 64
_GEMM_TILES = [(128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
               (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 4, 4)]
_GEMM_TILES_WIDE = [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (32, 128, 32, 4, 3)]
_SKINNY_TILES = [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4),
                 (256, 64, 8, 3)]
_SKINNY_TILES_WIDE = [(32, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)]


def _gemm_configs():
    """Tiles for the (M, N)-tiled GEMMs (one small tile in the interpreter); :func:`_prune_configs`
    picks the list for the rank and cuts it to ``FASTPEFT_TRITON_AUTOTUNE``."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _GEMM_TILES + _GEMM_TILES_WIDE]


def _skinny_configs():
    """Tiles for the kernels with an r-wide side (shrink, dA); see :func:`_gemm_configs`."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in _SKINNY_TILES + _SKINNY_TILES_WIDE]


_WIDE = {(bm, bn, bk, w, s) for bm, bn, bk, w, s in _GEMM_TILES_WIDE} | \
    {(bm, None, bk, w, s) for bm, bk, w, s in _SKINNY_TILES_WIDE}


def _is_wide(c) -> bool:
    return (c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_N"), c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in _WIDE


def _prune_configs(configs, named_args, **kwargs):
    """The tiles for this rank (the wide-rank list above R_PAD 64), cut to the autotune level."""
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    keep = [c for c in configs if _is_wide(c) == (r_pad > WIDE_RANK)] or list(configs)
    return autotune_configs(keep)


@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.autotune(configs=_skinny_configs(), key=["M", "K", "R_PAD", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                   seed, threshold, inv_keep,
                   HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """U0[m, j] = Σ_k drop(x)[m, k] · A[j, k]   (drop(x) in x's dtype, fp32 accumulation)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rm, rk, 0, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                      mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a_t.to(x_ptr.dtype.element_ty), input_precision=PRECISION)
    tl.store(u_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R_PAD"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _fwd_gemm_kernel(x_ptr, w_ptr, b_ptr, u_ptr, lb_ptr, y_ptr, M, N, K, R, scale,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_bias,
                     HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x Wᵀ + b + scale · U0 Bᵀ, the rank-r update added to the accumulator in the epilogue."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w_t = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk,
                      mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, w_t, input_precision=PRECISION)
    rr = tl.arange(0, R_PAD)
    u = tl.load(u_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                other=0.0)
    lb_t = tl.load(lb_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                   mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    acc += tl.dot(u, lb_t.to(u.dtype), input_precision=PRECISION) * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R_PAD", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _dx_gemm_kernel(dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr, M, N, K, R, stride_dm, stride_dn, stride_wn, stride_wk,
                    stride_ar, stride_ak, seed, threshold, inv_keep,
                    HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dX = dY W + (G A) ∘ keep / (1 - p)  (tiles over [M, K], loop over N; BLOCK_N tiles K here)."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        rn = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * stride_dm + rn[None, :] * stride_dn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(dy, w, input_precision=PRECISION)
    rr = tl.arange(0, R_PAD)
    g = tl.load(g_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    ga = tl.dot(g, a.to(g.dtype), input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rm, rk, 0, threshold)
        ga = tl.where(keep, ga * inv_keep, 0.0)
    acc += ga
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.autotune(configs=_skinny_configs(), key=["M", "K", "R_PAD", "HAS_DROPOUT", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _da_kernel(g_ptr, x_ptr, ws_ptr, M, K, R, stride_xm, stride_xk, seed, threshold, inv_keep,
               HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial dA of split s: ws[s, j, k] = Σ_{m in split s} G[m, j] · drop(x)[m, k]   (fp32).

    Grid (K tiles, SPLIT); split s takes the row tiles s, s + SPLIT, ...; the launcher sums ws over s."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(split * BLOCK_M, M, SPLIT * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g_t = tl.load(g_ptr + rm[None, :].to(tl.int64) * R + rr[:, None], mask=(rm[None, :] < M) & (rr[:, None] < R),
                      other=0.0)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rm, rk, 0, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
        acc += tl.dot(g_t, x, input_precision=PRECISION)
    tl.store(ws_ptr + (split * R + rr[:, None]).to(tl.int64) * K + rk[None, :], acc,
             mask=(rr[:, None] < R) & (rk[None, :] < K))


def _da_split(M: int) -> int:
    """Row splits of the dA reduction: enough programs to fill a GPU when K is narrow."""
    return max(1, min(32, triton.cdiv(M, 128)))


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreter_on() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dropout_args(p: float, seed: int):
    return (seed if p > 0 else 0), dropout_threshold(p), (1.0 / (1.0 - p))


def lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, scale: float, p: float, seed: int):
    """(y [..., N], U0 [M, r]) — see the module doc."""
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    u0 = torch.empty(M, r, dtype=x.dtype, device=x.device)
    if M > 0:
        r_pad, prec = _r_pad(r), _precision(x.dtype)
        s, thr, inv = _dropout_args(p, seed)
        _shrink_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
            x2, lora_A, u0, M, K, r, x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), s, thr, inv,
            HAS_DROPOUT=p > 0, R_PAD=r_pad, PRECISION=prec)
        _fwd_gemm_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
            x2, weight, bias if bias is not None else y, u0, lora_B, y, M, N, K, r, float(scale),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
            bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None, R_PAD=r_pad, PRECISION=prec)
    return y.view(*x.shape[:-1], N), u0


def lora_linear_bwd_triton(dy, x, weight, lora_A, lora_B, u0, scale: float, p: float, seed: int, needs):
    """(dx, dw, db, dA, dB); gradients not in ``needs`` come back as empty [0] tensors."""
    need_x, need_w, need_b, need_a, need_bb = (bool(n) for n in needs)
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dy2 = dy.reshape(M, N)
    act = x.dtype

    def none(like):
        return like.new_empty((0,))

    dx, dw, db, da, dbb = none(x), none(weight), none(weight), none(lora_A), none(lora_B)
    g = (dy2 @ lora_B.to(act)).mul_(scale).contiguous() if (need_x or need_a) else None  # [M, r]
    if need_bb:
        dbb = (dy2.t() @ u0).mul_(scale).to(lora_B.dtype)
    r_pad, prec = _r_pad(r), _precision(act)
    s, thr, inv = _dropout_args(p, seed)
    if need_x:
        dx = torch.empty(M, K, dtype=act, device=x.device)
        if M > 0:
            _dx_gemm_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)](
                dy2, weight, g, lora_A, dx, M, N, K, r, dy2.stride(0), dy2.stride(1), weight.stride(0),
                weight.stride(1), lora_A.stride(0), lora_A.stride(1), s, thr, inv,
                HAS_DROPOUT=p > 0, R_PAD=r_pad, PRECISION=prec)
        dx = dx.view(x.shape)
    if need_a:
        if M > 0:
            split = _da_split(M)
            ws = torch.empty(split, r, K, dtype=torch.float32, device=x.device)
            _da_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split)](
                g, x2, ws, M, K, r, x2.stride(0), x2.stride(1), s, thr, inv,
                HAS_DROPOUT=p > 0, R_PAD=r_pad, PRECISION=prec, SPLIT=split)
            da = ws.sum(0).to(lora_A.dtype)
        else:
            da = torch.zeros(r, K, dtype=lora_A.dtype, device=x.device)
    if need_w:
        dw = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0)
    return dx, dw, db, da, dbb


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py
    records them instead of running them): each activation dtype, fp32 or activation-dtype LoRA
    parameters, ranks padding to 16, 64 and 256, dropout on/off, bias or not."""
    import itertools

    def t(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype)

    M, K, N = 40, 48, 56
    acts = (torch.float32, torch.float16, torch.bfloat16)
    for dt, r, p, bias, pdt in itertools.product(acts, (1, 16, 64, 256), (0.0, 0.1), (False, True), ("act", "fp32")):
        par = dt if pdt == "act" else torch.float32
        x, w = t(M, K, dtype=dt), t(N, K, dtype=dt)
        a, b = t(r, K, dtype=par), t(N, r, dtype=par)
        y, u0 = lora_linear_fwd_triton(x, w, t(N, dtype=dt) if bias else None, a, b, 2.0, p, 7)
        lora_linear_bwd_triton(t(M, N, dtype=dt), x, w, a, b, u0, 2.0, p, 7, [True] * 5)
