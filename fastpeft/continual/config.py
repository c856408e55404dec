"""The ``continual:`` section of a ``fastpeft finetune`` config, and running it.

::

    model: minilm
    task: sequence_classification
    output_dir: runs/continual
    data: {max_length: 64, quoting: none}          # shared by every task (columns, format, max_length)
    method: {name: lora, r: 8, lora_alpha: 16, target_modules: [query, value]}
    trainer: {lr: 1.0e-3, epochs: 1, batch_size: 32, progress: false}
    continual:
      strategy: ewc          # naive | ewc | l2sp | replay | per_task_adapters | lwf
      tasks:                 # in stream order; each task's data overrides the top-level data section
        - {name: short, data: {train: short_train.tsv, validation: short_dev.tsv}}
        - {name: long,  data: {train: long_train.tsv, validation: {path: long_dev.tsv, text_column: content}}}
      ewc_lambda: 100.0      # ewc: penalty weight           ewc_gamma: 1.0    decay of the accumulated Fisher
      fisher_samples: 200    # ewc: examples per Fisher      fisher_mode: empirical | expected
      l2_lambda: 0.01        # l2sp: penalty weight          l2_anchor: previous | initial
      replay_size: 200       # replay: buffer capacity (examples, all tasks together)
      lwf_alpha: 1.0         # lwf: distillation weight      lwf_temperature: 2.0
      seed: null             # strategy seed (Fisher subsets, reservoir, new adapters); default trainer.seed

:func:`validate_section` checks the section (``ValueError`` naming ``continual.<key>``) and returns it
with every default filled; :func:`run_from_config` reads each task's files, fits one label vocabulary on
the union of the tasks' training labels, builds the model with the ``method`` section, runs the strategy
(:func:`fastpeft.continual.run_stream`) and writes ``result.json``, ``matrix.png`` and ``adapter/`` into
``output_dir``. The top-level ``data.train`` / ``data.validation`` are not used: each task names its own.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Optional

import torch

from ..workflow.config_checks import ConfigError, Section, check_data, parse_number
from ..workflow.models import load_tokenizer, resolve_model_path
from ..workflow.pipeline import apply_method, load_split
from ..workflow.tasks import get_task
from ..workflow.trainer import TrainerConfig
from .methods import STRATEGIES, STRATEGY_PARAMS
from .runner import run_stream
from .stream import ContinualTask

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclasses.dataclass
class ContinualConfig(Section):
    """The ``continual:`` section (see the module docstring), checked when built: errors are
    :class:`~fastpeft.workflow.config_checks.ConfigError` naming ``continual.<key>``; numbers given as
    strings are parsed, each task's ``data`` is checked like the top-level ``data:`` section."""

    NAME = "continual"
    strategy: str = "naive"
    tasks: Optional[list] = None
    ewc_lambda: float = 100.0
    ewc_gamma: float = 1.0
    fisher_samples: Optional[int] = 200
    fisher_mode: str = "empirical"
    l2_lambda: float = 0.01
    l2_anchor: str = "previous"
    replay_size: int = 200
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    seed: Optional[int] = None

    @classmethod
    def from_section(cls, section):
        if section is None:
            raise ConfigError("continual: expected a mapping with 'strategy' and 'tasks', got nothing")
        return super().from_section(section)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"continual.strategy: unknown strategy {self.strategy!r}; expected one of "
                              f"{sorted(STRATEGIES)}")
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ConfigError(f"continual.tasks: expected a non-empty list of {{name, data}} mappings, "
                              f"got {self.tasks!r}")
        self.tasks = [_check_task(i, t) for i, t in enumerate(self.tasks)]
        names = [t["name"] for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"continual.tasks: task names must be unique, repeated: {dup}")
        for k in ("ewc_lambda", "ewc_gamma", "l2_lambda", "lwf_alpha", "lwf_temperature"):
            setattr(self, k, float(parse_number(getattr(self, k), f"continual.{k}")))
        for k in ("replay_size", "fisher_samples", "seed"):
            if getattr(self, k) is not None:
                setattr(self, k, _integer(getattr(self, k), k))
        checks = {"ewc_lambda": (self.ewc_lambda >= 0, "a number >= 0"),
                  "ewc_gamma": (0 <= self.ewc_gamma <= 1, "a number in [0, 1]"),
                  "l2_lambda": (self.l2_lambda >= 0, "a number >= 0"),
                  "lwf_alpha": (self.lwf_alpha >= 0, "a number >= 0"),
                  "lwf_temperature": (self.lwf_temperature > 0, "a number > 0"),
                  "replay_size": (self.replay_size is not None and self.replay_size > 0,
                                  "a positive integer (the buffer's capacity in examples)"),
                  "fisher_samples": (self.fisher_samples is None or self.fisher_samples >= 1,
                                     "an integer >= 1 (or null: every training example)"),
                  "seed": (self.seed is None or self.seed >= 0, "null or an integer >= 0")}
        for k, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"continual.{k}: expected {expected}, got {getattr(self, k)!r}")
        if self.fisher_mode not in ("empirical", "expected"):
            raise ConfigError(f"continual.fisher_mode: expected 'empirical' or 'expected', got {self.fisher_mode!r}")
        if self.l2_anchor not in ("previous", "initial"):
            raise ConfigError(f"continual.l2_anchor: expected 'previous' or 'initial', got {self.l2_anchor!r}")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(ContinualConfig)}


