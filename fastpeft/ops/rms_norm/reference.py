"""rms_norm, pure-PyTorch reference (the ``torch`` backend and the test oracle).

transformers' two RMSNorm compositions, autograd by PyTorch.  The accumulation dtype A is float32
(float64 for float64 x)::

    n = x.to(A) * torch.rsqrt(x.to(A).pow(2).mean(-1, keepdim=True) + eps)
    w = offset + weight.to(A)
    cast_before_weight=False:  (n * w).to(x.dtype)                        # GemmaRMSNorm (offset=1), Olmo2
    cast_before_weight=True:   (w * n.to(x.dtype).to(A)).to(out_dtype)    # LlamaRMSNorm: weight * n.to(x.dtype)

with ``out_dtype = torch.promote_types(x.dtype, weight.dtype)`` in the second form (the dtype of
``weight * n.to(x.dtype)``).  Run on float64 copies it is the float64 oracle of the kernels.
"""
from __future__ import annotations

import torch


def acc_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of rms_norm: float64 for float64 x, else float32."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def out_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype, cast_before_weight: bool) -> torch.dtype:
    """dtype of rms_norm's output: x's, or with ``cast_before_weight`` the promotion of x's and weight's."""
    return torch.promote_types(x_dtype, weight_dtype) if cast_before_weight else x_dtype


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                       cast_before_weight: bool) -> torch.Tensor:
    """RMSNorm of the last dim of ``x`` scaled by ``offset + weight`` (see the module doc)."""
    acc = acc_dtype(x.dtype)
    h = x.to(acc)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(acc) + offset
    if cast_before_weight:
        return (w * n.to(x.dtype).to(acc)).to(out_dtype(x.dtype, weight.dtype, True))
    return (n * w).to(x.dtype)
