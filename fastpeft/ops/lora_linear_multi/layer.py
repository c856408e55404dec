"""Mixed-adapter batches of a LoRA *layer* through :func:`~fastpeft.ops.lora_linear_multi`: the adapters of a
layer stacked once, the per-row adapter index, and the layer forward that uses them.

One rule for both layer families that run mixed batches on the multi-adapter op: fastpeft's own
``tuners.lora.Linear`` / ``Embedding`` and HF PEFT's ``peft.tuners.lora.Linear`` / ``Embedding`` switched by
:func:`fastpeft.accelerate`.  Both have HF PEFT's attributes (``get_base_layer()``, ``lora_A`` / ``lora_B``
ModuleDicts, ``lora_embedding_A`` / ``lora_embedding_B`` ParameterDicts, ``scaling``, ``r``, ``use_dora``,
``fan_in_fan_out``), so this module reads only those.

* :class:`AdapterStack` / :func:`adapter_stack` -- a layer's adapters as ``lora_A`` [n, r_max, K],
  ``lora_B`` [n, N, r_max] (ranks below r_max zero-padded; the op is told the true ranks and never reads the
  padding), ``scales`` [n], in the compute dtype and device.  Cached per layer (outside the module, so no
  state_dict key changes) and rebuilt only when the layer's adapters change: an adapter loaded or deleted, a
  weight written (version counter / data pointer), a scale changed, another dtype or device.
* :func:`adapter_index` -- the [rows] int64 index of a batch in one stack (-1: base only, for
  ``"__base__"`` rows and for adapters this layer does not hold -- a layer an adapter does not target
  contributes nothing for its rows), cached per (names, stack).
* :func:`mixed_forward` -- the layer's output for a mixed batch, or ``None`` when the op cannot take it
  (the caller then runs its per-adapter loop): quantised or custom base layers, an ``nn.Embedding`` with
  ``max_norm`` or a scaled-embedding subclass, a row on a DoRA / ``lora_bias`` / other-variant adapter
  (those raise, as in HF PEFT, in the callers' loops where they are unsupported).

Rows: ``names`` has one adapter name per *sequence* (B names).  The layer's input has B or k·B rows in its
first dimension (beam search / ``num_return_sequences`` repeat each sequence k times in a row, as
transformers' ``generate`` does with ``repeat_interleave``; an encoder-decoder's encoder sees B): each
name then covers k consecutive rows.  Everything runs without autograd (mixed batches are inference).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..._optional import conv1d_cls

@dataclass
class AdapterStack:
    """A layer's stackable adapters in one dtype / device (see the module doc)."""

    names: tuple          # adapter names, in slot order
    lora_A: torch.Tensor  # [n, r_max, K]  (an embedding: [n, r_max, V])
    lora_B: torch.Tensor  # [n, N, r_max]  (an embedding: [n, D, r_max])
    scales: torch.Tensor  # [n] float32
    ranks: Optional[list]  # true rank per adapter, None when all equal r_max
    key: tuple            # what the stack was built from

    @property
    def slot(self) -> dict:
        return {a: i for i, a in enumerate(self.names)}


_STACKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # layer -> {(dt, dev): stack}
_INDEX: dict = {}          # (names, stack names, rows, device) -> index tensor; small, cleared when full
_INDEX_MAX = 256


def _is_embedding_layer(layer) -> bool:
    return isinstance(layer.get_base_layer(), nn.Embedding)


def unsupported_adapter(layer, name: str) -> Optional[str]:
    """Why adapter ``name`` of ``layer`` cannot be stacked (None: it can)."""
    if getattr(layer, "use_dora", {}).get(name, False):
        return "DoRA"
    if name in getattr(layer, "lora_variant", {}):
        return "a LoRA variant"
    B = getattr(layer, "lora_B", {})
    if name in B and getattr(B[name], "bias", None) is not None:
        return "lora_bias"
    return None


