"""adv_perturb_update / adv_perturb_init, Triton kernels (same semantics as reference.py).

One program per row (token) of the [B*L, H] view: ``linf`` is one pass, ``l2_token`` a
stats loop and an update loop over the row (the second read hits the cache), ``l2_example``
a per-row stats kernel, a tiny per-example reduction, and the update kernel.  Import only
where Triton runs (the public op imports it lazily).
"""
import torch
import triton
import triton.language as tl

from ...kernels.triton_philox import join_seed, seed_halves

NORM_FLOOR = 1e-8
LINF, L2_TOKEN, L2_EXAMPLE = 0, 1, 2
MODES = {"linf": LINF, "l2_token": L2_TOKEN, "l2_example": L2_EXAMPLE}


@triton.jit
def _row_stats(d_row, g_row, H, BLOCK: tl.constexpr):
    gg = tl.zeros([BLOCK], tl.float32)
    dg = tl.zeros([BLOCK], tl.float32)
    dd = tl.zeros([BLOCK], tl.float32)
    for h0 in range(0, H, BLOCK):
        offs = h0 + tl.arange(0, BLOCK)
        m = offs < H
        g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
        d = tl.load(d_row + offs, mask=m, other=0.0).to(tl.float32)
        gg += g * g
        dg += d * g
        dd += d * d
    return tl.sum(gg, 0), tl.sum(dg, 0), tl.sum(dd, 0)


@triton.jit
def _coefs(gg, dg, dd, step, eps):
    a = step / tl.maximum(tl.sqrt(gg), 1e-8)
    nsq = tl.maximum(dd + 2.0 * a * dg + a * a * gg, 0.0)
    s = tl.where((eps > 0.0) & (nsq > eps * eps), eps / tl.sqrt(tl.maximum(nsq, 1e-30)), 1.0)
    return a, s


