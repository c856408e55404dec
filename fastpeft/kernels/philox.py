"""Philox-4x32-10 counter-based RNG and dropout masks, in pure PyTorch.

This is the reference for the RNG used inside every fastpeft kernel: Triton's
``tl.philox`` (32-bit counters), ``csrc/common/philox.h`` (C++/CUDA) and this
module produce bit-identical streams, so one seed gives one dropout mask on
every backend.

Mask addressing, for a mask of logical shape ``[rows, cols]``::

    counter = (col // 4, row, stream, 0); key = (seed & 0xffffffff, seed >> 32)
    bits    = philox4x32(counter, key)[col % 4]
    keep    = (bits >> 8) >= ceil(p * 2**24)

``stream`` separates independent uses of one seed (for example the dropout of
a LoRA layer and that of an adapter).  Arithmetic is done in int64 tensors that
hold uint32 values, so it runs on any device and dtype-independent.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
MAX_SEED = 2**63 - 1


def _mulhi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a constant uint32 ``a``, tensor ``b``.

    Split ``a`` into 16-bit halves so no intermediate leaves int64.
    """
    ah, al = a >> 16, a & 0xFFFF
    hi = (ah * b + ((al * b) >> 16)) >> 16
    lo = (a * b) & _M32  # int64 wrap-around keeps the low 32 bits exact
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of int64 tensors holding uint32 counters; returns 4 int64 tensors."""
    seed = check_seed(seed)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2, c3 = (torch.as_tensor(c).to(torch.int64) & _M32 for c in (c0, c1, c2, c3))
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mulhi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise TypeError(f"seed must be an int in [0, 2**63), got {seed!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def dropout_threshold(p: float) -> int:
    """Integer threshold t with keep iff (bits >> 8) >= t, P(keep) = 1 - t / 2**24."""
    if not p > 0.0:
        return 0
    if p >= 1.0:
        return 1 << 24
    return int(math.ceil(p * 16777216.0))


def random_bits(seed: int, rows: int, cols: int, stream: int = 0,
                device: torch.device | str | None = None, row_offset: int = 0) -> torch.Tensor:
    """uint32 stream (as int64) of shape [rows, cols] under the mask addressing above."""
    groups = (cols + 3) // 4
    g = torch.arange(groups, device=device, dtype=torch.int64).expand(rows, groups)
    r = torch.arange(row_offset, row_offset + rows, device=device,
                     dtype=torch.int64).unsqueeze(1).expand(rows, groups)
    z = torch.zeros((), device=device, dtype=torch.int64)
    s = torch.full((), stream & _M32, device=device, dtype=torch.int64)
    out = philox4x32(seed, g, r, s.expand(rows, groups), z.expand(rows, groups))
    return torch.stack(out, dim=-1).reshape(rows, groups * 4)[:, :cols]


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, stream: int = 0,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask [rows, cols]: True where the element is kept by dropout with rate ``p``."""
    if rows == 0 or cols == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return (random_bits(seed, rows, cols, stream, device) >> 8) >= dropout_threshold(p)


def uniform(seed: int, rows: int, cols: int, stream: int = 0,
            device: torch.device | str | None = None) -> torch.Tensor:
    """float32 uniform in [0, 1) on the same addressing: (bits >> 8) * 2**-24."""
    return (random_bits(seed, rows, cols, stream, device) >> 8).to(torch.float32) * (1.0 / 16777216.0)
