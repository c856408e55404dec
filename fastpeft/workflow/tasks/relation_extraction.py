"""Relation extraction: the directed relation between two marked entities of a sentence (SemEval-2010 Task 8).

Input: a sentence with its two entities marked ``<e1>...</e1>`` and ``<e2>...</e2>`` (the SemEval file
format, or JSONL with ``text`` and two character spans, which are turned into the same markers). The four
markers are added to the tokenizer as special tokens; the model (:class:`EntityStartClassifier`) embeds them
with its own small table ``entity_markers`` (4 x hidden, trained in full through ``modules_to_save``, so the
base model's vocabulary is left as it is and the adapter loads on the unmodified base) and classifies the
concatenation of the encoder's states at the two entity-start markers (the "entity start" recipe of
Baldini Soares et al. 2019, as in R-BERT). Labels are directed (``Cause-Effect(e1,e2)`` and
``Cause-Effect(e2,e1)`` are two classes, 19 with ``Other`` for SemEval).

Metrics (:func:`semeval_scores`): the official SemEval-2010 Task 8 score -- macro-averaged F1 over the
relation types other than ``Other``, direction taken into account -- plus accuracy over all labels and the
loss.
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn

from .. import metrics as M
from ..data import DataError, EncodedDataset, from_hf_dataset
from .base import Task, register_task, require_two_classes, source_name

MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")
OTHER = "Other"
_ID_LINE = re.compile(r'^\s*(\S+)\t\s*"(.*)"\s*$')


# --------------------------------------------------------------------------- metric

def relation_type(label: str) -> str:
    """``"Cause-Effect(e1,e2)"`` -> ``"Cause-Effect"`` (the relation without its direction)."""
    return label.split("(", 1)[0]


def semeval_scores(preds, golds, other: str = OTHER) -> dict:
    """The official SemEval-2010 Task 8 score (``semeval2010_task8_scorer-v1.2.pl``, "(9+1)-way evaluation
    with directionality taken into account") and accuracy, from label strings.

    For each relation type T other than ``other`` (directions collapsed): a prediction is correct when the
    label matches exactly (type and direction); P_T = correct_T / (predictions of type T, any direction),
    R_T = correct_T / (gold examples of type T), F1_T = 2 P R / (P + R) (0 when nothing is correct).
    ``macro_f1`` is the unweighted mean of F1_T over the types that occur in ``golds`` or ``preds``
    (excluding ``other``), as the scorer's "MACRO-averaged result (excluding Other)"; ``micro_f1`` pools
    the counts. Values are fractions in [0, 1] (the scorer prints percentages)."""
    if len(preds) != len(golds):
        raise ValueError(f"semeval_scores: {len(preds)} predictions for {len(golds)} labels")
    if not golds:
        raise ValueError("semeval_scores: no examples")
    types = sorted({relation_type(x) for x in list(golds) + list(preds)} - {other})
    per_type, tp_all, sys_all, gold_all = {}, 0, 0, 0
    for t in types:
        correct = sum(1 for p, g in zip(preds, golds) if p == g and relation_type(g) == t)
        n_sys = sum(1 for p in preds if relation_type(p) == t)
        n_gold = sum(1 for g in golds if relation_type(g) == t)
        prec = correct / n_sys if n_sys else 0.0
        rec = correct / n_gold if n_gold else 0.0
        per_type[t] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        tp_all, sys_all, gold_all = tp_all + correct, sys_all + n_sys, gold_all + n_gold
    mp = tp_all / sys_all if sys_all else 0.0
    mr = tp_all / gold_all if gold_all else 0.0
    return {"macro_f1": sum(per_type.values()) / len(per_type) if per_type else 0.0,
            "micro_f1": 2 * mp * mr / (mp + mr) if mp + mr else 0.0,
            "accuracy": M.accuracy(preds, golds), "per_type_f1": per_type}


# --------------------------------------------------------------------------- readers

def check_marked(text: str, where: str) -> tuple[str, str]:
    """The two entity texts of a marked sentence; a :class:`DataError` naming ``where`` unless each of the
    four markers occurs exactly once, each entity is opened before it is closed and is not empty."""
    counts = {m: text.count(m) for m in MARKERS}
    bad = [m for m, c in counts.items() if c != 1]
    if bad:
        raise DataError(f"{where}: expected each of {' '.join(MARKERS)} exactly once (both entities marked), "
                        f"found {', '.join(f'{m} x{counts[m]}' for m in bad)}")
    ents = []
    for k in ("1", "2"):
        s, e = text.index(f"<e{k}>"), text.index(f"</e{k}>")
        if e < s:
            raise DataError(f"{where}: </e{k}> comes before <e{k}>")
        ent = text[s + len(f"<e{k}>"):e]
        if not ent.strip():
            raise DataError(f"{where}: entity e{k} is empty")
        ents.append(ent)
    return ents[0], ents[1]


def mark_spans(text: str, e1, e2, where: str) -> str:
    """``text`` with ``<e1>..</e1>`` and ``<e2>..</e2>`` inserted around the character spans ``e1`` and
    ``e2`` (``[start, end)``); the spans must be in range, non-empty and must not overlap."""
    spans = []
    for name, sp in (("e1", e1), ("e2", e2)):
        if (not isinstance(sp, (list, tuple)) or len(sp) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in sp)):
            raise DataError(f"{where}: {name}: expected a character span [start, end], got {sp!r}")
        if not 0 <= sp[0] < sp[1] <= len(text):
            raise DataError(f"{where}: {name}: span {list(sp)} is empty or outside the text "
                            f"({len(text)} characters)")
        spans.append((sp[0], sp[1], name))
    (s1, t1, _), (s2, t2, _) = sorted(spans)
    if s2 < t1:
        raise DataError(f"{where}: the spans of e1 {list(e1)} and e2 {list(e2)} overlap")
    out = text
    for s, t, name in sorted(spans, reverse=True):  # right to left: earlier offsets stay valid
        out = out[:s] + f"<{name}>" + out[s:t] + f"</{name}>" + out[t:]
    return out


def read_semeval(path: str, with_labels: bool = True, limit: int | None = None) -> list[dict]:
    """SemEval-2010 Task 8 file: ``ID<TAB>"sentence"``, then the relation, an optional ``Comment:`` line and
    a blank line (the training and keyed test files); without labels, lines of ``ID<TAB>"sentence"`` alone
    (the unkeyed test file) also read. Records ``{"id", "text", "e1", "e2", "label"?, "_line", "_source"}``;
    errors name the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: list[dict] = []
    i = 0
    while i < len(lines) and (limit is None or len(out) < limit):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = _ID_LINE.match(line)
        where = f"{path}:{i + 1}"
        if not m:
            raise DataError(f'{where}: expected ID<TAB>"sentence with <e1>..</e1> and <e2>..</e2>", got {line[:80]!r}')
        text = m.group(2)
        e1, e2 = check_marked(text, where)
        rec = {"id": m.group(1), "text": text, "e1": e1, "e2": e2, "_line": i + 1, "_source": path}
        i += 1
        nxt = lines[i].strip() if i < len(lines) else ""
        if nxt and not nxt.startswith("Comment") and not _ID_LINE.match(lines[i]):
            rec["label"] = nxt
            i += 1
        elif with_labels:
            raise DataError(f"{path}:{i + 1}: expected the relation label of the sentence on line {i}, "
                            f"got {nxt[:80]!r}")
        if i < len(lines) and lines[i].strip().startswith("Comment"):
            i += 1
        out.append(rec)
    if not out:
        raise DataError(f"{path}: empty file (no sentences)")
    return out


def read_jsonl_spans(path: str, cfg: dict, with_labels: bool, limit: int | None) -> list[dict]:
    """JSONL: ``{"text": ..., "e1": [start, end], "e2": [start, end], "label": ...}`` per line (character
    spans, end exclusive; key names from ``text_column`` / ``label_column``), or ``text`` already marked
    with ``<e1>..</e1> <e2>..</e2>`` and no spans."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    tcol, lcol = cfg.get("text_column") or "text", cfg.get("label_column") or "label"
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON line ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(tcol), str):
                raise DataError(f"{where}: expected a JSON object with a string {tcol!r}")
            out.append(_record(obj, tcol, lcol, with_labels, where, path, lineno))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path}: empty file (no data rows)")
    return out


def _record(obj, tcol, lcol, with_labels, where, source, line) -> dict:
    text = obj[tcol]
    if "e1" in obj or "e2" in obj:
        if any(m in text for m in MARKERS):
            raise DataError(f"{where}: give either character spans e1/e2 or markers in the text, not both")
        if "e1" not in obj or "e2" not in obj:
            raise DataError(f"{where}: both entity spans e1 and e2 are needed")
        text = mark_spans(text, obj["e1"], obj["e2"], where)
    e1, e2 = check_marked(text, where)
    rec = {"text": text, "e1": e1, "e2": e2, "_line": line, "_source": source}
    if "id" in obj:
        rec["id"] = obj["id"]
    if with_labels:
        if lcol not in obj:
            raise DataError(f"{where}: missing the label {lcol!r}")
        rec["label"] = str(obj[lcol])
    return rec


# --------------------------------------------------------------------------- model

class EntityStartHead(nn.Module):
    """``[h_e1 ; h_e2]`` ([B, 2H]) -> dropout -> ``dense`` (2H -> H) -> tanh -> dropout -> ``out_proj``
    (H -> num_labels): the logits [B, num_labels]."""

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(2 * hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pair)))))


class EntityStartClassifier(nn.Module):
    """A transformers encoder with entity-marker embeddings and an entity-start relation head.

    ``forward(input_ids [B, T], attention_mask, token_type_ids, e1_index [B], e2_index [B], labels [B])``:
    ids ``>= marker_base`` (the four markers the task adds to the tokenizer) are embedded by
    ``entity_markers`` (an ``nn.Embedding(4, H)``), the others by the encoder's word embeddings; the encoder
    runs on these ``inputs_embeds``; the logits are ``classifier([h[b, e1_index[b]] ; h[b, e2_index[b]]])``
    and the loss their cross-entropy with ``labels``. Equivalent PyTorch for the embedding step::

        emb = word_embeddings(ids.clamp(max=marker_base - 1))
        emb = torch.where((ids >= marker_base)[..., None], entity_markers((ids - marker_base).clamp(min=0)), emb)
    """

    def __init__(self, encoder: nn.Module, num_labels: int, marker_base: int, *, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.marker_base = int(marker_base)
        hidden = encoder.config.hidden_size
        self.entity_markers = nn.Embedding(len(MARKERS), hidden)
        self.classifier = EntityStartHead(hidden, num_labels, dropout)
        self.num_labels = num_labels

    def init_markers(self, token_ids: list[int | None]) -> None:
        """Start each marker's embedding at the embedding of an ordinary token (``None``: the mean row)."""
        w = self.encoder.get_input_embeddings().weight.detach()
        with torch.no_grad():
            for k, tid in enumerate(token_ids):
                self.entity_markers.weight[k] = w[tid] if tid is not None else w.mean(0)

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, e1_index=None, e2_index=None,
                labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput
        if e1_index is None or e2_index is None:
            raise ValueError("EntityStartClassifier: e1_index and e2_index (the entity-start positions) are needed")
        is_marker = input_ids >= self.marker_base
        emb = self.encoder.get_input_embeddings()(input_ids.clamp(max=self.marker_base - 1))
        marker = self.entity_markers((input_ids - self.marker_base).clamp(min=0, max=len(MARKERS) - 1))
        emb = torch.where(is_marker[..., None], marker.to(emb.dtype), emb)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        h = self.encoder(inputs_embeds=emb, attention_mask=attention_mask, **extra).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        pair = torch.cat([h[rows, e1_index], h[rows, e2_index]], dim=-1)
        logits = self.classifier(pair)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build_relation_model(model_path: str, labels, *, dropout: float = 0.1) -> EntityStartClassifier:
    """:class:`EntityStartClassifier` over the encoder at ``model_path`` (``transformers.AutoModel``), with
    ``len(labels)`` classes and the markers' ids starting right after the tokenizer's vocabulary."""
    from transformers import AutoModel
    from ..models import load_base_model, load_tokenizer
    tok = load_tokenizer(model_path)
    encoder = load_base_model(model_path, AutoModel, add_pooling_layer=False) if _has_pooler(model_path) \
        else load_base_model(model_path, AutoModel)
    model = EntityStartClassifier(encoder, len(labels), len(tok), dropout=dropout)
    vocab = tok.get_vocab()
    model.init_markers([vocab.get(t) for t in ("<", ">", "[", "]")])  # distinct ordinary punctuation
    model.config.id2label = dict(enumerate(labels))
    return model


def _has_pooler(model_path: str) -> bool:
    """BERT-like encoders take ``add_pooling_layer`` (the pooler is unused here)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f).get("model_type") in ("bert", "roberta", "xlm-roberta", "electra", "camembert")
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- task

@register_task
class RelationExtraction(Task):
    """The directed relation between two marked entities (see the module doc). Data: SemEval-2010 Task 8
    files (``format: semeval``, the default for ``.txt``) or JSONL (``text`` + ``e1`` / ``e2`` character
    spans, or ``text`` with markers). Metrics: ``macro_f1`` (official SemEval score), ``micro_f1``,
    ``accuracy``, ``loss``."""

    name = "relation_extraction"
    aliases = ("re", "relation_classification")
    default_metric = "macro_f1"
    default_mode = "max"
    head_modules = ["classifier", "entity_markers"]
    peft_task_type = None  # a custom head: HF PEFT loads the adapter into EntityStartClassifier
    default_target_modules = ["query", "value"]

    def read(self, path, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        if not isinstance(path, (str, os.PathLike)):  # a datasets.Dataset / list of dicts
            tcol, lcol = cfg.get("text_column") or "text", cfg.get("label_column") or "label"
            cols = [tcol] + ([lcol] if with_labels else [])
            rows = from_hf_dataset(path, cols, limit)
            return [_record({**dict(path[r["_line"]]), **r}, tcol, lcol, with_labels, f"dataset row {r['_line']}",
                            source_name(path), r["_line"]) for r in rows]
        path = str(path)
        fmt = (cfg.get("format") or ("jsonl" if path.endswith((".jsonl", ".json")) else "semeval")).lower()
        if fmt == "semeval":
            return read_semeval(path, with_labels, limit)
        if fmt == "jsonl":
            return read_jsonl_spans(path, cfg, with_labels, limit)
        raise ValueError(f"format: relation_extraction reads 'semeval' or 'jsonl', got {fmt!r}")

    def fit_labels(self, records) -> list[str]:
        """The training labels, each directed one in both directions (``T(e1,e2)`` brings ``T(e2,e1)``: a
        rare direction missing from the training data is still a class), ``Other`` first."""
        labels = {r["label"] for r in records}
        require_two_classes(labels, records)   # before the directions: one relation is still one class
        for l in list(labels):
            m = re.fullmatch(r"(.+)\((e[12]),(e[12])\)", l)
            if m and m.group(2) != m.group(3):
                labels.add(f"{m.group(1)}({m.group(3)},{m.group(2)})")
        labels = sorted(labels)
        self.labels = ([OTHER] if OTHER in labels else []) + [l for l in labels if l != OTHER]
        return self.labels

    @staticmethod
    def add_markers(tokenizer) -> list[int]:
        """Add the four markers to ``tokenizer`` as special tokens (once); their ids."""
        if any(tokenizer.convert_tokens_to_ids(m) in (None, tokenizer.unk_token_id) for m in MARKERS):
            tokenizer.add_tokens(list(MARKERS), special_tokens=True)
        return tokenizer.convert_tokens_to_ids(list(MARKERS))

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        if with_labels and not self.labels:
            raise ValueError("labels are unknown: call fit_labels on the training records first")
        ids_m = self.add_markers(tokenizer)
        base = len(tokenizer) - len(MARKERS)
        if ids_m != list(range(base, base + len(MARKERS))):
            raise ValueError(f"relation_extraction: the markers must be the tokenizer's last ids, got {ids_m}")
        enc = tokenizer([r["text"] for r in records], truncation=False)
        l2i = self.label2id
        feats = []
        for i, r in enumerate(records):
            ids = list(enc["input_ids"][i])
            where = f"{r.get('_source', '<data>')}:{r.get('_line', '?')}"
            p1, p2 = ids.index(ids_m[0]), ids.index(ids_m[2])
            keep = slice(0, len(ids))
            if len(ids) > max_length:  # keep [CLS], a window holding both entity starts, [SEP]
                lo, hi = min(p1, p2), max(p1, p2)
                room = max_length - 2
                if hi - lo + 1 > room:
                    raise DataError(f"{where}: the entity markers are {hi - lo + 1} tokens apart; "
                                    f"max_length={max_length} cannot hold both")
                start = max(1, min(lo - (room - (hi - lo + 1)) // 2, len(ids) - 1 - room))
                keep = slice(start, start + room)
                ids = [ids[0]] + ids[keep] + [ids[-1]]
                p1, p2 = p1 - start + 1, p2 - start + 1
            f = {"input_ids": ids, "attention_mask": [1] * len(ids), "e1_index": p1, "e2_index": p2}
            if "token_type_ids" in enc:
                f["token_type_ids"] = [0] * len(ids)
            if with_labels:
                if r["label"] not in l2i:
                    raise DataError(f"{where}: unknown relation {r['label']!r}; the model knows {self.labels}")
                f["labels"] = l2i[r["label"]]
            feats.append(f)
        return EncodedDataset(feats, records)

    def build_model(self, model_path: str):
        return build_relation_model(model_path, self.labels)

    @torch.no_grad()
    def predict_ids(self, model, loader):
        preds, loss_sum, n = [], 0.0, 0
        for batch, out in self.outputs(model, loader):
            preds += out.logits.argmax(-1).tolist()
            if out.loss is not None:
                loss_sum += float(out.loss) * len(batch["input_ids"])
                n += len(batch["input_ids"])
        return preds, (loss_sum / n if n else None)

    def evaluate(self, model, loader, dataset) -> dict:
        preds, loss = self.predict_ids(model, loader)
        gold = [self.labels[f["labels"]] for f in dataset.features]
        scores = semeval_scores([self.labels[p] for p in preds], gold)
        return {"macro_f1": scores["macro_f1"], "micro_f1": scores["micro_f1"], "accuracy": scores["accuracy"],
                "loss": loss}

    def predict(self, model, loader, dataset) -> list[dict]:
        preds, _ = self.predict_ids(model, loader)
        out = []
        for r, p in zip(dataset.records, preds):
            label = self.labels[p]
            rec = {"text": r["text"], "e1": r["e1"], "e2": r["e2"], "relation": label,
                   "reading": _reading(label, r["e1"], r["e2"])}
            if "id" in r:
                rec = {"id": r["id"], **rec}
            out.append(rec)
        return out


def _reading(label: str, e1: str, e2: str) -> str:
    """``"Cause-Effect(e2,e1)"`` with e1="smoke", e2="fire" -> ``"Cause-Effect(fire, smoke)"``."""
    m = re.fullmatch(r"(.+)\((e[12]),(e[12])\)", label)
    if not m:
        return f"{label}({e1}, {e2})"
    ents = {"e1": e1, "e2": e2}
    return f"{m.group(1)}({ents[m.group(2)]}, {ents[m.group(3)]})"
