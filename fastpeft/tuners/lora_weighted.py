"""``PeftModel.add_weighted_adapter``: a new LoRA adapter combining existing ones (HF PEFT's method, same maths
and ``combination_type`` values; ``peft.utils.merge_utils``' functions written out below).

Per LoRA layer, with weights ``w_i`` and scalings ``s_i`` of adapters ``i``:

* ``cat``: ``A = [w_i s_i A_i]`` (rows), ``B = [B_i]`` (columns): rank ``Σ r_i``, exact.
* ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: the A's (weights
  ``sign(w_i s_i) sqrt|w_i s_i|``) and the B's (``sqrt|w_i s_i|``) are combined separately (same rank).
* ``svd`` and the ``*_svd`` variants: the delta weights ``s_i B_i A_i`` are combined, then truncated to
  ``svd_rank`` by SVD (``B = U S``, ``A = Vᴴ``, optionally clamped at the ``svd_clamp`` quantile).

The new adapter has ``r = lora_alpha = new rank`` (scaling 1), is inactive and frozen.  Differences from HF
PEFT: an existing ``adapter_name`` raises (HF returns silently), and when the first adapter was initialised by
a scheme that rewrites the base weight (PiSSA, OLoRA, LoftQ) the combined adapter is created with plain init
(HF copies ``init_lora_weights`` and so re-runs it on the base weight).
``dare_*`` draw their random masks from torch's generator, as HF PEFT.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch

from .lora_init import mutates_base

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")


# -- peft.utils.merge_utils ------------------------------------------------------------------------------
def _weights_view(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (tasks.dim() - weights.dim()))


def _prune(t: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return t
    if density < 0:
        raise ValueError(f"density: should be >= 0, got {density}")
    if method == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
        return t * mask.reshape(t.shape)
    pruned = t * torch.bernoulli(torch.full_like(t, density))
    return pruned / density if rescale else pruned


def _majority_mask(tasks: torch.Tensor, method: str) -> torch.Tensor:
    sign = tasks.sign()
    if method == "total":
        mag = tasks.sum(dim=0)
    elif method == "frequency":
        mag = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method: expected 'total' or 'frequency', got {method!r}")
    return sign == torch.where(mag >= 0, 1, -1)


def combine(kind: str, tensors: list, weights: torch.Tensor, density, sign_method: str) -> torch.Tensor:
    """``merge_utils.{task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune}`` by ``kind``."""
    if kind != "linear" and density is None:
        raise ValueError(f"combination_type {kind!r}: needs density (the fraction of values kept)")
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude") for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random", rescale=True) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * _weights_view(stacked, weights)
    if kind in ("ties", "dare_ties"):
        mask = _majority_mask(stacked, sign_method)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


# -- the method ----------------------------------------------------------------------------------------
def _check(pm, adapters, weights, combination_type, svd_rank):
    if str(pm._tuner.peft_type) != "LORA":
        raise ValueError(f"add_weighted_adapter: LoRA adapters only, this model holds {pm._tuner.peft_type}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type: expected one of {COMBINATIONS}, got {combination_type!r}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"adapters / weights: expected lists of the same non-zero length, got {len(adapters)} and "
                         f"{len(weights)}")
    for a in adapters:
        if a not in pm.peft_config:
            raise ValueError(f"adapters: adapter {a!r} does not exist (the model has {list(pm.peft_config)})")
        if getattr(pm.peft_config[a], "target_parameters", None):
            raise ValueError(f"add_weighted_adapter does not support adapters on nn.Parameter ({a!r})")
    shared = [k for k, w in pm._mts_wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(f"Cannot add weighted adapters if they target the same module with modules_to_save: {shared}")
    kind = "linear" if len(adapters) == 1 else combination_type
    cfgs = [pm.peft_config[a] for a in adapters]
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values()) for c in cfgs]
    if kind in ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"):
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties, dare_linear or magnitude_prune.")
        rank = ranks[0]
    elif kind == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    kinds = {isinstance(c.target_modules, str) for c in cfgs}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type (all lists or all regex "
                         "strings)")
    if kinds.pop():
        targets = "|".join(f"({c.target_modules})" for c in cfgs)
    else:
        targets = sorted(set().union(*(set(c.target_modules) for c in cfgs)))
    return kind, rank, targets


def _factors(layer, adapter):
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


@torch.no_grad()
def _svd_factors(kind, layer, adapters, weights, rank, density, sign_method, clamp, full_matrices, driver,
                 shape_A, shape_B):
    from .lora import Conv2d
    valid = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
    deltas = [layer.get_delta_weight(a) for a, _ in valid]
    ws = torch.tensor([w for _, w in valid]).to(deltas[0].device)
    delta = combine({"svd": "linear"}.get(kind, kind[:-len("_svd")]), deltas, ws, density, sign_method)
    is_conv = isinstance(layer, Conv2d)
    if is_conv:
        delta = delta.squeeze() if tuple(layer.base_layer.weight.shape[2:4]) == (1, 1) else delta.flatten(start_dim=1)
    if getattr(layer, "fan_in_fan_out", False) or any(a in layer.lora_embedding_A for a, _ in valid):
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if is_conv:
        U, Vh = U.reshape(shape_B), Vh.reshape(shape_A)
    return Vh, U


def _task_factors(kind, layer, adapters, weights, density, sign_method):
    wa, wb, As, Bs = [], [], [], []
    for a, w in zip(adapters, weights):
        f = _factors(layer, a)
        if f is None:
            continue
        ws = w * layer.scaling[a]
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
        As.append(f[0].data)
        Bs.append(f[1].data)
    dtype = As[0].dtype
    A = combine(kind, As, torch.tensor(wa).to(As[0].device), density, sign_method)
    B = combine(kind, Bs, torch.tensor(wb).to(Bs[0].device), density, sign_method)
    return A.to(dtype), B.to(dtype)


def add_weighted_adapter(pm, adapters, weights, adapter_name, *, combination_type="svd", svd_rank=None,
                         svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                         majority_sign_method="total") -> None:
    """See the module doc; ``pm`` is a fastpeft ``PeftModel`` holding LoRA adapters."""
    from .lora import lora_layers
    if adapter_name in pm.peft_config:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    adapters, weights = list(adapters), [float(w) for w in weights]
    kind, rank, targets = _check(pm, adapters, weights, combination_type, svd_rank)
    first = pm.peft_config[adapters[0]]
    init = True if mutates_base(first.init_lora_weights) else first.init_lora_weights  # (same random draws as HF)
    cfg = dataclasses.replace(copy.deepcopy(first), r=rank, lora_alpha=rank, target_modules=targets,
                              alpha_pattern={}, rank_pattern={}, init_lora_weights=init, loftq_config={})
    active = pm.active_adapters
    pm._add(adapter_name, cfg)
    try:
        for _, layer in lora_layers(pm._model, adapter_name):
            A, B = _factors(layer, adapter_name)
            with torch.no_grad():
                A.zero_()
                B.zero_()
                if kind == "cat":
                    parts = [(f[0].data * w * layer.scaling[a], f[1].data)
                             for a, w in zip(adapters, weights) if (f := _factors(layer, a)) is not None]
                    if not parts:
                        continue
                    cat_A, cat_B = torch.cat([p[0] for p in parts], 0), torch.cat([p[1] for p in parts], 1)
                    A[: cat_A.shape[0], :] = cat_A
                    B[:, : cat_B.shape[1]] = cat_B
                elif not any(_factors(layer, a) is not None for a in adapters):
                    continue
                elif kind.endswith("svd"):
                    a_new, b_new = _svd_factors(kind, layer, adapters, weights, rank, density, majority_sign_method,
                                                svd_clamp, svd_full_matrices, svd_driver, A.shape, B.shape)
                    A.copy_(a_new.to(A))
                    B.copy_(b_new.to(B))
                else:
                    a_new, b_new = _task_factors(kind, layer, adapters, weights, density, majority_sign_method)
                    A.copy_(a_new.to(A))
                    B.copy_(b_new.to(B))
    except Exception:
        pm._delete(adapter_name, unwrap_empty=True)
        raise
    pm._set_active(active)


__all__ = ["add_weighted_adapter", "combine", "COMBINATIONS"]
