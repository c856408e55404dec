"""``lora_linear``: a LoRA linear layer, forward and backward, with dropout fused in.

Equivalent PyTorch (HF PEFT's vanilla LoRA forward; ``drop`` uses fastpeft's
Philox mask so every backend drops the same elements for one seed)::

    y = F.linear(x, weight, bias) + scale * F.linear(F.linear(drop(x), lora_A), lora_B)
    drop(x) = x * keep / (1 - dropout_p),  keep = philox.dropout_keep_mask(seed, M, K, dropout_p)

Shapes: x [..., K] (M = product of the leading dims, may be 0, any strides),
weight [N, K] (any strides, e.g. ``conv1d.weight.t()``), bias [N] or None,
lora_A [r, K], lora_B [N, r]; y [..., N] in x's dtype.

Backward (see ``reference.LoraLinearFunction`` for the derivation) saves only x
and ``U0 = drop(x) lora_Aᵀ`` [M, r], regenerates the mask from the seed, and
computes weight/bias gradients only when they require grad.

Files of this op: ``reference.py`` (torch backend and oracle), ``triton_kernel.py``,
``csrc/lora_linear/`` (torch-free ``_cpu.cpp`` kernels, ``_binding.cpp``), ``layer.py`` (when a
LoRA layer can run this op), ``tests/ops/test_lora_linear.py``,
``fastpeft/bench/cases/ops/lora_linear.py``, ``benchmarks/bench_lora_linear.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...backends import define_op
from .._checks import check_lora_scale_dropout, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import lora_linear_plain, lora_linear_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_RANK = 256


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    M, K, N, r = 2, 8, 4, 2
    return (randn(M, K), randn(N, K, scale=K ** -0.5), randn(N), randn(r, K, scale=K ** -0.5),
            randn(N, r, scale=r ** -0.5), 1.0, 0.1, 0)


OP = define_op("lora_linear", example=_example)


def _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., K] with K >= 1, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=(2,))
    check_tensor("bias", bias, ndim=(1,), allow_none=True)
    check_tensor("lora_A", lora_A, ndim=(2,))
    check_tensor("lora_B", lora_B, ndim=(2,))
    K = x.shape[-1]
    N, Kw = weight.shape
    if Kw != K:
        raise ValueError(f"weight: expected shape [N, {K}] (K = x.shape[-1] = {K}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias: expected shape [{N}] (N = weight.shape[0]), got {tuple(bias.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: expected shape [r, {K}] with rank r >= 1, got {tuple(lora_A.shape)}")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}] (K = x.shape[-1]), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (N = weight.shape[0], r = lora_A.shape[0]), "
                         f"got {tuple(lora_B.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A: expected dtype {x.dtype} (the dtype of x) or float32, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: expected dtype {lora_A.dtype} (the dtype of lora_A), got {lora_B.dtype}")
    check_same_device("x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return check_lora_scale_dropout(scale, dropout_p, seed)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                seed: Optional[int] = None) -> torch.Tensor:
    """LoRA linear layer ``y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ``, differentiable.

    Args:
        x: [..., K] activations (fp32/fp16/bf16; fp64 on the torch and cpu backends).
        weight: [N, K] frozen base weight, dtype of x (gradient only if it requires grad).
        bias: [N] or None, dtype of x.
        lora_A: [r, K], dtype of x or float32 (mixed precision: LoRA runs in x's dtype,
            its gradients come back in float32).
        lora_B: [N, r], dtype of lora_A.
        scale: LoRA scaling (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p: dropout rate on the LoRA branch's input, in [0, 1).
        seed: Philox seed of the dropout mask (int in [0, 2**63)); None draws one
            from torch's default generator (deterministic under ``torch.manual_seed``).
            Ignored when ``dropout_p == 0``.

    Returns:
        y: [..., N] in x's dtype.

    Equivalent PyTorch: :func:`fastpeft.ops.lora_linear.reference.lora_linear_plain`.
    """
    scale, dropout_p, seed = _check_args(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)
    return OP(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


# -- shared by the compiled and Triton ops ---------------------------------------
# Both are a pair of ops:
#   <fwd>(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed) -> (y [..., N], u0 [M, r])
#   <bwd>(dy, x, weight, lora_A, lora_B, u0, scale, dropout_p, seed, needs[5]) -> (dx, dw, db, dA, dB)
# with autograd on <fwd> whose backward calls <bwd> (derivation in reference.LoraLinearFunction).
# Gradients not asked for in ``needs`` (x, weight, bias, lora_A, lora_B) come back as empty [0].
def _fwd_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    lead = tuple(x.shape[:-1])
    return x.new_empty((*lead, weight.shape[0])), x.new_empty((math.prod(lead), lora_A.shape[0]))


def _bwd_fake(dy, x, weight, lora_A, lora_B, u0, scale, dropout_p, seed, needs):
    def grad(like, shape, need):
        return like.new_empty(tuple(shape) if need else (0,))

    return (grad(x, x.shape, needs[0]), grad(weight, weight.shape, needs[1]),
            grad(weight, weight.shape[:1], needs[2]), grad(lora_A, lora_A.shape, needs[3]),
            grad(lora_B, lora_B.shape, needs[4]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])  # x and u0 [M, r]: nothing else M-sized
    ctx.scale, ctx.p, ctx.seed, ctx.has_bias = scale, dropout_p, seed, bias is not None
    ctx.mark_non_differentiable(output[1])


def _make_backward(bwd):
    def backward(ctx, dy, du0):
        x, weight, lora_A, lora_B, u0 = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [bool(n[0]), bool(n[1]), bool(n[2] and ctx.has_bias), bool(n[3]), bool(n[4])]
        grads = bwd(dy.to(x.dtype), x, weight, lora_A, lora_B, u0, ctx.scale, ctx.p, ctx.seed, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)

    return backward


# -- cpu: torch.ops.fastpeft.lora_linear_fwd / _bwd (csrc/lora_linear/) --------------
compiled_op("lora_linear_bwd", fake=_bwd_fake)
compiled_op("lora_linear_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.lora_linear_bwd(*a)))


def _lora_linear_cpu(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    return torch.ops.fastpeft.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[0]


# -- triton: torch.ops.fastpeft.lora_linear_triton_fwd / _bwd ----------------------
@triton_op("lora_linear_triton_bwd", fake=_bwd_fake)
def _lora_linear_triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, u0: torch.Tensor, scale: float, dropout_p: float, seed: int,
                            needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    from .triton_kernel import lora_linear_bwd_triton

    return lora_linear_bwd_triton(dy, x, weight, lora_A, lora_B, u0, scale, dropout_p, seed, needs)


@triton_op("lora_linear_triton_fwd", fake=_fwd_fake, setup_context=_setup_context,
           backward=_make_backward(_lora_linear_triton_bwd))
def _lora_linear_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float,
                            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import lora_linear_fwd_triton

    return lora_linear_fwd_triton(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)


def _lora_linear_triton(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    return _lora_linear_triton_fwd(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[0]


def _rank_fits_triton(x, weight, bias, lora_A, *args, forced):
    r = lora_A.shape[0]
    return None if r <= MAX_TRITON_RANK else f"triton backend supports ranks up to {MAX_TRITON_RANK}, got {r}"


# -- backends ----------------------------------------------------------------------
register_backend(OP, "torch")(lora_linear_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["lora_linear_fwd", "lora_linear_bwd"])(_lora_linear_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_rank_fits_triton)(_lora_linear_triton)

__all__ = ["lora_linear", "lora_linear_plain", "OP"]
