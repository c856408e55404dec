"""grad_tail: the fused mixed-precision gradient tail (unscale + clip + overflow check).

PyTorch's fp16 recipe walks the gradients several times with per-tensor launches::

    scaler.unscale_(optimizer)                       # g *= 1/scale ; found_inf = any(!isfinite(g))
    total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)   # norm pass + g *= min(1, max_norm/(norm+1e-6))
    scaler.step(optimizer)                           # skipped if found_inf (host sync)

fastpeft does it in two multi-tensor passes whose number of launches does not
depend on the number of tensors:

* :func:`grad_tail` (pass 1, reads every gradient once, writes nothing)::

      multiplier, total_norm, found_inf = grad_tail(grads, inv_scale=1/scale, max_norm=1.0)

  - ``total_norm`` = ‖g · inv_scale‖₂ over all tensors (the *unscaled* norm, fp32 accumulation),
  - ``found_inf``  = 1.0 if any gradient holds inf/NaN else 0.0,
  - ``multiplier`` = ``inv_scale · min(1, max_norm / (total_norm + eps))``, or 0.0 when ``found_inf``
    (``inv_scale`` alone when ``max_norm`` is None),

  all three float32 tensors of shape ``()`` on the gradients' device, computed on the device
  (no host synchronisation).
* :func:`grad_tail_apply_` (pass 2, light): ``g *= multiplier`` in place for every gradient, one
  launch; it writes nothing when the multiplier is exactly 1 (bf16/fp32 without clipping active).
  When ``found_inf`` is set the multiplier is 0 and inf·0 = NaN: skip the optimizer step then
  (``fastpeft.amp.GradScaler`` does, and does not run this pass at all on overflow).
* :func:`grad_tail_` does both and returns the stats.

Equivalent PyTorch (what the tests compare with)::

    for g in grads: g.mul_(inv_scale)                                   # unscale_
    found_inf = any(not torch.isfinite(g).all() for g in grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    for g in grads: g.mul_(min(1, max_norm / (norm + 1e-6)))              # clip_grad_norm_

Launches per call, whatever the number of tensors: CPU, one dispatcher op per pass
(``fastpeft::grad_tail_stats``, ``fastpeft::grad_tail_apply_``); CUDA, per pass one async
host-to-device copy of the packed tensor table + one kernel (plus one fill when ``inv_scale``
is a Python float).  PyTorch's ``unscale_`` + ``clip_grad_norm_`` issue per-tensor ops (or
foreach launches chunked by tensor count) and read the gradients three times.

Gradients may be fp32, fp16, bf16 (and fp64; read as fp32 on CUDA) mixed in one call, of any shapes, contiguous
or not (non-contiguous ones are read through a copy and scaled one by one), any number of
tensors including zero and empty tensors.  ``norm_type`` other than 2 runs on the torch backend.

Files of this op: ``reference.py`` (torch backend), ``triton_kernel.py`` (pointer-table
multi-tensor kernels, one launch per dtype present), ``csrc/grad_tail/`` (``_cpu.cpp`` OpenMP over
fixed chunks with a deterministic reduction, ``_cuda.cu`` one block per chunk + last-block
finalisation, ``_binding.cpp``), ``tests/ops/test_grad_tail.py``, ``fastpeft/bench/cases/ops/grad_tail.py``,
``benchmarks/bench_grad_tail.py``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from ...backends import define_op
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import grad_tail_apply_reference, grad_tail_stats_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_EPS = 1e-6  # the epsilon of torch.nn.utils.clip_grad_norm_


def _example(device, dtype):
    randn = random_tensors(device, dtype)
    return [randn(4), randn(3, 5)], torch.full((), 0.5, device=device), 1.0, 2.0, DEFAULT_EPS


def _apply_example(device, dtype):
    randn = random_tensors(device, dtype)
    return [randn(4), randn(3, 5)], torch.full((), 0.5, device=device)


OP = define_op("grad_tail", example=_example)
OP_APPLY = define_op("grad_tail_apply", example=_apply_example)


class GradTailStats(NamedTuple):
    """Result of :func:`grad_tail`: float32 tensors of shape ``()`` on the gradients' device."""

    multiplier: torch.Tensor
    total_norm: torch.Tensor
    found_inf: torch.Tensor


