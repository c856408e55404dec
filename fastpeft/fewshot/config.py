"""The ``fewshot:`` section of a ``fastpeft finetune`` config, and the config-driven few-shot run.

Example (the rest of the config as for fine-tuning; ``data.validation`` is required)::

    model: minilm
    task: sequence_classification
    output_dir: runs/sst2_fewshot
    data:
      train: ../shared/data/sst2/train.tsv
      validation: {path: ../shared/data/sst2/dev.tsv, text_column: content}
    fewshot:
      shots: 8                 # k examples per class
      seeds: [0, 1, 2, 3, 4]   # one k-shot draw and one run per seed
      method: setfit           # setfit | head_only | prototype | prompt_tuning
      baselines: [head_only]   # also run these on the same shots (their default hyper-parameters)
      iterations: 20           # method hyper-parameters (see SECTION_KEYS): they apply to `method`
      lr: 2.5e-4
      label_names: {0: negative, 1: positive}   # SetFit's templated examples (setfit only; off if unset)
      template: "This sentence is {}"           # default; exactly one {} for the label name (or a list)
      template_samples: 8                       # copies per label (0 disables)
      sampling: random         # random (iterations rounds) | oversampling (SetFit >= 1.0, all unique pairs)
      head_prior: none         # none | label_names: head pulled towards the label-name zero-shot classifier
      end_to_end_epochs: 0     # > 0: SetFit's end-to-end phase (head + LoRA, cross-entropy); body_lr, head_lr
      augment: []              # token-level ops making altered copies of the shots, e.g. [random_deletion]
      augment_copies: 1        # copies of every shot per op; augment_rate: 0.1 (fraction of tokens changed)

``run_from_config(cfg)`` reads the splits with the task's reader, runs every method over the seeds and
writes ``output_dir/result.json`` atomically (temp file + rename). LoRA settings (``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``) of a ``method: {name: lora, ...}`` section are used by SetFit
unless the ``fewshot`` section sets them. The ``trainer`` section is not used by few-shot runs.
"""
from __future__ import annotations

import os
import time

from ..fileio import write_json_atomic
from .evaluate import METHODS, evaluate_seeds
from .setfit import HEAD_PRIORS, LOSSES, SAMPLINGS

# key -> (default, kind). kind: "int" (>=1), "int0" (>=0), "pos" (number > 0), "frac" ([0, 1)), "nonneg",
# "unit" ((0, 1]),
# or a tuple of allowed strings; None default = the method's own default.
SECTION_KEYS: dict = {
    "shots": (8, "int"),
    "seeds": ([0, 1, 2, 3, 4], "seeds"),
    "method": ("setfit", METHODS),
    "baselines": ([], "methods"),
    "min_words": (0, "int0"),
    # method hyper-parameters (None: the method's default)
    "iterations": (None, "int"),
    "epochs": (None, "int"),
    "lr": (None, "pos"),
    "batch_size": (None, "int"),
    "warmup_ratio": (None, "frac"),
    "weight_decay": (None, "nonneg"),
    "max_length": (None, "int"),
    "loss": (None, LOSSES),
    "margin": (None, "pos"),
    "r": (None, "int"),
    "lora_alpha": (None, "int"),
    "lora_dropout": (None, "frac"),
    "target_modules": (None, "modules"),
    "head_C": (None, "pos"),
    "head_max_iter": (None, "int"),
    "num_virtual_tokens": (None, "int"),
    "prompt_tuning_init": (None, ("RANDOM", "SAMPLE_VOCAB")),
    "eval_batch_size": (None, "int"),
    "label_names": (None, "label_names"),
    "template": (None, "template"),
    "template_samples": (None, "int0"),
    "sampling": (None, SAMPLINGS),
    "head_prior": (None, HEAD_PRIORS),
    "head_prior_scale": (None, "pos"),
    "end_to_end_epochs": (None, "int0"),
    "body_lr": (None, "pos"),
    "head_lr": (None, "pos"),
    "augment": (None, "augment"),
    "augment_copies": (None, "int"),
    "augment_rate": (None, "unit"),
}
RUN_KEYS = ("shots", "seeds", "method", "baselines", "min_words")
# which hyper-parameters each method takes
METHOD_PARAMS = {
    "setfit": {"iterations", "epochs", "lr", "batch_size", "warmup_ratio", "weight_decay", "max_length", "loss",
               "margin", "r", "lora_alpha", "lora_dropout", "target_modules", "head_C", "head_max_iter",
               "eval_batch_size", "label_names", "template", "template_samples", "sampling", "head_prior",
               "head_prior_scale", "end_to_end_epochs", "body_lr", "head_lr", "augment", "augment_copies",
               "augment_rate"},
    "head_only": {"max_length", "head_C", "head_max_iter"},
    "prototype": {"max_length"},
    "prompt_tuning": {"num_virtual_tokens", "prompt_tuning_init", "lr", "epochs", "batch_size", "weight_decay",
                      "max_length", "eval_batch_size"},
}


