"""lora_linear_4bit on a GPU: the frozen GEMMs decode the 4-bit weight inside the K loop (Triton); the
low-rank parts are lora_linear's Triton kernels (same Philox mask, same seed convention).

Forward::

    U0 = drop(x) Aᵀ                      lora_linear._shrink_kernel     [M, r]
    y  = b + s · U0 Bᵀ                   cuBLAS (addmm)
    y += x dequant(W)ᵀ                   _dequant_mm_kernel (NT)        W decoded tile by tile, never stored

Backward (G = s·dY B, dB = s·dYᵀ U0 by cuBLAS)::

    dX  = dY dequant(W)                  _dequant_mm_kernel (NN)
    dX += (G A) ∘ keep/(1-p)             lora_linear._dx_lora_kernel (p = 0: addmm_)
    dA  = Gᵀ drop(x)                     lora_linear._da_kernel

Decoding (bitsandbytes' layout, reference.py): element e = n·K + k of W is nibble ``e & 1`` (0: high) of
byte ``e >> 1``; value ``code[nibble] · absmax[e // blocksize]`` in fp32, cast to x's dtype before
``tl.dot`` (fp32 accumulation).  The decode is a gather per element (code table and absmax stay in
L1); it costs a few integer ops per weight element, once per row tile of x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import autotune_configs, interpreter_on
from ..lora_linear import triton_kernel as _ll  # the low-rank kernels (compiled by lora_linear's aot_launches)

_MM_TILES = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3), (32, 64, 64, 4, 4)]


def _mm_configs():
    if interpreter_on():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_Q": bq}, num_warps=w, num_stages=s)
            for bm, bp, bq, w, s in _MM_TILES]


def _prune(configs, named_args, **kwargs):
    return autotune_configs(list(configs))


# restore_value: C is added into in place; the autotuner's timed runs of each config on the caller's C
# would otherwise add the product into it once per run (tests/ops/test_triton_autotune.py)
@triton.autotune(configs=_mm_configs(), key=["M_KEY", "P", "Q", "NT"], prune_configs_by={"early_config_prune": _prune},
                 restore_value=["c_ptr"])
@triton.jit(do_not_specialize=["M_KEY"])
def _dequant_mm_kernel(a_ptr, q_ptr, absmax_ptr, code_ptr, c_ptr, M, P, Q, K, blocksize, stride_am, stride_aq, M_KEY,
                       NT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """C[m, p] += Σ_q A[m, q] · Wop[q, p]   (C contiguous [M, P], fp32 accumulation), where the [N, K]
    4-bit weight W gives Wop = Wᵀ (NT: P = N, Q = K; the forward's x Wᵀ) or Wop = W (NN: P = K, Q = N;
    the backward's dY W)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rq[None, :] * stride_aq,
                    mask=(rm[:, None] < M) & (rq[None, :] < Q), other=0.0)
        if NT:
            e = rp[None, :].to(tl.int64) * K + rq[:, None]      # W[p, q]
        else:
            e = rq[:, None].to(tl.int64) * K + rp[None, :]      # W[q, p]
        wmask = (rq[:, None] < Q) & (rp[None, :] < P)
        byte = tl.load(q_ptr + (e >> 1), mask=wmask, other=0).to(tl.int32)
        nib = tl.where((e & 1) == 0, byte >> 4, byte & 15)
        w = tl.load(code_ptr + nib, mask=wmask, other=0.0) * tl.load(absmax_ptr + e // blocksize, mask=wmask,
                                                                      other=0.0)
        acc += tl.dot(a, w.to(a_ptr.dtype.element_ty), input_precision=PRECISION)
    ptrs = c_ptr + rm[:, None].to(tl.int64) * P + rp[None, :]
    mask = (rm[:, None] < M) & (rp[None, :] < P)
    c = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (c + acc).to(c_ptr.dtype.element_ty), mask=mask)


