"""``bottleneck_adapter``: the fused Houlsby/Pfeiffer bottleneck adapter.

Equivalent PyTorch (x: [..., H], W_down: [Bn, H], b_down: [Bn] or None,
W_up: [H, Bn], b_up: [H] or None; M = x.numel() // H rows)::

    x2 = x.reshape(-1, H)                                   # [M, H]
    h  = x2 @ W_down.T + b_down                             # [M, Bn] pre-activation
    a  = act(h)                                             # relu | gelu (erf) | gelu_tanh | silu
    d  = a * keep / (1 - p)                                 # keep = dropout_keep_mask(seed, M, Bn, p, stream=1)
    y  = (x2 if residual else 0) + d @ W_up.T + b_up        # [M, H]
    return y.reshape(x.shape)

The dropout mask covers the logical [M, Bn] activation and comes from the shared
Philox RNG (:mod:`fastpeft.kernels.philox`, stream 1), so one seed drops the
same elements on every backend; the fused kernels generate it in registers and
regenerate it in backward, never storing it.

Backends: ``torch`` (:mod:`.reference`, the plain unfused adapter and the test
oracle), ``cpu`` (C++: ATen BLAS GEMMs around torch-free fused bias + activation
+ dropout kernels, ``csrc/bottleneck_adapter/``), ``triton`` (GPU; kernel 1:
down-projection + bias + activation + dropout, kernel 2: up-projection + bias +
residual; fused backward).

Mixed precision: the parameters may have another float dtype than ``x`` (fp32
adapter weights with bf16/fp16 activations); the computation runs in ``x.dtype``
and parameter gradients come back in each parameter's own dtype.

Saved for backward by the fused backends: ``x`` itself and the [M, Bn]
pre-activation ``h`` -- nothing else of size M×H, no mask.

Backward (g = dY [M, H]; keep, s = 1/(1-p); a = act(h); d = a*keep*s)::

    y      = r*x + d W_upᵀ + b_up          (r = 1 if residual else 0)
    dW_up  = gᵀ d                          # [H, Bn]
    db_up  = Σ_rows g                      # [H]
    dd     = g W_up                        # [M, Bn]
    dh     = dd * keep * s * act'(h)       # chain rule through d = act(h)*keep*s
    dW_down= dhᵀ x                         # [Bn, H]
    db_down= Σ_rows dh                     # [Bn]
    dX     = r*g + dh W_down               # [M, H]

Files of this op: ``reference.py``, ``triton_kernel.py``, ``csrc/bottleneck_adapter/``,
``tests/ops/test_bottleneck_adapter.py``, ``fastpeft/bench/cases/ops/bottleneck_adapter.py``,
``benchmarks/bench_bottleneck_adapter.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import define_op
from ...kernels.philox import MAX_SEED
from .._checks import check_float, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import ACTIVATIONS, DROPOUT_STREAM, adapter_keep_mask, bottleneck_adapter_reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    H, Bn = 8, 4
    return (randn(2, H), randn(Bn, H, scale=H ** -0.5), randn(Bn), randn(H, Bn, scale=Bn ** -0.5), randn(H),
            "relu", 0.1, 0, True)


OP = define_op("bottleneck_adapter", example=_example)


def bottleneck_adapter(x: torch.Tensor, W_down: torch.Tensor, b_down: Optional[torch.Tensor],
                       W_up: torch.Tensor, b_up: Optional[torch.Tensor], activation: str = "relu",
                       dropout_p: float = 0.0, seed: Optional[int] = None, residual: bool = True) -> torch.Tensor:
    """Bottleneck adapter ``y = x + drop(act(x W_downᵀ + b_down)) W_upᵀ + b_up`` (differentiable).

    Args:
        x: [..., H] activations (float32/bfloat16 on CPU, also float16 on GPU); any strides; may be empty.
        W_down: [Bn, H] down-projection weight.
        b_down: [Bn] down-projection bias, or None.
        W_up: [H, Bn] up-projection weight.
        b_up: [H] up-projection bias, or None.
        activation: ``"relu"``, ``"gelu"`` (exact erf GELU), ``"gelu_tanh"`` or ``"silu"``.
        dropout_p: dropout rate in [0, 1) on the [M, Bn] activation (inverted dropout).
        seed: Philox seed of the dropout mask, int in [0, 2**63); with ``dropout_p > 0`` and
            ``seed=None`` one is drawn from torch's default CPU generator (eager only: under
            ``torch.compile`` pass an explicit seed, e.g. a step counter, to stay in one graph).
        residual: add ``x`` to the output (``False``: return only the adapter branch).

    Returns:
        y with the shape and dtype of ``x`` (contiguous).

    Parameters may have another float dtype than ``x``: the computation runs in
    ``x.dtype``, their gradients come back in their own dtype.  See the module
    doc for the equivalent PyTorch and the derivation of the backward.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor [..., H] with at least 1 dim and H >= 1, got shape {tuple(x.shape)}")
    H = x.shape[-1]
    check_tensor("W_down", W_down, ndim=(2,), dtypes=FLOAT_DTYPES)
    Bn = W_down.shape[0]
    if W_down.shape[1] != H or Bn < 1:
        raise ValueError(f"W_down: expected shape [Bn, H] = [Bn >= 1, {H}] (H = x.shape[-1]), "
                         f"got {tuple(W_down.shape)}")
    check_tensor("W_up", W_up, ndim=(2,), dtypes=FLOAT_DTYPES)
    if tuple(W_up.shape) != (H, Bn):
        raise ValueError(f"W_up: expected shape [H, Bn] = [{H}, {Bn}] (from x and W_down), got {tuple(W_up.shape)}")
    check_tensor("b_down", b_down, dtypes=FLOAT_DTYPES, allow_none=True)
    if b_down is not None and tuple(b_down.shape) != (Bn,):
        raise ValueError(f"b_down: expected shape [Bn] = [{Bn}] or None, got {tuple(b_down.shape)}")
    check_tensor("b_up", b_up, dtypes=FLOAT_DTYPES, allow_none=True)
    if b_up is not None and tuple(b_up.shape) != (H,):
        raise ValueError(f"b_up: expected shape [H] = [{H}] or None, got {tuple(b_up.shape)}")
    check_same_device("x", x, W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    p = check_float("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if not isinstance(residual, bool):
        raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
    if p > 0.0:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int in [0, 2**63) or None, got {type(seed).__name__}")
        elif not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed: expected an int in [0, 2**63) or None, got {seed}")
    else:
        seed = 0  # unused without dropout; a constant keeps compiled graphs seed-independent
    return OP(x, W_down, b_down, W_up, b_up, activation, p, seed, residual)


# -- shared by the fused backends: fake shapes and autograd ------------------
# Each fused backend has a forward op returning (y, h) -- h = x W_downᵀ + b_down
# [M, Bn] is all that backward needs besides x -- and a backward op returning
# (dx, dW_down, db_down, dW_up, db_up); gradients not asked for (need_* False, or
# an absent bias) come back as empty [0] tensors.  The backward follows the
# derivation in the module doc; grad_h (None unless h itself was used) is added
# to dh.
def _fwd_fake(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual):
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((M, W_down.shape[0]))


def _bwd_fake(grad_y, grad_h, x, h, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual,
              need_dx, need_down, need_up):
    def none():
        return x.new_empty((0,))

    return (x.new_empty(x.shape) if need_dx else none(),
            W_down.new_empty(W_down.shape) if need_down else none(),
            b_down.new_empty(b_down.shape) if need_down and b_down is not None else none(),
            W_up.new_empty(W_up.shape) if need_up else none(),
            b_up.new_empty(b_up.shape) if need_up and b_up is not None else none())


def _setup_context(ctx, inputs, output):
    x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual = inputs
    ctx.save_for_backward(x, output[1], W_down, b_down, W_up, b_up)  # x and h [M, Bn]: no M×H copy, no mask
    ctx.config = (activation, dropout_p, seed, residual)


def _autograd_backward(bwd_op):
    def backward(ctx, grad_y, grad_h):
        x, h, W_down, b_down, W_up, b_up = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_y is None:
            grad_y = torch.zeros_like(x, memory_format=torch.contiguous_format)
        dx, dWd, dbd, dWu, dbu = bwd_op(grad_y, grad_h, x, h, W_down, b_down, W_up, b_up, *ctx.config,
                                        need[0], need[1] or need[2], need[3] or need[4])
        return (dx if need[0] else None, dWd if need[1] else None, dbd if need[2] else None,
                dWu if need[3] else None, dbu if need[4] else None, None, None, None, None)

    return backward


# -- cpu: torch.ops.fastpeft.bottleneck_adapter_fwd / _bwd (csrc/bottleneck_adapter/) --
compiled_op("bottleneck_adapter_bwd", fake=_bwd_fake)
compiled_op("bottleneck_adapter_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_autograd_backward(lambda *a: torch.ops.fastpeft.bottleneck_adapter_bwd(*a)))


def _bottleneck_adapter_cpu(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual):
    return torch.ops.fastpeft.bottleneck_adapter_fwd(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed,
                                                     residual)[0]


# -- triton: torch.ops.fastpeft.bottleneck_adapter_triton_fwd / _bwd -----------------
@triton_op("bottleneck_adapter_triton_bwd", fake=_bwd_fake)
def _triton_bwd(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], x: torch.Tensor, h: torch.Tensor,
                W_down: torch.Tensor, b_down: Optional[torch.Tensor], W_up: torch.Tensor, b_up: Optional[torch.Tensor],
                activation: str, dropout_p: float, seed: int, residual: bool, need_dx: bool, need_down: bool,
                need_up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernel import adapter_bwd_triton

    return adapter_bwd_triton(grad_y, grad_h, x, h, W_down, b_down, W_up, b_up, activation, dropout_p, seed,
                              residual, need_dx, need_down, need_up)


@triton_op("bottleneck_adapter_triton_fwd", fake=_fwd_fake, setup_context=_setup_context,
           backward=_autograd_backward(lambda *a: _triton_bwd(*a)))
def _triton_fwd(x: torch.Tensor, W_down: torch.Tensor, b_down: Optional[torch.Tensor], W_up: torch.Tensor,
                b_up: Optional[torch.Tensor], activation: str, dropout_p: float, seed: int,
                residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import adapter_fwd_triton

    return adapter_fwd_triton(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual)


def _bottleneck_adapter_triton(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual):
    return _triton_fwd(x, W_down, b_down, W_up, b_up, activation, dropout_p, seed, residual)[0]


def _no_bf16_dot_in_interpreter(x, *args, forced):
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "the Triton interpreter has no bfloat16 tl.dot"
    return None


# -- backends ----------------------------------------------------------------------
register_backend(OP, "torch")(bottleneck_adapter_reference)
register_backend(OP, "cpu", dtypes=CPU_DTYPES, needs=["bottleneck_adapter_fwd", "bottleneck_adapter_bwd"])(
    _bottleneck_adapter_cpu)
register_backend(OP, "triton", dtypes=GPU_DTYPES, also=_no_bf16_dot_in_interpreter)(_bottleneck_adapter_triton)

__all__ = ["bottleneck_adapter", "bottleneck_adapter_reference", "adapter_keep_mask", "ACTIVATIONS",
           "DROPOUT_STREAM", "OP"]