def _err(msg: str) -> Exception:
    from ..workflow.config import ConfigError
    return ConfigError(msg)


def _number(value, where):
    from ..workflow.config import parse_number
    return parse_number(value, where)


def _check(key: str, value, kind):
    where = f"fewshot.{key}"
    if isinstance(kind, tuple):
        v = value.upper() if key == "prompt_tuning_init" and isinstance(value, str) else value
        if v not in kind:
            raise _err(f"{where}: expected one of {list(kind)}, got {value!r}")
        return v
    if kind in ("int", "int0"):
        v = _number(value, where)
        lo = 1 if kind == "int" else 0
        if not isinstance(v, int) or v < lo:
            raise _err(f"{where}: expected an integer >= {lo}, got {value!r}")
        return v
    if kind in ("pos", "frac", "nonneg", "unit"):
        v = float(_number(value, where))
        ok = {"pos": v > 0, "frac": 0 <= v < 1, "nonneg": v >= 0, "unit": 0 < v <= 1}[kind]
        if not ok:
            want = {"pos": "> 0", "frac": "in [0, 1)", "nonneg": ">= 0", "unit": "in (0, 1]"}[kind]
            raise _err(f"{where}: expected a number {want}, got {value!r}")
        return v
    if kind == "seeds":
        seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise _err(f"{where}: expected a non-empty list of integers, got {value!r}")
        out = []
        for s in seeds:
            s = _number(s, where)
            if not isinstance(s, int):
                raise _err(f"{where}: expected integers, got {s!r}")
            out.append(s)
        if len(set(out)) != len(out):
            raise _err(f"{where}: duplicate seeds in {out}")
        return out
    if kind == "methods":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            raise _err(f"{where}: expected a list of method names, got {value!r}")
        for n in names:
            if n not in METHODS:
                raise _err(f"{where}: unknown method {n!r}; expected some of {list(METHODS)}")
        return list(names)
    if kind == "modules":
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(m, str) and m for m in value):
            return list(value)
        raise _err(f"{where}: expected a module name list or 'all-linear', got {value!r}")
    if kind == "label_names":
        from .setfit import check_label_names
        if not isinstance(value, dict):
            raise _err(f"{where}: expected a mapping {{label: name}}, e.g. {{0: negative, 1: positive}}, "
                       f"got {value!r}")
        try:
            return dict(check_label_names(value))
        except ValueError as e:
            raise _err(f"fewshot.{e}") from None
    if kind == "augment":
        from .setfit import check_augment
        try:
            return check_augment([value] if isinstance(value, str) else value)
        except ValueError as e:
            raise _err(f"fewshot.{e}") from None
    if kind == "template":
        from .setfit import check_template
        try:
            return check_template(value)
        except ValueError as e:
            raise _err(f"fewshot.{e}") from None
    raise AssertionError(kind)


