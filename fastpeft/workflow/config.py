"""Fine-tuning configuration: a YAML file merged with command-line overrides, then validated.

Layout (every section optional except ``model``, ``task`` and ``data.train``)::

    model: minilm                    # bundled name or a local transformers directory
    task: sequence_classification    # sequence_classification | token_classification | causal_lm
    output_dir: runs/sst2
    data:
      train: path/train.tsv          # a path, or {path: ..., <column overrides>}
      validation: {path: path/dev.tsv, text_column: content}
      format: tsv                    # tsv | csv | jsonl | conll (default: from the extension / task)
      text_column: sentence          # sequence classification / causal LM
      text_pair_column: null
      label_column: label
      quoting: none                  # TSV/CSV quoting: none | minimal
      max_length: 128
      train_limit: null              # keep N training examples ...
      train_subset_seed: null        # ... a fixed random subset when set, else the first N
      validation_limit: null
    method:                          # the PEFT method; other keys go to its config class
      name: lora                     # lora | ia3 | adapter | bitfit | prefix | prompt | full | linear_probe
      backend: auto                  # auto (= fastpeft) | fastpeft | peft (Hugging Face PEFT)
      r: 8
      lora_alpha: 16
      lora_dropout: 0.1
      target_modules: [query, value] # default: the task's (query/value; all-linear for NER / LM)
      modules_to_save: [classifier]  # default: the task head
    trainer: {lr: 1e-3, epochs: 1, batch_size: 32, ...}   # fastpeft.workflow.trainer.TrainerConfig
    adversarial: {method: freelb, ...}                    # optional, fastpeft.adversarial
    quantization: {load_in_4bit: true, bnb_4bit_quant_type: nf4}  # optional QLoRA base (fastpeft.workflow.quantize)
    augment:                                              # optional, fastpeft.augment (on-the-fly)
      - {name: embedding_substitution, p: 0.1}
      - {name: neftune, alpha: 5}
    fewshot: {shots: 8, seeds: [0, 1, 2, 3, 4], method: setfit}   # optional, fastpeft.fewshot
    continual: {strategy: ewc, tasks: [...]}              # optional, fastpeft.continual

``fewshot`` and ``continual`` change what ``fastpeft finetune`` runs (a k-shot study over several seeds;
a stream of tasks trained in sequence); they cannot be combined with each other. Their packages own them:
:data:`STUDY_SECTIONS` is the one place where the workflow reaches them (CONTRIBUTING.md, "Package map").

Errors are :class:`~fastpeft.workflow.config_checks.ConfigError`; reading and writing YAML needs PyYAML
(``pip install 'fastpeft[train]'``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re

from .. import (BitFitConfig, BottleneckAdapterConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                PromptTuningConfig)
from .._optional import import_extra
from .config_checks import DATA_KEYS, FILE_KEYS, ConfigError, check_data, parse_number  # noqa: F401  (API)
from .tasks import TASKS
from .trainer import TrainerConfig


def _fewshot():
    from ..fewshot.config import FewshotConfig, run_from_config
    return FewshotConfig, run_from_config


def _continual():
    from ..continual.config import ContinualConfig, run_from_config
    return ContinualConfig, run_from_config


def _augment():
    from ..augment.config import callbacks_from_config
    return callbacks_from_config


# The sections owned by the applications built on the workflow: the only place where the workflow imports
# them. Each loader imports its package when a config uses the section, so importing the workflow imports
# none of them.
# A section that turns `fastpeft finetune` into another study -> (its validated dataclass, a
# config_checks.Section; its runner `run(cfg, log=print) -> result dict`).
STUDY_SECTIONS = {"fewshot": _fewshot, "continual": _continual}
# A section that adds trainer callbacks -> its builder `build(spec, model=, tokenizer=, task=, seed=) ->
# (callbacks, loss_fn or None)`; only the shape of the section is checked here (_validate_augment).
CALLBACK_SECTIONS = {"augment": _augment}

TOP_KEYS = {"model", "task", "output_dir", "data", "method", "trainer", "adversarial", "seed", "quantization",
            *STUDY_SECTIONS,
            *CALLBACK_SECTIONS}

# method.name -> fastpeft's config class (the keys of method: other than name / backend are its arguments)
METHOD_CLASSES = {"lora": LoraConfig, "ia3": IA3Config, "adapter": BottleneckAdapterConfig,
                  "bitfit": BitFitConfig, "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}
# methods without a PEFT wrapper (workflow.pipeline.plain_method): the references PEFT is compared with
PLAIN_METHODS = {"full": "every parameter trains", "linear_probe": "only the task head trains"}

DEFAULTS = {
    "data": {"max_length": 128},
    "method": {"name": "lora", "backend": "auto"},   # LoRA defaults (r=8, alpha 16, dropout 0) in apply_method
    "trainer": {},
}


def _yaml():
    return import_extra("yaml", "fastpeft's YAML config")


def load_yaml(path: str) -> dict:
    yaml = _yaml()
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return resolve_data_paths(cfg, os.path.dirname(os.path.abspath(path)))


def resolve_data_paths(cfg: dict, base_dir: str) -> dict:
    """Relative file paths of ``data:`` (``train`` / ``validation`` / ``test``, as a string or a mapping's
    ``path``) taken relative to ``base_dir``, the config file's directory, so a config runs from anywhere
    (paths given as flags stay relative to the working directory). ``~`` is expanded."""
    data = cfg.get("data")
    if not isinstance(data, dict):
        return cfg

    def fix(p):
        if not isinstance(p, str) or not p:
            return p
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    for split in ("train", "validation", "test"):
        v = data.get(split)
        if isinstance(v, str):
            data[split] = fix(v)
        elif isinstance(v, dict) and "path" in v:
            v["path"] = fix(v["path"])
    return cfg


def set_dotted(cfg: dict, key: str, value) -> None:
    """``set_dotted(cfg, "trainer.lr", 1e-3)``."""
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if d.get(p) is None:
            d[p] = {}
        elif not isinstance(d[p], dict):
            if isinstance(d[p], str) and p in ("train", "validation", "test"):
                d[p] = {"path": d[p]}
            else:
                raise ConfigError(f"{key}: {p!r} is not a section")
        d = d[p]
    d[parts[-1]] = value


def parse_override(text: str):
    """``"trainer.lr=1e-3"`` -> ("trainer.lr", 0.001) (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set: expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    value = _yaml().safe_load(v) if v != "" else None
    if isinstance(value, str):  # YAML 1.1 does not read 1e-3 as a float
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return k.strip(), value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_config(yaml_cfg: dict | None = None, overrides: dict | None = None) -> dict:
    """Merge defaults < YAML < overrides (dotted keys) and validate. Returns a plain dict whose
    ``trainer`` entry is a :class:`TrainerConfig`."""
    cfg = _merge(DEFAULTS, yaml_cfg or {})
    for k, v in (overrides or {}).items():
        if v is not None:
            set_dotted(cfg, k, v)
    return validate(cfg)


def validate(cfg: dict) -> dict:
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}")
    for key in ("model", "task"):
        if not cfg.get(key):
            raise ConfigError(f"{key}: required (set it in the YAML or with --{key})")
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task: unknown task {cfg['task']!r}; expected one of {sorted(TASKS)}")
    data = cfg.get("data") or {}
    # a continual stream names each task's files: the top-level data.train is not required
    check_data(data, "data", required={} if cfg.get("continual") is not None else
               {"train": "a file path; --train on the command line"})
    method = cfg.get("method") or {}
    if not isinstance(method, dict) or not method.get("name"):
        raise ConfigError("method.name: required (e.g. lora)")
    if method["name"] not in METHOD_CLASSES and method["name"] not in PLAIN_METHODS:
        raise ConfigError(f"method.name: unknown method {method['name']!r}; expected one of "
                          f"{sorted(METHOD_CLASSES) + sorted(PLAIN_METHODS)}")
    if method.get("backend", "auto") not in ("auto", "fastpeft", "peft"):
        raise ConfigError(f"method.backend: expected 'auto', 'fastpeft' or 'peft', got {method['backend']!r}")
    for k in ("r", "lora_alpha"):
        if k in method:
            method[k] = parse_number(method[k], f"method.{k}")
    if "lora_dropout" in method:
        method["lora_dropout"] = float(parse_number(method["lora_dropout"], "method.lora_dropout"))
        if not 0 <= method["lora_dropout"] < 1:
            raise ConfigError(f"method.lora_dropout: expected a number in [0, 1), got {method['lora_dropout']!r}")
    if "r" in method and (not isinstance(method["r"], int) or method["r"] < 1):
        raise ConfigError(f"method.r: expected an integer >= 1, got {method['r']!r}")
    if "lora_alpha" in method and not method["lora_alpha"] > 0:
        raise ConfigError(f"method.lora_alpha: expected a positive number, got {method['lora_alpha']!r}")
    _check_target_modules(method.get("target_modules"))
    tr = dict(cfg.get("trainer") or {}) if not isinstance(cfg.get("trainer"), TrainerConfig) \
        else dataclasses.asdict(cfg["trainer"])
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    unknown = set(tr) - set(fields)
    if unknown:
        raise ConfigError(f"trainer: unknown key(s) {sorted(unknown)}; expected some of {sorted(fields)}")
    if cfg.get("output_dir") and not tr.get("output_dir"):
        tr["output_dir"] = cfg["output_dir"]
    if cfg.get("seed") is not None:
        tr.setdefault("seed", cfg["seed"])
    for k in ("lr", "weight_decay", "eps", "momentum", "warmup_ratio", "min_delta", "max_grad_norm"):
        if tr.get(k) is not None:
            tr[k] = float(parse_number(tr[k], f"trainer.{k}"))
    for k in ("epochs", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "eval_every", "patience",
              "save_every", "warmup_steps", "seed", "keep_checkpoints", "bucket_size", "log_every"):
        if tr.get(k) is not None:
            tr[k] = parse_number(tr[k], f"trainer.{k}")
    try:
        cfg["trainer"] = TrainerConfig(**tr)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    names = getattr(TASKS[cfg["task"]], "metric_names", None)
    metric = cfg["trainer"].metric
    if metric is not None and names and metric not in names:
        raise ConfigError(f"trainer.metric: the {cfg['task']} task has no metric {metric!r}; expected one of "
                          f"{list(names)}")
    adv = cfg.get("adversarial")
    if adv is not None and (not isinstance(adv, dict) or not adv.get("method")):
        raise ConfigError("adversarial: expected a mapping with 'method' (e.g. {method: freelb, ...})")
    _validate_augment(cfg.get("augment"))
    studies = [name for name in STUDY_SECTIONS if cfg.get(name) is not None]
    if len(studies) > 1:
        raise ConfigError(f"{' and '.join(studies)}: choose one (each replaces the fine-tuning run by a study of "
                          f"its own)")
    for name in studies:
        section_cls, _ = STUDY_SECTIONS[name]()
        cfg[name] = section_cls.from_section(cfg[name]).to_dict()
    from .quantize import check_quantization  # quantization: (QLoRA, bitsandbytes)
    cfg["quantization"] = check_quantization(cfg.get("quantization"))
    cfg["data"] = data
    cfg["method"] = method
    return cfg


