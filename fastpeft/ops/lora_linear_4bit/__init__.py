"""``lora_linear_4bit``: a LoRA linear layer over a bitsandbytes 4-bit (NF4 / FP4) frozen weight (QLoRA),
forward and backward, with the dequantisation fused into the GEMMs and dropout fused in.

Equivalent PyTorch (HF PEFT's ``lora.bnb.Linear4bit`` forward with fastpeft's Philox dropout mask)::

    W = bitsandbytes.functional.dequantize_4bit(qweight, quant_state).to(x.dtype)     # [N, K]
    y = F.linear(x, W, bias) + scale * F.linear(F.linear(drop(x), lora_A), lora_B)
    drop(x) = x * keep / (1 - dropout_p),  keep = philox.dropout_keep_mask(seed, M, K, dropout_p)

Shapes: x [..., K] (M = product of the leading dims, may be 0), qweight the packed bytes of the [N, K]
weight (uint8, ``ceil(N*K/2)`` of them, any shape, e.g. ``Params4bit`` [ceil(N*K/2), 1]), bias [N] or
None, lora_A [r, K], lora_B [N, r]; y [..., N] in x's dtype.

The quantisation state travels as tensors and ints (what ``torch.library`` schemas take): ``absmax``
fp32 [ceil(N*K / blocksize)] (a double-quantised state's nested 8-bit absmax is dequantised to fp32 by
:func:`quant_state_args`, once per call; it is N*K/blocksize numbers, ~1.6% of the weight's), ``code``
fp32 [16] (the NF4 or FP4 table: the kernels take the table, not the type's name, so both types run
the same code), ``out_features`` N and ``blocksize`` (a power of two).  The public function takes a
bitsandbytes ``QuantState`` (or a :class:`Quant4bit`) and does that unpacking.

Kernels: the ``cpu`` backend (``csrc/lora_linear_4bit/``) decodes cache-sized tiles of W's rows into a
buffer that BLAS consumes, forward (``y[:, tile] += x tileᵀ``) and backward (``dX += dY[:, tile] tile``);
the ``triton`` backend decodes the nibbles inside the GEMM's K loop (``triton_kernel.py``); the ``torch``
backend (reference and oracle) dequantises the whole weight.  Backward computes dX through the
dequantised tiles, dA / dB / db as :func:`fastpeft.ops.lora_linear` (same Philox mask, same seed
convention); the quantised weight gets no gradient.

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/lora_linear_4bit/``,
``tests/ops/test_lora_linear_4bit.py``, ``fastpeft/bench/cases/ops/lora_linear_4bit.py``,
``benchmarks/bench_lora_linear_4bit.py``; the LoRA layers that run it: ``fastpeft/tuners/lora_quant.py``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ...backends import define_op
from .._checks import check_lora_factors, check_lora_scale_dropout, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import CODES, code_table, dequantize_4bit_torch, lora_linear_4bit_reference, quantize_4bit_torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_RANK = 256


class Quant4bit(NamedTuple):
    """A 4-bit quantisation state as tensors and ints (the op's arguments): fp32 ``absmax`` [blocks],
    fp32 ``code`` [16], ``blocksize``, the weight's ``shape`` (N, K)."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple


def quant_state_args(quant_state, name: str = "quant_state") -> Quant4bit:
    """:class:`Quant4bit` of a bitsandbytes ``QuantState`` (nested absmax dequantised to fp32:
    ``state2.code[absmax] * state2.absmax[i // state2.blocksize] + offset``, bitsandbytes'
    ``dequantize_blockwise``), or ``quant_state`` itself when it is a Quant4bit.  Errors name ``name``."""
    if isinstance(quant_state, Quant4bit):
        return quant_state
    if quant_state is None:
        raise ValueError(f"{name}: the 4-bit weight has no quantisation state (quant_state is None): it was "
                         "never quantised (bitsandbytes quantises a Params4bit when it is moved to a device, "
                         "e.g. layer.to('cpu') / .cuda(), or loaded with BitsAndBytesConfig)")
    qt = getattr(quant_state, "quant_type", None)
    if qt not in CODES:
        raise ValueError(f"{name}.quant_type: fastpeft's 4-bit LoRA supports 'nf4' and 'fp4', got {qt!r}")
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        i = torch.arange(absmax.numel(), device=absmax.device)
        absmax = (s2.code.float()[absmax.reshape(-1).long()] * s2.absmax.float()[i // s2.blocksize]
                  + float(quant_state.offset))
    code = quant_state.code
    if code is None or code.numel() != 16:
        code = code_table(qt, absmax.device)
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        raise ValueError(f"{name}.shape: expected the shape of a 2-D weight [N, K], got {shape}")
    return Quant4bit(absmax.reshape(-1).float().contiguous(), code.reshape(-1).float().contiguous(),
                     int(quant_state.blocksize), shape)


def packed_bytes(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """The packed weight as a flat contiguous uint8 tensor (bitsandbytes' ``quant_storage`` may be
    another dtype holding the same bytes)."""
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of packed 4-bit weights, got {type(qweight).__name__}")
    q = qweight.detach()
    if type(q) is not torch.Tensor and not isinstance(q, torch._subclasses.FakeTensor):
        q = q.as_subclass(torch.Tensor) if hasattr(q, "as_subclass") else q
    q = q.contiguous().reshape(-1)
    if q.dtype != torch.uint8:
        if q.dtype.is_floating_point or q.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            q = q.view(torch.uint8)
        else:
            raise TypeError(f"{name}: expected packed bytes (uint8 or a quant_storage dtype), got {q.dtype}")
    return q


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    M, K, N, r, bs = 2, 8, 5, 2, 32
    q, absmax, code = quantize_4bit_torch(torch.randn(N, K, generator=torch.Generator().manual_seed(0)), bs, "nf4")
    return (randn(M, K), q.reshape(-1).to(device), absmax.to(device), code.to(device), N, bs, randn(N),
            randn(r, K, scale=K ** -0.5), randn(N, r, scale=r ** -0.5), 1.0, 0.1, 0)


OP = define_op("lora_linear_4bit", example=_example)


def _check_args(x, qweight, qs: Quant4bit, bias, lora_A, lora_B, scale, dropout_p, seed):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., K] with K >= 1, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    N, Kq = qs.shape
    if Kq != K:
        raise ValueError(f"quant_state.shape: the weight is [{N}, {Kq}] but x has K = x.shape[-1] = {K}")
    bs = qs.blocksize
    if bs < 2 or bs & (bs - 1):
        raise ValueError(f"quant_state.blocksize: expected a power of two >= 2, got {bs}")
    if qweight.numel() < (N * K + 1) // 2:
        raise ValueError(f"qweight: a [{N}, {K}] 4-bit weight needs {(N * K + 1) // 2} packed bytes, "
                         f"got {qweight.numel()}")
    if qs.absmax.numel() < -(-N * K // bs):
        raise ValueError(f"quant_state.absmax: expected {-(-N * K // bs)} blocks of {bs}, got {qs.absmax.numel()}")
    if qs.code.numel() != 16:
        raise ValueError(f"quant_state.code: expected a [16] code table, got {tuple(qs.code.shape)}")
    check_lora_factors(x, N, "quant_state.shape[0]", bias, lora_A, lora_B)
    check_same_device("x", x, qweight=qweight, absmax=qs.absmax, code=qs.code, bias=bias, lora_A=lora_A,
                      lora_B=lora_B)
    return check_lora_scale_dropout(scale, dropout_p, seed)


def lora_linear_4bit(x: torch.Tensor, qweight: torch.Tensor, quant_state, bias: Optional[torch.Tensor],
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0,
                     seed: Optional[int] = None) -> torch.Tensor:
    """LoRA linear layer over a 4-bit weight: ``y = x dequant(W)ᵀ + b + scale · (drop(x) Aᵀ) Bᵀ``.

    Args:
        x: [..., K] activations, the compute dtype (fp32/fp16/bf16; fp64 on the torch and cpu backends).
        qweight: packed 4-bit weight of shape [N, K] (``Linear4bit.weight``: a ``Params4bit``).
        quant_state: its bitsandbytes ``QuantState`` (``weight.quant_state``; nf4 or fp4, nested or not,
            any blocksize) or a :class:`Quant4bit`.
        bias: [N] or None, dtype of x.
        lora_A: [r, K], dtype of x or float32; lora_B: [N, r], dtype of lora_A.
        scale: LoRA scaling; dropout_p: in [0, 1); seed: Philox seed (None: drawn from torch's generator).

    Returns:
        y: [..., N] in x's dtype.  Differentiable in x, bias, lora_A, lora_B.

    Equivalent PyTorch: the module doc (:func:`reference.lora_linear_4bit_reference`).
    """
    qs = quant_state_args(quant_state)
    q = packed_bytes(qweight)
    scale, dropout_p, seed = _check_args(x, q, qs, bias, lora_A, lora_B, scale, dropout_p, seed)
    return OP(x, q, qs.absmax, qs.code, int(qs.shape[0]), int(qs.blocksize), bias, lora_A, lora_B, scale,
              dropout_p, seed)


# -- shared by the compiled and Triton ops -------------------------------------------
#   <fwd>(x, qweight, absmax, code, N, blocksize, bias, lora_A, lora_B, scale, p, seed) -> (y, u0 [M, r])
#   <bwd>(dy, x, qweight, absmax, code, N, blocksize, lora_A, lora_B, u0, scale, p, seed, needs[4])
#       -> (dx, db, dA, dB)   needs = (x, bias, lora_A, lora_B); not needed: empty [0]
def _fwd_fake(x, qweight, absmax, code, out_features, blocksize, bias, lora_A, lora_B, scale, dropout_p, seed):
    lead = tuple(x.shape[:-1])
    return x.new_empty((*lead, out_features)), x.new_empty((math.prod(lead), lora_A.shape[0]))


def _bwd_fake(dy, x, qweight, absmax, code, out_features, blocksize, lora_A, lora_B, u0, scale, dropout_p, seed,
              needs):
    def grad(like, shape, need):
        return like.new_empty(tuple(shape) if need else (0,))

    return (grad(x, x.shape, needs[0]), grad(x, (out_features,), needs[1]), grad(lora_A, lora_A.shape, needs[2]),
            grad(lora_B, lora_B.shape, needs[3]))


def _setup_context(ctx, inputs, output):
    x, qweight, absmax, code, out_features, blocksize, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, qweight, absmax, code, lora_A, lora_B, output[1])
    ctx.n, ctx.bs, ctx.scale, ctx.p, ctx.seed = out_features, blocksize, scale, dropout_p, seed
    ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _make_backward(bwd):
    # Backward of y = x Wᵀ + b + s·D(x) Aᵀ Bᵀ with W frozen (lora_linear's derivation without dW):
    #   G = s dY B;  dB = s dYᵀ U0;  dA = Gᵀ D(x);  dX = dY W + D(G A);  db = Σ_rows dY
    def backward(ctx, dy, du0):
        x, qweight, absmax, code, lora_A, lora_B, u0 = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [bool(n[0]), bool(n[6] and ctx.has_bias), bool(n[7]), bool(n[8])]
        dx, db, da, dbb = bwd(dy.to(x.dtype), x, qweight, absmax, code, ctx.n, ctx.bs, lora_A, lora_B, u0,
                              ctx.scale, ctx.p, ctx.seed, needs)
        if needs[1]:
            db = db.to(ctx.bias_dtype)
        return (dx if needs[0] else None, None, None, None, None, None, db if needs[1] else None,
                da if needs[2] else None, dbb if needs[3] else None, None, None, None)

    return backward


# -- cpu: torch.ops.fastpeft.lora_linear_4bit_fwd / _bwd (csrc/lora_linear_4bit/) ---------
compiled_op("lora_linear_4bit_bwd", fake=_bwd_fake)
compiled_op("lora_linear_4bit_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.lora_linear_4bit_bwd(*a)))


def _lora_linear_4bit_cpu(*args):
    return torch.ops.fastpeft.lora_linear_4bit_fwd(*args)[0]


# -- triton: torch.ops.fastpeft.lora_linear_4bit_triton_fwd / _bwd ------------------------
@triton_op("lora_linear_4bit_triton_bwd", fake=_bwd_fake)
def _lora_linear_4bit_triton_bwd(dy: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                                 code: torch.Tensor, out_features: int, blocksize: int, lora_A: torch.Tensor,
                                 lora_B: torch.Tensor, u0: torch.Tensor, scale: float, dropout_p: float, seed: int,
                                 needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernel import lora_linear_4bit_bwd_triton

    return lora_linear_4bit_bwd_triton(dy, x, qweight, absmax, code, out_features, blocksize, lora_A, lora_B, u0,
                                       scale, dropout_p, seed, needs)


@triton_op("lora_linear_4bit_triton_fwd", fake=_fwd_fake, setup_context=_setup_context,
           backward=_make_backward(_lora_linear_4bit_triton_bwd))
def _lora_linear_4bit_triton_fwd(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                                 out_features: int, blocksize: int, bias: Optional[torch.Tensor],
                                 lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, dropout_p: float,
                                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import lora_linear_4bit_fwd_triton

    return lora_linear_4bit_fwd_triton(x, qweight, absmax, code, out_features, blocksize, bias, lora_A, lora_B,
                                       scale, dropout_p, seed)


def _lora_linear_4bit_triton(*args):
    return _lora_linear_4bit_triton_fwd(*args)[0]


def _rank_fits_triton(x, qweight, absmax, code, out_features, blocksize, bias, lora_A, *args, forced):
    r = lora_A.shape[0]
    return None if r <= MAX_TRITON_RANK else f"triton backend supports ranks up to {MAX_TRITON_RANK}, got {r}"


# -- backends ------------------------------------------------------------------------
register_backend(OP, "torch")(lora_linear_4bit_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["lora_linear_4bit_fwd", "lora_linear_4bit_bwd"])(
    _lora_linear_4bit_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_rank_fits_triton)(_lora_linear_4bit_triton)

__all__ = ["lora_linear_4bit", "Quant4bit", "quant_state_args", "packed_bytes", "dequantize_4bit_torch",
           "quantize_4bit_torch", "code_table", "OP"]
