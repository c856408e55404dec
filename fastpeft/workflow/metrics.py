"""Metrics: accuracy, macro-F1, entity-level micro P/R/F1 over BIO tags, perplexity.

Entity scoring follows conlleval: an entity is a maximal span ``(type, start, end)`` opened by ``B-X``
(or by an ``I-X`` that does not continue an entity of type ``X``) and continued by ``I-X``; a predicted
entity counts only when its span and type match a gold one exactly.
"""
from __future__ import annotations

import math
from typing import Sequence


def accuracy(preds: Sequence, labels: Sequence) -> float:
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy: no examples")
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence, labels: Sequence, classes: Sequence | None = None) -> float:
    """Unweighted mean over classes of per-class F1 (a class with no gold and no predicted item scores
    nothing and is left out when ``classes`` is not given)."""
    if len(preds) != len(labels):
        raise ValueError(f"macro_f1: {len(preds)} predictions for {len(labels)} labels")
    classes = list(classes) if classes is not None else sorted(set(labels) | set(preds), key=str)
    if not classes:
        raise ValueError("macro_f1: no classes")
    f1s = []
    for c in classes:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def _split_tag(tag: str):
    if tag in ("O", "", None):
        return "O", None
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in "BIES":
        return tag[0], tag[2:]
    raise ValueError(f"not a BIO tag: {tag!r} (expected 'O', 'B-TYPE' or 'I-TYPE')")


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities ``(type, start, end_exclusive)`` of one tag sequence (conlleval rules, IOB1 and IOB2)."""
    ents = set()
    cur_type, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = _split_tag(tag)
        continues = prefix == "I" and typ == cur_type
        if cur_type is not None and not continues:
            ents.add((cur_type, start, i))
            cur_type = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and not continues):
            cur_type, start = typ, i
        if prefix in ("E", "S") and cur_type is not None:
            ents.add((cur_type, start, i + 1))
            cur_type = None
    return ents


def entity_prf(pred_seqs: Sequence[Sequence[str]], gold_seqs: Sequence[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 over exact (span, type) entity matches, summed over sentences."""
    if len(pred_seqs) != len(gold_seqs):
        raise ValueError(f"entity_prf: {len(pred_seqs)} predicted sentences for {len(gold_seqs)} gold")
    tp = n_pred = n_gold = 0
    for k, (p, g) in enumerate(zip(pred_seqs, gold_seqs)):
        if len(p) != len(g):
            raise ValueError(f"entity_prf: sentence {k} has {len(p)} predicted tags for {len(g)} gold tags")
        pe, ge = bio_entities(p), bio_entities(g)
        tp += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "n_pred": n_pred, "n_gold": n_gold, "n_correct": tp}


def perplexity(mean_loss: float) -> float:
    """``exp(mean token cross-entropy)`` (``inf`` on overflow)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")
