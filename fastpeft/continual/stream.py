"""A stream of tasks for continual learning.

A :class:`ContinualTask` is one step of the stream: a name, its encoded training and evaluation data
(:class:`~fastpeft.workflow.data.EncodedDataset`, as ``Task.encode`` returns them) and the labels it
uses. Every task of a stream shares the model's label vocabulary (one head: ``labels`` of a task are
a subset of it), so a sequence-classification stream is *domain-incremental* (same label ids, new
inputs or a new meaning of the labels) unless the strategy routes by task id (per-task adapters).

Build one from records::

    task = get_task("sequence_classification")
    recs = {"a": (train_a, dev_a), "b": (train_b, dev_b)}          # records from task.read(...)
    stream = encode_stream(task, tok, recs, max_length=64)        # fits the union label vocabulary
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from ..workflow.data import EncodedDataset

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class ContinualTask:
    """One task of the stream: ``train`` / ``eval`` encoded datasets, ``labels`` it uses."""
    name: str
    train: EncodedDataset
    eval: EncodedDataset
    labels: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"name: expected a non-empty task name of letters, digits, '_' or '-', "
                             f"got {self.name!r}")
        for attr in ("train", "eval"):
            ds = getattr(self, attr)
            if ds is None or not hasattr(ds, "features") or len(ds) == 0:
                raise ValueError(f"{attr}: task {self.name!r} needs a non-empty EncodedDataset, got {ds!r}")


def check_stream(stream: Sequence[ContinualTask]) -> list[ContinualTask]:
    """The stream as a list; ValueError naming ``stream`` when it is empty, holds something other than
    :class:`ContinualTask` or repeats a task name."""
    if stream is None:
        raise ValueError("stream: expected a non-empty list of ContinualTask, got None")
    tasks = list(stream)
    if not tasks:
        raise ValueError("stream: expected a non-empty list of ContinualTask, got an empty list")
    for i, t in enumerate(tasks):
        if not isinstance(t, ContinualTask):
            raise ValueError(f"stream[{i}]: expected a ContinualTask, got {type(t).__name__}")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"stream: task names must be unique, repeated: {dup}")
    return tasks


def concat_datasets(*datasets) -> EncodedDataset:
    """One :class:`EncodedDataset` holding the features (and records) of all ``datasets`` in order,
    or of the feature lists given instead of datasets (the replay buffer)."""
    feats, recs = [], []
    have_recs = True
    for d in datasets:
        if isinstance(d, EncodedDataset):
            feats += list(d.features)
            if d.records is None:
                have_recs = False
            else:
                recs += list(d.records)
        else:
            feats += list(d)
            have_recs = False
    if not feats:
        raise ValueError("datasets: nothing to concatenate (all empty)")
    keys = set(feats[0])
    for i, f in enumerate(feats):
        if set(f) != keys:
            raise ValueError(f"datasets: example {i} has keys {sorted(f)}, the first has {sorted(keys)} "
                             "(encoded with different tasks or tokenizers?)")
    return EncodedDataset(feats, recs if have_recs else None)


def encode_stream(task, tokenizer, records: dict, max_length: int = 128,
                  labels: Sequence[str] | None = None) -> list[ContinualTask]:
    """``records``: ``{name: (train_records, eval_records)}`` in stream order (records as
    ``task.read`` returns them). Fits ``task``'s label vocabulary on the union of all training
    records (or uses ``labels``), then encodes every split. Returns the stream."""
    if not records:
        raise ValueError("records: expected a non-empty {name: (train_records, eval_records)} mapping")
    if labels is not None:
        task.labels = list(labels)
    else:
        task.fit_labels([r for tr, _ in records.values() for r in tr])
    out = []
    for name, (tr, ev) in records.items():
        if not tr or not ev:
            raise ValueError(f"records[{name!r}]: expected non-empty training and evaluation records")
        own = sorted({str(r["label"]) for r in tr}) if "label" in tr[0] else list(task.labels or [])
        out.append(ContinualTask(name, task.encode(tr, tokenizer, max_length),
                                 task.encode(ev, tokenizer, max_length), own))
    return out