def validate_section(section: dict | None) -> dict:
    """The ``fewshot:`` section checked, with defaults filled (hyper-parameters left unset stay ``None``:
    the method's own default). Raises :class:`fastpeft.workflow.config.ConfigError` (a ValueError) naming
    ``fewshot.<key>``."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise _err(f"fewshot: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise _err(f"fewshot: unknown key(s) {unknown}; expected some of {sorted(SECTION_KEYS)}")
    out = {}
    for key, (default, kind) in SECTION_KEYS.items():
        value = section.get(key)
        out[key] = _check(key, value, kind) if value is not None else (list(default) if isinstance(default, list)
                                                                        else default)
    meth = out["method"]
    unused = sorted(k for k, v in section.items()
                    if k not in RUN_KEYS and v is not None and k not in METHOD_PARAMS[meth])
    if unused:
        raise _err(f"fewshot: key(s) {unused} do not apply to method {meth!r} "
                   f"(it takes {sorted(METHOD_PARAMS[meth])})")
    orphan = [k for k in ("template", "template_samples") if section.get(k) is not None]
    if orphan and out["label_names"] is None:
        raise _err(f"fewshot: {orphan} only apply with fewshot.label_names (the templated examples are off "
                   f"without label names)")
    if out["head_prior"] == "label_names" and out["label_names"] is None:
        raise _err("fewshot.head_prior: 'label_names' needs fewshot.label_names (the prior is built from them)")
    if section.get("head_prior_scale") is not None and out["head_prior"] != "label_names":
        raise _err("fewshot.head_prior_scale: only applies with fewshot.head_prior: label_names")
    idle = [k for k in ("augment_copies", "augment_rate") if section.get(k) is not None]
    if idle and not out["augment"]:
        raise _err(f"fewshot: {idle} only apply with a non-empty fewshot.augment (the shot augmentation)")
    idle = [k for k in ("body_lr", "head_lr") if section.get(k) is not None]
    if idle and not out["end_to_end_epochs"]:
        raise _err(f"fewshot: {idle} only apply with fewshot.end_to_end_epochs > 0 (the end-to-end phase)")
    out["baselines"] = [b for b in out["baselines"] if b != meth]
    return out


def method_params(section: dict, method: str, model: str | None, lora: dict | None = None) -> dict:
    """Constructor keywords for ``method``: the section's hyper-parameters apply to ``section["method"]``
    only; baselines get their defaults (but share ``max_length``)."""
    params: dict = {"model": model}
    if method == "setfit" and lora:
        params.update({k: lora[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in lora})
    if method == section["method"]:
        params.update({k: section[k] for k in METHOD_PARAMS[method] if section.get(k) is not None})
    elif section.get("max_length") is not None:
        params["max_length"] = section["max_length"]
    return params


def run_from_config(cfg: dict, *, log=print) -> dict:
    """Run the few-shot experiment described by ``cfg`` (a dict from
    :func:`fastpeft.workflow.config.build_config` plus a ``fewshot`` section) and return
    ``{"method", "k", "metric", "per_seed", "mean", "std", "baselines": {name: same fields},
    "fewshot": section, "model", "task", "train_pool", "eval_examples", "wall_s"}``; also written to
    ``<output_dir>/result.json`` when an output directory is configured."""
    from ..workflow.pipeline import load_split
    from ..workflow.tasks import get_task

    if not isinstance(cfg, dict):
        raise ValueError(f"cfg: expected a dict from build_config, got {type(cfg).__name__}")
    section = validate_section(cfg.get("fewshot"))
    if cfg.get("task") not in ("sequence_classification", "seq_cls", "classification"):
        raise _err(f"task: few-shot methods support sequence_classification, got {cfg.get('task')!r}")
    data = cfg.get("data") or {}
    if not data.get("train"):
        raise _err("data.train: required (the pool the k-shot sets are drawn from)")
    if not data.get("validation"):
        raise _err("data.validation: required (the few-shot evaluation set)")
    if data.get("text_pair_column"):
        raise _err("data.text_pair_column: few-shot methods take single texts")
    task = get_task(cfg["task"])
    t0 = time.perf_counter()
    train = load_split(task, data, "train", data.get("train_limit"), data.get("train_subset_seed"))
    val = load_split(task, data, "validation", data.get("validation_limit"))
    texts = [r["text"] for r in train]
    labels = [r["label"] for r in train]
    exclude = None
    if section["min_words"]:
        exclude = {i for i, t in enumerate(texts) if len(t.split()) < section["min_words"]}
    if section.get("max_length") is None and data.get("max_length"):
        section = dict(section, max_length=data["max_length"])
    method_cfg = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    lora = method_cfg if method_cfg.get("name") == "lora" else None
    eval_texts = [r["text"] for r in val]
    eval_labels = [r["label"] for r in val]
    frozen = None
    results = {}
    for name in [section["method"]] + section["baselines"]:
        params = method_params(section, name, cfg.get("model"), lora)
        if name in ("head_only", "prototype"):  # one frozen encoder (and embedding memo) for both
            from .baselines import FrozenEncoder
            ml = params.pop("max_length", 64)
            if frozen is None or frozen.max_length != ml:
                frozen = FrozenEncoder(params.pop("model"), max_length=ml)
            params.pop("model", None)
            params["encoder"] = frozen
        results[name] = evaluate_seeds(name, texts, labels, eval_texts, eval_labels, k=section["shots"],
                                       seeds=section["seeds"], exclude=exclude, params=params, log=log)
    main = results.pop(section["method"])
    out = dict(main)
    out["baselines"] = results
    out.update({"fewshot": section, "model": cfg.get("model"), "task": cfg["task"],
                "train_pool": len(texts) - len(exclude or ()), "eval_examples": len(eval_texts),
                "wall_s": round(time.perf_counter() - t0, 1)})
    out_dir = cfg.get("output_dir") or getattr(cfg.get("trainer"), "output_dir", None)
    if out_dir:
        write_json_atomic(os.path.join(out_dir, "result.json"), out)
        if log:
            log(f"[fewshot] wrote {os.path.join(out_dir, 'result.json')}")
    return out
