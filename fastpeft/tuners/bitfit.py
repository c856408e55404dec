"""BitFit: train only the bias terms of a model (Ben Zaken et al. 2022), on any ``nn.Module``.

BitFit adds no parameters: ``inject`` freezes every parameter except the biases of
the targeted modules (all modules with a ``bias`` parameter by default, LayerNorm
included) and keeps a copy of the original biases, so that

* ``enable_adapters(model, False)`` (``with peft_model.disable_adapter():``) runs
  the model with its original biases and ``True`` swaps the trained ones back;
* ``merge`` marks the trained biases as the model's own (``merge_and_unload``
  keeps them), while ``remove`` without a merge restores the original biases;
  either way ``remove`` restores every parameter's ``requires_grad``.

On disk: ``{"<module path>.bias": tensor}`` (``base_model.model.`` prefix added by
:class:`fastpeft.PeftModel`); peft_type ``"BITFIT"`` (HF PEFT has no BitFit).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .base import PeftConfig
from .registry import register_tuner

PEFT_TYPE = "BITFIT"
_STATE_ATTR = "_fastpeft_bitfit"


@dataclass
class BitFitConfig(PeftConfig):
    """target_modules: None (every module owning a ``bias`` parameter), a list of names
    (exact path or ``.name`` suffix) or a regex (full match on the module path).
    exclude_modules: same forms, skipped.  Modules named in ``modules_to_save`` are
    skipped too (PeftModel trains their copies)."""

    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None

    def __post_init__(self):
        self.peft_type = PEFT_TYPE
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, list, tuple, set)):
                raise ValueError(f"BitFitConfig.{name}: expected a list of names or a regex str, got {v!r}")
            if isinstance(v, (tuple, set)):
                setattr(self, name, sorted(v))


def _matches(spec, key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


def _in_modules_to_save(config, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in (config.modules_to_save or []))


def _bias_owners(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) and "modules_to_save" not in n.split(".")]


class _BitFitState:
    def __init__(self, modules: list, original: dict, requires_grad: dict):
        self.modules = modules            # module paths whose bias is trained
        self.original = original          # path -> original bias (detached clone)
        self.requires_grad = requires_grad  # param name -> requires_grad before inject
        self.enabled = True
        self.merged = False
        self.trained_while_disabled: dict = {}


def _state(model: nn.Module, adapter_name: str) -> _BitFitState:
    states = getattr(model, _STATE_ATTR, {})
    if adapter_name not in states:
        raise ValueError(f"adapter_name: no BitFit adapter {adapter_name!r} on this model "
                         f"(present: {sorted(states)})")
    return states[adapter_name]


def inject(model: nn.Module, config: BitFitConfig, adapter_name: str = "default") -> list:
    """Freeze all parameters except the targeted biases; returns the module paths whose bias trains."""
    if not isinstance(config, BitFitConfig):
        raise TypeError(f"config: expected BitFitConfig, got {type(config).__name__}")
    states = getattr(model, _STATE_ATTR, None) or {}
    if states:
        raise ValueError(f"adapter_name: BitFit supports one adapter per model; {sorted(states)} already "
                         f"present (it trains the model's own biases)")
    owners = _bias_owners(model)
    chosen = [(n, m) for n, m in owners
              if (config.target_modules is None or _matches(config.target_modules, n))
              and not (config.exclude_modules and _matches(config.exclude_modules, n))
              and not _in_modules_to_save(config, n)]
    if not chosen:
        cands = sorted({n.rsplit(".", 1)[-1] for n, _ in owners})
        raise ValueError(f"BitFitConfig.target_modules={config.target_modules!r} matched no module with a "
                         f"bias; candidates: {cands if cands else 'none: the model has no bias parameters'}")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    original = {n: m.bias.detach().clone() for n, m in chosen}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in chosen:
        m.bias.requires_grad_(True)
    states = {adapter_name: _BitFitState([n for n, _ in chosen], original, requires_grad)}
    object.__setattr__(model, _STATE_ATTR, states)
    return [n for n, _ in chosen]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *, config=None) -> dict:
    st = _state(model, adapter_name)
    if not st.enabled:  # trained values are parked while disabled
        return {f"{n}.bias": st.trained_while_disabled[n] for n in st.modules}
    return {f"{n}.bias": model.get_submodule(n).bias.detach() for n in st.modules}


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str = "default", *, config=None) -> None:
    st = _state(model, adapter_name)
    params = {f"{n}.bias": model.get_submodule(n).bias for n in st.modules}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                 for k in set(params) & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"BitFit adapter does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {bad}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    """``False``: run with the original biases (trained ones parked); ``True``: put them back."""
    for st in getattr(model, _STATE_ATTR, {}).values():
        if enabled == st.enabled:
            continue
        with torch.no_grad():
            for n in st.modules:
                b = model.get_submodule(n).bias
                if not enabled:
                    st.trained_while_disabled[n] = b.detach().clone()
                    b.copy_(st.original[n])
                else:
                    b.copy_(st.trained_while_disabled.pop(n))
        st.enabled = enabled


def merge(model: nn.Module, adapter_names=None, *, safe_merge: bool = False) -> None:
    """BitFit trains the model's own biases: merging only marks them as kept by :func:`remove`
    (no weight changes, so ``safe_merge`` has nothing to check)."""
    for st in getattr(model, _STATE_ATTR, {}).values():
        st.merged = True


def unmerge(model: nn.Module) -> None:
    for st in getattr(model, _STATE_ATTR, {}).values():
        st.merged = False


def remove(model: nn.Module, adapter_name: str = "default", *, unwrap_empty: bool = True) -> None:
    """Undo :func:`inject`: restore ``requires_grad``; restore the original biases unless merged
    (no wrapper layers: ``unwrap_empty`` has nothing to do)."""
    st = _state(model, adapter_name)
    if not st.enabled:
        enable_adapters(model, True)
    with torch.no_grad():
        if not st.merged:
            for n in st.modules:
                model.get_submodule(n).bias.copy_(st.original[n])
    for n, p in model.named_parameters():
        if n in st.requires_grad:
            p.requires_grad_(st.requires_grad[n])
    object.__delattr__(model, _STATE_ATTR)


def trainable_bias_names(model: nn.Module, adapter_name: str = "default") -> list:
    return [f"{n}.bias" for n in _state(model, adapter_name).modules]


register_tuner(PEFT_TYPE, BitFitConfig, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, merge=merge, unmerge=unmerge, enable_adapters=enable_adapters)
