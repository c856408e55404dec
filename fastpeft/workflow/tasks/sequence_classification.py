"""Sequence classification: one label per text (or text pair).

Labels are strings, with one rule: a label that reads as a finite number is written in its shortest form
(``"1.0"``, ``"01"``, ``" 1"`` -> ``"1"``; ``"2.50"`` -> ``"2.5"``), in training and evaluation data alike,
so ``1`` and ``1.0`` are one class; other labels are kept as they are (whitespace stripped).
"""
from __future__ import annotations

import math

import torch

from .. import metrics as M
from ..data import DataError, EncodedDataset
from .base import Task, read_rows, register_task, require_two_classes, source_name


@register_task
class SequenceClassification(Task):
    """One label per text (or text pair). Metrics: accuracy, macro-F1, loss."""

    name = "sequence_classification"
    aliases = ("seq_cls", "classification")
    default_metric = "accuracy"
    default_mode = "max"
    head_modules = ["classifier"]
    peft_task_type = "SEQ_CLS"
    default_target_modules = ["query", "value"]
    metric_names = ("accuracy", "macro_f1", "loss")

    def columns(self, cfg: dict) -> list[str]:
        cols = [cfg.get("text_column", "sentence")]
        if cfg.get("text_pair_column"):
            cols.append(cfg["text_pair_column"])
        if cfg.get("label_column", "label") is not None:
            cols.append(cfg.get("label_column", "label"))
        return cols

    def read(self, path: str, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        cols = self.columns(cfg)
        if not with_labels and cfg.get("label_column", "label") in cols:
            cols = cols[:-1]
        recs = read_rows(path, cols, cfg, limit)
        out = []
        for r in recs:
            o = {"text": str(r[cols[0]]), "_line": r["_line"], "_source": source_name(path)}
            if cfg.get("text_pair_column"):
                o["text_pair"] = str(r[cfg["text_pair_column"]])
            if with_labels:
                o["label"] = normalize_label(r[cfg.get("label_column", "label")])
            out.append(o)
        return out

    def fit_labels(self, records) -> list[str]:
        labels = sorted({r["label"] for r in records})
        require_two_classes(labels, records)
        try:  # numeric labels in numeric order ("2" before "10")
            labels = sorted(labels, key=float)
        except ValueError:
            pass
        self.labels = labels
        return labels

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        if with_labels and not self.labels:
            raise ValueError("labels are unknown: call fit_labels on the training records first")
        texts = [r["text"] for r in records]
        pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        l2i = self.label2id
        feats = []
        for i, r in enumerate(records):
            f = {k: enc[k][i] for k in enc.keys()}
            if with_labels:
                if r["label"] not in l2i:
                    raise DataError(f"{r.get('_source', '<data>')}:{r.get('_line', '?')}: unknown label "
                                    f"{r['label']!r}; the model knows {self.labels}")
                f["labels"] = l2i[r["label"]]
            feats.append(f)
        return EncodedDataset(feats, records)

    def build_model(self, model_path: str):
        from transformers import AutoModelForSequenceClassification
        return self.labelled_model(model_path, AutoModelForSequenceClassification)

    @torch.no_grad()
    def predict_ids(self, model, loader):
        preds, losses, n = [], 0.0, 0
        for batch, out in self.outputs(model, loader):
            preds += out.logits.argmax(-1).tolist()
            if out.loss is not None:
                losses += float(out.loss) * len(batch["input_ids"])
                n += len(batch["input_ids"])
        return preds, (losses / n if n else None)

    def evaluate(self, model, loader, dataset) -> dict:
        preds, loss = self.predict_ids(model, loader)
        gold = [f["labels"] for f in dataset.features]
        return {"accuracy": M.accuracy(preds, gold),
                "macro_f1": M.macro_f1(preds, gold, classes=range(len(self.labels))), "loss": loss}

    def predict(self, model, loader, dataset, scores: bool = False) -> list[dict]:
        """One ``{"text", "prediction"}`` per record; with ``scores``, also ``"scores"``: label -> softmax
        probability."""
        if not scores:
            preds, _ = self.predict_ids(model, loader)
            return [{"text": r["text"], "prediction": self.labels[p]} for r, p in zip(dataset.records, preds)]
        probs = []
        with torch.no_grad():
            for _, out in self.outputs(model, loader):
                probs += out.logits.float().softmax(-1).tolist()
        return [{"text": r["text"], "prediction": self.labels[max(range(len(p)), key=p.__getitem__)],
                 "scores": {l: round(v, 6) for l, v in zip(self.labels, p)}}
                for r, p in zip(dataset.records, probs)]


def normalize_label(value) -> str:
    """The class name of a label value: a finite number in its shortest form (``1.0`` -> ``"1"``), anything
    else as a stripped string."""
    if isinstance(value, bool):
        return str(value)
    text = str(value).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return text
    if not math.isfinite(x):
        return text
    return str(int(x)) if x == int(x) and abs(x) < 2 ** 53 else repr(x)
