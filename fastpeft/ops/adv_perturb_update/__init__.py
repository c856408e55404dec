"""Adversarial perturbation of embedding outputs: the fused update step and the
random initialisation used by FGM / PGD / FreeLB / FGSM-RS / SMART
(:mod:`fastpeft.adversarial`).

``adv_perturb_update(delta, grad, *, norm, step_size, epsilon, mask)`` updates
``delta`` **in place** (and returns it); it is not differentiable and runs under
``torch.no_grad()`` itself.  Shapes: ``delta``, ``grad``: [B, L, H] (the output of
the input embedding and its gradient); ``mask``: [B, L] attention mask (any
dtype, nonzero = real token) or None.  Equivalent PyTorch (norms over real tokens)::

    m = (mask != 0)[..., None].float();  g = grad * m
    if norm == "linf":                       # FGSM, PGD-Linf, free-m
        d = (delta + step_size * g.sign()).clamp(-epsilon, epsilon)
    elif norm == "l2_token":                 # SMART-style, per token
        d = delta * m + step_size * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        n = d.norm(dim=-1, keepdim=True);  d = torch.where(n > epsilon, d * epsilon / n, d)
    elif norm == "l2_example":               # FreeLB, PGD-L2, per example over L x H
        d = delta * m + step_size * g / g.flatten(1).norm(dim=1)[:, None, None].clamp_min(1e-8)
        n = d.flatten(1).norm(dim=1)[:, None, None];  d = torch.where(n > epsilon, d * epsilon / n, d)
    delta.copy_(d * m)                       # padding positions are exactly zero

``epsilon=None`` or ``<= 0`` skips the projection (FreeLB's ``adv_max_norm=0``).
A zero gradient gives a zero step (no 0/0).  The kernels read ``delta`` and
``grad`` once and write ``delta`` once; ``l2_example`` adds one statistics pass
(|g|^2, <delta, g>, |delta|^2 per example) and projects with the analytic norm
|delta + a g|^2 = |delta|^2 + 2a<delta, g> + a^2 |g|^2, so it needs no third pass.

``adv_perturb_init(like, *, kind, scale, norm, mask, seed)`` returns a new
[B, L, H] tensor of counter-based (Philox, stream 2) random values: ``uniform``
in [-1, 1) or standard ``normal``, times ``scale`` (``norm="linf"``),
``scale / sqrt(H)`` (``"l2_token"``) or ``scale / sqrt(n_b * H)`` with ``n_b``
the real tokens of example b (``"l2_example"``: FreeLB's init), zero at padding.
Same seed, same values on every backend (up to the rounding of log/cos for
``normal``).

Files: ``reference.py`` (torch backend, oracle, the eager FreeLB baseline),
``triton_kernel.py``, ``csrc/adv_perturb_update/`` (C++ CPU, CUDA, binding, C++ test),
``tests/ops/test_adv_perturb_update.py``, ``fastpeft/bench/cases/ops/adv_perturb_update.py``,
``benchmarks/bench_adv_perturb_update.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ...backends import define_op
from ...kernels.philox import check_seed
from .._checks import check_float, check_same_device, check_tensor
from .._register import compiled_op, random_tensors, register_backend, triton_op
from .reference import (INIT_KINDS, INIT_STREAM, NORMS, adv_perturb_init_reference,
                        adv_perturb_update_reference, freelb_eager_update)

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _example_mask(device):
    mask = torch.ones(2, 3, device=device)
    mask[1, 2] = 0  # one padding position
    return mask


def _update_example(device, dtype):
    randn = random_tensors(device, dtype)
    return randn(2, 3, 8, scale=0.1), randn(2, 3, 8), _example_mask(device), "l2_example", 0.1, 1.0


def _init_example(device, dtype):
    return torch.zeros(2, 3, 8, device=device, dtype=dtype), _example_mask(device), "uniform", "l2_example", 1.0, 0


UPDATE_OP = define_op("adv_perturb_update", example=_update_example)
INIT_OP = define_op("adv_perturb_init", example=_init_example)


def _check_mask(mask, delta):
    if mask is None:
        return None
    check_tensor("mask", mask)
    if mask.dim() != 2 or tuple(mask.shape) != tuple(delta.shape[:2]):
        raise ValueError(f"mask: expected shape [B, L] = {list(delta.shape[:2])} (the first two dims of delta), "
                         f"got {list(mask.shape)}")
    check_same_device("delta", delta, mask=mask)
    return mask


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    return norm


def adv_perturb_update(delta: torch.Tensor, grad: torch.Tensor, *, norm: str, step_size: float,
                       epsilon: Optional[float] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One projected ascent step on ``delta`` [B, L, H], in place; returns ``delta``.

    Args:
        delta: current perturbation [B, L, H], float32/bfloat16 (CPU, also float64),
            float32/float16/bfloat16 (CUDA).  Updated in place (may be a leaf that
            requires grad: the update runs under ``no_grad``).
        grad: gradient of the loss w.r.t. the perturbed embeddings, shape/dtype/device of delta.
        norm: ``"linf"``, ``"l2_token"`` or ``"l2_example"`` (see the module doc).
        step_size: ascent step (FreeLB's ``adv_lr``).
        epsilon: radius of the ball delta is projected onto; None or <= 0: no projection.
        mask: [B, L] attention mask (nonzero = real token); padding rows of delta become 0.
    """
    check_tensor("delta", delta, ndim=(3,), dtypes=FLOAT_DTYPES)
    check_tensor("grad", grad)
    if grad.shape != delta.shape:
        raise ValueError(f"grad: expected shape {list(delta.shape)} (the shape of delta), got {list(grad.shape)}")
    if grad.dtype != delta.dtype:
        raise TypeError(f"grad: expected dtype {delta.dtype} (the dtype of delta), got {grad.dtype}")
    check_same_device("delta", delta, grad=grad)
    mask = _check_mask(mask, delta)
    _check_norm(norm)
    step_size = check_float("step_size", step_size)
    epsilon = 0.0 if epsilon is None else max(check_float("epsilon", epsilon), 0.0)
    with torch.no_grad():
        UPDATE_OP(delta, grad, mask, norm, step_size, epsilon)
    return delta


