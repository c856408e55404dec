"""bottleneck_adapter, pure-PyTorch reference (the ``torch`` backend and the test oracle).

Numerically this is the plain, unfused PyTorch adapter (Linear -> activation ->
dropout -> Linear, plus the residual), computed in the dtype of ``x``; autograd
is PyTorch's own.  Only the dropout mask differs from ``nn.Dropout``: it comes
from the shared Philox RNG (stream 1) so that every backend drops the same
elements for one seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.philox import dropout_keep_mask

#: Dropout mask stream of the adapter (LoRA uses stream 0): one seed, independent masks.
DROPOUT_STREAM = 1

ACTIVATIONS = {
    "relu": F.relu,
    # exact (erf) GELU written out, as the kernels compute it: F.gelu(+inf) is NaN or inf depending on the
    # tensor's length (vectorised or scalar path), and the oracle must not depend on that
    "gelu": lambda h: 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476)),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


def adapter_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Bool keep mask [rows, cols] of the adapter's dropout (Philox, stream 1)."""
    return dropout_keep_mask(seed, rows, cols, p, stream=DROPOUT_STREAM, device=device)


def bottleneck_adapter_reference(x: torch.Tensor, W_down: torch.Tensor, b_down, W_up: torch.Tensor, b_up,
                                 activation: str, dropout_p: float, seed: int, residual: bool) -> torch.Tensor:
    """``y = (x if residual else 0) + drop(act(x W_downᵀ + b_down)) W_upᵀ + b_up`` (see the package doc)."""
    dt = x.dtype
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    cast = (lambda t: None if t is None else t.to(dt))
    h = F.linear(x2, cast(W_down), cast(b_down))
    a = ACTIVATIONS[activation](h)
    if dropout_p > 0.0:
        keep = adapter_keep_mask(seed, h.shape[0], h.shape[1], dropout_p, device=x.device)
        a = a * keep.to(dt) * (1.0 / (1.0 - dropout_p))
    y = F.linear(a, cast(W_up), cast(b_up))
    if residual:
        y = y + x2
    return y.reshape(x.shape)