def _check_target_modules(tm) -> None:
    """``method.target_modules``: a list of module names, ``all-linear``, or one regular expression (matched
    against full module names, as in HF PEFT) that must compile."""
    if tm is None or tm == "all-linear":
        return
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise ConfigError(f"method.target_modules: {tm!r} is not a valid regular expression ({e})") from None
        return
    if not isinstance(tm, list) or not tm or not all(isinstance(x, str) and x for x in tm):
        raise ConfigError(f"method.target_modules: expected module names, 'all-linear' or a regular expression, "
                          f"got {tm!r}")


def _validate_augment(spec) -> None:
    """Shape check of ``augment:`` (a list of ``{name: ..., ...}``); names and options are checked by
    :func:`fastpeft.augment.config.callbacks_from_config` when the model exists, before training."""
    if spec is None:
        return
    if isinstance(spec, dict):
        raise ConfigError("augment: expected a list of mappings like [{name: neftune, alpha: 5}], got a mapping "
                          "(put a '-' before each augmentation)")
    if not isinstance(spec, list):
        raise ConfigError(f"augment: expected a list of mappings with 'name', got {type(spec).__name__}")
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or not item.get("name"):
            raise ConfigError(f"augment[{i}]: expected a mapping with 'name' (e.g. {{name: mixup, alpha: 0.4}}), "
                              f"got {item!r}")


def to_yaml(cfg: dict) -> str:
    out = dict(cfg)
    if isinstance(out.get("trainer"), TrainerConfig):
        out["trainer"] = dataclasses.asdict(out["trainer"])
        out["trainer"]["betas"] = list(out["trainer"]["betas"])
    return _yaml().safe_dump(out, sort_keys=False)
