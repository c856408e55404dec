"""``lora_linear_8bit``: a LoRA linear layer over a bitsandbytes LLM.int8 frozen weight (``Linear8bitLt``),
forward and backward, with the dequantisation fused into the GEMMs and dropout fused in.

Equivalent PyTorch (bitsandbytes' ``MatMul8bitFp``, the forward and backward ``Linear8bitLt`` runs when
training on a CPU, plus HF PEFT's LoRA branch with fastpeft's Philox dropout mask)::

    W = weight.to(x.dtype).mul_(row_scale.unsqueeze(1).mul(1.0 / 127.0))           # [N, K]
    y = F.linear(x, W, bias) + scale * F.linear(F.linear(drop(x), lora_A), lora_B)
    drop(x) = x * keep / (1 - dropout_p),  keep = philox.dropout_keep_mask(seed, M, K, dropout_p)

Shapes: x [..., K] (M = product of the leading dims, may be 0), weight int8 [N, K] (bitsandbytes' ``CB``),
row_scale fp32 [N] (``SCB``, each row's absolute maximum), bias [N] or None, lora_A [r, K], lora_B [N, r];
y [..., N] in x's dtype.

This is weight-only dequantisation.  bitsandbytes' LLM.int8() forward (``MatMul8bitLt``: on CUDA, and on
the CPU in eval mode) also quantises the activations to int8 row by row, which this op does not; the LoRA
layers (:mod:`fastpeft.tuners.lora_quant`) therefore run it only where bitsandbytes itself computes with
the dequantised weight, and keep bitsandbytes' forward elsewhere.  The backward's dX is bitsandbytes' in
both cases (``dY · CB · SCB / 127``).

Kernels: the ``cpu`` backend (``csrc/lora_linear_8bit/``) decodes cache-sized tiles of W's rows into a
buffer that BLAS consumes (forward ``y[:, tile] += x tileᵀ``, backward ``dX += dY[:, tile] tile``), the
``triton`` backend decodes inside the GEMM's K loop (``triton_kernel.py``), the ``torch`` backend
(reference and oracle) dequantises the whole weight.  dA / dB / db as :func:`fastpeft.ops.lora_linear` (same
Philox mask, same seed convention); the int8 weight and its scales get no gradient.

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/lora_linear_8bit/``,
``tests/ops/test_lora_linear_8bit.py``, ``fastpeft/bench/cases/ops/lora_linear_8bit.py``,
``benchmarks/bench_lora_linear_8bit.py``; the LoRA layers that run it: ``fastpeft/tuners/lora_quant.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...backends import define_op
from .._checks import check_lora_factors, check_lora_scale_dropout, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import dequantize_8bit_torch, lora_linear_8bit_reference, quantize_8bit_torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_RANK = 256


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    M, K, N, r = 2, 8, 5, 2
    w, s = quantize_8bit_torch(torch.randn(N, K, generator=torch.Generator().manual_seed(0)))
    return (randn(M, K), w.to(device), s.to(device), randn(N), randn(r, K, scale=K ** -0.5),
            randn(N, r, scale=r ** -0.5), 1.0, 0.1, 0)


OP = define_op("lora_linear_8bit", example=_example)


def int8_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """``weight`` as a plain contiguous int8 tensor (bitsandbytes' ``Int8Params`` is a Parameter subclass)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected an int8 tensor [N, K], got {type(weight).__name__}")
    w = weight.detach()
    if type(w) is not torch.Tensor and not isinstance(w, torch._subclasses.FakeTensor):
        w = w.as_subclass(torch.Tensor)
    return w.contiguous()


def _check_args(x, weight, row_scale, bias, lora_A, lora_B, scale, dropout_p, seed):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., K] with K >= 1, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=(2,), dtypes=(torch.int8,))
    N = weight.shape[0]
    if weight.shape[1] != K or N < 1:
        raise ValueError(f"weight: expected an int8 [N, {K}] weight with N >= 1 (K = x.shape[-1]), "
                         f"got shape {tuple(weight.shape)}")
    check_tensor("row_scale", row_scale, ndim=(1,), dtypes=(torch.float32,))
    if row_scale.shape[0] != N:
        raise ValueError(f"row_scale: expected shape [{N}] (one scale per row of weight), got {tuple(row_scale.shape)}")
    check_lora_factors(x, N, "weight.shape[0]", bias, lora_A, lora_B)
    check_same_device("x", x, weight=weight, row_scale=row_scale, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return check_lora_scale_dropout(scale, dropout_p, seed)


def lora_linear_8bit(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor, bias: Optional[torch.Tensor],
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                     seed: Optional[int] = None) -> torch.Tensor:
    """LoRA linear layer over an int8 weight: ``y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ``,
    ``W = weight · row_scale / 127`` (bitsandbytes' dequantisation, rounded once to x's dtype).

    Args:
        x: [..., K] activations (fp32/fp16/bf16; fp64 on the torch and cpu backends).
        weight: int8 [N, K] (``Linear8bitLt``'s ``state.CB``, or ``weight.data`` once quantised).
        row_scale: fp32 [N] (``state.SCB`` / ``weight.SCB``).
        bias: [N] or None, dtype of x.
        lora_A: [r, K], dtype of x or float32; lora_B: [N, r], dtype of lora_A.
        scale: LoRA scaling; dropout_p: in [0, 1); seed: Philox seed (None: drawn from torch's generator).

    Returns:
        y: [..., N] in x's dtype.  Differentiable in x, bias, lora_A, lora_B.

    Equivalent PyTorch: the module doc (:func:`reference.lora_linear_8bit_reference`).
    """
    w = int8_weight(weight)
    scale, dropout_p, seed = _check_args(x, w, row_scale, bias, lora_A, lora_B, scale, dropout_p, seed)
    return OP(x, w, row_scale.contiguous(), bias, lora_A, lora_B, scale, dropout_p, seed)


# -- shared by the compiled and Triton ops -------------------------------------------
#   <fwd>(x, weight, row_scale, bias, lora_A, lora_B, scale, p, seed) -> (y, u0 [M, r])
#   <bwd>(dy, x, weight, row_scale, lora_A, lora_B, u0, scale, p, seed, needs[4]) -> (dx, db, dA, dB)
#       needs = (x, bias, lora_A, lora_B); not needed: empty [0]
def _fwd_fake(x, weight, row_scale, bias, lora_A, lora_B, scale, dropout_p, seed):
    lead = tuple(x.shape[:-1])
    return x.new_empty((*lead, weight.shape[0])), x.new_empty((math.prod(lead), lora_A.shape[0]))


def _bwd_fake(dy, x, weight, row_scale, lora_A, lora_B, u0, scale, dropout_p, seed, needs):
    def grad(like, shape, need):
        return like.new_empty(tuple(shape) if need else (0,))

    return (grad(x, x.shape, needs[0]), grad(x, (weight.shape[0],), needs[1]), grad(lora_A, lora_A.shape, needs[2]),
            grad(lora_B, lora_B.shape, needs[3]))


def _setup_context(ctx, inputs, output):
    x, weight, row_scale, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, row_scale, lora_A, lora_B, output[1])
    ctx.scale, ctx.p, ctx.seed = scale, dropout_p, seed
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _make_backward(bwd):
    # Backward of y = x Wᵀ + b + s·D(x) Aᵀ Bᵀ with W frozen (lora_linear's derivation without dW):
    #   G = s dY B;  dB = s dYᵀ U0;  dA = Gᵀ D(x);  dX = dY W + D(G A);  db = Σ_rows dY
    def backward(ctx, dy, du0):
        x, weight, row_scale, lora_A, lora_B, u0 = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [bool(n[0]), bool(n[3] and ctx.has_bias), bool(n[4]), bool(n[5])]
        dx, db, da, dbb = bwd(dy.to(x.dtype), x, weight, row_scale, lora_A, lora_B, u0, ctx.scale, ctx.p, ctx.seed,
                              needs)
        if needs[1]:
            db = db.to(ctx.bias_dtype)
        return (dx if needs[0] else None, None, None, db if needs[1] else None, da if needs[2] else None,
                dbb if needs[3] else None, None, None, None)

    return backward