def _dequant_mm(a2, qweight, absmax, code, c, N, K, blocksize, nt: bool):
    """c += a2 · dequant(W)ᵀ (nt) or a2 · dequant(W) (not nt), in place; c contiguous."""
    M = a2.shape[0]
    P, Q = (N, K) if nt else (K, N)
    if M == 0:
        return c
    _dequant_mm_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(P, meta["BLOCK_P"]))](
        a2, qweight, absmax, code, c, M, P, Q, K, blocksize, a2.stride(0), a2.stride(1), _ll._m_key(M),
        NT=nt, PRECISION=_ll._precision(a2.dtype))
    return c


def lora_linear_4bit_fwd_triton(x, qweight, absmax, code, N: int, blocksize: int, bias, lora_A, lora_B,
                                scale: float, p: float, seed: int):
    """(y [..., N], U0 [M, r]) -- see the module doc."""
    K, r = x.shape[-1], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y = out.view(M, N)
    u0 = _ll._shrink(x2, lora_A, M, K, r, p, seed)
    B = lora_B.to(x.dtype)
    if bias is None:
        torch.mm(u0, B.t(), out=y).mul_(float(scale))
    else:
        torch.addmm(bias, u0, B.t(), alpha=float(scale), out=y)
    _dequant_mm(x2, qweight, absmax, code, y, N, K, blocksize, nt=True)
    return out, u0


def lora_linear_4bit_bwd_triton(dy, x, qweight, absmax, code, N: int, blocksize: int, lora_A, lora_B, u0,
                                scale: float, p: float, seed: int, needs):
    """(dx, db, dA, dB); gradients not in ``needs`` (x, bias, lora_A, lora_B) come back as empty [0]."""
    need_x, need_b, need_a, need_bb = (bool(n) for n in needs)
    K, r = x.shape[-1], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dy2 = dy.reshape(M, N).contiguous()
    act = x.dtype
    dx, db, da, dbb = x.new_empty((0,)), x.new_empty((0,)), lora_A.new_empty((0,)), lora_B.new_empty((0,))
    g = (dy2 @ lora_B.to(act)).mul_(scale).contiguous() if (need_x or need_a) else None
    if need_bb:
        dbb = (dy2.t() @ u0).mul_(scale).to(lora_B.dtype)
    r_pad, prec = _ll._r_pad(r), _ll._precision(act)
    args = _ll._dropout_args(p, seed)
    if need_x:
        dx = torch.zeros(M, K, dtype=act, device=x.device)
        _dequant_mm(dy2, qweight, absmax, code, dx, N, K, blocksize, nt=False)
        if M > 0 and p == 0:
            dx.addmm_(g, lora_A.to(act))
        elif M > 0:
            _ll._dx_lora_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))](
                g, lora_A, dx, M, K, r, lora_A.stride(0), lora_A.stride(1), *args, _ll._m_key(M),
                HAS_DROPOUT=True, R_PAD=r_pad, PRECISION=prec)
        dx = dx.reshape(x.shape)
    if need_a:
        if M > 0:
            split = _ll._da_split(M)
            ws = torch.empty(split, r, K, dtype=torch.float32, device=x.device)
            _ll._da_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split)](
                g, x2, ws, M, K, r, x2.stride(0), x2.stride(1), *args, _ll._m_key(M),
                HAS_DROPOUT=p > 0, R_PAD=r_pad, PRECISION=prec, SPLIT=split)
            da = ws.sum(0).to(lora_A.dtype)
        else:
            da = torch.zeros(r, K, dtype=lora_A.dtype, device=x.device)
    if need_b:
        db = dy2.sum(0)
    return dx, db, da, dbb


def aot_launches() -> None:
    """Every launch of this module's kernel (both layouts) for each activation dtype (tests/triton_aot.py);
    the lora_linear kernels it reuses are recorded by lora_linear's own aot_launches."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        M, K, N = 40, 48, 56
        q = torch.zeros((N * K + 1) // 2, dtype=torch.uint8)
        absmax, code = torch.zeros(-(-N * K // 64)), torch.zeros(16)
        _dequant_mm(torch.zeros(M, K, dtype=dt), q, absmax, code, torch.zeros(M, N, dtype=dt), N, K, 64, nt=True)
        _dequant_mm(torch.zeros(M, N, dtype=dt), q, absmax, code, torch.zeros(M, K, dtype=dt), N, K, 64, nt=False)