def adv_perturb_init(like: Union[torch.Tensor, Sequence[int]], *, kind: str = "uniform", scale: float = 1.0,
                     norm: str = "linf", mask: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                     dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """A new random perturbation [B, L, H] (see the module doc).

    Args:
        like: a [B, L, H] tensor (shape, dtype and device are taken from it) or a shape.
        kind: ``"uniform"`` (in [-1, 1)) or ``"normal"`` (standard normal).
        scale: magnitude; per-element for ``norm="linf"``, divided by sqrt(H) for
            ``"l2_token"`` and by sqrt(real tokens x H) per example for ``"l2_example"``.
        mask: [B, L] attention mask; padding positions are exactly zero.
        seed: Philox key in [0, 2**63); None draws one from torch's default generator
            (so ``torch.manual_seed`` makes it reproducible).
        dtype, device: override those of ``like`` (default float32 / CPU for a shape).

    FreeLB's init (``adv_init_mag`` with the L2 norm) is
    ``adv_perturb_init(embeds, kind="uniform", scale=adv_init_mag, norm="l2_example", mask=attention_mask)``.
    """
    if isinstance(like, torch.Tensor):
        shape = tuple(like.shape)
        dtype = dtype or like.dtype
        device = device if device is not None else like.device
    else:
        shape = tuple(int(s) for s in like)
        dtype = dtype or torch.float32
    if len(shape) != 3:
        raise ValueError(f"like: expected a [B, L, H] tensor or shape, got shape {list(shape)}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected a float dtype, got {dtype}")
    if kind not in INIT_KINDS:
        raise ValueError(f"kind: expected one of {INIT_KINDS}, got {kind!r}")
    _check_norm(norm)
    scale = check_float("scale", scale)
    seed = int(torch.randint(0, 2**62, ())) if seed is None else check_seed(seed)
    delta = torch.empty(shape, dtype=dtype, device=device)
    mask = _check_mask(mask, delta)
    with torch.no_grad():
        INIT_OP(delta, mask, kind, norm, scale, seed)
    return delta


# -- cpu / cuda: torch.ops.fastpeft.adv_perturb_update / _init (csrc/adv_perturb_update/) --
def _no_output(*args, **kwargs):
    return None


compiled_op("adv_perturb_update", fake=_no_output)
compiled_op("adv_perturb_init", fake=_no_output)


def _update_compiled(delta, grad, mask, norm, step_size, epsilon):
    torch.ops.fastpeft.adv_perturb_update(delta, grad, mask, norm, step_size, epsilon)


def _init_compiled(delta, mask, kind, norm, scale, seed):
    torch.ops.fastpeft.adv_perturb_init(delta, mask, kind, norm, scale, seed)


# -- triton: torch.ops.fastpeft.adv_perturb_update_triton / _init_triton (in place) ---
@triton_op("adv_perturb_update_triton", fake=_no_output, mutates_args=["delta"])
def _update_triton(delta: torch.Tensor, grad: torch.Tensor, mask: Optional[torch.Tensor], norm: str,
                   step_size: float, epsilon: float) -> None:
    from .triton_kernel import update_triton

    update_triton(delta, grad, mask, norm, step_size, epsilon)


@triton_op("adv_perturb_init_triton", fake=_no_output, mutates_args=["delta"])
def _init_triton(delta: torch.Tensor, mask: Optional[torch.Tensor], kind: str, norm: str, scale: float,
                 seed: int) -> None:
    from .triton_kernel import init_triton

    init_triton(delta, mask, kind, norm, scale, seed, INIT_STREAM)


# -- backends ------------------------------------------------------------------
_COMPILED = ["adv_perturb_update", "adv_perturb_init"]
register_backend(UPDATE_OP, "torch")(adv_perturb_update_reference)
register_backend(UPDATE_OP, "cpu", dtypes=CPU_DTYPES, needs=_COMPILED)(_update_compiled)
register_backend(UPDATE_OP, "cuda", dtypes=GPU_DTYPES, needs=_COMPILED)(_update_compiled)
register_backend(UPDATE_OP, "triton", dtypes=GPU_DTYPES)(_update_triton)
register_backend(INIT_OP, "torch")(adv_perturb_init_reference)
register_backend(INIT_OP, "cpu", dtypes=CPU_DTYPES, needs=_COMPILED)(_init_compiled)
register_backend(INIT_OP, "cuda", dtypes=GPU_DTYPES, needs=_COMPILED)(_init_compiled)
register_backend(INIT_OP, "triton", dtypes=GPU_DTYPES)(_init_triton)

__all__ = ["adv_perturb_update", "adv_perturb_init", "freelb_eager_update", "UPDATE_OP", "INIT_OP", "NORMS",
           "INIT_KINDS", "INIT_STREAM"]