def collect_grads(params_or_grads) -> list[torch.Tensor]:
    """The gradient tensors of ``params_or_grads``.

    An element that is an ``nn.Parameter`` or requires grad is a parameter: its ``.grad`` is
    taken (skipped when None).  Any other tensor is taken as a gradient itself.  A single
    tensor is accepted too.
    """
    if isinstance(params_or_grads, torch.Tensor):
        params_or_grads = [params_or_grads]
    out = []
    for i, t in enumerate(params_or_grads):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grads[{i}]: expected a torch.Tensor (a gradient or a parameter), got {type(t).__name__}")
        if isinstance(t, torch.nn.Parameter) or t.requires_grad:
            if t.grad is None:
                continue
            t = t.grad
        out.append(t)
    return out


def _check_grads(grads: list[torch.Tensor], device: Optional[torch.device]) -> torch.device:
    for i, g in enumerate(grads):
        if g.is_sparse or g.layout != torch.strided:
            raise TypeError(f"grads[{i}]: expected a dense (strided) tensor, got layout {g.layout}")
        if g.dtype not in DTYPES:
            raise TypeError(f"grads[{i}]: expected dtype float32, float16, bfloat16 or float64, got {g.dtype}")
        if device is None:
            device = g.device
        elif g.device != device:
            raise ValueError(f"grads[{i}]: expected a tensor on {device} (the device of grads[0]), got {g.device}")
    return device if device is not None else torch.device("cpu")


