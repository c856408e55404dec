"""Tasks: what to read, how to encode it, which head to train, how to score it.

A task is an object with this interface (subclass :class:`Task` to add one):

* ``columns(data_cfg)`` / ``read(path, data_cfg, limit)`` -- records from a file;
* ``fit_labels(records)`` -- the label vocabulary, taken from the training data;
* ``encode(records, tokenizer, max_length, source)`` -- an :class:`~fastpeft.workflow.data.EncodedDataset`
  (unknown labels raise a :class:`~fastpeft.workflow.data.DataError` naming file and line);
* ``build_model(model_path)`` -- the base transformers model with its task head;
* ``head_modules`` / ``default_target_modules`` -- what ``modules_to_save`` and LoRA target by default;
* ``forward(model, batch) -> (loss, logits)`` -- the training step's forward (the trainer and the
  adversarial methods call it);
* ``evaluate(model, loader, dataset) -> {metric: value}`` and ``predict(model, loader, dataset)``.

Extension points: question answering would read ``(question, context, answers)``, encode with
``return_offsets_mapping`` and train ``AutoModelForQuestionAnswering`` (start/end logits; metric exact
match / F1); seq2seq would encode ``(source, target)`` pairs with ``text_target=`` and train
``AutoModelForSeq2SeqLM`` (metric loss / BLEU). Register a new task with :func:`register_task`.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import metrics as M
from .data import DataError, EncodedDataset, from_hf_dataset, read_conll, read_table

TASKS: dict[str, type] = {}


def register_task(cls):
    TASKS[cls.name] = cls
    for alias in getattr(cls, "aliases", ()):
        TASKS[alias] = cls
    return cls


def get_task(name: str, **kwargs) -> "Task":
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def model_inputs(batch: dict) -> dict:
    """The batch without bookkeeping keys (those starting with ``_``)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class Task:
    name = "task"
    aliases: tuple = ()
    default_metric = "loss"
    default_mode = "min"
    head_modules: list[str] = []
    default_target_modules: list[str] | str = []

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

    def forward(self, model, batch):
        out = model(**model_inputs(batch))
        return out.loss, out.logits


@register_task
class SequenceClassification(Task):
    """One label per text (or text pair). Metrics: accuracy, macro-F1, loss."""

    name = "sequence_classification"
    aliases = ("seq_cls", "classification")
    default_metric = "accuracy"
    default_mode = "max"
    head_modules = ["classifier"]
    default_target_modules = ["query", "value"]

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
        recs = _read_rows(path, cols, cfg, limit)
        out = []
        for r in recs:
            o = {"text": str(r[cols[0]]), "_line": r["_line"], "_source": _source(path)}
            if cfg.get("text_pair_column"):
                o["text_pair"] = str(r[cfg["text_pair_column"]])
            if with_labels:
                o["label"] = str(r[cfg.get("label_column", "label")])
            out.append(o)
        return out

    def fit_labels(self, records) -> list[str]:
        labels = sorted({r["label"] for r in records})
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
        from .models import load_base_model
        return load_base_model(model_path, AutoModelForSequenceClassification, num_labels=len(self.labels),
                               id2label=dict(enumerate(self.labels)), label2id=self.label2id)

    @torch.no_grad()
    def predict_ids(self, model, loader):
        preds, losses, n = [], 0.0, 0
        for batch in loader:
            batch = _to_device(batch, _device_of(model))
            out = model(**model_inputs(batch))
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

    def predict(self, model, loader, dataset) -> list[dict]:
        preds, _ = self.predict_ids(model, loader)
        return [{"text": r["text"], "prediction": self.labels[p]} for r, p in zip(dataset.records, preds)]


