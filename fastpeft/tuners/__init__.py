"""Tuner (PEFT method) registry.  See :mod:`fastpeft.tuners.base` for the contract.

LoRA is always present; the other methods are imported if their module exists and
imports cleanly (a failure is recorded in :data:`TUNER_IMPORT_ERRORS`, never raised
at ``import fastpeft``).
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from .base import PeftConfig


@dataclass(frozen=True)
class Tuner:
    peft_type: str
    config_cls: type
    inject: Callable
    adapter_state_dict: Callable
    load_adapter_state_dict: Callable
    remove: Optional[Callable] = None
    merge: Optional[Callable] = None
    unmerge: Optional[Callable] = None
    set_adapter: Optional[Callable] = None
    enable_adapters: Optional[Callable] = None


_TUNERS: dict[str, Tuner] = {}
#: module name -> why it could not be imported
TUNER_IMPORT_ERRORS: dict[str, str] = {}


def register_tuner(peft_type: str, config_cls, inject, adapter_state_dict, load_adapter_state_dict,
                   remove=None, merge=None, unmerge=None, set_adapter=None, enable_adapters=None) -> Tuner:
    """Register a PEFT method under ``peft_type`` (HF PEFT's name, e.g. ``"LORA"``, ``"IA3"``)."""
    if not isinstance(peft_type, str) or not peft_type:
        raise ValueError(f"peft_type: expected a non-empty str, got {peft_type!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise TypeError(f"config_cls: expected a subclass of fastpeft.PeftConfig, got {config_cls!r}")
    for name, fn in (("inject", inject), ("adapter_state_dict", adapter_state_dict),
                     ("load_adapter_state_dict", load_adapter_state_dict)):
        if not callable(fn):
            raise TypeError(f"{name}: expected a callable, got {fn!r}")
    t = Tuner(peft_type.upper(), config_cls, inject, adapter_state_dict, load_adapter_state_dict,
              remove, merge, unmerge, set_adapter, enable_adapters)
    _TUNERS[t.peft_type] = t
    return t


def _norm(peft_type) -> str:
    if hasattr(peft_type, "value"):
        peft_type = peft_type.value
    if not isinstance(peft_type, str):
        raise ValueError(f"peft_type: expected a str, got {peft_type!r}")
    if peft_type.startswith("PeftType."):
        peft_type = peft_type.split(".", 1)[1]
    return peft_type.upper()


def get_tuner(peft_type) -> Tuner:
    key = _norm(peft_type)
    if key not in _TUNERS:
        extra = f" (modules that failed to import: {TUNER_IMPORT_ERRORS})" if TUNER_IMPORT_ERRORS else ""
        raise ValueError(f"peft_type: unknown PEFT method {peft_type!r}; fastpeft supports "
                         f"{sorted(_TUNERS)}{extra}")
    return _TUNERS[key]


def config_class_for(peft_type):
    return get_tuner(peft_type).config_cls


def registered_tuners() -> list[str]:
    return sorted(_TUNERS)


from . import lora  # noqa: E402  (always present)

for _mod in ("adapter", "ia3", "bitfit", "prompt", "prefix"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_mod}":
            TUNER_IMPORT_ERRORS[_mod] = repr(_e)
            warnings.warn(f"fastpeft.tuners.{_mod} could not be imported: {_e!r}")
    except Exception as _e:  # a broken optional method must not break `import fastpeft`
        TUNER_IMPORT_ERRORS[_mod] = repr(_e)
        warnings.warn(f"fastpeft.tuners.{_mod} could not be imported: {_e!r}")

__all__ = ["PeftConfig", "Tuner", "register_tuner", "get_tuner", "config_class_for", "registered_tuners",
           "TUNER_IMPORT_ERRORS"]