def _adapter_weights(layer, embedding: bool):
    """(name, A [r, K], B [N, r], scale) of every stackable adapter of ``layer``."""
    out = []
    if embedding:
        for a, A in layer.lora_embedding_A.items():
            out.append((a, A, layer.lora_embedding_B[a], float(layer.scaling[a])))
    else:
        for a, mod in layer.lora_A.items():
            if unsupported_adapter(layer, a) is None:
                out.append((a, mod.weight, layer.lora_B[a].weight, float(layer.scaling[a])))
    return out


def adapter_stack(layer, dtype: torch.dtype, device: torch.device, embedding: Optional[bool] = None) -> AdapterStack:
    """``layer``'s adapters stacked in ``dtype`` on ``device``; cached until they change (module doc).
    A layer without stackable adapters gets a stack of one all-zero adapter named ``""`` (never indexed)."""
    if embedding is None:
        embedding = _is_embedding_layer(layer)
    weights = _adapter_weights(layer, embedding)
    key = tuple((a, A.data_ptr(), A._version, tuple(A.shape), B.data_ptr(), B._version, s)
                for a, A, B, s in weights) + (dtype, device, embedding)
    per_layer = _STACKS.get(layer)
    if per_layer is None:
        per_layer = _STACKS[layer] = {}
    hit = per_layer.get((dtype, device))
    if hit is not None and hit.key == key:
        return hit
    with torch.no_grad():
        if weights:
            r_max = max(A.shape[0] for _, A, _, _ in weights)
            K, N = weights[0][1].shape[1], weights[0][2].shape[0]
        else:
            base = layer.get_base_layer()
            r_max = 1
            K, N = (base.weight.shape[0], base.weight.shape[1]) if embedding else (layer.in_features,
                                                                                    layer.out_features)
        n = max(len(weights), 1)
        A_st = torch.zeros(n, r_max, K, dtype=dtype, device=device)
        B_st = torch.zeros(n, N, r_max, dtype=dtype, device=device)
        for i, (_, A, B, _) in enumerate(weights):
            r = A.shape[0]
            A_st[i, :r].copy_(A.detach())
            B_st[i, :, :r].copy_(B.detach())
        ranks = [int(A.shape[0]) for _, A, _, _ in weights] or [0]
        scales = torch.tensor([s for *_, s in weights] or [0.0], dtype=torch.float32, device=device)
    stack = AdapterStack(tuple(a for a, *_ in weights) or ("",), A_st, B_st, scales,
                         None if all(r == r_max for r in ranks) else ranks, key)
    per_layer.clear()  # one dtype / device at a time: the old stack is garbage once the layer moved
    per_layer[(dtype, device)] = stack
    return stack


def forget_stacks(layer: Optional[nn.Module] = None) -> None:
    """Drop the cached stacks of ``layer`` (None: of every layer); they rebuild on the next mixed batch.
    Only needed after writing adapter weights through ``.data`` in place (invisible to version counters)."""
    if layer is None:
        _STACKS.clear()
    else:
        _STACKS.pop(layer, None)
    _INDEX.clear()


def rows_per_name(n_names: int, rows: int) -> int:
    """k such that each of the ``n_names`` names covers k consecutive rows of ``rows`` (module doc)."""
    if n_names > 0 and rows % n_names == 0:
        return rows // n_names
    raise ValueError(f"adapter_names: got {n_names} adapter names for a batch of {rows} rows (expected one name "
                     "per sequence; beam search / num_return_sequences may repeat each sequence k times)")


def adapter_index(names: Sequence[str], stack: AdapterStack, rows: int, device: torch.device) -> torch.Tensor:
    """[rows] int64: the stack slot of each row's adapter, -1 for the base and for adapters not in the stack."""
    names = tuple(names)
    key = (names, stack.names, rows, device)
    hit = _INDEX.get(key)
    if hit is not None:
        return hit
    k = rows_per_name(len(names), rows)
    slot = stack.slot
    idx = torch.tensor([slot.get(a, -1) for a in names for _ in range(k)], dtype=torch.int64, device=device)
    if len(_INDEX) >= _INDEX_MAX:
        _INDEX.clear()
    _INDEX[key] = idx
    return idx


