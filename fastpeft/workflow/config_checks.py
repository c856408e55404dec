"""The leaf of the fine-tuning configuration: :class:`ConfigError`, number parsing, the ``data:`` keys and
their check, and :class:`Section`, the base of a config section written as a validated dataclass.

It imports nothing from fastpeft, so every section -- the workflow's own and those of the applications
built on it (``fewshot:``, ``continual:``) -- uses it without importing the config loader
(:mod:`fastpeft.workflow.config`) back.
"""
from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (``trainer.lr: expected a number, got True``)."""


def parse_number(value, where: str):
    """A config number: ints and floats as they are, strings parsed (``"1e-3"`` -> 0.001, ``"8"`` -> 8);
    anything else (booleans included) is a :class:`ConfigError` naming ``where``."""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".enaif") else int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


DATA_KEYS = {"train", "validation", "test", "format", "text_column", "text_pair_column", "label_column",
             "quoting", "max_length", "train_limit", "train_subset_seed", "validation_limit", "token_column",
             "tag_column", "tokens_column", "tags_column"}
DATA_KEYS |= {"source_column", "target_column", "source_lang", "target_lang", "source_prefix",  # seq2seq
              "max_target_length", "num_beams"}
FILE_KEYS = {"path"} | (DATA_KEYS - {"train", "validation", "test", "max_length", "train_limit",
                                     "train_subset_seed", "validation_limit"})


def check_data(data: dict, where: str = "data", required: dict[str, str] | None = None) -> dict:
    """Check a ``data:`` mapping in place and return it: known keys only; each split in ``required``
    (``{split: why}``) present; every split a path or a mapping with ``path`` and file keys; the sizes and
    the subset seed parsed to integers (>= 1; the seed >= 0). Errors name ``<where>.<key>``."""
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(DATA_KEYS)}")
    for split, why in (required or {}).items():
        if not data.get(split):
            raise ConfigError(f"{where}.{split}: required ({why})")
    for split in ("train", "validation", "test"):
        v = data.get(split)
        if v is None or isinstance(v, str):
            continue
        if not isinstance(v, dict) or "path" not in v:
            raise ConfigError(f"{where}.{split}: expected a path or a mapping with 'path', got {v!r}")
        bad = set(v) - FILE_KEYS
        if bad:
            raise ConfigError(f"{where}.{split}: unknown key(s) {sorted(bad)}; expected some of {sorted(FILE_KEYS)}")
    for k in ("max_length", "train_limit", "validation_limit", "train_subset_seed"):
        if data.get(k) is not None:
            data[k] = parse_number(data[k], f"{where}.{k}")
            if not isinstance(data[k], int) or data[k] < (0 if k == "train_subset_seed" else 1):
                raise ConfigError(f"{where}.{k}: expected a positive integer, got {data[k]!r}")
    return data


class Section:
    """Base of a config section written as a dataclass, like :class:`~fastpeft.workflow.TrainerConfig`:
    fields with defaults, checks in ``__post_init__`` raising :class:`ConfigError` naming
    ``<NAME>.<key>``. :meth:`from_section` builds one from the YAML mapping (unknown keys are an error, a
    null value means the default); :meth:`to_dict` is the plain mapping a built config holds."""

    NAME = "section"  # the section's key in the config file

    @classmethod
    def from_section(cls, section):
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{cls.NAME}: expected a mapping, got {type(section).__name__}")
        keys = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(section) - set(keys))
        if unknown:
            raise ConfigError(f"{cls.NAME}: unknown key(s) {unknown}; expected some of {keys}")
        return cls(**{k: v for k, v in section.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["ConfigError", "parse_number", "DATA_KEYS", "FILE_KEYS", "check_data", "Section"]
