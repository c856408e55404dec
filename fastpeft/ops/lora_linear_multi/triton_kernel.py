"""lora_linear_multi, Triton kernels (GPU; CPU only through the interpreter).

The base output ``y = x Wᵀ + b`` comes from cuBLAS (``torch.addmm``); the kernels then add every
row's own low-rank update in place, ``y[m] += s_a · (x[m] A_aᵀ) B_aᵀ`` with ``a = adapter_index[m]``
(rows with -1 are left alone).  Not fused into the GEMM on purpose: rows of one GEMM tile belong to
different adapters, so a fused epilogue would need either a row permutation of the whole GEMM or a
per-row gather of B; cuBLAS at full speed plus one read-modify-write of the adapter rows of y (about
2·M·N elements, a few percent of the GEMM's time at serving sizes) is the better trade.

Two layouts (:func:`choose_layout`; ``layout=`` forces one):

* ``sgmv`` -- prefill, many rows per adapter.  The rows are sorted by adapter on the device
  (``torch.sort`` of ``adapter_index + 1``, stable; ``bounds[a]`` = first sorted position of adapter a,
  from ``torch.searchsorted``), no host sync.  The grid has ``cdiv(M, BLOCK_M) + n_adapters`` row
  blocks, an upper bound of Σ_a cdiv(rows_a, BLOCK_M); each program finds its (adapter, rows) from
  ``bounds`` in-kernel (a cumsum over the adapters, :func:`_segment_rows`) and idles past the end.

      _sgmv_shrink_kernel   U[i] = x[order[i]] A_aᵀ               [M, R_PAD] fp32, sorted positions i
      _sgmv_expand_kernel   y[order[i]] += s_a · U[i] B_aᵀ         program per (row block, N block)

* ``bgmv`` -- decode, about one row per adapter: no sorting at all, a program per row reads its
  adapter index (the adapters' A and B are re-read per row, from L2 at decode sizes).

      _bgmv_shrink_kernel   U[m] = x[m] A_aᵀ                      program per row
      _bgmv_expand_kernel   y[m] += s_a · U[m] B_aᵀ                program per (row, N block)

The rank is padded to a power of two >= 16 (``R_PAD``); columns j >= ranks[a] of A and B are masked
off (never loaded), so zero padding of smaller ranks costs no memory traffic.  U is rounded to x's
dtype before the expand (as ``lora_B(lora_A(x))`` in PEFT).  fp32 accumulation throughout; fp32
``tl.dot`` uses IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._triton import autotune_configs, interpreter_on
from ..lora_linear.triton_kernel import _precision, _r_pad

# (BLOCK_K, warps, stages) of the SGMV shrink and (BLOCK_N, warps, stages) of the SGMV expand; the prune
# keeps tiles with BLOCK * R_PAD <= 8192 elements (the wide operand: 32 KiB per stage in fp32, so three
# stages fit the shared memory of an A100 and an H100 at every rank up to 256).
_SHRINK_TILES = [(64, 4, 3), (128, 4, 3), (32, 4, 4), (128, 8, 3)]
_EXPAND_TILES = [(128, 4, 2), (64, 4, 2), (256, 8, 2), (32, 4, 2)]
_TILE_ELEMENTS = 8192


def _configs(tiles, name):
    if interpreter_on():
        return [triton.Config({name: 32}, num_warps=1)]
    return [triton.Config({name: b}, num_warps=w, num_stages=s) for b, w, s in tiles]


def _prune(configs, named_args, **kwargs):
    """The tiles that fit this rank (the smallest if none does), cut to the autotune level."""
    r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
    name = "BLOCK_K" if "BLOCK_K" in configs[0].kwargs else "BLOCK_N"
    keep = [c for c in configs if c.kwargs[name] * r_pad <= _TILE_ELEMENTS]
    return autotune_configs(keep or [min(configs, key=lambda c: c.kwargs[name])])


@triton.jit
def _segment_rows(bounds_ptr, order_ptr, pid, n_adapters, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr):
    """The adapter ``a`` of row block ``pid`` of the SGMV grid (``a >= n_adapters``: idle, past the last
    block), its sorted positions ``rs`` (valid where ``rmask``) and their rows of x / y.  Adapter a owns
    the sorted positions bounds[a] .. bounds[a + 1], in cdiv(count, BLOCK_M) row blocks."""
    i = tl.arange(0, N_PAD)
    live = i < n_adapters
    lo = tl.load(bounds_ptr + i, mask=live, other=0)
    hi = tl.load(bounds_ptr + i + 1, mask=live, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)                       # the row blocks of adapter i end (exclusive) here
    a = tl.sum((ends <= pid).to(tl.int32), 0)         # the first adapter whose blocks end after pid
    mine = i == a                                     # all False when idle: no row below
    first_block = tl.sum(tl.where(mine, ends - blocks, 0), 0)
    rs = tl.sum(tl.where(mine, lo, 0), 0) + (pid - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rs < tl.sum(tl.where(mine, hi, 0), 0)
    rows = tl.load(order_ptr + rs, mask=rmask, other=0).to(tl.int64)
    return a, rs, rmask, rows


@triton.autotune(configs=_configs(_SHRINK_TILES, "BLOCK_K"), key=["K", "R_PAD", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _sgmv_shrink_kernel(x_ptr, a_ptr, ranks_ptr, order_ptr, bounds_ptr, u_ptr, K, n_adapters,
                        stride_xm, stride_xk, stride_aa, stride_ar, stride_ak,
                        N_PAD: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """U[i, j] = Σ_k x[order[i], k] · A[a, j, k] for the sorted rows i of one row block of adapter a."""
    a, rs, rmask, rows = _segment_rows(bounds_ptr, order_ptr, tl.program_id(0), n_adapters, BLOCK_M, N_PAD)
    if a >= n_adapters:
        return
    rr = tl.arange(0, R_PAD)
    rank = tl.load(ranks_ptr + a)
    a_base = a_ptr + a.to(tl.int64) * stride_aa
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :].to(tl.int64) * stride_xk,
                    mask=rmask[:, None] & (rk[None, :] < K), other=0.0)
        a_t = tl.load(a_base + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                      mask=(rr[None, :] < rank) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, a_t, input_precision=PRECISION)
    tl.store(u_ptr + rs[:, None].to(tl.int64) * R_PAD + rr[None, :], acc, mask=rmask[:, None])


@triton.autotune(configs=_configs(_EXPAND_TILES, "BLOCK_N"), key=["N", "R_PAD", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["y_ptr"])
@triton.jit
def _sgmv_expand_kernel(u_ptr, b_ptr, ranks_ptr, scales_ptr, order_ptr, bounds_ptr, y_ptr, N, n_adapters,
                        stride_ba, stride_bn, stride_br, stride_ym,
                        N_PAD: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[order[i], n] += s_a · Σ_j U[i, j] · B[a, n, j] for one row block of adapter a and one N block."""
    a, rs, rmask, rows = _segment_rows(bounds_ptr, order_ptr, tl.program_id(0), n_adapters, BLOCK_M, N_PAD)
    if a >= n_adapters:
        return
    rr = tl.arange(0, R_PAD)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(ranks_ptr + a)
    u = tl.load(u_ptr + rs[:, None].to(tl.int64) * R_PAD + rr[None, :], mask=rmask[:, None], other=0.0)
    b_t = tl.load(b_ptr + a.to(tl.int64) * stride_ba + rn[None, :].to(tl.int64) * stride_bn + rr[:, None] * stride_br,
                  mask=(rr[:, None] < rank) & (rn[None, :] < N), other=0.0)
    delta = tl.dot(u.to(b_t.dtype), b_t, input_precision=PRECISION) * tl.load(scales_ptr + a)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + rn[None, :]
    ymask = rmask[:, None] & (rn[None, :] < N)
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, ranks_ptr, idx_ptr, u_ptr, K, n_adapters,
                        stride_xm, stride_xk, stride_aa, stride_ar, stride_ak,
                        R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """U[m, j] = Σ_k x[m, k] · A[a, j, k], a = adapter_index[m] (rows outside [0, n_adapters) skipped)."""
    m = tl.program_id(0)
    a = tl.load(idx_ptr + m)
    if (a < 0) | (a >= n_adapters):
        return
    rr = tl.arange(0, R_PAD)
    rank = tl.load(ranks_ptr + a)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    a_base = a_ptr + a.to(tl.int64) * stride_aa
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + rk.to(tl.int64) * stride_xk, mask=rk < K, other=0.0).to(tl.float32)
        w = tl.load(a_base + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                    mask=(rr[:, None] < rank) & (rk[None, :] < K), other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(u_ptr + m.to(tl.int64) * R_PAD + rr, tl.sum(acc, 1))


@triton.jit
def _bgmv_expand_kernel(u_ptr, b_ptr, ranks_ptr, scales_ptr, idx_ptr, y_ptr, N, n_adapters,
                        stride_ba, stride_bn, stride_br, stride_ym,
                        R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[m, n] += s_a · Σ_j U[m, j] · B[a, n, j] for one row m and one N block."""
    m = tl.program_id(0)
    a = tl.load(idx_ptr + m)
    if (a < 0) | (a >= n_adapters):
        return
    rr = tl.arange(0, R_PAD)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(ranks_ptr + a)
    # U rounded to x's dtype, as the SGMV expand feeds it to tl.dot
    u = tl.load(u_ptr + m.to(tl.int64) * R_PAD + rr).to(y_ptr.dtype.element_ty).to(tl.float32)
    b = tl.load(b_ptr + a.to(tl.int64) * stride_ba + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                mask=(rn[:, None] < N) & (rr[None, :] < rank), other=0.0).to(tl.float32)
    delta = tl.sum(b * u[None, :], 1) * tl.load(scales_ptr + a)
    y_ptrs = y_ptr + m.to(tl.int64) * stride_ym + rn
    y = tl.load(y_ptrs, mask=rn < N, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=rn < N)


LAYOUTS = ("sgmv", "bgmv")


def choose_layout(M: int, n_adapters: int) -> str:
    """``bgmv`` when the batch has fewer than 16 rows per adapter slot on average (or at most 64
    rows): below one ``tl.dot`` tile of rows per adapter, sorting rows into segments costs more
    (several small launches) than re-reading each adapter per row from L2.  ``sgmv`` otherwise."""
    return "bgmv" if M <= 64 or M < 16 * n_adapters else "sgmv"


def _sgmv_block_m(M: int, n_adapters: int, r_pad: int) -> int:
    """Rows per SGMV tile from the expected rows per adapter (M / n_adapters), at most 32 for wide ranks."""
    per = M // max(n_adapters, 1)
    block = 16 if per <= 16 else 32 if per <= 32 else 64
    return min(block, 32) if r_pad > 64 else block


def _bgmv_block(r_pad: int) -> int:
    """The K (shrink) and N (expand) width of a BGMV tile: [R_PAD, block] holds 4096 elements."""
    return max(16, min(256, 4096 // r_pad))


@functools.lru_cache(maxsize=64)
def _ranks_tensor(ranks: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(ranks, dtype=torch.int32, device=device)


def lora_linear_multi_triton(x, weight, bias, lora_A, lora_B, scales, adapter_index, ranks, layout):
    """y [..., N] -- see the module doc.  ``adapter_index`` [M] (int32/int64), ``ranks`` None or a list of
    n_adapters ints, ``layout`` None / "auto" / "sgmv" / "bgmv"."""
    K, N = x.shape[-1], weight.shape[0]
    n, R, _ = lora_A.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    if M > 0:
        if layout in (None, "auto"):
            layout = choose_layout(M, n)
        r_pad, prec = _r_pad(R), _precision(x.dtype)
        rk = _ranks_tensor(tuple(int(v) for v in ranks) if ranks is not None else (R,) * n, x.device)
        sc = scales.to(torch.float32)
        u = torch.empty(M, r_pad, dtype=torch.float32, device=x.device)
        idx = adapter_index
        if layout == "bgmv":
            blk = _bgmv_block(r_pad)
            _bgmv_shrink_kernel[(M,)](x2, lora_A, rk, idx, u, K, n, x2.stride(0), x2.stride(1), *lora_A.stride(),
                                      R_PAD=r_pad, BLOCK_K=blk, num_warps=4)
            _bgmv_expand_kernel[(M, triton.cdiv(N, blk))](u, lora_B, rk, sc, idx, y, N, n, *lora_B.stride(),
                                                          y.stride(0), R_PAD=r_pad, BLOCK_N=blk, num_warps=4)
        else:
            block_m = _sgmv_block_m(M, n, r_pad)
            # bucket 0: base-only rows (and out-of-range ones when the caller skipped the index check)
            bucket = torch.where((idx >= 0) & (idx < n), idx + 1, 0)
            sorted_bucket, order = torch.sort(bucket, stable=True)
            firsts = torch.arange(1, n + 2, device=x.device, dtype=sorted_bucket.dtype)
            bounds = torch.searchsorted(sorted_bucket, firsts, out_int32=True)  # [n + 1]
            grid_m, n_pad = triton.cdiv(M, block_m) + n, max(16, triton.next_power_of_2(n))
            _sgmv_shrink_kernel[(grid_m,)](x2, lora_A, rk, order, bounds, u, K, n, x2.stride(0), x2.stride(1),
                                           *lora_A.stride(), N_PAD=n_pad, R_PAD=r_pad, PRECISION=prec,
                                           BLOCK_M=block_m)
            _sgmv_expand_kernel[lambda meta: (grid_m, triton.cdiv(N, meta["BLOCK_N"]))](
                u, lora_B, rk, sc, order, bounds, y, N, n, *lora_B.stride(), y.stride(0),
                N_PAD=n_pad, R_PAD=r_pad, PRECISION=prec, BLOCK_M=block_m)
    return y.view(*x.shape[:-1], N)


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py records
    them instead of running them): each activation dtype, both layouts, ranks that pad to 16 / 64 / 256,
    int32 and int64 indices, each SGMV row tile, bias or not, ranks given or not."""
    import itertools

    from . import GPU_DTYPES, INDEX_DTYPES

    K, N, n = 48, 56, 3
    for dt, r, layout, idt in itertools.product(GPU_DTYPES, (1, 16, 64, 256), LAYOUTS, INDEX_DTYPES):
        for M in ((40, 100, 200) if layout == "sgmv" else (40,)):  # SGMV row tiles 16 / 32 / 64
            x, w = torch.zeros(M, K, dtype=dt), torch.zeros(N, K, dtype=dt)
            a, b = torch.zeros(n, r, K, dtype=dt), torch.zeros(n, N, r, dtype=dt)
            idx = (torch.arange(M) % (n + 1) - 1).to(idt)
            lora_linear_multi_triton(x, w, torch.zeros(N, dtype=dt) if r == 16 else None, a, b, torch.ones(n),
                                     idx, [r] * n if r == 64 else None, layout)
