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

import torch

from .methods import STRATEGIES

DEFAULTS = {"strategy": "naive", "tasks": None, "ewc_lambda": 100.0, "ewc_gamma": 1.0, "fisher_samples": 200,
            "fisher_mode": "empirical", "l2_lambda": 0.01, "l2_anchor": "previous", "replay_size": 200,
            "lwf_alpha": 1.0, "lwf_temperature": 2.0, "seed": None}
_FLOATS = ("ewc_lambda", "ewc_gamma", "l2_lambda", "lwf_alpha", "lwf_temperature")
_INTS = ("replay_size", "fisher_samples", "seed")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _error(msg: str) -> ValueError:
    try:
        from ..workflow.config import ConfigError
        return ConfigError(msg)
    except ImportError:  # pragma: no cover
        return ValueError(msg)


def _number(value, key: str, kind):
    from ..workflow.config import parse_number
    value = parse_number(value, f"continual.{key}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise _error(f"continual.{key}: expected an integer, got {value!r}")
        return value
    return float(value)


def _check_task(i: int, t) -> dict:
    from ..workflow.config import DATA_KEYS, FILE_KEYS
    where = f"continual.tasks[{i}]"
    if not isinstance(t, dict):
        raise _error(f"{where}: expected a mapping {{name: ..., data: {{train: ..., validation: ...}}}}, got {t!r}")
    bad = sorted(set(t) - {"name", "data"})
    if bad:
        raise _error(f"{where}: unknown key(s) {bad}; expected 'name' and 'data'")
    name = t.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _error(f"{where}.name: expected a non-empty name of letters, digits, '_' or '-', got {name!r}")
    data = t.get("data")
    if not isinstance(data, dict):
        raise _error(f"{where}.data: expected a mapping with 'train' and 'validation', got {data!r}")
    data = copy.deepcopy(data)
    bad = sorted(set(data) - DATA_KEYS)
    if bad:
        raise _error(f"{where}.data: unknown key(s) {bad}; expected some of {sorted(DATA_KEYS)}")
    for split in ("train", "validation"):
        if not data.get(split):
            raise _error(f"{where}.data.{split}: required (every task needs training and evaluation data)")
    for split in ("train", "validation", "test"):
        v = data.get(split)
        if v is None or isinstance(v, str):
            continue
        if not isinstance(v, dict) or "path" not in v:
            raise _error(f"{where}.data.{split}: expected a path or a mapping with 'path', got {v!r}")
        bad = sorted(set(v) - FILE_KEYS)
        if bad:
            raise _error(f"{where}.data.{split}: unknown key(s) {bad}; expected some of {sorted(FILE_KEYS)}")
    for k in ("max_length", "train_limit", "validation_limit", "train_subset_seed"):
        if data.get(k) is not None:
            v = data[k]
            try:
                v = int(v) if isinstance(v, str) else v
            except ValueError:
                pass
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "train_subset_seed" else 1):
                raise _error(f"{where}.data.{k}: expected a positive integer, got {data[k]!r}")
            data[k] = v
    return {"name": name, "data": data}


def validate_section(section) -> dict:
    """Check a ``continual:`` section and return a copy with every default filled (see module docstring).
    Raises ``ValueError`` (``fastpeft.workflow.config.ConfigError``) naming ``continual.<key>``."""
    if section is None:
        raise _error("continual: expected a mapping with 'strategy' and 'tasks', got nothing")
    if not isinstance(section, dict):
        raise _error(f"continual: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise _error(f"continual: unknown key(s) {unknown}; expected some of {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    out.update({k: v for k, v in section.items() if v is not None or k == "seed"})
    if out["strategy"] not in STRATEGIES:
        raise _error(f"continual.strategy: unknown strategy {out['strategy']!r}; expected one of {sorted(STRATEGIES)}")
    tasks = out["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise _error(f"continual.tasks: expected a non-empty list of {{name, data}} mappings, got {tasks!r}")
    out["tasks"] = [_check_task(i, t) for i, t in enumerate(tasks)]
    names = [t["name"] for t in out["tasks"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _error(f"continual.tasks: task names must be unique, repeated: {dup}")
    for k in _FLOATS:
        out[k] = _number(out[k], k, float)
    for k in _INTS:
        if out[k] is not None:
            out[k] = _number(out[k], k, int)
    checks = {"ewc_lambda": (out["ewc_lambda"] >= 0, "a number >= 0"),
              "ewc_gamma": (0 <= out["ewc_gamma"] <= 1, "a number in [0, 1]"),
              "l2_lambda": (out["l2_lambda"] >= 0, "a number >= 0"),
              "lwf_alpha": (out["lwf_alpha"] >= 0, "a number >= 0"),
              "lwf_temperature": (out["lwf_temperature"] > 0, "a number > 0"),
              "replay_size": (out["replay_size"] > 0, "a positive integer (the buffer's capacity in examples)"),
              "fisher_samples": (out["fisher_samples"] is None or out["fisher_samples"] >= 1,
                                 "an integer >= 1 (or null: every training example)"),
              "seed": (out["seed"] is None or out["seed"] >= 0, "null or an integer >= 0")}
    for k, (ok, expected) in checks.items():
        if not ok:
            raise _error(f"continual.{k}: expected {expected}, got {out[k]!r}")
    if out["fisher_mode"] not in ("empirical", "expected"):
        raise _error(f"continual.fisher_mode: expected 'empirical' or 'expected', got {out['fisher_mode']!r}")
    if out["l2_anchor"] not in ("previous", "initial"):
        raise _error(f"continual.l2_anchor: expected 'previous' or 'initial', got {out['l2_anchor']!r}")
    return out


def strategy_params(section: dict, seed: int) -> dict:
    """The keyword arguments of ``make_strategy(section["strategy"], ...)`` from a validated section."""
    from .methods import STRATEGY_PARAMS
    name = section["strategy"]
    params = {k: section[k] for k in STRATEGY_PARAMS[name] if k != "seed"}
    if "seed" in STRATEGY_PARAMS[name]:
        params["seed"] = section["seed"] if section["seed"] is not None else seed
    return params


def run_from_config(cfg: dict, log=None) -> dict:
    """Run the ``continual:`` section of ``cfg`` (a dict from ``fastpeft.workflow.config.build_config``,
    plus ``continual``); returns the result dict (also written to ``output_dir/result.json``).
    ``log(message)``, when given, receives one progress line per task (the matrix row)."""
    from ..workflow.models import load_tokenizer, resolve_model_path
    from ..workflow.pipeline import apply_method, load_split
    from ..workflow.tasks import get_task
    from ..workflow.trainer import TrainerConfig
    from .runner import run_stream
    from .stream import ContinualTask

    if not isinstance(cfg, dict):
        raise _error(f"cfg: expected the config dict from build_config, got {type(cfg).__name__}")
    section = validate_section(cfg.get("continual"))
    for key in ("model", "task"):
        if not cfg.get(key):
            raise _error(f"{key}: required")
    task = get_task(cfg["task"])
    if task.default_mode != "max" or not hasattr(task, "fit_labels"):
        raise _error(f"task: continual learning needs a labelled task with a higher-is-better metric "
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
