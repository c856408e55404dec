"""``swiglu`` and ``geglu``: the gated MLP activation ``act(gate) * up``, forward and backward fused.

Equivalent PyTorch (transformers' ``LlamaMLP`` / ``GemmaMLP``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``)::

    swiglu(gate, up)               = F.silu(gate) * up                      # ACT2FN["silu"]
    geglu(gate, up, "tanh")        = F.gelu(gate, approximate="tanh") * up  # ACT2FN["gelu_pytorch_tanh"]
    geglu(gate, up, "none")        = F.gelu(gate) * up                      # ACT2FN["gelu"]

Shapes: gate and up [..., N] of one shape and dtype, any strides (e.g. the two halves of a fused
``gate_up_proj`` output, ``chunk(2, -1)``, are read in place); the fused backends' output is contiguous.

Numerics: the activation is computed in float32 (float64 for float64) and rounded to the input dtype
before the product, as the unfused ``act_fn(gate)`` tensor is; the product is rounded once.  The backward
rounds where PyTorch's autograd of that composition rounds.  So a patched MLP gives transformers'
numbers up to the float32 activation's last bit (for bf16/fp16, nearly always the same bits).

Backward (g = dL/dy; a = act(gate) rounded as in forward), recomputing the activation from gate
instead of saving it; saved: gate and up only::

    y      = a(gate) * up
    d up   = g * dy/dup   = g * a
    d gate = g * dy/dgate = (g * up) * act'(gate)   # silu' = s (1 + x (1 - s)), s = sigmoid(x);
                                                    # gelu' = Φ(x) + x φ(x);
                                                    # gelu_tanh' = (1 + t)/2 + x/2 (1 - t²) u'(x), t = tanh(u(x))

Drop-in for LlamaMLP.forward: ``self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))``;
GemmaMLP (hidden_activation "gelu_pytorch_tanh"): ``geglu(..., approximate="tanh")``.

Backends (each op): ``torch`` (:mod:`.reference`), ``cpu`` (C++, ``csrc/glu/``: float32, float64,
bfloat16), ``triton`` (GPU: float32/float16/bfloat16).  One kernel family serves both ops
(``fastpeft::glu_fwd/_bwd`` with the activation as an argument).

Files of these ops: ``reference.py``, ``triton_kernel.py``, ``csrc/glu/``, ``tests/ops/test_glu.py``,
``fastpeft/bench/cases/ops/glu.py`` (benchmark cases), ``benchmarks/bench_glu.py``; one line in
``fastpeft/ops/__init__.py``.
"""
from __future__ import annotations

import torch

from ...backends import define_op
from .._checks import check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import GELU_KERNEL_ACT, geglu_reference, swiglu_reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gate_up(device, dtype):
    """gate and up [3, 40] of ``dtype`` (gate spread over the activations' curved part)."""
    randn = random_tensors(device, dtype)
    return randn(3, 40, scale=2.0), randn(3, 40)


SWIGLU = define_op("swiglu", example=_gate_up)
GEGLU = define_op("geglu", example=lambda device, dtype: (*_gate_up(device, dtype), "tanh"))


def _check_args(gate, up):
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor("up", up)
    if gate.dim() < 1:
        raise ValueError(f"gate: expected a tensor [..., N] with at least 1 dim, got shape {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected shape {tuple(gate.shape)} (the shape of gate), got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected dtype {gate.dtype} (the dtype of gate), got {up.dtype}")
    check_same_device("gate", gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``F.silu(gate) * up`` (differentiable in gate and up).

    Args:
        gate: [..., N] (float32/bfloat16/float16/float64), any strides, may be empty.
        up: gate's shape and dtype, any strides.

    Returns:
        y: gate's shape and dtype (contiguous from the fused backends).  See the module doc for numerics
            and the backward.
    """
    _check_args(gate, up)
    return SWIGLU(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU ``F.gelu(gate, approximate=approximate) * up`` (differentiable in gate and up).

    Args:
        gate: [..., N] (float32/bfloat16/float16/float64), any strides, may be empty.
        up: gate's shape and dtype, any strides.
        approximate: ``"tanh"`` (transformers' "gelu_pytorch_tanh", Gemma's default) or ``"none"``
            (exact erf GELU, "gelu").

    Returns:
        y: gate's shape and dtype (contiguous from the fused backends).  See the module doc for numerics
            and the backward.
    """
    _check_args(gate, up)
    if not isinstance(approximate, str) or approximate not in GELU_KERNEL_ACT:
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")
    return GEGLU(gate, up, approximate)


# -- shared by the fused backends: fake shapes and autograd -------------------------
# Forward op (gate, up, activation) -> y; backward op (grad_y, gate, up, activation) -> (dgate, dup);
# activation is "silu", "gelu" or "gelu_tanh".
def _fwd_fake(gate, up, activation):
    return gate.new_empty(gate.shape)


def _bwd_fake(grad_y, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)  # the activation is recomputed, not saved
    ctx.activation = activation


def _make_backward(bwd):
    def backward(ctx, grad_y):
        gate, up = ctx.saved_tensors
        dgate, dup = bwd(grad_y, gate, up, ctx.activation)
        return (dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None, None)

    return backward


# -- cpu: torch.ops.fastpeft.glu_fwd / _bwd (csrc/glu/) ------------------------------------------
compiled_op("glu_bwd", fake=_bwd_fake)
compiled_op("glu_fwd", fake=_fwd_fake, setup_context=_setup_context,
            backward=_make_backward(lambda *a: torch.ops.fastpeft.glu_bwd(*a)))


def _glu_cpu(gate, up, activation):
    return torch.ops.fastpeft.glu_fwd(gate, up, activation)


# -- triton: torch.ops.fastpeft.glu_triton_fwd / _bwd ------------------------------------------------
@triton_op("glu_triton_bwd", fake=_bwd_fake)
def _glu_triton_bwd(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernel import glu_bwd_triton

    return glu_bwd_triton(grad_y, gate, up, activation)


@triton_op("glu_triton_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_make_backward(_glu_triton_bwd))
def _glu_triton_fwd(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    from .triton_kernel import glu_fwd_triton

    return glu_fwd_triton(gate, up, activation)


# -- backends: one kernel family, the activation an argument -------------------------------------
def _swiglu_on(fwd):
    return lambda gate, up: fwd(gate, up, "silu")


def _geglu_on(fwd):
    return lambda gate, up, approximate: fwd(gate, up, GELU_KERNEL_ACT[approximate])


_COMPILED = ["glu_fwd", "glu_bwd"]
register_backend(SWIGLU, "torch")(swiglu_reference)
register_backend(SWIGLU, "cpu", dtypes=CPU_DTYPES, needs=_COMPILED)(_swiglu_on(_glu_cpu))
register_backend(SWIGLU, "triton", dtypes=GPU_DTYPES)(_swiglu_on(_glu_triton_fwd))
register_backend(GEGLU, "torch")(geglu_reference)
register_backend(GEGLU, "cpu", dtypes=CPU_DTYPES, needs=_COMPILED)(_geglu_on(_glu_cpu))
register_backend(GEGLU, "triton", dtypes=GPU_DTYPES)(_geglu_on(_glu_triton_fwd))

__all__ = ["swiglu", "geglu", "swiglu_reference", "geglu_reference", "SWIGLU", "GEGLU"]
