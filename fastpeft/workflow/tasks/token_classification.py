"""Token classification: one BIO tag per word (named entities)."""
from __future__ import annotations

import os

import torch

from .. import metrics as M
from ..data import DataError, EncodedDataset, from_hf_dataset, read_conll, read_table
from .base import Task, class_names, register_task, source_name


@register_task
class TokenClassification(Task):
    """One BIO tag per word (CoNLL). The first sub-token of each word carries the word's label, the
    others get -100 (ignored by the loss); predictions are read back at first sub-tokens, and words cut
    off by ``max_length`` are predicted ``O`` (so truncation costs recall instead of being hidden).
    Metrics: entity-level micro precision / recall / F1 (exact span and type), token accuracy, loss."""

    name = "token_classification"
    aliases = ("ner", "token_cls")
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "token_accuracy", "loss")
    default_mode = "max"
    head_modules = ["classifier"]
    peft_task_type = "TOKEN_CLS"
    default_target_modules = "all-linear"

    def read(self, path: str, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        if not isinstance(path, (str, os.PathLike)):  # a Hugging Face dataset / sequence of dicts
            cols = [cfg.get("tokens_column", "tokens"), cfg.get("tags_column", "tags")]
            rows = from_hf_dataset(path, cols, limit)
            names = class_names(path, cols[1])
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
            s["_source"] = source_name(path)
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
        return self.labelled_model(model_path, AutoModelForTokenClassification)

    @torch.no_grad()
    def predict_tags(self, model, loader):
        out_tags, loss_sum, n = [], 0.0, 0
        for batch, out in self.outputs(model, loader):
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
