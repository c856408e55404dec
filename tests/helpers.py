"""Helpers for op tests: backends to run, tolerances, float64 oracles."""
from __future__ import annotations

import pytest
import torch

from fastpeft import backends

# Explicit tolerances (atol, rtol) of a kernel's output against a float64
# reference, per dtype of the computation.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def runnable_backends(op_name: str, *example_args) -> list:
    """pytest params: every backend of ``op_name``, skipped with the reason where
    it cannot take ``example_args`` here (so a broken build shows as skips in -ra)."""
    op = backends.get_op(op_name)
    params = []
    for name in backends.BACKENDS:
        if name not in op.impls:
            continue
        reason = op.why_not(name, *example_args)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float = 1.0) -> None:
    """Compare ``actual`` with a float64 ``expected`` under TOL[dtype] (atol scaled by ``scale``)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")
