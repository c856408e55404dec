"""``rms_norm``: RMSNorm of the last dim, scaled by ``offset + weight``, forward and backward fused.

Equivalent PyTorch (A = float32, float64 for float64 x; transformers' two orders, see
:mod:`.reference`)::

    h = x.to(A)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = offset + weight.to(A)
    y = (n * w).to(x.dtype)                           # cast_before_weight=False (GemmaRMSNorm with offset=1)
    y = (w * n.to(x.dtype).to(A)).to(out_dtype)       # cast_before_weight=True  (LlamaRMSNorm: weight * n.to(x.dtype))

``out_dtype`` is ``torch.promote_types(x.dtype, weight.dtype)``, the dtype of LlamaRMSNorm's
``weight * hidden.to(input_dtype)``; without ``cast_before_weight`` the output has x's dtype.  The fused
kernels round where these compositions round, so a patched model gives the unpatched numbers up to the
order of the sum of squares (for bf16/fp16 outputs, nearly always the same bits).

Drop-in forwards::

    LlamaRMSNorm (Mistral, Qwen2/3, Phi3, Granite, GLM ...):
        rms_norm(hidden_states, self.weight, self.variance_epsilon, cast_before_weight=True)
    GemmaRMSNorm (Gemma, Gemma2, Gemma3):  rms_norm(x, self.weight, self.eps, offset=1.0)
    Olmo2RMSNorm ((weight * n).to(input_dtype)):  rms_norm(hidden_states, self.weight, self.variance_epsilon)

Shapes: x [..., H] (M rows = product of the leading dims, may be 0; any strides), weight [H].

Backward (g = dL/dy; the rounding n -> x.dtype has derivative 1), saving only x, weight and the
per-row rstd [M] (float32; float64 for float64 x)::

    rstd = (mean_k x_k² + eps)^(-1/2),  n_k = x_k rstd,  y_k = w_k n_k
    dn_k = g_k w_k
    dx_j = Σ_k dn_k dn_k/dx_j = dn_j rstd + Σ_k dn_k x_k drstd/dx_j
         = rstd (dn_j - n_j (1/H) Σ_k dn_k n_k)            (drstd/dx_j = -x_j rstd³ / H)
    dweight_k = Σ_rows g_k n'_k    (n' = n rounded to x.dtype with cast_before_weight, else n)

computed in float32 (float64 for float64 x); the weight gradient only when weight requires grad.

Backends: ``torch`` (:mod:`.reference`), ``cpu`` (C++, ``csrc/rms_norm/``: float32, float64, bfloat16,
and bfloat16 x with a float32 result), ``triton`` (GPU: float32/float16/bfloat16, H <= 32768; one row
per program forward, row-blocked programs with per-program weight-gradient partial sums backward).

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/rms_norm/``,
``tests/ops/test_rms_norm.py``, ``fastpeft/bench/cases/ops/rms_norm.py`` (benchmark cases),
``benchmarks/bench_rms_norm.py``; one line in ``fastpeft/ops/__init__.py``.
"""
from __future__ import annotations

import torch

from ...backends import define_op
from .._checks import check_float, check_same_device, check_tensor, dtype_pair_reason
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import acc_dtype, out_dtype, rms_norm_reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (x dtype, output dtype) pairs of the C++ kernels (csrc/common/torch_utils.h: dispatch_in_out_cpu).
CPU_PAIRS = ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32))
MAX_TRITON_H = 32768


def _example(device, dtype):
    """The arguments of ``OP``: 5 rows of 24 (x and weight of ``dtype``), Llama's order."""
    randn = random_tensors(device, dtype)
    return randn(5, 24, scale=2.0), randn(24, scale=0.3) + 1.0, 1e-6, 0.0, True


