"""The base config of every fastpeft tuner (PEFT method) and reading ``adapter_config.json``.

The contract a tuner implements, and its registry, are in :mod:`fastpeft.tuners.registry`.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

CONFIG_NAME = "adapter_config.json"
#: keys HF PEFT writes about the file itself, not about the method
_HF_BOOKKEEPING = {"auto_mapping", "peft_version"}
_OFF = (None, False, {}, [], "")


@dataclass
class PeftConfig:
    """Fields shared by every method's config (HF PEFT names)."""

    peft_type: Optional[str] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[list] = None

    #: True for methods whose parameters live outside the wrapped model (prompt/prefix tuning).
    is_prompt_learning = False
    #: HF config fields of this method that fastpeft does not implement but accepts at these values
    #: (None: any value, the field only matters together with another one that is refused)
    _HF_INERT: ClassVar[dict] = {}

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
        # HF PEFT writes every field of its config, most of them "off"; one that is set to anything else is a
        # feature fastpeft does not implement: refused by name rather than silently dropped.
        unknown = sorted(k for k, v in d.items() if k not in names and k not in _HF_BOOKKEEPING
                         and not _inert(cls._HF_INERT, k, v))
        if unknown:
            raise ValueError(f"{cls.__name__}: fastpeft does not implement "
                             + ", ".join(f"{k}={d[k]!r}" for k in unknown)
                             + " (use HF PEFT for these features)")
        kwargs = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in d.items() if k in names}
        pt = kwargs.get("peft_type")
        if isinstance(pt, str) and pt.startswith("PeftType."):
            kwargs["peft_type"] = pt.split(".", 1)[1]
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str, auto_mapping_dict: Optional[dict] = None) -> None:
        """Write ``adapter_config.json`` (HF PEFT field names) into ``save_directory`` atomically.
        ``auto_mapping_dict`` (HF's ``auto_mapping``: the base model class, for ``AutoPeftModel``)."""
        os.makedirs(save_directory, exist_ok=True)
        from ..checkpoint import atomic_write_bytes
        d = self.to_dict()
        if auto_mapping_dict is not None:
            d["auto_mapping"] = auto_mapping_dict
        text = json.dumps(d, indent=2, sort_keys=True, default=_json_default)
        atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), text.encode("utf-8"))

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None, **hub_kwargs) -> "PeftConfig":
        """Read ``adapter_config.json`` from a directory (or the file itself; ``subfolder`` inside it) or a
        Hugging Face Hub repository (``revision``, ``cache_dir``, ``token``, ...: see
        :func:`fastpeft.hub.resolve_adapter_dir`).  Called on :class:`PeftConfig`, it returns the
        registered config class for ``peft_type``."""
        if subfolder is not None or hub_kwargs or not os.path.exists(os.fspath(path)):
            from ..hub import resolve_adapter_dir
            path = resolve_adapter_dir(path, subfolder=subfolder, **hub_kwargs)
        d = read_config_dict(path)
        if cls is PeftConfig or dataclasses.fields(cls) == dataclasses.fields(PeftConfig):
            from .registry import config_class_for
            target = config_class_for(d.get("peft_type"))
        else:
            target = cls
        return target.from_dict(d)


class TaskType(str, enum.Enum):
    """HF PEFT's task types (``peft.TaskType``): ``LoraConfig(task_type=TaskType.SEQ_CLS)`` or the string."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def task_type_of(config) -> str:
    """``config.task_type`` as an upper-case str ('' when unset), whether a str or an enum (``peft.TaskType``)."""
    t = getattr(config, "task_type", None)
    t = getattr(t, "value", t)
    return str(t).upper() if t else ""


def _inert(table: dict, key: str, value) -> bool:
    """Whether an HF config field fastpeft does not have is at a value that changes nothing."""
    if isinstance(value, enum.Enum):
        value = value.value
    if key in table:
        allowed = table[key]
        return allowed is None or value in allowed or value in _OFF
    return value in _OFF


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


__all__ = ["PeftConfig", "CONFIG_NAME", "read_config_dict", "as_fastpeft_config", "field", "TaskType", "task_type_of"]
