"""Which modules a config targets: ``target_modules`` as a list of names (exact
module path or its suffix after a dot), a regex string (``re.fullmatch`` on the
module path) or ``"all-linear"``; ``layers_to_transform`` / ``layers_pattern``;
``exclude_modules``; never inside ``modules_to_save``.  Same rules as HF PEFT's
``check_target_module_exists`` so the same config touches the same modules."""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch.nn as nn

from .._optional import conv1d_cls

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def linear_types() -> tuple:
    c = conv1d_cls()
    return (nn.Linear,) if c is None else (nn.Linear, c)


def _layer_index_ok(config, key: str) -> bool:
    idx = getattr(config, "layers_to_transform", None)
    if idx is None or (isinstance(idx, list) and len(idx) == 0):
        return True
    pattern = getattr(config, "layers_pattern", None)
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    i = int(match.group("idx"))
    return i == idx if isinstance(idx, int) else i in idx


def in_modules_to_save(config, key: str) -> bool:
    mts = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in mts)


def is_excluded(config, key: str) -> bool:
    ex = getattr(config, "exclude_modules", None)
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return True
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return True
    return in_modules_to_save(config, key)


def key_matches(target_modules, key: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith(f".{t}") for t in target_modules)


def _all_linear_names(model: nn.Module, config) -> set:
    names = {n for n, m in model.named_modules() if isinstance(m, linear_types())}
    exclude = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except Exception:
            out = None
    if out is not None:
        exclude |= {n for n, m in model.named_modules() if m is out}
    elif str(getattr(config, "task_type", None) or "").upper().endswith("SEQ_CLS"):
        for h in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, h, None)
            if head is not None:
                exclude |= {n for n, m in model.named_modules() if m is head}
                break
    return names - exclude


def _is_adapter_internal(name: str) -> bool:
    parts = name.split(".")
    return any(p in ("base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector",
                     "original_module", "modules_to_save") for p in parts)


def find_targets(model: nn.Module, config, supported: tuple, what: str = "target_modules") -> list[str]:
    """Names of modules of ``model`` that ``config`` targets, in ``named_modules`` order.

    Raises ValueError listing candidate module names when nothing matches, or when a
    targeted module's type is not in ``supported``."""
    tm = getattr(config, "target_modules", None)
    if tm is None:
        raise ValueError(f"{what}: no target modules given; candidates: {candidate_names(model, supported)}")
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        tm = _all_linear_names(model, config)
    elif isinstance(tm, (set, tuple)):
        tm = list(tm)
    matched, unsupported = [], []
    for name, module in model.named_modules():
        if not name or _is_adapter_internal(name):
            continue
        if is_excluded(config, name) or not key_matches(tm, name) or not _layer_index_ok(config, name):
            continue
        if isinstance(module, supported):
            matched.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(f"{what}: these targeted modules have a type this method does not support: "
                         f"{unsupported}; supported types: {[t.__name__ for t in supported]}")
    if not matched:
        raise ValueError(f"{what}={getattr(config, 'target_modules', None)!r} matched no module of "
                         f"{type(model).__name__}; candidates: {candidate_names(model, supported)}")
    if isinstance(tm, list):
        leftover = [t for t in tm if not any(n == t or n.endswith(f".{t}") for n in matched)]
        if leftover:
            warnings.warn(f"{what}: entries {leftover} matched no module (others did)", stacklevel=3)
    return matched


def candidate_names(model: nn.Module, supported: tuple, limit: int = 40) -> list[str]:
    """Distinct short names (last path component) of the modules of supported types."""
    seen = []
    for name, module in model.named_modules():
        if name and isinstance(module, supported) and not _is_adapter_internal(name):
            short = name.rsplit(".", 1)[-1]
            if short not in seen:
                seen.append(short)
    return seen[:limit] + (["..."] if len(seen) > limit else [])


def pattern_value(patterns: Optional[dict], key: str, default):
    """HF PEFT's rank_pattern / alpha_pattern lookup: first pattern p with
    ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def get_submodule_parent(model: nn.Module, name: str):
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


__all__ = ["ALL_LINEAR", "find_targets", "candidate_names", "pattern_value", "linear_types",
           "get_submodule_parent", "key_matches", "is_excluded", "in_modules_to_save"]