OP = define_op("rms_norm", example=_example)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = False) -> torch.Tensor:
    """RMSNorm ``y = x * rsqrt(mean(x², -1) + eps) * (offset + weight)``, computed in float32, differentiable.

    Args:
        x: [..., H] activations (float32/bfloat16/float16/float64), any strides, may have no rows.
        weight: [H], any float dtype (float64 only with float64 x).
        eps: added to the mean square, >= 0.
        offset: added to the weight (1.0 for Gemma's ``1 + weight``).
        cast_before_weight: round the normalised x to x's dtype before the weight product, as
            LlamaRMSNorm's ``weight * hidden.to(input_dtype)`` does; the output dtype is then
            ``promote_types(x.dtype, weight.dtype)``.  False: everything in float32 and one rounding
            to x's dtype (GemmaRMSNorm, Olmo2RMSNorm).

    Returns:
        y: x's shape (contiguous from the fused backends); dtype as above.

    See the module doc for the equivalent PyTorch and the derivation of the backward.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., H] with H >= 1, got shape {tuple(x.shape)}")
    H = x.shape[-1]
    check_tensor("weight", weight, ndim=(1,), dtypes=FLOAT_DTYPES)
    if weight.shape[0] != H:
        raise ValueError(f"weight: expected shape [{H}] (H = x.shape[-1]), got {tuple(weight.shape)}")
    if weight.dtype == torch.float64 and x.dtype != torch.float64:
        raise TypeError(f"weight: float64 needs float64 x (the computation runs in float32 for x of {x.dtype}); "
                        "convert the weight")
    check_same_device("x", x, weight=weight)
    eps = check_float("eps", eps, lo=0.0)
    offset = check_float("offset", offset)
    if not isinstance(cast_before_weight, bool):
        raise TypeError(f"cast_before_weight: expected a bool, got {type(cast_before_weight).__name__}")
    return OP(x, weight, eps, offset, cast_before_weight)


# -- shared by the compiled and Triton ops: fake shapes and autograd --------------------
# Each is a pair of ops: a forward op (x, weight, eps, offset, cast_before_weight) -> (y, rstd [M]) and
# a backward op (grad_y, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight) ->
# (dx, dweight), a gradient not asked for being an empty [0] tensor; autograd on the forward op calls
# the backward op.
def _fwd_fake(x, weight, eps, offset, cast_before_weight):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype(x.dtype, weight.dtype, cast_before_weight)),
            x.new_empty((M,), dtype=acc_dtype(x.dtype)))


def _bwd_fake(grad_y, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight):
    return (x.new_empty(x.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dweight else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight, output[1])  # x and rstd [M]: no normalised copy of x
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
    ctx.mark_non_differentiable(output[1])


def _make_backward(bwd):
    def backward(ctx, grad_y, grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        dx, dw = bwd(grad_y, x, weight, rstd, ctx.offset, ctx.cast_before_weight, need_dx, need_dw)
        return dx if need_dx else None, dw if need_dw else None, None, None, None

    return backward


# -- cpu: torch.ops.fastpeft.rms_norm_fwd / _bwd (csrc/rms_norm/) -------------------------------
compiled_op("rms_norm_bwd", fake=_bwd_fake)
compiled_op("rms_norm_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.rms_norm_bwd(*a)))


def _rms_norm_cpu(x, weight, eps, offset, cast_before_weight):
    return torch.ops.fastpeft.rms_norm_fwd(x, weight, eps, offset, cast_before_weight)[0]


def _cpu_pair(x, weight, eps, offset, cast_before_weight, forced):
    """The C++ kernels' (x, output) dtype pairs (csrc/common/torch_utils.h: dispatch_in_out_cpu)."""
    return dtype_pair_reason((x.dtype, out_dtype(x.dtype, weight.dtype, cast_before_weight)), CPU_PAIRS,
                             "cpu backend", "x/output")


# -- triton: torch.ops.fastpeft.rms_norm_triton_fwd / _bwd --------------------------------------
@triton_op("rms_norm_triton_bwd", fake=_bwd_fake)
def _rms_norm_triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                         offset: float, cast_before_weight: bool, need_dx: bool,
                         need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import rms_norm_bwd_triton

    return rms_norm_bwd_triton(grad_y, x, weight, rstd, offset, cast_before_weight, need_dx, need_dweight)


@triton_op("rms_norm_triton_fwd", fake=_fwd_fake, setup_context=_setup_context,
           backward=_make_backward(_rms_norm_triton_bwd))
def _rms_norm_triton_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                         cast_before_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import rms_norm_fwd_triton

    return rms_norm_fwd_triton(x, weight, eps, offset, cast_before_weight)


def _rms_norm_triton(x, weight, eps, offset, cast_before_weight):
    return _rms_norm_triton_fwd(x, weight, eps, offset, cast_before_weight)[0]


def _row_fits_triton(x, *args, forced):
    H = x.shape[-1]
    return None if H <= MAX_TRITON_H else f"triton backend takes rows of up to {MAX_TRITON_H} elements, got H = {H}"


# -- backends ----------------------------------------------------------------------------------
register_backend(OP, "torch")(rms_norm_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, also=_cpu_pair, needs=["rms_norm_fwd", "rms_norm_bwd"])(_rms_norm_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_row_fits_triton)(_rms_norm_triton)

__all__ = ["rms_norm", "rms_norm_reference", "OP"]
