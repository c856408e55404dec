"""``scaled_add(a, b, alpha) = a + alpha * b`` — the smallest fused op.

It proves the whole op path (registry, four backends, fake kernels, autograd,
opcheck, ``torch.compile``) and is the residual/accumulate step used by the
larger ops.  Equivalent PyTorch::

    out = a + alpha * b          # a, b: same shape, dtype, device; alpha: float

Backward (d out = g):  d a = g,  d b = alpha * g.

Files of this op: ``reference.py`` (torch backend), ``triton_kernel.py``,
``csrc/scaled_add/`` (``_cpu.cpp`` + ``_cuda.cu`` kernels, ``_binding.cpp``),
``tests/ops/test_scaled_add.py``, ``benchmarks/bench_scaled_add.py``.
"""
from __future__ import annotations

import torch

from ... import _ext, _triton
from ...backends import define_op
from .._checks import check_float, check_same_device, check_tensor, device_reason, dtype_reason
from .reference import scaled_add_reference

OP = define_op("scaled_add")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


# -- torch ------------------------------------------------------------------
OP.register("torch")(scaled_add_reference)


# -- cpu / cuda (compiled, torch.ops.fastpeft.scaled_add) --------------------
def _setup_context(ctx, inputs, output):
    ctx.alpha = inputs[2]


def _backward(ctx, grad):
    return grad, grad * ctx.alpha, None


if _ext.load() is not None:
    @torch.library.register_fake("fastpeft::scaled_add")
    def _(a, b, alpha):
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    torch.library.register_autograd("fastpeft::scaled_add", _backward, setup_context=_setup_context)


def _compiled(a, b, alpha):
    return torch.ops.fastpeft.scaled_add(a, b, alpha)


OP.register("cpu", available=_ext.cpu_available,
            supports=lambda a, b, alpha, forced: device_reason(a, "cpu", "cpu backend")
            or dtype_reason(a, CPU_DTYPES, "cpu backend"))(_compiled)
OP.register("cuda", available=_ext.cuda_available,
            supports=lambda a, b, alpha, forced: device_reason(a, "cuda", "cuda backend")
            or dtype_reason(a, GPU_DTYPES, "cuda backend"))(_compiled)


# -- triton (custom_op + fake, so opcheck and torch.compile work) -------------
@torch.library.custom_op("fastpeft::scaled_add_triton", mutates_args=())
def _scaled_add_triton(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    from .triton_kernel import scaled_add_triton

    return scaled_add_triton(a, b, alpha)


@_scaled_add_triton.register_fake
def _(a, b, alpha):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


_scaled_add_triton.register_autograd(_backward, setup_context=_setup_context)

OP.register("triton", available=_triton.available,
            supports=lambda a, b, alpha, forced: _triton.supports_device(a.device, forced)
            or dtype_reason(a, GPU_DTYPES, "triton backend"))(_scaled_add_triton)

__all__ = ["scaled_add", "OP"]
