"""Argument checks shared by the public op functions (clear errors, named arguments)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..kernels.philox import check_seed


def check_tensor(name: str, t, *, ndim: Optional[Iterable[int]] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = None, allow_none: bool = False):
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndim = tuple(ndim)
        if t.dim() not in ndim:
            raise ValueError(f"{name}: expected a tensor with {' or '.join(map(str, ndim))} dims, "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_float(name: str, value, *, lo: Optional[float] = None, hi: Optional[float] = None,
                hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
            value = float(value)
        else:
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name}: expected a number, got NaN")
    if lo is not None and value < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value >= hi)):
        raise ValueError(f"{name}: expected {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def dtype_reason(t: torch.Tensor, allowed: Iterable[torch.dtype], what: str) -> Optional[str]:
    allowed = tuple(allowed)
    if t.dtype in allowed:
        return None
    return f"{what} supports {[str(d).replace('torch.', '') for d in allowed]}, got {t.dtype}"


def device_reason(t: torch.Tensor, device_type: str, what: str) -> Optional[str]:
    return None if t.device.type == device_type else f"{what} needs {device_type} tensors, got {t.device.type}"


def dtype_pair_reason(pair: tuple, allowed: Iterable[tuple], what: str, names: str) -> Optional[str]:
    """None if the (input, output) dtype ``pair`` is one of ``allowed``, else the reason (``names`` says
    what the pair is, e.g. "x/output")."""
    allowed = tuple(allowed)
    if pair in allowed:
        return None
    fmt = lambda p: "/".join(str(d).replace("torch.", "") for d in p)  # noqa: E731
    return f"{what} takes {names} dtypes {[fmt(p) for p in allowed]}, got {fmt(pair)}"


def check_lora_scale_dropout(scale, dropout_p, seed) -> tuple:
    """``(scale, dropout_p, seed)`` of a fused LoRA op, checked: ``scale`` a finite float, ``dropout_p`` in
    [0, 1), ``seed`` a Philox seed (drawn from torch's generator when None; 0 when there is no dropout, where
    it is ignored).  Errors name the argument."""
    scale = check_float("scale", scale)
    dropout_p = check_float("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    if dropout_p == 0.0:
        return scale, dropout_p, 0
    if seed is None:
        return scale, dropout_p, int(torch.randint(0, 2**62, (), dtype=torch.int64))
    try:
        return scale, dropout_p, check_seed(seed)
    except (TypeError, ValueError) as e:
        raise type(e)(f"seed: {e}") from None
