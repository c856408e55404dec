"""Checks shared by the tests of the decoder-LLM ops (rms_norm, rope, swiglu/geglu): dtype skips,
bit-level agreement with transformers, the compiled/Triton ops for opcheck."""
from __future__ import annotations

import pytest
import torch

import fastpeft

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


def dtype_skip(backend, dtype):
    """float16 has no C++ CPU kernel (the cpu backend declines it), float64 no Triton kernel."""
    backend = getattr(backend, "id", backend)
    if dtype == torch.float16 and backend == "cpu":
        pytest.skip("float16 is a GPU dtype (triton, and the torch backend on CPU)")
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 is not a Triton dtype")


def bit_exact_skip(backend, dtype):
    """Skip bit-level comparisons of bfloat16 results from the Triton interpreter: it converts
    float32 -> bfloat16 by truncation, where GPUs (and PyTorch) round to nearest even."""
    if getattr(backend, "id", backend) == "triton" and dtype == torch.bfloat16 and fastpeft._triton.interpreter_on():
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even)")


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the floats (adjacent floats differ by 1; -0 == +0)."""
    i = t.detach().contiguous().view(_INT_VIEW[t.dtype]).to(torch.int64)
    magnitude_bits = i & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(i < 0, -magnitude_bits, magnitude_bits)


def agreement_with(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    """(fraction of bit-identical elements, largest distance in units in the last place) of two tensors
    of one dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    if not got.numel():
        return 1.0, 0
    ulps = (_ordered_bits(got) - _ordered_bits(want)).abs()
    return float((ulps == 0).double().mean()), int(ulps.max())


def assert_nearly_same_bits(got: torch.Tensor, want: torch.Tensor, what: str, min_same: float,
                            ulps: int = 1) -> None:
    """At least ``min_same`` of the elements bit-identical, and every element within ``ulps`` units in
    the last place of ``want``'s dtype, relative (for float32 a unit is 2^-20, 8 of its ulps: libm
    approximations differ by a few), or 1e-6 of the largest |want| (absolute, for elements near zero,
    where the spacing of the floats is no measure)."""
    same, dist = agreement_with(got, want)
    assert same >= min_same, f"{what}: {same:.4f} of the elements identical (want >= {min_same}), up to {dist} ulp"
    rtol = ulps * {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[want.dtype]
    big = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6 * big,
                               msg=lambda m: f"{what}: {m}")


def compiled_ops(*names: str) -> list:
    """``torch.ops.fastpeft.<name>`` for each name; skips when one is not registered here (extension
    not built) or is a Triton op and Triton cannot run."""
    ops = [getattr(torch.ops.fastpeft, n, None) for n in names]
    if any(op is None for op in ops):
        pytest.skip(f"torch.ops.fastpeft.{'/'.join(names)} not registered here (extension not built?)")
    if any("triton" in n for n in names) and fastpeft._triton.available() is not None:
        pytest.skip(fastpeft._triton.available())
    return ops
