"""bottleneck_adapter, Triton kernels and launchers (imported lazily, only where Triton runs).

Forward (two kernels, see the package doc for the math)::

    kernel 1  _skinny_kernel(BACKWARD=False):  h = x W_downᵀ + b_down       -> h [M, Bn]  (saved for backward)
                                               d = act(h) * keep / (1 - p)  -> d [M, Bn]  (Philox mask in registers)
    kernel 2  _mm_kernel:                      y = d W_upᵀ + b_up + x        -> y [M, H]

Backward::

    _skinny_kernel(BACKWARD=True):  dd = dY W_up, epilogue with the regenerated mask:
                                    dh = dd * keep / (1 - p) * act'(h) (+ grad_h),  d = act(h) * keep / (1 - p)
    _mm_kernel:  dX = dh W_down + dY  ·  dW_up = dYᵀ d  ·  dW_down = dhᵀ x   (fp32 accumulation,
                 written straight in the parameter dtype)
    db_up = Σ dY, db_down = Σ dh (torch reductions in fp32)

All matrices are addressed through explicit strides, so strided views (and the
transposes above) need no copies.  fp32 dots use IEEE precision (like torch's
default matmul); half types accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.philox import dropout_threshold
from ...kernels.triton_philox import dropout_keep, join_seed, seed_halves
from .reference import DROPOUT_STREAM

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


@triton.jit
def _act(h, ACT: tl.constexpr):
    """Activation of fp32 h: 0 relu, 1 gelu (erf), 2 gelu (tanh approximation), 3 silu."""
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (2.0 * tl.sigmoid(2.0 * u))  # 1 + tanh(u) = 2 sigmoid(2u)
    else:
        out = h * tl.sigmoid(h)
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act / d h of fp32 h (relu'(0) = 0, like PyTorch)."""
    if ACT == 0:
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
    else:
        sg = tl.sigmoid(h)
        out = sg * (1.0 + h * (1.0 - sg))
    return out


@triton.jit
def _tile_matmul(a_ptr, b_ptr, rm, rn, M, N, K, sam, sak, sbk, sbn,
                 PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """fp32 [BM, BN] tile of A[M, K] @ B[K, N] at rows rm, cols rn (strided A and B)."""
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm64[:, None] * sam + kk[None, :].to(tl.int64) * sak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None].to(tl.int64) * sbk + rn64[None, :] * sbn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, r_ptr, M, N, K,
               sam, sak, sbk, sbn, scm, scn, srm, srn,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]) (+ R[M, N]); fp32 accumulation, stored in C's dtype."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = _tile_matmul(a_ptr, b_ptr, rm, rn, M, N, K, sam, sak, sbk, sbn, PREC, BM, BN, BK)
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rm64[:, None] * srm + rn64[None, :] * srn, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptr + rm64[:, None] * scm + rn64[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _skinny_kernel(a_ptr, b_ptr, bias_ptr, h_ptr, gh_ptr, out_ptr, d_ptr, M, N, K,
                   sam, sak, sbk, sbn, seed_lo, seed_hi, threshold, scale,
                   BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr,
                   WRITE_D: tl.constexpr, DROPOUT: tl.constexpr, ACT: tl.constexpr, STREAM: tl.constexpr,
                   PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The [M, Bn] side of the adapter: a skinny GEMM with the activation/dropout epilogue.

    forward  (A = x, B = W_downᵀ): h = acc + b_down -> h_ptr;  d = act(h) * keep * scale -> d_ptr
    backward (A = dY, B = W_up):   dh = acc * keep * scale * act'(h) (+ gh) -> out_ptr;
                                   d = act(h) * keep * scale -> d_ptr if WRITE_D
    h, gh, out and d are contiguous [M, N]; the mask is Philox(seed, STREAM) at (row, col).
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = _tile_matmul(a_ptr, b_ptr, rm, rn, M, N, K, sam, sak, sbk, sbn, PREC, BM, BN, BK)
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if not BACKWARD:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        h = acc.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=cmask)
        hf = h.to(tl.float32)  # the activation sees the stored h, as backward will
    else:
        hf = tl.load(h_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    a = _act(hf, ACT) * scale
    if DROPOUT:
        keep = dropout_keep(join_seed(seed_lo, seed_hi), rm, rn, STREAM, threshold)
        a = tl.where(keep, a, 0.0)
    if BACKWARD:
        g = acc * scale * _act_grad(hf, ACT)
        if DROPOUT:
            g = tl.where(keep, g, 0.0)
        if HAS_GH:
            g += tl.load(gh_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=cmask)
    if WRITE_D:
        tl.store(d_ptr + offs, a.to(d_ptr.dtype.element_ty), mask=cmask)


# -- launchers ----------------------------------------------------------------
def _blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Tile sizes: small in the interpreter (it runs every lane in numpy), GEMM-sized on GPU."""
    def fit(v, lo, hi):
        return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))

    from ... import _triton

    if _triton.interpreter_on():
        return fit(m, 16, 32), fit(n, 16, 32), fit(k, 16, 32)
    return fit(m, 16, 64), fit(n, 16, 64), fit(k, 16, 64)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias=None, res=None) -> torch.Tensor:
    """out[M, N] = a[M, K] @ b[K, N] (+ bias) (+ res), any strides."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if a.is_cuda:  # a plain GEMM: cuBLAS beats this kernel's tiles on a GPU (H200 run of 2026-12-04)
        if res is None:
            torch.matmul(a, b, out=out)
        else:
            torch.addmm(res, a, b, out=out)
        return out if bias is None else out.add_(bias)
    BM, BN, BK = _blocks(M, N, K)
    r = res if res is not None else out
    _mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, out, bias if bias is not None else out, r, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), r.stride(0), r.stride(1),
        HAS_BIAS=bias is not None, HAS_RES=res is not None, PREC=_prec(a.dtype), BM=BM, BN=BN, BK=BK)
    return out


