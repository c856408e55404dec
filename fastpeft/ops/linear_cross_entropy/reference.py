"""linear_cross_entropy, pure-PyTorch reference (the ``torch`` backend and the test oracle).

The composition it fuses (transformers' ``ForCausalLMLoss(lm_head(hidden), ...)``): the logits in hidden's
dtype, then everything in the accumulation dtype A (float32; float64 for float64 hidden)::

    logits = F.linear(hidden, weight, bias).to(A)                  # [N, V]
    if softcap:                                   # Gemma-2's final_logit_softcapping
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)

This one materialises the [N, V] logits (in A): it is the oracle (run on float64 copies) and the
fallback backend where neither the C++ nor the Triton backend can run; the fused backends process the
tokens in chunks and never hold more than one chunk's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and loss) dtype: float64 for float64 hidden, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias, ignore_index: int, label_smoothing: float, softcap: float,
                                   reduction: str, chunk_size: int) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` (soft-capped when ``softcap > 0``) against ``labels``.

    hidden [N, H], weight [V, H], labels [N] (int64), bias [V] or None; ``chunk_size`` is ignored
    (the whole [N, V] logits are built).  Returns the loss in float32 (float64 for float64 hidden):
    a scalar, or [N] for ``reduction="none"``.
    """
    acc = acc_dtype(hidden.dtype)
    logits = F.linear(hidden, weight, bias).to(acc)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
