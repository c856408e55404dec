"""``scaled_add(a, b, alpha) = a + alpha * b`` — the smallest fused op.

It proves the whole op path (registry, four backends, fake kernels, autograd,
opcheck, ``torch.compile``) and is the residual/accumulate step used by the
larger ops.  Equivalent PyTorch::

    out = a + alpha * b          # a, b: same shape, dtype, device; alpha: float

Backward (d out = g):  d a = g,  d b = alpha * g.

Files of this op: ``reference.py`` (torch backend), ``triton_kernel.py``,
``csrc/scaled_add/`` (``_cpu.cpp`` + ``_cuda.cu`` kernels, ``_binding.cpp``),
``tests/ops/test_scaled_add.py``, ``fastpeft/bench/cases/ops/scaled_add.py`` (benchmark
cases) and ``benchmarks/bench_scaled_add.py``; one line in ``fastpeft/ops/__init__.py``.
"""
from __future__ import annotations

import torch

from ...backends import define_op
from .._checks import check_float, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import scaled_add_reference

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    return randn(4), randn(4), 0.5


OP = define_op("scaled_add", example=_example)


def scaled_add(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Return ``a + alpha * b`` (differentiable in ``a`` and ``b``).

    Args:
        a: tensor of any shape, float dtype.
        b: tensor with the shape, dtype and device of ``a``.
        alpha: scale of ``b``.
    """
    check_tensor("a", a)
    check_tensor("b", b)
    if b.shape != a.shape:
        raise ValueError(f"b: expected shape {tuple(a.shape)} (the shape of a), got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"b: expected dtype {a.dtype} (the dtype of a), got {b.dtype}")
    check_same_device("a", a, b=b)
    alpha = check_float("alpha", alpha)
    return OP(a, b, alpha)


# -- fake and autograd, shared by the compiled and the Triton op ----------------
def _fake(a, b, alpha):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.alpha = inputs[2]


def _backward(ctx, grad):
    return grad, grad * ctx.alpha, None


# -- cpu / cuda: torch.ops.fastpeft.scaled_add (csrc/scaled_add/) ---------------
compiled_op("scaled_add", fake=_fake, backward=_backward, setup_context=_setup_context)


def _compiled(a, b, alpha):
    return torch.ops.fastpeft.scaled_add(a, b, alpha)


# -- triton: torch.ops.fastpeft.scaled_add_triton ---------------------------------
@triton_op("scaled_add_triton", fake=_fake, backward=_backward, setup_context=_setup_context)
def _scaled_add_triton(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    from .triton_kernel import scaled_add_triton

    return scaled_add_triton(a, b, alpha)


# -- backends ------------------------------------------------------------------
register_backend(OP, "torch")(scaled_add_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["scaled_add"])(_compiled)
register_backend(OP, "cuda", dtypes=GPU_DTYPES, needs=["scaled_add"])(_compiled)
register_backend(OP, "triton", dtypes=GPU_DTYPES)(_scaled_add_triton)

__all__ = ["scaled_add", "OP"]
