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
      iterations: 20           # method hyper-parameters (see FewshotConfig): they apply to `method`
      lr: 2.5e-4
      label_names: {0: negative, 1: positive}   # SetFit's templated examples (setfit only; off if unset)
      template: "This sentence is {}"           # default; exactly one {} for the label name (or a list)
      template_samples: 8                       # copies per label (0 disables)
      sampling: random         # random (iterations rounds) | oversampling (SetFit >= 1.0, all unique pairs)
      head_prior: none         # none | label_names: head pulled towards the label-name zero-shot classifier
      end_to_end_epochs: 0     # > 0: SetFit's end-to-end phase (head + LoRA, cross-entropy); body_lr, head_lr
      augment: []              # token-level ops making altered copies of the shots, e.g. [random_deletion]
      augment_copies: 1        # copies of every shot per op; augment_rate: 0.1 (fraction of tokens changed)

:class:`FewshotConfig` checks the section (:func:`validate_section` returns it as a dict);
``run_from_config(cfg)`` reads the splits with the task's reader, runs every method over the seeds and
writes ``output_dir/result.json`` atomically (temp file + rename). LoRA settings (``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``) of a ``method: {name: lora, ...}`` section are used by SetFit
unless the ``fewshot`` section sets them. The ``trainer`` section is not used by few-shot runs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Union

from ..fileio import write_json_atomic
from ..workflow.config_checks import ConfigError, Section, parse_number
from ..workflow.pipeline import load_split
from ..workflow.tasks import get_task
from .evaluate import METHODS, evaluate_seeds
from .setfit import HEAD_PRIORS, LOSSES, SAMPLINGS, check_augment, check_label_names, check_template

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


def _key(kind, default=None, factory=None):
    """A section field checked as ``kind``: "int" (>= 1), "int0" (>= 0), "pos" (number > 0), "frac"
    ([0, 1)), "nonneg", "unit" ((0, 1]), "seeds", "methods", "modules", "label_names", "template",
    "augment", or a tuple of allowed strings. A None default is the method's own default."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"kind": kind})
    return dataclasses.field(default=default, metadata={"kind": kind})


@dataclasses.dataclass
class FewshotConfig(Section):
    """The ``fewshot:`` section (see the module docstring), checked when built: errors are
    :class:`~fastpeft.workflow.config_checks.ConfigError` naming ``fewshot.<key>``. Hyper-parameters left
    unset stay None (the method's own default) and apply to ``method`` only."""

    NAME = "fewshot"
    shots: int = _key("int", 8)
    seeds: list = _key("seeds", factory=lambda: [0, 1, 2, 3, 4])
    method: str = _key(METHODS, "setfit")
    baselines: list = _key("methods", factory=list)
    min_words: int = _key("int0", 0)
    # method hyper-parameters (None: the method's default)
    iterations: Optional[int] = _key("int")
    epochs: Optional[int] = _key("int")
    lr: Optional[float] = _key("pos")
    batch_size: Optional[int] = _key("int")
    warmup_ratio: Optional[float] = _key("frac")
    weight_decay: Optional[float] = _key("nonneg")
    max_length: Optional[int] = _key("int")
    loss: Optional[str] = _key(LOSSES)
    margin: Optional[float] = _key("pos")
    r: Optional[int] = _key("int")
    lora_alpha: Optional[int] = _key("int")
    lora_dropout: Optional[float] = _key("frac")
    target_modules: Union[str, list, None] = _key("modules")
    head_C: Optional[float] = _key("pos")
    head_max_iter: Optional[int] = _key("int")
    num_virtual_tokens: Optional[int] = _key("int")
    prompt_tuning_init: Optional[str] = _key(("RANDOM", "SAMPLE_VOCAB"))
    eval_batch_size: Optional[int] = _key("int")
    label_names: Optional[dict] = _key("label_names")
    template: Union[str, list, None] = _key("template")
    template_samples: Optional[int] = _key("int0")
    sampling: Optional[str] = _key(SAMPLINGS)
    head_prior: Optional[str] = _key(HEAD_PRIORS)
    head_prior_scale: Optional[float] = _key("pos")
    end_to_end_epochs: Optional[int] = _key("int0")
    body_lr: Optional[float] = _key("pos")
    head_lr: Optional[float] = _key("pos")
    augment: Optional[list] = _key("augment")
    augment_copies: Optional[int] = _key("int")
    augment_rate: Optional[float] = _key("unit")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, _check(f.name, value, f.metadata["kind"]))
        meth = self.method
        unused = sorted(f.name for f in dataclasses.fields(self)
                        if f.name not in RUN_KEYS and getattr(self, f.name) is not None
                        and f.name not in METHOD_PARAMS[meth])
        if unused:
            raise ConfigError(f"fewshot: key(s) {unused} do not apply to method {meth!r} "
                              f"(it takes {sorted(METHOD_PARAMS[meth])})")
        orphan = [k for k in ("template", "template_samples") if getattr(self, k) is not None]
        if orphan and self.label_names is None:
            raise ConfigError(f"fewshot: {orphan} only apply with fewshot.label_names (the templated examples "
                              f"are off without label names)")
        if self.head_prior == "label_names" and self.label_names is None:
            raise ConfigError("fewshot.head_prior: 'label_names' needs fewshot.label_names (the prior is built "
                              "from them)")
        if self.head_prior_scale is not None and self.head_prior != "label_names":
            raise ConfigError("fewshot.head_prior_scale: only applies with fewshot.head_prior: label_names")
        idle = [k for k in ("augment_copies", "augment_rate") if getattr(self, k) is not None]
        if idle and not self.augment:
            raise ConfigError(f"fewshot: {idle} only apply with a non-empty fewshot.augment (the shot "
                              f"augmentation)")
        idle = [k for k in ("body_lr", "head_lr") if getattr(self, k) is not None]
        if idle and not self.end_to_end_epochs:
            raise ConfigError(f"fewshot: {idle} only apply with fewshot.end_to_end_epochs > 0 (the end-to-end "
                              f"phase)")
        self.baselines = [b for b in self.baselines if b != meth]


