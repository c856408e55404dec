"""linear_cross_entropy, the Triton row kernel and the chunk loop around it (imported lazily, only where
Triton runs).

Per chunk of tokens the logits ``h_c @ W.T + b`` come from cuBLAS (``torch.mm`` / ``addmm``, hidden's
dtype, [c, V] contiguous); ``_lce_row_kernel`` (one program per row, the row in BLOCK-wide pieces)
computes the row's loss in float32 with an online max / sum of exponentials and, in a second sweep,
overwrites the logits with ``dL/dlogits`` (the package doc gives the formulas); then ``dh_c = dlogits @ W``
(and ``dW``, ``db`` in float32 when asked) by cuBLAS.  The mean's ``1 / count`` is read by the kernel
from a device tensor, so nothing synchronises with the host.  Row offsets int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _softcap(x, cap):
    # cap * tanh(x / cap); tanh from exp (the interpreter has no libdevice), saturating to ±1
    return cap * (2.0 / (1.0 + tl.exp(-2.0 * (x / cap))) - 1.0)


@triton.jit
def _lce_row_kernel(x_ptr, stride_x, labels_ptr, loss_ptr, scale_ptr, V, ignore_index, eps, cap,
                    HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y = tl.load(labels_ptr + row)
    cols0 = tl.arange(0, BLOCK)
    if (y == ignore_index) | (y < 0) | (y >= V):
        # ignored: loss 0; a label outside [0, V): NaN (the eager wrapper raises before this runs)
        tl.store(loss_ptr + row, tl.where(y == ignore_index, 0.0, float("nan")))
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                cols = start + cols0
                tl.store(x_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(x_ptr.dtype.element_ty),
                         mask=cols < V)
        return
    m = float("-inf")
    s = 0.0
    sum_z = 0.0
    for start in range(0, V, BLOCK):
        cols = start + cols0
        mask = cols < V
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            z = _softcap(z, cap)
        sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    zy = tl.load(x_row + y).to(tl.float32)
    if HAS_CAP:
        zy = _softcap(zy, cap)
    lse = m + tl.log(s)
    tl.store(loss_ptr + row, (1.0 - eps) * (lse - zy) + eps * (lse - sum_z / V))
    if WRITE_GRAD:
        scale = tl.load(scale_ptr)
        off = scale * eps / V
        for start in range(0, V, BLOCK):
            cols = start + cols0
            mask = cols < V
            z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = _softcap(z, cap)
            d = scale * tl.exp(z - lse) - off
            d = tl.where(cols == y, d - scale * (1.0 - eps), d)
            if HAS_CAP:
                t = z / cap
                d = d * (1.0 - t * t)
            tl.store(x_row + cols, d.to(x_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(BLOCK, triton.next_power_of_2(max(V, 16)))


def lce_rows_triton(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
                    ignore_index: int, label_smoothing: float, softcap: float, write_grad: bool) -> None:
    """The row pass on contiguous logits [c, V]: ``loss[i]`` and, with ``write_grad``, logits -> dL/dlogits."""
    c, V = logits.shape
    if c:
        block = _block(V)
        _lce_row_kernel[(c,)](logits, logits.stride(0), labels, loss, scale, V, int(ignore_index),
                              float(label_smoothing), float(softcap) if softcap > 0 else 1.0,
                              HAS_CAP=softcap > 0, WRITE_GRAD=write_grad, BLOCK=block,
                              num_warps=8 if block >= 2048 else 4)


def linear_cross_entropy_fwd_triton(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap,
                                    reduction, chunk_size, need_dh, need_dw, need_db):
    """(loss, dhidden, dweight, dbias) as ``torch.ops.fastpeft.linear_cross_entropy_fwd`` (package doc)."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_db = need_db and bias is not None
    grad = need_dh or need_dw or need_db
    mean = reduction == "mean"
    if mean:
        count = (labels != ignore_index).sum().to(torch.float32)
        scale = torch.where(count > 0, 1.0 / count, torch.zeros_like(count)).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh = torch.empty((N, H) if need_dh else (0,), dtype=hidden.dtype, device=hidden.device)
    dw = torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if need_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if need_db else None
    wt = weight.t()
    for start in range(0, N, chunk_size):
        c = min(chunk_size, N - start)
        hc = hidden[start:start + c]
        logits = torch.addmm(bias, hc, wt) if bias is not None else torch.mm(hc, wt)
        lce_rows_triton(logits, labels[start:start + c], rows[start:start + c], scale, ignore_index,
                        label_smoothing, softcap, grad)
        if need_dh:
            torch.mm(logits, weight, out=dh[start:start + c])
        if need_dw:
            dw.addmm_(logits.t().float(), hc.float())
        if need_db:
            db.add_(logits.float().sum(0))
    if reduction == "none":
        loss = rows
    else:
        loss = rows.sum()
        if mean:
            loss = loss / count  # 0 / 0 = NaN with no label, as torch
    dw = dw.to(weight.dtype) if need_dw else weight.new_empty((0,))
    db = db.to(weight.dtype) if need_db else weight.new_empty((0,))
    return loss, dh, dw, db


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (the ahead-of-time check
    records them instead of running them and compiles each to a cubin)."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for V in (37, 32000):
            for cap in (0.0, 30.0):
                for write_grad in (False, True):
                    logits = torch.zeros(3, V, dtype=dt)
                    lce_rows_triton(logits, torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.ones(1),
                                    -100, 0.1, cap, write_grad)
