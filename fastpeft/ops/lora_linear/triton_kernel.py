"""lora_linear on a GPU: cuBLAS for the big GEMMs, Triton for the dropout-masked low-rank parts.

Forward::

    y  = x Wᵀ + b                   cuBLAS (F.linear)
    U0 = drop(x) Aᵀ                 _shrink_kernel   [M, r]  mask generated in-kernel, never stored
    y += s · U0 Bᵀ                  cuBLAS (addmm_, in place)

Backward (G = s·dY B and dB = s·dYᵀ U0 are [M, r] / [N, r] cuBLAS products)::

    dX  = dY W                      cuBLAS
    dX += (G A) ∘ keep/(1-p)        _dx_lora_kernel  [M, K] tiles, mask regenerated (p = 0: addmm_)
    dA  = Gᵀ drop(x)                _da_kernel       mask regenerated, fp32 partial sums over row splits

The first GPU run (H200, 2026-12-04) measured the earlier design, which did the x Wᵀ and dY W GEMMs in
Triton with the low-rank terms in their epilogues, at 44% of the matmul ceiling (303 TFLOP/s against
cuBLAS's 685 on 8192×4096×4096 bf16) and 1.7× HF PEFT's time: the frozen GEMMs are most of a LoRA layer's
work, so they go to cuBLAS, and the fused kernels keep what HF PEFT cannot avoid materialising (drop(x)).

The rank is padded internally to a power of two >= 16 (``R_PAD``) for ``tl.dot``.  Dropout seeds travel
as two int32 halves that are never specialised (:func:`fastpeft.kernels.triton_philox.seed_halves`), and
the autotune keys use the row count rounded up to a power of two, so neither a new seed per step nor a new
sequence length per batch compiles or autotunes again.
fp32 dots use IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import autotune_configs, interpreter_on
from ...kernels.philox import dropout_threshold
from ...kernels.triton_philox import dropout_keep, join_seed, seed_halves

STREAM = 0  # Philox stream of the LoRA dropout mask (same as the torch and cpu backends)


# Tiles. Ranks up to 64 (R_PAD <= 64) use the common tiles, the first of which fits the shared memory of
# every supported GPU in every dtype (FASTPEFT_TRITON_AUTOTUNE=off keeps only it); wider ranks (R_PAD
# 128 / 256) hold an R_PAD-wide operand, so they get their own small-footprint tiles that also fit the
# 163 KiB of shared memory of an A100 in fp32 (checked by tests/triton_aot.py for sm_80 and sm_90).
WIDE_RANK = 64
_TILE_TILES = [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]   # [M, K] tiles of dX
_TILE_TILES_WIDE = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2)]
_SKINNY_TILES = [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4),
                 (256, 64, 8, 3)]
_SKINNY_TILES_WIDE = [(32, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)]


def _configs(tiles, tiles_wide):
    """``triton.Config`` list of ``(BLOCK_M, BLOCK_K, num_warps, num_stages)`` tiles (one small tile in the
    interpreter); :func:`_prune_configs` picks the list for the rank and cuts it to
    ``FASTPEFT_TRITON_AUTOTUNE``."""
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bk, w, st in tiles + tiles_wide]


_WIDE = {(bm, bk, w, st) for bm, bk, w, st in _TILE_TILES_WIDE + _SKINNY_TILES_WIDE}


def _is_wide(c) -> bool:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in _WIDE


def _prune_configs(configs, named_args, **kwargs):
    """The tiles for this rank (the wide-rank list above R_PAD 64), cut to the autotune level."""
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    keep = [c for c in configs if _is_wide(c) == (r_pad > WIDE_RANK)] or list(configs)
    return autotune_configs(keep)


def _m_key(M: int) -> int:
    """The autotune key of a row count: M rounded up to a power of two (at least 64)."""
    return max(64, triton.next_power_of_2(M))


@triton.autotune(configs=_configs(_SKINNY_TILES, _SKINNY_TILES_WIDE), key=["M_KEY", "K", "R_PAD", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "M_KEY"])
def _shrink_kernel(x_ptr, a_ptr, u_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                   seed_lo, seed_hi, threshold, inv_keep, M_KEY,
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
            keep = dropout_keep(join_seed(seed_lo, seed_hi), rm, rk, 0, threshold)
            x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(x_ptr.dtype.element_ty)
        a_t = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                      mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a_t.to(x_ptr.dtype.element_ty), input_precision=PRECISION)
    tl.store(u_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rr[None, :] < R))


# restore_value: dX is added into in place; the autotuner's timed runs of each config on the caller's dX
# would otherwise add G A into it once per run (tests/ops/test_triton_autotune.py)
@triton.autotune(configs=_configs(_TILE_TILES, _TILE_TILES_WIDE), key=["M_KEY", "K", "R_PAD", "HAS_DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_configs}, restore_value=["dx_ptr"])
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "M_KEY"])
def _dx_lora_kernel(g_ptr, a_ptr, dx_ptr, M, K, R, stride_ar, stride_ak, seed_lo, seed_hi, threshold, inv_keep,
                    M_KEY, HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX[m, k] += Σ_j G[m, j] · A[j, k] · keep[m, k] / (1 - p)   (dX: contiguous [M, K], already dY W)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    g = tl.load(g_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                other=0.0)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
    ga = tl.dot(g, a.to(g.dtype), input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(join_seed(seed_lo, seed_hi), rm, rk, 0, threshold)
        ga = tl.where(keep, ga * inv_keep, 0.0)
    ptrs = dx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    dx = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (dx + ga).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_SKINNY_TILES, _SKINNY_TILES_WIDE), key=["M_KEY", "K", "R_PAD", "HAS_DROPOUT", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "M_KEY"])
def _da_kernel(g_ptr, x_ptr, ws_ptr, M, K, R, stride_xm, stride_xk, seed_lo, seed_hi, threshold, inv_keep, M_KEY,
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
            keep = dropout_keep(join_seed(seed_lo, seed_hi), rm, rk, 0, threshold)
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
    """(seed_lo, seed_hi, threshold, 1 / (1 - p)) kernel arguments."""
    return (*seed_halves(seed if p > 0 else 0), dropout_threshold(p), (1.0 / (1.0 - p)))


def _shrink(x2, lora_A, M, K, r, p, seed):
    """U0 = drop(x) Aᵀ [M, r] in x's dtype (fp32 accumulation)."""
    u0 = torch.empty(M, r, dtype=x2.dtype, device=x2.device)
    if M > 0:
        _shrink_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
            x2, lora_A, u0, M, K, r, x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1),
            *_dropout_args(p, seed), _m_key(M), HAS_DROPOUT=p > 0, R_PAD=_r_pad(r), PRECISION=_precision(x2.dtype))
    return u0


def lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, scale: float, p: float, seed: int):
    """(y [..., N], U0 [M, r]) — see the module doc."""
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y = out.view(M, N)  # the op returns `out`, not a view (in-place ops on the output must work)
    if bias is None:
        torch.mm(x2, weight.t(), out=y)
    else:
        torch.addmm(bias, x2, weight.t(), out=y)
    u0 = _shrink(x2, lora_A, M, K, r, p, seed)
    if M > 0:
        y.addmm_(u0, lora_B.to(x.dtype).t(), alpha=float(scale))
    return out, u0


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
    args = _dropout_args(p, seed)
    if need_x:
        dx = dy2 @ weight  # [M, K], contiguous
        if M > 0 and p == 0:
            dx.addmm_(g, lora_A.to(act))
        elif M > 0:
            _dx_lora_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))](
                g, lora_A, dx, M, K, r, lora_A.stride(0), lora_A.stride(1), *args, _m_key(M),
                HAS_DROPOUT=True, R_PAD=r_pad, PRECISION=prec)
        dx = dx.reshape(x.shape)
    if need_a:
        if M > 0:
            split = _da_split(M)
            ws = torch.empty(split, r, K, dtype=torch.float32, device=x.device)
            _da_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split)](
                g, x2, ws, M, K, r, x2.stride(0), x2.stride(1), *args, _m_key(M),
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
