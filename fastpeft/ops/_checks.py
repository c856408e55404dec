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


def check_lora_factors(x: torch.Tensor, N: int, n_from: str, bias, lora_A, lora_B) -> int:
    """The bias and LoRA factors of a fused LoRA layer over a frozen [N, K] weight, ``K = x.shape[-1]``:
    bias [N] in x's dtype or None, lora_A [r, K] and lora_B [N, r] in x's dtype or float32 (both alike).
    ``n_from`` names where N comes from (e.g. "quant_state.shape[0]").  Returns r; errors name the argument."""
    K = x.shape[-1]
    check_tensor("bias", bias, ndim=(1,), allow_none=True)
    check_tensor("lora_A", lora_A, ndim=(2,))
    check_tensor("lora_B", lora_B, ndim=(2,))
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias: expected shape [{N}] (N = {n_from}), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
    r = lora_A.shape[0]
    if r < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}] with r >= 1 (K = x.shape[-1]), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (N = {n_from}, r = lora_A.shape[0]), "
                         f"got {tuple(lora_B.shape)}")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A: expected dtype {x.dtype} (the dtype of x) or float32, got {lora_A.dtype}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: expected dtype {lora_A.dtype} (the dtype of lora_A), got {lora_B.dtype}")
    return r