def expand_names(names: Sequence[str], rows: int) -> list:
    """``names`` with each repeated k times for a batch of ``rows`` = k · len(names) rows."""
    k = rows_per_name(len(names), rows)
    return [a for a in names for _ in range(k)]


def _rows_stackable(layer, names, strict: bool) -> bool:
    for a in set(names):
        why = unsupported_adapter(layer, a) if a in getattr(layer, "lora_A", {}) else None
        if why is not None:
            if not strict:
                return False
            raise ValueError(f"adapter_names: adapter {a!r} uses {why}; mixed-adapter batches support plain LoRA "
                             "adapters only (as in HF PEFT)")
    return True


def base_reason(layer) -> Optional[str]:
    """Why ``layer``'s base layer cannot take the multi-adapter op (None: it can)."""
    base = layer.get_base_layer()
    if _is_embedding_layer(layer):
        if type(base) is not nn.Embedding:
            return f"embedding base layer of class {type(base).__name__} (not exactly nn.Embedding)"
        if base.max_norm is not None:
            return "nn.Embedding with max_norm"
        return None
    if type(base) is nn.Linear:
        return None if not getattr(layer, "fan_in_fan_out", False) else "fan_in_fan_out on an nn.Linear"
    c = conv1d_cls()
    if c is not None and type(base) is c:
        return None if getattr(layer, "fan_in_fan_out", False) else "Conv1D without fan_in_fan_out"
    return f"base layer of class {type(base).__name__} (not nn.Linear / Conv1D)"


def mixed_forward(layer, x: torch.Tensor, names: Sequence[str], strict: bool = True) -> Optional[torch.Tensor]:
    """The output of LoRA ``layer`` (Linear, GPT-2 Conv1D or Embedding) on the mixed batch ``x`` whose
    sequences use ``names`` (one per sequence; ``"__base__"`` = none), through the multi-adapter op, or
    None when the op cannot take this layer (the caller runs its own per-adapter loop).  A row on a DoRA /
    lora_bias / variant adapter raises (``strict``) or gives None (HF PEFT's layers, whose loop runs them)."""
    from . import lora_embedding_multi, lora_linear_multi
    from ..lora_linear.layer import autocast_copy, autocast_dtype

    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    if base_reason(layer) is not None or x.dim() < 1 or (x.dim() < 2 and not _is_embedding_layer(layer)):
        return None
    if not _rows_stackable(layer, names, strict):
        return None
    base = layer.get_base_layer()
    with torch.no_grad():
        if _is_embedding_layer(layer):
            w = base.weight
            stack = adapter_stack(layer, w.dtype, w.device, embedding=True)
            idx = adapter_index(names, stack, x.shape[0], x.device)
            return lora_embedding_multi(x, w, stack.lora_A, stack.lora_B, stack.scales, idx,
                                        ranks=stack.ranks, check_index=False)
        w, bias = base.weight, base.bias
        if getattr(layer, "fan_in_fan_out", False):
            w = w.t()
        ad = autocast_dtype(x)
        if ad is not None:
            x, w, bias = x.to(ad), autocast_copy(w, ad), autocast_copy(bias, ad)
        elif x.dtype != w.dtype:
            x = x.to(w.dtype)
        if bias is not None and bias.dtype != w.dtype:
            bias = bias.to(w.dtype)
        stack = adapter_stack(layer, w.dtype, w.device, embedding=False)
        idx = adapter_index(names, stack, x.shape[0], x.device)
        return lora_linear_multi(x, w, bias, stack.lora_A, stack.lora_B, stack.scales, idx,
                                 ranks=stack.ranks, check_index=False)


__all__ = ["AdapterStack", "adapter_stack", "adapter_index", "expand_names", "forget_stacks",
           "mixed_forward", "base_reason", "rows_per_name", "unsupported_adapter"]