def _scale_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name}: expected a float or a floating-point tensor with one element, "
                            f"got {value.dtype} of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of the gradients), got {value.device}")
        return value.detach().reshape(()).to(torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return torch.full((), float(value), dtype=torch.float32, device=device)


def grad_tail(grads: Sequence[torch.Tensor], *, inv_scale: Union[float, torch.Tensor] = 1.0,
              max_norm: Optional[float] = None, norm_type: float = 2.0, eps: float = DEFAULT_EPS) -> GradTailStats:
    """Pass 1 of the gradient tail: global norm, overflow flag and combined multiplier.

    Args:
        grads: gradients (or parameters, whose ``.grad`` is used; see :func:`collect_grads`),
            any shapes, fp32/fp16/bf16/fp64 mixed, all on one device.  Not modified.
        inv_scale: ``1 / loss_scale`` as a float or a one-element tensor on the gradients'
            device (a tensor keeps the whole step free of host syncs).
        max_norm: clip threshold of the unscaled global norm; None disables clipping.
        norm_type: the p of the norm (2 on the kernels; others, incl. ``inf``, on the torch backend).
        eps: added to the norm in the clip coefficient (as ``clip_grad_norm_``).

    Returns:
        :class:`GradTailStats` ``(multiplier, total_norm, found_inf)``, float32, shape ``()``.
    """
    grads = collect_grads(grads)
    device = _check_grads(grads, None)
    s = _scale_tensor("inv_scale", inv_scale, device)
    if max_norm is not None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0 \
                or math.isinf(max_norm):
            raise ValueError(f"max_norm: expected None or a finite number >= 0, got {max_norm!r}")
        max_norm = float(max_norm)
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"norm_type: expected a number > 0 (or inf), got {norm_type!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    return GradTailStats(*OP(grads, s, max_norm, float(norm_type), float(eps)))


def grad_tail_apply_(grads: Sequence[torch.Tensor], multiplier: torch.Tensor) -> None:
    """Pass 2: ``g *= multiplier`` in place for every gradient (one launch; nothing written
    when the multiplier is exactly 1).  ``multiplier``: one-element float tensor on the
    gradients' device, e.g. ``grad_tail(...).multiplier``.  A tensor listed twice is scaled twice."""
    grads = collect_grads(grads)
    device = _check_grads(grads, None if not isinstance(multiplier, torch.Tensor) else multiplier.device)
    if not isinstance(multiplier, torch.Tensor):
        raise TypeError(f"multiplier: expected a tensor (e.g. grad_tail(...).multiplier), got {type(multiplier).__name__}")
    m = _scale_tensor("multiplier", multiplier, device)
    OP_APPLY(grads, m)


def grad_tail_(grads: Sequence[torch.Tensor], *, inv_scale: Union[float, torch.Tensor] = 1.0,
               max_norm: Optional[float] = None, norm_type: float = 2.0, eps: float = DEFAULT_EPS) -> GradTailStats:
    """:func:`grad_tail` then :func:`grad_tail_apply_`: unscale and clip in place, return the stats."""
    grads = collect_grads(grads)
    stats = grad_tail(grads, inv_scale=inv_scale, max_norm=max_norm, norm_type=norm_type, eps=eps)
    grad_tail_apply_(grads, stats.multiplier)
    return stats


# -- fakes, shared by the compiled and the Triton ops --------------------------------
def _stats_fake(grads, inv_scale, max_norm, eps):
    return tuple(inv_scale.new_empty((), dtype=torch.float32) for _ in range(3))


def _apply_fake(grads, multiplier):
    return None


# -- cpu / cuda: torch.ops.fastpeft.grad_tail_stats / grad_tail_apply_ (csrc/grad_tail/) --
compiled_op("grad_tail_stats", fake=_stats_fake)
compiled_op("grad_tail_apply_", fake=_apply_fake)


def _stats_compiled(grads, inv_scale, max_norm, norm_type, eps):
    return torch.ops.fastpeft.grad_tail_stats(grads, inv_scale, max_norm, eps)


def _apply_compiled(grads, multiplier):
    torch.ops.fastpeft.grad_tail_apply_(grads, multiplier)


# -- triton: torch.ops.fastpeft.grad_tail_stats_triton / grad_tail_apply_triton_ --------
@triton_op("grad_tail_stats_triton", fake=_stats_fake)
def _grad_tail_stats_triton(grads: list[torch.Tensor], inv_scale: torch.Tensor, max_norm: Optional[float],
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernel import grad_tail_stats_triton

    return grad_tail_stats_triton(grads, inv_scale, max_norm, eps)


@triton_op("grad_tail_apply_triton_", fake=_apply_fake, mutates_args=["grads"])
def _grad_tail_apply_triton(grads: list[torch.Tensor], multiplier: torch.Tensor) -> None:
    from .triton_kernel import grad_tail_apply_triton

    grad_tail_apply_triton(grads, multiplier)


def _stats_triton_entry(grads, inv_scale, max_norm, norm_type, eps):
    return _grad_tail_stats_triton(grads, inv_scale, max_norm, eps)


# -- backends: the device is the scale's (args[1]); the kernels compute the 2-norm only ----
def _triton_dtypes(grads, *args, forced):
    for i, g in enumerate(grads):
        if g.dtype not in TRITON_DTYPES:
            return f"triton backend supports float32, float16 and bfloat16 grads, got {g.dtype} at grads[{i}]"
    return None


def _two_norm(backend, then=None):
    def check(grads, inv_scale, max_norm, norm_type, eps, forced):
        if norm_type != 2.0:
            return f"{backend} backend computes the 2-norm only, got norm_type={norm_type}"
        return None if then is None else then(grads, forced=forced)
    return check


_COMPILED = ["grad_tail_stats", "grad_tail_apply_"]
register_backend(OP, "torch")(grad_tail_stats_reference)
register_backend(OP, "cpu", arg=1, also=_two_norm("cpu"), needs=_COMPILED)(_stats_compiled)
register_backend(OP, "cuda", arg=1, also=_two_norm("cuda"), needs=_COMPILED)(_stats_compiled)
register_backend(OP, "triton", arg=1, also=_two_norm("triton", then=_triton_dtypes))(_stats_triton_entry)
register_backend(OP_APPLY, "torch")(grad_tail_apply_reference)
register_backend(OP_APPLY, "cpu", arg=1, needs=_COMPILED)(_apply_compiled)
register_backend(OP_APPLY, "cuda", arg=1, needs=_COMPILED)(_apply_compiled)
register_backend(OP_APPLY, "triton", arg=1, also=_triton_dtypes)(_grad_tail_apply_triton)

__all__ = ["grad_tail", "grad_tail_", "grad_tail_apply_", "collect_grads", "GradTailStats", "OP", "OP_APPLY"]