def _integer(value, key: str) -> int:
    value = parse_number(value, f"continual.{key}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(f"continual.{key}: expected an integer, got {value!r}")
    return value


def _check_task(i: int, t) -> dict:
    where = f"continual.tasks[{i}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a mapping {{name: ..., data: {{train: ..., validation: ...}}}}, "
                          f"got {t!r}")
    bad = sorted(set(t) - {"name", "data"})
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; expected 'name' and 'data'")
    name = t.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected a non-empty name of letters, digits, '_' or '-', got {name!r}")
    data = t.get("data")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}.data: expected a mapping with 'train' and 'validation', got {data!r}")
    why = "every task needs training and evaluation data"
    return {"name": name, "data": check_data(copy.deepcopy(data), f"{where}.data",
                                             required={"train": why, "validation": why})}


def validate_section(section) -> dict:
    """Check a ``continual:`` section (:class:`ContinualConfig`) and return it as a dict with every default
    filled (see module docstring). Raises ``ValueError`` (``ConfigError``) naming ``continual.<key>``."""
    return ContinualConfig.from_section(section).to_dict()


def strategy_params(section: dict, seed: int) -> dict:
    """The keyword arguments of ``make_strategy(section["strategy"], ...)`` from a validated section."""
    name = section["strategy"]
    params = {k: section[k] for k in STRATEGY_PARAMS[name] if k != "seed"}
    if "seed" in STRATEGY_PARAMS[name]:
        params["seed"] = section["seed"] if section["seed"] is not None else seed
    return params


def run_from_config(cfg: dict, log=None) -> dict:
    """Run the ``continual:`` section of ``cfg`` (a dict from ``fastpeft.workflow.config.build_config``,
    plus ``continual``); returns the result dict (also written to ``output_dir/result.json``).
    ``log(message)``, when given, receives one progress line per task (the matrix row)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"cfg: expected the config dict from build_config, got {type(cfg).__name__}")
    section = validate_section(cfg.get("continual"))
    for key in ("model", "task"):
        if not cfg.get(key):
            raise ConfigError(f"{key}: required")
    task = get_task(cfg["task"])
    if task.default_mode != "max" or not hasattr(task, "fit_labels"):
        raise ConfigError(f"task: continual learning needs a labelled task with a higher-is-better metric "
                     f"(sequence_classification, token_classification), got {cfg['task']!r}")
    trcfg = cfg.get("trainer")
    if trcfg is None:
        trcfg = TrainerConfig()
    elif isinstance(trcfg, dict):
        trcfg = TrainerConfig(**trcfg)
    output_dir = cfg.get("output_dir") or trcfg.output_dir
    model_path = resolve_model_path(cfg["model"])
    tok = load_tokenizer(model_path)
    shared = {k: v for k, v in (cfg.get("data") or {}).items() if k not in ("train", "validation", "test")}
    loaded = []
    for t in section["tasks"]:
        d = dict(shared, **t["data"])
        tr = load_split(task, d, "train", d.get("train_limit"), d.get("train_subset_seed"))
        ev = load_split(task, d, "validation", d.get("validation_limit"))
        loaded.append((t["name"], d, tr, ev))
    task.fit_labels([r for _, _, tr, _ in loaded for r in tr])  # one head: the union of every task's labels
    stream = []
    for name, d, tr, ev in loaded:
        max_len = d.get("max_length", 128)
        own = sorted({str(r["label"]) for r in tr}) if tr and "label" in tr[0] else list(task.labels)
        stream.append(ContinualTask(name, task.encode(tr, tok, max_len), task.encode(ev, tok, max_len), own))
    torch.manual_seed(trcfg.seed)  # head / adapter initialisation, as in finetune
    model = apply_method(task.build_model(model_path), dict(cfg.get("method") or {"name": "lora"}), task)
    result = run_stream(model, task, stream, section["strategy"], dataclasses.replace(trcfg, output_dir=None),
                        tokenizer=tok, output_dir=output_dir, log=log, extra={"config": {"continual": section,
                                                                                "model": cfg["model"],
                                                                                "task": cfg["task"],
                                                                                "method": cfg.get("method")},
                                                                     "labels": list(task.labels)},
                        **strategy_params(section, trcfg.seed))
    return result