def _skinny(a, b, h, *, backward, act, p, seed, bias=None, gh=None, out=None, d=None):
    M, K = a.shape
    N = b.shape[1]
    if M == 0:
        return
    BM, BN, BK = _blocks(M, N, K)
    dummy = h
    _skinny_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, bias if bias is not None else dummy, h, gh if gh is not None else dummy,
        out if out is not None else dummy, d if d is not None else dummy, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *seed_halves(int(seed)), dropout_threshold(p),
        1.0 / (1.0 - p),
        BACKWARD=backward, HAS_BIAS=bias is not None, HAS_GH=gh is not None, WRITE_D=d is not None,
        DROPOUT=p > 0.0, ACT=ACT_CODES[act], STREAM=DROPOUT_STREAM, PREC=_prec(a.dtype), BM=BM, BN=BN, BK=BK)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [M, H] (a view when the strides allow it)."""
    return t.reshape(-1, t.shape[-1])


def adapter_fwd_triton(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual):
    """(y like x, contiguous; h [M, Bn]) -- kernels 1 and 2."""
    dt = x.dtype
    x2 = _rows(x)
    M, H = x2.shape
    Bn = W_down.shape[0]
    Wd, Wu = W_down.to(dt), W_up.to(dt)
    bd = b_down.to(dt) if b_down is not None else None
    bu = b_up.to(dt) if b_up is not None else None
    h = torch.empty(M, Bn, dtype=dt, device=x.device)
    d = torch.empty(M, Bn, dtype=dt, device=x.device)
    y = torch.empty(M, H, dtype=dt, device=x.device)
    _skinny(x2, Wd.t(), h, backward=False, act=activation, p=dropout_p, seed=seed, bias=bd, d=d)
    _mm(d, Wu.t(), y, bias=bu, res=x2 if residual else None)
    return y.view(x.shape), h


def adapter_bwd_triton(grad_y, grad_h, x, h, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual,
                       need_dx, need_down, need_up):
    """(dx, dW_down, db_down, dW_up, db_up); empty [0] tensors for what is not needed."""
    dt = x.dtype
    x2, g2 = _rows(x), _rows(grad_y)
    M, H = x2.shape
    Bn = W_down.shape[0]
    Wu = W_up.to(dt)
    dh = torch.empty(M, Bn, dtype=dt, device=x.device)
    d = torch.empty(M, Bn, dtype=dt, device=x.device) if need_up else None
    gh = grad_h.contiguous() if grad_h is not None else None
    _skinny(g2, Wu, h.contiguous(), backward=True, act=activation, p=dropout_p, seed=seed, gh=gh, out=dh, d=d)
    dx, dWd, dbd, dWu, dbu = (x.new_empty((0,)) for _ in range(5))  # distinct: outputs must not alias
    if need_dx:
        dx = torch.empty(M, H, dtype=dt, device=x.device)
        _mm(dh, W_down.to(dt), dx, res=g2 if residual else None)
        dx = dx.view(x.shape)
    if need_down:
        dWd = _mm(dh.t(), x2, torch.empty(W_down.shape, dtype=W_down.dtype, device=x.device))
        if b_down is not None:
            dbd = dh.sum(0, dtype=torch.float32).to(b_down.dtype)
    if need_up:
        dWu = _mm(g2.t(), d, torch.empty(W_up.shape, dtype=W_up.dtype, device=x.device))
        if b_up is not None:
            dbu = g2.sum(0, dtype=torch.float32).to(b_up.dtype)
    return dx, dWd, dbd, dWu, dbu


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py
    records them instead of running them): each activation dtype, fp32 or activation-dtype
    parameters, activations, dropout on/off, residual, biases, and grad_h present or not."""
    import itertools

    def t(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype)

    M, H, Bn = 40, 48, 16
    acts = (torch.float32, torch.float16, torch.bfloat16)
    for dt, act, p, residual, bias, wdt in itertools.product(acts, ("relu", "gelu", "silu"), (0.0, 0.1),
                                                             (True, False), (True, False), ("act", "fp32")):
        par = dt if wdt == "act" else torch.float32
        x = t(M, H, dtype=dt)
        wd, wu = t(Bn, H, dtype=par), t(H, Bn, dtype=par)
        bd, bu = (t(Bn, dtype=par), t(H, dtype=par)) if bias else (None, None)
        y, h = adapter_fwd_triton(x, wd, bd, wu, bu, act, p, 7, residual)
        for gh in (None, t(M, Bn, dtype=dt)):
            adapter_bwd_triton(t(M, H, dtype=dt), gh, x, h, wd, bd, wu, bu, act, p, 7, residual, True, True, True)
