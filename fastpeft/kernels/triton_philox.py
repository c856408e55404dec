"""Triton side of fastpeft's dropout RNG (see :mod:`fastpeft.kernels.philox`).

``dropout_keep(seed, rows, cols, stream, threshold)`` returns the keep mask of
a [BM, BK] tile, bit-identical to ``philox.dropout_keep_mask`` and to
``csrc/common/philox.h``.  Import only where Triton is available.
"""
import triton
import triton.language as tl


@triton.jit
def philox_bits(seed, rows, cols, stream):
    """uint32 bits [BM, BK] for row indices ``rows`` [BM] and column indices ``cols`` [BK]."""
    r = rows[:, None].to(tl.int64)
    c = cols[None, :].to(tl.int64)
    zero = (r * 0 + c * 0).to(tl.uint32)
    c0 = ((c >> 2) + r * 0).to(tl.uint32)
    c1 = (r + c * 0).to(tl.uint32)
    a0, a1, a2, a3 = tl.philox(seed, c0, c1, zero + stream, zero)
    lane = c & 3
    return tl.where(lane == 0, a0, tl.where(lane == 1, a1, tl.where(lane == 2, a2, a3)))


@triton.jit
def dropout_keep(seed, rows, cols, stream, threshold):
    """Bool keep mask [BM, BK]: (bits >> 8) >= threshold, threshold = ceil(p * 2**24)."""
    bits = philox_bits(seed, rows, cols, stream)
    return (bits >> 8).to(tl.int32) >= threshold


def seed_halves(seed: int) -> tuple[int, int]:
    """A 64-bit Philox seed as two int32-range kernel arguments ``(lo, hi)``, joined in the kernel by
    :func:`join_seed`.  Triton types and specialises an int argument by its value (i32 or i64; divisible
    by 16; equal to 1), so a fresh seed per call passed as one int compiled up to four variants of every
    dropout kernel during the first steps of a run; kernels take ``seed_lo, seed_hi`` in their
    ``do_not_specialize`` list instead, and these always fit int32."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


@triton.jit
def join_seed(seed_lo, seed_hi):
    """The int64 seed of :func:`seed_halves`' two halves."""
    return (seed_hi.to(tl.int64) << 32) | (seed_lo.to(tl.int64) & 0xFFFFFFFF)