@register_task
class TokenClassification(Task):
    """One BIO tag per word (CoNLL). The first sub-token of each word carries the word's label, the
    others get -100 (ignored by the loss); predictions are read back at first sub-tokens, and words cut
    off by ``max_length`` are predicted ``O`` (so truncation costs recall instead of being hidden).
    Metrics: entity-level micro precision / recall / F1 (exact span and type), token accuracy, loss."""

    name = "token_classification"
    aliases = ("ner", "token_cls")
    default_metric = "f1"
    default_mode = "max"
    head_modules = ["classifier"]
    default_target_modules = "all-linear"

    def read(self, path: str, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        if not isinstance(path, (str, os.PathLike)):  # a Hugging Face dataset / sequence of dicts
            cols = [cfg.get("tokens_column", "tokens"), cfg.get("tags_column", "tags")]
            rows = from_hf_dataset(path, cols, limit)
            names = _class_names(path, cols[1])
            sents = [{"tokens": list(r[cols[0]]),
                      "tags": [names[t] if names and isinstance(t, int) else t for t in r[cols[1]]],
                      "_line": r["_line"]} for r in rows]
        elif (cfg.get("format") or "conll") == "conll":
            sents = read_conll(path, token_column=cfg.get("token_column", 0), tag_column=cfg.get("tag_column"),
                               limit=limit)
        else:
            cols = [cfg.get("tokens_column", "tokens"), cfg.get("tags_column", "tags")]
            rows = read_table(path, cols, cfg.get("format"), limit=limit)
            sents = [{"tokens": list(r[cols[0]]), "tags": list(r[cols[1]]), "_line": r["_line"]} for r in rows]
        for s in sents:
            s["_source"] = _source(path)
        return sents

    def fit_labels(self, records) -> list[str]:
        tags = {t for r in records for t in r["tags"]}
        for t in tags:
            M._split_tag(t)  # raises on a non-BIO tag
        self.labels = ["O"] + sorted(tags - {"O"}, key=lambda t: (t[2:], t[0]))
        return self.labels

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        enc = tokenizer([r["tokens"] for r in records], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        l2i = self.label2id
        feats = []
        for i, r in enumerate(records):
            word_ids = enc.word_ids(i)
            f = {k: enc[k][i] for k in enc.keys()}
            starts, labels, prev = [], [], None
            for pos, w in enumerate(word_ids):
                if w is not None and w != prev:
                    starts.append(pos)
                    if with_labels:
                        tag = r["tags"][w]
                        if tag not in l2i:
                            raise DataError(f"{r.get('_source', '<data>')}:{r.get('_line', '?')}: unknown tag "
                                            f"{tag!r} in this sentence; the model knows {self.labels}")
                        labels.append(l2i[tag])
                elif with_labels:
                    labels.append(-100)
                prev = w
            if with_labels:
                f["labels"] = labels
                for tag in r["tags"][len(starts):]:  # truncated words: still validate their tags
                    if tag not in l2i:
                        raise DataError(f"{r.get('_source', '<data>')}:{r.get('_line', '?')}: unknown tag {tag!r}")
            f["_word_starts"] = starts
            feats.append(f)
        return EncodedDataset(feats, records)

    def build_model(self, model_path: str):
        from transformers import AutoModelForTokenClassification
        from .models import load_base_model
        return load_base_model(model_path, AutoModelForTokenClassification, num_labels=len(self.labels),
                               id2label=dict(enumerate(self.labels)), label2id=self.label2id)

    @torch.no_grad()
    def predict_tags(self, model, loader):
        out_tags, loss_sum, n = [], 0.0, 0
        for batch in loader:
            batch = _to_device(batch, _device_of(model))
            out = model(**model_inputs(batch))
            ids = out.logits.argmax(-1).tolist()
            for row, starts in zip(ids, batch["_word_starts"]):
                out_tags.append([self.labels[row[p]] for p in starts])
            if out.loss is not None:
                k = int((batch["labels"] != -100).sum())
                loss_sum += float(out.loss) * k
                n += k
        return out_tags, (loss_sum / n if n else None)

    def evaluate(self, model, loader, dataset) -> dict:
        pred, loss = self.predict_tags(model, loader)
        gold = [r["tags"] for r in dataset.records]
        pred = [p + ["O"] * (len(g) - len(p)) for p, g in zip(pred, gold)]
        prf = M.entity_prf(pred, gold)
        flat_p = [t for s in pred for t in s]
        flat_g = [t for s in gold for t in s]
        return {"f1": prf["f1"], "precision": prf["precision"], "recall": prf["recall"],
                "token_accuracy": M.accuracy(flat_p, flat_g), "loss": loss}

    def predict(self, model, loader, dataset) -> list[dict]:
        pred, _ = self.predict_tags(model, loader)
        out = []
        for r, p in zip(dataset.records, pred):
            p = p + ["O"] * (len(r["tokens"]) - len(p))
            out.append({"tokens": r["tokens"], "tags": p})
        return out


@register_task
class CausalLM(Task):
    """Next-token prediction on text. Metrics: loss (mean token cross-entropy), perplexity.
    ``predict`` greedily continues each text (``max_new_tokens``) for a quick look."""

    name = "causal_lm"
    aliases = ("lm", "clm")
    default_metric = "loss"
    default_mode = "min"
    head_modules: list[str] = []
    default_target_modules = "all-linear"
    max_new_tokens = 20

    def read(self, path: str, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        col = cfg.get("text_column", "text")
        recs = _read_rows(path, [col], cfg, limit)
        return [{"text": str(r[col]), "_line": r["_line"], "_source": _source(path)} for r in recs]

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
        feats = []
        for i in range(len(records)):
            f = {k: enc[k][i] for k in ("input_ids", "attention_mask")}
            if with_labels:
                f["labels"] = list(enc["input_ids"][i])
            feats.append(f)
        ds = EncodedDataset(feats, records)
        ds.tokenizer = tokenizer
        return ds

    def build_model(self, model_path: str):
        from transformers import AutoModelForCausalLM
        from .models import load_base_model
        return load_base_model(model_path, AutoModelForCausalLM)

    @torch.no_grad()
    def evaluate(self, model, loader, dataset) -> dict:
        loss_sum, n = 0.0, 0
        for batch in loader:
            batch = _to_device(batch, _device_of(model))
            out = model(**model_inputs(batch))
            k = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * k
            n += k
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "perplexity": M.perplexity(loss)}

    @torch.no_grad()
    def predict(self, model, loader, dataset) -> list[dict]:
        tok = getattr(dataset, "tokenizer", None)
        out = []
        dev = _device_of(model)
        for f, r in zip(dataset.features, dataset.records):
            ids = torch.tensor([f["input_ids"]], device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(tok, "pad_token_id", None))
            new = gen[0, ids.shape[1]:].tolist()
            out.append({"text": r["text"], "continuation": tok.decode(new) if tok is not None else new})
        return out


def _read_rows(path, cols, cfg, limit):
    """Rows from a file (TSV/CSV/JSONL) or from a Hugging Face dataset / sequence of dicts."""
    if isinstance(path, (str, os.PathLike)):
        return read_table(str(path), cols, cfg.get("format"), quoting=cfg.get("quoting"), limit=limit)
    rows = from_hf_dataset(path, cols, limit)
    label_col = cfg.get("label_column", "label")
    names = _class_names(path, label_col) if label_col in cols else None
    if names:
        for r in rows:
            if isinstance(r[label_col], int):
                r[label_col] = names[r[label_col]]
    return rows


def _class_names(dataset, column):
    """Names of a ``datasets`` ClassLabel (or Sequence(ClassLabel)) column, else None."""
    feat = getattr(dataset, "features", None)
    feat = feat.get(column) if hasattr(feat, "get") else None
    feat = getattr(feat, "feature", feat)
    return list(getattr(feat, "names", None) or []) or None


def _source(path) -> str:
    return str(path) if isinstance(path, (str, os.PathLike)) else "dataset row"


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