def _check(key: str, value, kind):
    where = f"fewshot.{key}"
    if isinstance(kind, tuple):
        v = value.upper() if key == "prompt_tuning_init" and isinstance(value, str) else value
        if v not in kind:
            raise ConfigError(f"{where}: expected one of {list(kind)}, got {value!r}")
        return v
    if kind in ("int", "int0"):
        v = parse_number(value, where)
        lo = 1 if kind == "int" else 0
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"{where}: expected an integer >= {lo}, got {value!r}")
        return v
    if kind in ("pos", "frac", "nonneg", "unit"):
        v = float(parse_number(value, where))
        ok = {"pos": v > 0, "frac": 0 <= v < 1, "nonneg": v >= 0, "unit": 0 < v <= 1}[kind]
        if not ok:
            want = {"pos": "> 0", "frac": "in [0, 1)", "nonneg": ">= 0", "unit": "in (0, 1]"}[kind]
            raise ConfigError(f"{where}: expected a number {want}, got {value!r}")
        return v
    if kind == "seeds":
        seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ConfigError(f"{where}: expected a non-empty list of integers, got {value!r}")
        out = []
        for s in seeds:
            s = parse_number(s, where)
            if not isinstance(s, int):
                raise ConfigError(f"{where}: expected integers, got {s!r}")
            out.append(s)
        if len(set(out)) != len(out):
            raise ConfigError(f"{where}: duplicate seeds in {out}")
        return out
    if kind == "methods":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of method names, got {value!r}")
        for n in names:
            if n not in METHODS:
                raise ConfigError(f"{where}: unknown method {n!r}; expected some of {list(METHODS)}")
        return list(names)
    if kind == "modules":
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(m, str) and m for m in value):
            return list(value)
        raise ConfigError(f"{where}: expected a module name list or 'all-linear', got {value!r}")
    if kind == "label_names" and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping {{label: name}}, e.g. {{0: negative, 1: positive}}, "
                          f"got {value!r}")
    checkers = {"label_names": lambda v: dict(check_label_names(v)),
                "augment": lambda v: check_augment([v] if isinstance(v, str) else v),
                "template": check_template}
    try:
        return checkers[kind](value)
    except ValueError as e:  # setfit's message starts with the key
        raise ConfigError(f"fewshot.{e}") from None


def validate_section(section: dict | None) -> dict:
    """The ``fewshot:`` section checked (:class:`FewshotConfig`), as a plain dict with the defaults filled
    (hyper-parameters left unset stay ``None``: the method's own default). Raises
    :class:`~fastpeft.workflow.config_checks.ConfigError` (a ValueError) naming ``fewshot.<key>``."""
    return FewshotConfig.from_section(section).to_dict()


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
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg: expected a dict from build_config, got {type(cfg).__name__}")
    section = validate_section(cfg.get("fewshot"))
    if cfg.get("task") not in ("sequence_classification", "seq_cls", "classification"):
        raise ConfigError(f"task: few-shot methods support sequence_classification, got {cfg.get('task')!r}")
    data = cfg.get("data") or {}
    if not data.get("train"):
        raise ConfigError("data.train: required (the pool the k-shot sets are drawn from)")
    if not data.get("validation"):
        raise ConfigError("data.validation: required (the few-shot evaluation set)")
    if data.get("text_pair_column"):
        raise ConfigError("data.text_pair_column: few-shot methods take single texts")
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
