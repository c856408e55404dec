"""The tuner (PEFT method) registry and the contract every tuner implements.

A leaf module: it imports only :mod:`fastpeft.tuners.base`, so a method module imports
:func:`register_tuner` from here without going through ``fastpeft.tuners`` (which imports
every in-tree method).

Contract
========

A tuner module (``fastpeft/tuners/<method>.py``) registers itself at import::

    from .registry import register_tuner
    register_tuner(peft_type, config_cls, inject, adapter_state_dict, load_adapter_state_dict,
                   remove=None, merge=None, unmerge=None, set_adapter=None, enable_adapters=None)

Every function has this fixed signature (:class:`fastpeft.PeftModel` always calls it with all
of these arguments, the keyword-only ones by name; a method that has no use for one accepts
and ignores it).  :func:`register_tuner` checks the signatures and raises ``TypeError`` naming
the function that does not fit.

* ``config_cls``: a dataclass subclass of :class:`~fastpeft.tuners.base.PeftConfig` whose field
  names are HF PEFT's (so ``adapter_config.json`` files are interchangeable).
* ``inject(model, config, adapter_name) -> list[str]``: adds the adapter's parameters to
  ``model`` *in place* and returns the names of the touched modules.  Parameter names must
  make ``model.state_dict()`` keys identical to HF PEFT's in memory (adapter name inside,
  e.g. ``...query.lora_A.default.weight``).  Raises ``ValueError`` listing candidate module
  names when nothing matches, and leaves the model unchanged if it fails half-way.
* ``adapter_state_dict(model, adapter_name, *, config) -> dict[str, Tensor]``: the adapter's
  tensors under their *on-disk* keys (adapter name stripped), relative to the wrapped model,
  i.e. WITHOUT the ``base_model.model.`` prefix that PeftModel adds.  (Prompt-learning
  configs, whose class attribute ``is_prompt_learning`` is True, give keys that are written
  as they are, e.g. ``prompt_embeddings``, exactly as HF PEFT writes them.)  ``config`` is
  the adapter's config (LoRA reads ``bias`` from it).
* ``load_adapter_state_dict(model, state, adapter_name, *, config)``: takes the on-disk keys
  (same convention), validates them (missing / unexpected keys, shapes: the error names
  them) and loads them; nothing is changed when it raises.
* ``remove(model, adapter_name, *, unwrap_empty)``: undoes ``inject`` for that adapter (used
  by ``delete_adapter``, ``merge_and_unload`` and ``unload``).  ``unwrap_empty``: replace a
  wrapper layer left without adapters by its base layer (PeftModel passes False from
  ``delete_adapter``, where HF PEFT keeps such layers, and True when unloading).  LoRA
  honours it; IA3 always unwraps; the hook-based methods have no wrapper layers.
* ``merge(model, adapter_names, *, safe_merge)`` / ``unmerge(model)``: fold the adapters
  (``adapter_names`` None: the active ones) into the base weights and back; ``safe_merge``
  checks the merged weights are finite first.  Methods that cannot merge register None;
  PeftModel then raises a clear error.
* ``set_adapter(model, adapter_names, *, inference_mode)``: make these adapters (a list of
  names) the active ones, trainable unless ``inference_mode``.  None: the method supports a
  single adapter only.
* ``enable_adapters(model, enabled)``: switch all adapters of the method off and on again
  (``with peft_model.disable_adapter():``); None when the method cannot.

``modules_to_save`` (trainable copies of heads such as ``classifier``) is handled by
:class:`fastpeft.PeftModel` for every method, with HF PEFT's key convention.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from .base import PeftConfig

#: function -> (positional parameter names, keyword-only parameter names) of its fixed call
CONTRACT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "inject": (("model", "config", "adapter_name"), ()),
    "adapter_state_dict": (("model", "adapter_name"), ("config",)),
    "load_adapter_state_dict": (("model", "state", "adapter_name"), ("config",)),
    "remove": (("model", "adapter_name"), ("unwrap_empty",)),
    "merge": (("model", "adapter_names"), ("safe_merge",)),
    "unmerge": (("model",), ()),
    "set_adapter": (("model", "adapter_names"), ("inference_mode",)),
    "enable_adapters": (("model", "enabled"), ()),
}
_REQUIRED = ("inject", "adapter_state_dict", "load_adapter_state_dict")


@dataclass(frozen=True)
class Tuner:
    """A registered PEFT method: its config class and the contract's functions (see module doc)."""

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


def _check_signature(name: str, fn: Callable) -> None:
    """Raise TypeError unless ``fn`` can be called the way PeftModel calls contract function ``name``."""
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {fn!r}")
    positional, keywords = CONTRACT[name]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: cannot be checked, trusted
        return
    try:
        sig.bind(*positional, **{k: k for k in keywords})
    except TypeError as e:
        call = ", ".join(positional + (("*",) + keywords if keywords else ()))
        raise TypeError(f"{name}: {getattr(fn, '__qualname__', fn)}{sig} does not fit the tuner contract "
                        f"{name}({call}) ({e}); see fastpeft.tuners.registry") from None


def register_tuner(peft_type: str, config_cls, inject, adapter_state_dict, load_adapter_state_dict,
                   remove=None, merge=None, unmerge=None, set_adapter=None, enable_adapters=None) -> Tuner:
    """Register a PEFT method under ``peft_type`` (HF PEFT's name, e.g. ``"LORA"``, ``"IA3"``)."""
    if not isinstance(peft_type, str) or not peft_type:
        raise ValueError(f"peft_type: expected a non-empty str, got {peft_type!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, PeftConfig)):
        raise TypeError(f"config_cls: expected a subclass of fastpeft.PeftConfig, got {config_cls!r}")
    fns = dict(inject=inject, adapter_state_dict=adapter_state_dict,
               load_adapter_state_dict=load_adapter_state_dict, remove=remove, merge=merge, unmerge=unmerge,
               set_adapter=set_adapter, enable_adapters=enable_adapters)
    for name, fn in fns.items():
        if fn is not None or name in _REQUIRED:
            _check_signature(name, fn)
    t = Tuner(peft_type.upper(), config_cls, **fns)
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
    """The registered method for ``peft_type`` (a str such as ``"LORA"`` or HF PEFT's ``PeftType``)."""
    key = _norm(peft_type)
    if key not in _TUNERS:
        raise ValueError(f"peft_type: unknown PEFT method {peft_type!r}; fastpeft supports {sorted(_TUNERS)}")
    return _TUNERS[key]


def config_class_for(peft_type) -> type:
    return get_tuner(peft_type).config_cls


def registered_tuners() -> list[str]:
    return sorted(_TUNERS)


__all__ = ["Tuner", "register_tuner", "get_tuner", "config_class_for", "registered_tuners", "CONTRACT"]
