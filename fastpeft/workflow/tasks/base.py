"""The :class:`Task` base class, the task registry, and helpers for task modules (see the package doc)."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch

from ..config_checks import DATA_KEYS, FILE_KEYS
from ..data import DataError, PaddingCollator, from_hf_dataset, read_table

#: name or alias -> task class
TASKS: dict[str, type] = {}


def register_task(cls):
    """Class decorator: register ``cls`` under ``cls.name`` and each of ``cls.aliases``; its ``data_keys``
    become known keys of the config's ``data:`` section (and of each split's mapping)."""
    DATA_KEYS.update(getattr(cls, "data_keys", ()))
    FILE_KEYS.update(getattr(cls, "data_keys", ()))
    TASKS[cls.name] = cls
    for alias in getattr(cls, "aliases", ()):
        TASKS[alias] = cls
    return cls


def get_task(name: str, **kwargs) -> "Task":
    """A new instance of the task registered as ``name`` (``kwargs`` go to its constructor, e.g. ``labels``)."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def task_names() -> list[str]:
    """The registered tasks' names (without aliases), in registration order."""
    return list(dict.fromkeys(cls.name for cls in TASKS.values()))


def model_inputs(batch: dict) -> dict:
    """The batch without bookkeeping keys (those starting with ``_``)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class Task:
    """Base of every task; the package docstring lists what a subclass implements."""

    name = "task"
    aliases: tuple = ()
    default_metric = "loss"
    default_mode = "min"
    head_modules: list[str] = []
    default_target_modules: list[str] | str = []
    #: HF PEFT task type written into the adapter's config (``AutoPeftModelFor*`` picks the model class
    #: from it); None for a task without one (the adapter then records ``auto_mapping``)
    peft_task_type: str | None = None
    #: the keys :meth:`evaluate` returns, so a config's ``trainer.metric`` is checked before training;
    #: None: not declared (checked at the first evaluation)
    metric_names: tuple | None = None
    #: extra keys of the config's ``data:`` section this task reads (e.g. ``messages_column``)
    data_keys: tuple = ()

    def __init__(self, labels: Sequence[str] | None = None):
        self.labels = list(labels) if labels is not None else None

    # ---- persisted with the adapter
    def state(self) -> dict:
        return {"task": self.name, "labels": self.labels}

    @property
    def label2id(self) -> dict:
        return {l: i for i, l in enumerate(self.labels or [])}

    def fit_labels(self, records) -> list[str] | None:
        return None

    # ---- base model, "tokenizer" and PEFT-method defaults (overridden by tasks on non-transformers bases)
    def resolve_model(self, name_or_path: str) -> str:
        """The local base-model location for the config's ``model:`` (default: a transformers directory or
        a bundled name, :func:`~fastpeft.workflow.models.resolve_model_path`)."""
        from ..models import resolve_model_path
        return resolve_model_path(name_or_path)

    def load_tokenizer(self, model_path: str):
        """What ``encode`` and ``collator`` take as ``tokenizer`` (default: the base's transformers tokenizer)."""
        from ..models import load_tokenizer
        return load_tokenizer(model_path)

    def method_defaults(self, name: str) -> dict:
        """Default options of PEFT method ``name`` on this task's model (after ``build_model``); the config's
        ``method:`` keys win. LoRA's ``target_modules`` default is :attr:`default_target_modules`."""
        return {}

    def labelled_model(self, model_path: str, auto_class):
        """``auto_class`` (a transformers ``AutoModelFor...``) from ``model_path``, its head sized and named
        for :attr:`labels` (``build_model`` of tasks with a label vocabulary)."""
        from ..models import load_base_model
        return load_base_model(model_path, auto_class, num_labels=len(self.labels),
                               id2label=dict(enumerate(self.labels)), label2id=self.label2id)

    # ---- batches and the training step
    def collator(self, tokenizer):
        """Turns a list of encoded examples into a batch: padding to the batch's longest ``input_ids``."""
        pad = getattr(tokenizer, "pad_token_id", None)
        return PaddingCollator(pad if pad is not None else 0)

    def num_examples(self, batch: dict) -> int:
        """How many examples ``batch`` holds (the trainer's example counts and throughput)."""
        return len(batch["input_ids"])

    def forward(self, model, batch, loss_fn=None):
        """(loss, logits) of the training step; ``loss_fn(outputs, batch)`` replaces the model's loss
        when given (custom losses). The trainer and the adversarial methods call it."""
        out = model(**model_inputs(batch))
        return (out.loss if loss_fn is None else loss_fn(out, batch)), out.logits

    def metric_mode(self, metric: str) -> str:
        """``"min"`` or ``"max"``: which way ``metric`` (one of :meth:`evaluate`'s keys) improves."""
        return "min" if "loss" in metric or "perplexity" in metric else "max"

    # ---- evaluation helpers
    @staticmethod
    def outputs(model, loader) -> Iterator[tuple[dict, object]]:
        """(batch on the model's device, model outputs) for every batch of ``loader``."""
        device = device_of(model)
        for batch in loader:
            batch = to_device(batch, device)
            yield batch, model(**model_inputs(batch))


# --------------------------------------------------------------------------- helpers for task modules

def read_rows(path, cols, cfg, limit):
    """Rows from a file (TSV/CSV/JSONL) or from a Hugging Face dataset / sequence of dicts."""
    if isinstance(path, (str, os.PathLike)):
        return read_table(str(path), cols, cfg.get("format"), quoting=cfg.get("quoting"), limit=limit)
    rows = from_hf_dataset(path, cols, limit)
    label_col = cfg.get("label_column", "label")
    names = class_names(path, label_col) if label_col in cols else None
    if names:
        for r in rows:
            if isinstance(r[label_col], int):
                r[label_col] = names[r[label_col]]
    return rows


def class_names(dataset, column):
    """Names of a ``datasets`` ClassLabel (or Sequence(ClassLabel)) column, else None."""
    feat = getattr(dataset, "features", None)
    feat = feat.get(column) if hasattr(feat, "get") else None
    feat = getattr(feat, "feature", feat)
    return list(getattr(feat, "names", None) or []) or None


def require_two_classes(labels, records) -> None:
    """Refuse training data with fewer than two distinct ``labels`` (a classifier over one class learns
    nothing and predicts it everywhere: usually a wrong label column or a filtered file), naming the
    records' source."""
    labels = sorted(labels)
    if len(labels) >= 2:
        return
    src = records[0].get("_source", "training data") if records else "training data"
    raise DataError(f"{src}: every training example has the label {labels[0]!r}: classification needs at "
                    f"least two classes (wrong label column, or a filtered file?)" if labels else
                    f"{src}: no labelled training examples")


def source_name(path) -> str:
    """How errors name where a record came from: the file, or "dataset row"."""
    return str(path) if isinstance(path, (str, os.PathLike)) else "dataset row"


def device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
