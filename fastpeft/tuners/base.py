"""Base config and the contract every fastpeft tuner (PEFT method) implements.

Contract
========

A tuner module (``fastpeft/tuners/<method>.py``) registers itself at import with
:func:`fastpeft.tuners.register_tuner`::

    register_tuner(peft_type, config_cls, inject, adapter_state_dict, load_adapter_state_dict,
                   remove=None, merge=None, unmerge=None, set_adapter=None, enable_adapters=None)

* ``config_cls``: a dataclass subclass of :class:`PeftConfig` whose field names are
  HF PEFT's (so ``adapter_config.json`` files are interchangeable).
* ``inject(model, config, adapter_name) -> list[str]``: adds the adapter's
  parameters to ``model`` *in place* and returns the names of the touched modules.
  Parameter names must make ``model.state_dict()`` keys identical to HF PEFT's in
  memory (adapter name inside, e.g. ``...query.lora_A.default.weight``).  Raises
  ``ValueError`` listing candidate module names when nothing matches, and leaves
  the model unchanged if it fails half-way.
* ``adapter_state_dict(model, adapter_name) -> dict[str, Tensor]``: the adapter's
  tensors under their *on-disk* keys (adapter name stripped), relative to the
  wrapped model, i.e. WITHOUT the ``base_model.model.`` prefix that
  :class:`fastpeft.PeftModel` adds.  (Prompt-learning configs, whose class
  attribute ``is_prompt_learning`` is True, give keys that are written as they
  are, e.g. ``prompt_embeddings``, exactly as HF PEFT writes them.)
* ``load_adapter_state_dict(model, state, adapter_name)``: takes the on-disk keys
  (same convention as above), validates them (missing / unexpected keys, shapes:
  the error names them) and loads them; nothing is changed when it raises.
* ``remove(model, adapter_name)``: undoes ``inject`` for that adapter (used by
  ``delete_adapter``, ``merge_and_unload`` and ``unload``).  It may accept a keyword
  ``unwrap_empty`` (PeftModel passes False from ``delete_adapter``, where HF PEFT keeps
  adapter layers that have no adapter left, and True when unloading).
* ``merge(model, adapter_names)`` / ``unmerge(model)``: fold the adapter into the
  base weights and back (methods that cannot merge leave them None; PeftModel
  then raises a clear error).
* ``set_adapter(model, adapter_names: list[str])``: make these adapters the active
  ones (optional: None means the method supports a single adapter only).
* ``enable_adapters(model, enabled: bool)``: switch all adapters of the method off
  and on again (``with peft_model.disable_adapter():``); optional.

``adapter_state_dict`` and ``load_adapter_state_dict`` may also accept a keyword
argument ``config``: PeftModel then passes the adapter's config (LoRA uses it for ``bias``).

``modules_to_save`` (trainable copies of heads such as ``classifier``) is handled
by :class:`fastpeft.PeftModel` for every method, with HF PEFT's key convention.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

CONFIG_NAME = "adapter_config.json"
_HF_BOOKKEEPING = {"auto_mapping", "revision", "peft_version", "megatron_core", "qalora_group_size"}


@dataclass
class PeftConfig:
    """Fields shared by every method's config (HF PEFT names)."""

    peft_type: Optional[str] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[list] = None

    #: True for methods whose parameters live outside the wrapped model (prompt/prefix tuning).
    is_prompt_learning = False

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (set, tuple)):
                v = sorted(v) if isinstance(v, set) else list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        # HF PEFT writes many fields of features fastpeft does not have; warn only when one
        # of them is set to something other than its "off" value.
        unknown = sorted(k for k, v in d.items() if k not in names and k not in _HF_BOOKKEEPING
                         and v not in (None, False, {}, [], "", 0))
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring config keys fastpeft does not use: {unknown}",
                          stacklevel=2)
        kwargs = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items() if k in names}
        pt = kwargs.get("peft_type")
        if isinstance(pt, str) and pt.startswith("PeftType."):
            kwargs["peft_type"] = pt.split(".", 1)[1]
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``adapter_config.json`` (HF PEFT field names) into ``save_directory`` atomically."""
        os.makedirs(save_directory, exist_ok=True)
        from ..checkpoint import atomic_write_bytes
        d = self.to_dict()
        text = json.dumps(d, indent=2, sort_keys=True, default=_json_default)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))

    @classmethod
    def from_pretrained(cls, path: str) -> "PeftConfig":
        """Read ``adapter_config.json`` from a directory (or the file itself).  Called on
        :class:`PeftConfig`, it returns the registered config class for ``peft_type``."""
        d = read_config_dict(path)
        if cls is PeftConfig or dataclasses.fields(cls) == dataclasses.fields(PeftConfig):
            from . import config_class_for
            target = config_class_for(d.get("peft_type"))
        else:
            target = cls
        return target.from_dict(d)


def as_fastpeft_config(config) -> "PeftConfig":
    """``config`` itself if it is a fastpeft config; an HF PEFT config (anything with
    ``to_dict()`` and a ``peft_type``) converted to the registered fastpeft class."""
    if isinstance(config, PeftConfig):
        return config
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict) or getattr(config, "peft_type", None) is None:
        raise TypeError(f"peft_config: expected a fastpeft config (e.g. fastpeft.LoraConfig) or an HF PEFT "
                        f"config, got {type(config).__name__}")
    from . import config_class_for
    d = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in to_dict().items()}
    return config_class_for(d["peft_type"]).from_dict(d)


def _json_default(o: Any):
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"adapter_config.json: cannot serialise {type(o).__name__}")


def read_config_dict(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"adapter config: no {CONFIG_NAME} at {path!r}")
    try:
        with open(file, "r", encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter config {file!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or "peft_type" not in d:
        raise ValueError(f"adapter config {file!r}: expected a JSON object with a 'peft_type' field")
    pt = d["peft_type"]
    if isinstance(pt, str) and pt.startswith("PeftType."):
        d["peft_type"] = pt.split(".", 1)[1]
    return d


__all__ = ["PeftConfig", "CONFIG_NAME", "read_config_dict", "as_fastpeft_config", "field"]
