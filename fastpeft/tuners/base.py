"""The base config of every fastpeft tuner (PEFT method) and reading ``adapter_config.json``.

The contract a tuner implements, and its registry, are in :mod:`fastpeft.tuners.registry`.
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
            from .registry import config_class_for
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
    from .registry import config_class_for
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
