"""swiglu / geglu, Triton kernels and launchers (imported lazily, only where Triton runs).

Elementwise over [M, N] rows (gate and up with their own row strides, unit column stride; outputs
contiguous): program (row, column block).  Float32 math with the formulas and operation order of
PyTorch's CUDA activation kernels, and on a GPU the same libm (CUDA's expf / tanhf / erff through
libdevice), so the results agree with PyTorch's nearly always to the bit; the activation is rounded
to the input dtype before the product (see the package doc).  The interpreter has no libdevice
(LIBDEVICE=False): there exp is tl.exp and tanh is computed from it.  Row offsets int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..._triton import interpreter_on

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
BLOCK = 1024


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:  # CUDA's expf, what PyTorch's kernels call
        out = libdevice.exp(x)
    else:
        out = tl.exp(x)
    return out


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        out = libdevice.tanh(x)
    else:  # the interpreter has no libdevice
        out = 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0
    return out


@triton.jit
def _act(g, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    # PyTorch's CUDA formulas (activation kernels), float32.
    if ACT == 0:
        out = g / (1.0 + _exp(-g, LIBDEVICE))
    elif ACT == 1:
        out = g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        out = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * (g * g * g)), LIBDEVICE))
    return out


@triton.jit
def _act_backward(dy, g, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    # dy * act'(g), in the operation order of PyTorch's CUDA silu/gelu backward kernels.
    if ACT == 0:
        s = 1.0 / (1.0 + _exp(-g, LIBDEVICE))
        out = dy * s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = _exp(-0.5 * g * g, LIBDEVICE) * 0.3989422804014327
        out = dy * (cdf + g * pdf)
    else:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * (g * g * g)), LIBDEVICE)
        dinner = 0.7978845608028654 * (1.0 + 0.134145 * (g * g))
        out = dy * (0.5 * (1.0 + t) + (0.5 * g) * (1.0 - t * t) * dinner)
    return out


@triton.jit
def _glu_kernel(g_ptr, stride_g, u_ptr, stride_u, dy_ptr, out_ptr, dup_ptr, N, ACT: tl.constexpr,
                LIBDEVICE: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    # Forward: out = y.  Backward (dy given): out = dgate, dup_ptr = dup.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    DT = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    a = _act(g, ACT, LIBDEVICE).to(DT).to(tl.float32)  # the activation as the unfused act_fn(gate) stores it
    if BACKWARD:
        dy = tl.load(dy_ptr + row * N + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dup_ptr + row * N + cols, (dy * a).to(DT), mask=m)
        da = (dy * u).to(DT).to(tl.float32)
        tl.store(out_ptr + row * N + cols, _act_backward(da, g, ACT, LIBDEVICE).to(DT), mask=m)
    else:
        tl.store(out_ptr + row * N + cols, (a * u).to(DT), mask=m)


def _rows(t: torch.Tensor, M: int, N: int) -> torch.Tensor:
    """t as [M, N] with unit column stride (a view when possible)."""
    t2 = t.reshape(M, N)
    return t2.contiguous() if N > 1 and t2.stride(1) != 1 else t2


def _launch(gate, up, dy, out, dup, activation, backward):
    N = gate.shape[-1]
    M = gate.numel() // N if N else 0
    if M and N:
        g, u = _rows(gate, M, N), _rows(up, M, N)
        _glu_kernel[(M, triton.cdiv(N, BLOCK))](g, g.stride(0), u, u.stride(0), dy, out, dup, N,
                                                ACT=ACT_CODES[activation], LIBDEVICE=not interpreter_on(),
                                                BACKWARD=backward, BLOCK=BLOCK, num_warps=4)


def glu_fwd_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch(gate, up, y, y, y, activation, False)  # dy and dup unused forward
    return y


def glu_bwd_triton(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch(gate, up, grad_y.contiguous(), dg, du, activation, True)
    return dg, du


def aot_launches() -> None:
    """Every launch this module must compile for on a GPU, on CPU tensors (the ahead-of-time check
    records them instead of running them and compiles each to a cubin)."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for act in ACT_CODES:
            g = torch.zeros(3, 1500, dtype=dt)
            glu_fwd_triton(g, g, act)
            glu_bwd_triton(g, g, g, act)