@triton.jit
def _stats_kernel(d_ptr, g_ptr, m_ptr, part_ptr, H, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gg, dg, dd = _row_stats(d_ptr + row * H, g_ptr + row * H, H, BLOCK)
    if HAS_MASK:
        act = tl.load(m_ptr + row) != 0.0  # padding rows do not count (even if they hold inf/nan)
        gg = tl.where(act, gg, 0.0)
        dg = tl.where(act, dg, 0.0)
        dd = tl.where(act, dd, 0.0)
    tl.store(part_ptr + 3 * row, gg)
    tl.store(part_ptr + 3 * row + 1, dg)
    tl.store(part_ptr + 3 * row + 2, dd)


@triton.jit
def _update_kernel(d_ptr, g_ptr, m_ptr, coef_ptr, L, H, step, eps, MODE: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d_row = d_ptr + row * H
    g_row = g_ptr + row * H
    if HAS_MASK:
        keep = tl.load(m_ptr + row) != 0.0  # padding rows are written as exact zeros
    if MODE == 0:
        for h0 in range(0, H, BLOCK):
            offs = h0 + tl.arange(0, BLOCK)
            m = offs < H
            g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.load(d_row + offs, mask=m, other=0.0).to(tl.float32)
            v = d + tl.where(g > 0.0, step, tl.where(g < 0.0, -step, 0.0))
            if eps > 0.0:
                v = tl.minimum(tl.maximum(v, -eps), eps)
            if HAS_MASK:
                v = tl.where(keep, v, 0.0)
            tl.store(d_row + offs, v.to(d_ptr.dtype.element_ty), mask=m)
    else:
        if MODE == 1:
            gg, dg, dd = _row_stats(d_row, g_row, H, BLOCK)
            a, s = _coefs(gg, dg, dd, step, eps)
        else:
            b = row // L
            a = tl.load(coef_ptr + 2 * b)
            s = tl.load(coef_ptr + 2 * b + 1)
        for h0 in range(0, H, BLOCK):
            offs = h0 + tl.arange(0, BLOCK)
            m = offs < H
            g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.load(d_row + offs, mask=m, other=0.0).to(tl.float32)
            v = s * (d + a * g)
            if HAS_MASK:
                v = tl.where(keep, v, 0.0)
            tl.store(d_row + offs, v.to(d_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _init_kernel(d_ptr, m_ptr, scale_ptr, seed_lo, seed_hi, L, H, stream, NORMAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    s = tl.load(scale_ptr + b)
    if HAS_MASK:
        s = tl.where(tl.load(m_ptr + row) != 0.0, s, 0.0)
    for h0 in range(0, H, BLOCK):
        c = h0 + tl.arange(0, BLOCK)
        c0 = (c >> 2).to(tl.uint32)
        c1 = (c * 0 + row).to(tl.uint32)
        zero = (c * 0).to(tl.uint32)
        a0, a1, a2, a3 = tl.philox(join_seed(seed_lo, seed_hi), c0, c1, zero + stream, zero)
        lane = c & 3
        u0 = (a0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
        u1 = (a1 >> 8).to(tl.float32) * (1.0 / 16777216.0)
        u2 = (a2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
        u3 = (a3 >> 8).to(tl.float32) * (1.0 / 16777216.0)
        if NORMAL:
            lo = lane < 2
            ue = tl.where(lo, u0, u2)
            uo = tl.where(lo, u1, u3)
            r = tl.sqrt(-2.0 * tl.log(1.0 - ue))
            t = 6.283185307179586 * uo
            v = tl.where((lane & 1) == 0, r * tl.cos(t), r * tl.sin(t))
        else:
            u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
            v = 2.0 * u - 1.0
        tl.store(d_ptr + row * H + c, (v * s).to(d_ptr.dtype.element_ty), mask=c < H)


def _block(H: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(H, 1))))


def _float_mask(mask, delta):
    return None if mask is None else (mask != 0).to(torch.float32).contiguous()


def update_triton(delta: torch.Tensor, grad: torch.Tensor, mask, norm: str, step: float, eps: float) -> None:
    B, L, H = delta.shape
    if B * L == 0 or H == 0:
        return
    d = delta if delta.is_contiguous() else delta.contiguous()
    g = grad.contiguous()
    m = _float_mask(mask, delta)
    mode = MODES[norm]
    has_mask = m is not None
    m_arg = m if has_mask else d
    block = _block(H)
    coef = d
    if mode == L2_EXAMPLE:
        part = torch.empty(B * L * 3, dtype=torch.float32, device=d.device)
        _stats_kernel[(B * L,)](d, g, m_arg, part, H, HAS_MASK=has_mask, BLOCK=block)
        st = part.view(B, L, 3).sum(1, dtype=torch.float64)
        gg, dg, dd = st.unbind(-1)
        a = step / gg.sqrt().clamp_min(NORM_FLOOR)
        nsq = (dd + 2 * a * dg + a * a * gg).clamp_min(0)
        s = torch.where((nsq > eps * eps) & (eps > 0), eps / nsq.clamp_min(1e-30).sqrt(), torch.ones_like(nsq))
        coef = torch.stack((a, s), -1).to(torch.float32).contiguous()
    _update_kernel[(B * L,)](d, g, m_arg, coef, L, H, float(step), float(eps), MODE=mode, HAS_MASK=has_mask,
                             BLOCK=block)
    if d is not delta:
        delta.copy_(d)


def init_triton(delta: torch.Tensor, mask, kind: str, norm: str, scale: float, seed: int, stream: int) -> None:
    from .reference import init_scale

    B, L, H = delta.shape
    if B * L == 0 or H == 0:
        return
    d = delta if delta.is_contiguous() else torch.empty_like(delta, memory_format=torch.contiguous_format)
    m = _float_mask(mask, delta)
    sc = init_scale(mask, B, L, H, norm, scale, delta.device).reshape(B).to(torch.float32).contiguous()
    _init_kernel[(B * L,)](d, m if m is not None else sc, sc, *seed_halves(seed), L, H, stream, NORMAL=kind == "normal",
                           HAS_MASK=m is not None, BLOCK=_block(H))
    if d is not delta:
        delta.copy_(d)


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (tests/triton_aot.py
    records them instead of running them): each dtype, norm, with and without a mask, both init kinds."""
    import itertools

    for dt, norm, masked in itertools.product((torch.float32, torch.float16, torch.bfloat16), tuple(MODES),
                                              (False, True)):
        d, g = torch.zeros(2, 5, 24, dtype=dt), torch.zeros(2, 5, 24, dtype=dt)
        mask = torch.ones(2, 5) if masked else None
        update_triton(d, g, mask, norm, 0.1, 1.0)
        for kind in ("uniform", "normal"):
            init_triton(d, mask, kind, norm, 1.0, 7, 3)