# -- cpu: torch.ops.fastpeft.lora_linear_8bit_fwd / _bwd (csrc/lora_linear_8bit/) ---------
compiled_op("lora_linear_8bit_bwd", fake=_bwd_fake)
compiled_op("lora_linear_8bit_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.lora_linear_8bit_bwd(*a)))


def _lora_linear_8bit_cpu(*args):
    return torch.ops.fastpeft.lora_linear_8bit_fwd(*args)[0]


# -- triton: torch.ops.fastpeft.lora_linear_8bit_triton_fwd / _bwd ------------------------
@triton_op("lora_linear_8bit_triton_bwd", fake=_bwd_fake)
def _lora_linear_8bit_triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor,
                                 lora_A: torch.Tensor, lora_B: torch.Tensor, u0: torch.Tensor, scale: float,
                                 dropout_p: float, seed: int, needs: list[bool]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernel import lora_linear_8bit_bwd_triton

    return lora_linear_8bit_bwd_triton(dy, x, weight, row_scale, lora_A, lora_B, u0, scale, dropout_p, seed, needs)


@triton_op("lora_linear_8bit_triton_fwd", fake=_fwd_fake, setup_context=_setup_context,
           backward=_make_backward(_lora_linear_8bit_triton_bwd))
def _lora_linear_8bit_triton_fwd(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor,
                                 bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                                 dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import lora_linear_8bit_fwd_triton

    return lora_linear_8bit_fwd_triton(x, weight, row_scale, bias, lora_A, lora_B, scale, dropout_p, seed)


def _lora_linear_8bit_triton(*args):
    return _lora_linear_8bit_triton_fwd(*args)[0]


def _rank_fits_triton(x, weight, row_scale, bias, lora_A, *args, forced):
    r = lora_A.shape[0]
    return None if r <= MAX_TRITON_RANK else f"triton backend supports ranks up to {MAX_TRITON_RANK}, got {r}"


# -- backends ------------------------------------------------------------------------
register_backend(OP, "torch")(lora_linear_8bit_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["lora_linear_8bit_fwd", "lora_linear_8bit_bwd"])(
    _lora_linear_8bit_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_rank_fits_triton)(_lora_linear_8bit_triton)

__all__ = ["lora_linear_8bit", "int8_weight", "dequantize_8bit_torch", "quantize_8bit_torch", "OP"]
