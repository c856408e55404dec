"""The shared Philox RNG: torch reference == Triton (interpreter or GPU) == C++ (via ctest's
known answers, repeated here), and the dropout masks it makes are statistically sound."""
import math

import pytest
import torch

from fastpeft import _triton
from fastpeft.kernels import philox


def test_known_answers_match_triton_values():
    c = torch.zeros(1, dtype=torch.int64)
    out = philox.philox4x32(12345, c, c, c + 7, c)
    assert [int(v) for v in out] == [3875094715, 2406494259, 1745649445, 1587205332]


if _triton.available() is None:
    import triton
    import triton.language as tl

    from fastpeft.kernels.triton_philox import dropout_keep, join_seed, seed_halves

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
    def _mask_kernel(out, seed_lo, seed_hi, M, K, stream, thr, BM: tl.constexpr, BK: tl.constexpr):
        r = tl.program_id(0) * BM + tl.arange(0, BM)
        c = tl.program_id(1) * BK + tl.arange(0, BK)
        keep = dropout_keep(join_seed(seed_lo, seed_hi), r, c, stream, thr)
        tl.store(out + r[:, None] * K + c[None, :], keep.to(tl.int8), mask=(r[:, None] < M) & (c[None, :] < K))


@pytest.mark.skipif(_triton.available() is not None, reason=str(_triton.available()))
@pytest.mark.parametrize("seed,rows,cols,p,stream", [(1, 13, 29, 0.1, 0), (2**50 + 3, 7, 66, 0.5, 3),
                                                    (0, 1, 5, 0.9, 1), (2**62 - 1, 9, 17, 0.3, 0),
                                                    (0x80000000, 5, 12, 0.5, 2), (0x9ABCDEF0FEDCBA98 >> 1, 4, 9, 0.2, 0)])
def test_triton_mask_equals_reference(seed, rows, cols, p, stream):
    """Seeds whose halves have the top bit set (negative as int32 kernel arguments) included."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    o = torch.zeros(rows, cols, dtype=torch.int8, device=device)
    _mask_kernel[(triton.cdiv(rows, 8), triton.cdiv(cols, 16))](o, *seed_halves(seed), rows, cols, stream,
                                                                philox.dropout_threshold(p), BM=8, BK=16)
    assert torch.equal(o.bool().cpu(), philox.dropout_keep_mask(seed, rows, cols, p, stream))


def test_seed_halves_fit_int32_and_join_back():
    pytest.importorskip("triton")
    from fastpeft.kernels.triton_philox import seed_halves
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 - 1, 2**63 - 1]
    seeds += [int(v) for v in torch.randint(0, 2**62, (200,), generator=g)]
    for seed in seeds:
        lo, hi = seed_halves(seed)
        assert -2**31 <= lo < 2**31 and -2**31 <= hi < 2**31, seed
        assert ((hi & 0xFFFFFFFF) << 32 | (lo & 0xFFFFFFFF)) == seed


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_within_binomial_bounds(p):
    n_rows, n_cols = 64, 1000
    keep = philox.dropout_keep_mask(int(torch.randint(0, 2**62, ())), n_rows, n_cols, p)
    n = n_rows * n_cols
    sd = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) < 6 * sd


def test_masks_differ_by_seed_stream_and_row_but_repeat_for_same_key():
    a = philox.dropout_keep_mask(5, 8, 64, 0.5)
    assert torch.equal(a, philox.dropout_keep_mask(5, 8, 64, 0.5))
    assert not torch.equal(a, philox.dropout_keep_mask(6, 8, 64, 0.5))
    assert not torch.equal(a, philox.dropout_keep_mask(5, 8, 64, 0.5, stream=1))
    assert not torch.equal(a[0], a[1])


def test_extreme_rates_and_bad_seeds():
    assert philox.dropout_keep_mask(1, 3, 7, 0.0).all()
    assert philox.dropout_threshold(1.0) == 2**24
    assert philox.dropout_keep_mask(1, 0, 7, 0.5).shape == (0, 7)
    with pytest.raises(ValueError, match="seed must be in"):
        philox.check_seed(-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        philox.check_seed("x")


def test_uniform_is_uniform():
    u = philox.uniform(3, 100, 1000)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
