"""lora_linear_multi, pure-PyTorch: the ``torch`` backend and the plain per-adapter loop.

* :func:`lora_linear_multi_loop` -- the plain equivalent (what HF PEFT's mixed-batch forward does):
  the base layer, then one gather + two small matmuls + scatter-add per adapter present in the
  batch.  Data-dependent (``torch.unique``, one host sync per adapter), so it is not the backend;
  the benchmark uses it as the per-adapter-loop baseline.
* :func:`lora_linear_multi_reference` -- the ``torch`` backend: sync-free and ``torch.compile``
  friendly.  Every row is multiplied by *all* adapters' A at once (``x [M, K] @ A_catᵀ [K, n·r]``),
  a per-row coefficient mask keeps only its own adapter's columns (times its scale, and only the
  first ``ranks[a]`` of them), and one matmul with ``B_cat [N, n·r]`` expands.  That costs n times
  the low-rank FLOPs of the grouped kernels, which is fine for a fallback (the cpu and triton
  backends group rows by adapter instead).
* :func:`lora_embedding_multi_reference` -- multi-adapter LoRA of an ``nn.Embedding`` (gather + the
  same masked expand).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _ranks_or_none(ranks, r: int) -> Optional[list]:
    return None if ranks is None or all(int(v) == r for v in ranks) else [int(v) for v in ranks]


def lora_linear_multi_loop(x, weight, bias, lora_A, lora_B, scales, adapter_index,
                           ranks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Plain PyTorch, one adapter at a time (``adapter_index`` [M] over the rows of x as [M, K])::

        y = F.linear(x, weight, bias)
        for a in adapters present:                         # -1 rows keep the base output
            rows = (adapter_index == a).nonzero()
            y[rows] += scales[a] * (x[rows] @ lora_A[a, :r_a].T) @ lora_B[a, :, :r_a].T
    """
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    idx = adapter_index.reshape(-1)
    y = F.linear(x2, weight, bias)
    for a in torch.unique(idx).tolist():
        if a < 0:
            continue
        r_a = lora_A.shape[1] if ranks is None else int(ranks[a])
        rows = (idx == a).nonzero().squeeze(1)
        delta = (x2.index_select(0, rows) @ lora_A[a, :r_a].t()) @ lora_B[a, :, :r_a].t()
        y.index_add_(0, rows, delta * scales[a].to(delta.dtype))
    return y.reshape(*x.shape[:-1], N)


def row_coefficients(adapter_index, scales, n: int, r: int, ranks, dtype) -> torch.Tensor:
    """[M, n, r]: ``scales[a]`` where a is the row's adapter and j < ranks[a], else 0 (-1 rows: all 0)."""
    own = adapter_index.reshape(-1, 1) == torch.arange(n, device=adapter_index.device)        # [M, n]
    per_adapter = scales.to(dtype).reshape(n, 1).expand(n, r)                                # [n, r]
    if ranks is not None:
        cols = torch.arange(r, device=scales.device)
        limit = torch.tensor(list(ranks), device=scales.device).reshape(n, 1)
        per_adapter = per_adapter * (cols < limit).to(dtype)
    return own.to(dtype).unsqueeze(-1) * per_adapter


def masked_expand(u_masked: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``Σ_a u[:, a] @ lora_B[a]ᵀ``: [M, n, r] x [n, N, r] -> [M, N] as one matmul."""
    M, n, r = u_masked.shape
    return u_masked.reshape(M, n * r) @ lora_B.permute(0, 2, 1).reshape(n * r, lora_B.shape[1])


def lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, scales, adapter_index,
                                ranks: Optional[Sequence[int]] = None, layout: Optional[str] = None) -> torch.Tensor:
    """The ``torch`` backend of :func:`fastpeft.ops.lora_linear_multi` (arguments already checked;
    ``adapter_index`` [M]; ``layout`` is a Triton choice, ignored here)."""
    K, N = x.shape[-1], weight.shape[0]
    n, r, _ = lora_A.shape
    x2 = x.reshape(-1, K)
    u = (x2 @ lora_A.reshape(n * r, K).t()).reshape(-1, n, r)                             # [M, n, r]
    coef = row_coefficients(adapter_index, scales, n, r, _ranks_or_none(ranks, r), x.dtype)
    y = F.linear(x2, weight, bias) + masked_expand(u * coef, lora_B)
    return y.reshape(*x.shape[:-1], N)


def lora_embedding_multi_reference(input_ids, weight, lora_A, lora_B, scales, adapter_index,
                                   ranks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``E[ids] + s_a · A_a[:, ids]ᵀ B_aᵀ`` per token (``adapter_index`` [M] over the flattened ids).

    The A side is a gather of r numbers per token (``lora_A[a, :, id]``, no copy of A); the B side is
    the masked expand of :func:`lora_linear_multi_reference` (n·r·D per token, the size of one
    embedding row times n·r -- small next to any linear layer of the model)."""
    n, r, _ = lora_A.shape
    ids = input_ids.reshape(-1)
    own = adapter_index.reshape(-1).clamp(min=0)                   # -1 rows gather adapter 0, masked below
    u = lora_A[own, :, ids]                                        # [M, r]
    coef = row_coefficients(adapter_index, scales, n, r, _ranks_or_none(ranks, r), weight.dtype)
    y = F.embedding(ids, weight) + masked_expand(u.unsqueeze(1) * coef, lora_B)
    return y.reshape(*input_ids.shape, weight.shape[1])
