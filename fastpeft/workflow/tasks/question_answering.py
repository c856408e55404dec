"""Extractive question answering (SQuAD 1.1 / 2.0): the answer is a span of the context, or none.

Reader: the official SQuAD JSON (``data -> paragraphs -> qas``; answers with ``answer_start`` character
offsets; ``is_impossible`` in 2.0), or rows of a Hugging Face ``squad`` / ``squad_v2`` dataset. An answer
whose text is not the context at its offset is a :class:`~fastpeft.workflow.data.DataError` naming the file
and the question (id, article, line of the id in the file).

Encoding: question + context in windows of ``max_length`` tokens, consecutive windows overlapping by
``doc_stride`` tokens (default a quarter of ``max_length``; the tokenizer's ``return_overflowing_tokens`` with ``stride``), the offset mapping
kept to map tokens back to characters. A window whose context does not hold the whole (first) answer, and
every window of an unanswerable question, is labelled with the ``[CLS]`` position (0) for start and end.
With ``negative_ratio`` (data option), training keeps only that many such "no answer" windows per
window that holds an answer (a fixed random subset, seed 0); evaluation always keeps every window.

Model: ``AutoModelForQuestionAnswering`` (a ``qa_outputs`` linear layer giving start and end logits per
token, trained through ``modules_to_save``; HF PEFT task type ``QUESTION_ANS``). HF PEFT (0.21) loads the
adapter, but its ``PeftModelForQuestionAnswering.forward`` does not pass ``token_type_ids`` on; its LoRA
model (``hf_model.base_model(**inputs)``) gives fastpeft's outputs.

Decoding (:func:`best_span`): per window, the ``n_best`` highest start and end logits; a candidate is a
span of context tokens with ``start <= end`` and at most ``max_answer_length`` tokens, scored by
``start_logit + end_logit``; the best over all windows wins. SQuAD 2.0: the null score is the smallest
``start_logit[0] + end_logit[0]`` over the windows, and the answer is empty when
``null - best > null_threshold``.

Metrics (:func:`squad_scores`): exact match and token F1 as the official SQuAD 2.0 evaluation script
(``evaluate-v2.0.py``; on SQuAD 1.1 data it agrees with ``evaluate-v1.1.py``), in percent as the script
prints them: ``exact``, ``f1``, their ``HasAns_`` / ``NoAns_`` splits, and for 2.0 ``best_f1`` /
``best_exact`` with their thresholds (the script's ``find_best_thresh`` over our null-score differences).
"""
from __future__ import annotations

import collections
import json
import os
import re
import string

import torch

from ..data import DataError, EncodedDataset, from_hf_dataset
from .base import Task, device_of, model_inputs, register_task, source_name, to_device

#: data options of this task (the ``data:`` section) and their defaults
OPTIONS = {"doc_stride": None, "max_answer_length": 30, "n_best": 20, "null_threshold": 0.0,
           "negative_ratio": None, "version_2": None}


# --------------------------------------------------------------------------- the official metric

def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def compute_f1(gold: str, pred: str) -> float:
    """Token F1 of the official script; an empty gold or prediction scores 1 only if both are empty."""
    g, p = _tokens(gold), _tokens(pred)
    common = collections.Counter(g) & collections.Counter(p)
    same = sum(common.values())
    if not g or not p:
        return float(g == p)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _best_thresh(preds, scores, na_probs, has_ans):
    """``find_best_thresh`` of the official script: the best score (percent) over no-answer thresholds."""
    cur = best = sum(1 for q in has_ans if not has_ans[q])
    thresh = 0.0
    for q in sorted(na_probs, key=lambda k: na_probs[k]):
        if q not in scores:
            continue
        diff = scores[q] if has_ans[q] else (-1 if preds[q] else 0)
        cur += diff
        if cur > best:
            best, thresh = cur, na_probs[q]
    return 100.0 * best / len(scores), thresh


def squad_scores(golds: dict, preds: dict, na_probs: dict | None = None) -> dict:
    """Official SQuAD 2.0 scores. ``golds``: question id -> list of gold answer texts (empty for an
    unanswerable question); ``preds``: id -> predicted text ("" = no answer); ``na_probs``: id -> the
    no-answer score (higher = more likely none), for ``best_f1`` / ``best_exact``. Percentages."""
    missing = [q for q in golds if q not in preds]
    if missing:
        raise ValueError(f"squad_scores: no prediction for {len(missing)} question(s), e.g. {missing[:3]}")
    if not golds:
        raise ValueError("squad_scores: no questions")
    exact, f1, has_ans = {}, {}, {}
    for q, answers in golds.items():
        gold = [a for a in answers if normalize_answer(a)] or [""]
        has_ans[q] = gold != [""]
        exact[q] = max(compute_exact(a, preds[q]) for a in gold)
        f1[q] = max(compute_f1(a, preds[q]) for a in gold)
    out = {"exact": 100.0 * sum(exact.values()) / len(exact), "f1": 100.0 * sum(f1.values()) / len(f1),
           "total": len(golds)}
    for name, keep in (("HasAns", True), ("NoAns", False)):
        ids = [q for q in golds if has_ans[q] == keep]
        if ids:
            out[f"{name}_exact"] = 100.0 * sum(exact[q] for q in ids) / len(ids)
            out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
            out[f"{name}_total"] = len(ids)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_thresh(preds, exact, na_probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_thresh(preds, f1, na_probs, has_ans)
    return out


# --------------------------------------------------------------------------- reader

_ID_RE = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _id_lines(text: str) -> dict:
    """question id -> line of its ``"id"`` in the file (for error messages)."""
    lines = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _ID_RE.finditer(line):
            lines.setdefault(m.group(1), lineno)
    return lines


def read_squad(path: str, with_labels: bool = True, limit: int | None = None) -> list[dict]:
    """Records ``{"id", "question", "context", "answers": [{"text", "start"}], "is_impossible", "title",
    "_line", "_source"}`` from an official SQuAD JSON file; every answer is checked against its offset."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected the SQuAD layout {{\"data\": [{{\"paragraphs\": [...]}}]}}")
    lines = _id_lines(text)
    v2 = str(doc.get("version", "")).startswith("v2") or '"is_impossible"' in text
    out = []
    for a, article in enumerate(doc["data"]):
        title = article.get("title", f"article {a}")
        for p, para in enumerate(article.get("paragraphs") or []):
            context = para.get("context")
            if not isinstance(context, str):
                raise DataError(f"{path}: article {title!r}, paragraph {p}: missing 'context'")
            for qa in para.get("qas") or []:
                qid = str(qa.get("id", f"{a}.{p}.{len(out)}"))
                where = f"{path}:{lines.get(qid, '?')}: question {qid!r} (article {title!r})"
                out.append(dict(_qa_record(qa, context, qid, title, where, with_labels, path, lines.get(qid)),
                                _v2=v2))
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def _qa_record(qa: dict, context: str, qid, title, where: str, with_labels: bool, source, line) -> dict:
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'")
    answers = []
    for k, ans in enumerate(qa.get("answers") or []):
        try:
            text, start = ans["text"], int(ans["answer_start"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: answer {k}: expected {{'text', 'answer_start'}}, got {ans!r}") from None
        found = context[start:start + len(text)]
        if found != text:
            raise DataError(f"{where}: answer {k} {text!r} does not match the context at answer_start={start} "
                            f"(the context there reads {found!r})")
        answers.append({"text": text, "start": start})
    impossible = bool(qa.get("is_impossible", False))
    if with_labels and impossible and answers:
        raise DataError(f"{where}: is_impossible is true but the question has answers")
    if with_labels and not impossible and not answers:
        raise DataError(f"{where}: no answers (and not marked is_impossible)")
    return {"id": qid, "question": question, "context": context, "answers": answers,
            "is_impossible": impossible or not answers, "title": title, "_line": line, "_source": source}


# --------------------------------------------------------------------------- decoding

def best_span(windows, context: str, *, n_best: int, max_answer_length: int):
    """The best answer over the windows of one question.

    ``windows``: ``(start_logits [T], end_logits [T], offsets)`` per window, ``offsets[t]`` the character
    span of token t in ``context`` or None for tokens outside the context. Returns ``(text, char_start,
    score, null_score)``: the best valid span (None, None, -inf when there is none) and the smallest null
    score ``start_logits[0] + end_logits[0]``."""
    best = (None, None, float("-inf"))
    null = float("inf")
    for s, e, offsets in windows:
        null = min(null, float(s[0] + e[0]))
        k = min(n_best, len(offsets))
        starts = torch.topk(s[:len(offsets)], k).indices.tolist()
        ends = torch.topk(e[:len(offsets)], k).indices.tolist()
        for i in starts:
            if offsets[i] is None:
                continue
            for j in ends:
                if offsets[j] is None or j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(s[i] + e[j])
                if score > best[2]:
                    a, b = offsets[i][0], offsets[j][1]
                    best = (context[a:b], a, score)
    return best[0], best[1], best[2], null


# --------------------------------------------------------------------------- task

@register_task
class QuestionAnswering(Task):
    """Extractive QA on SQuAD-format data (see the module doc). Data options: ``doc_stride``,
    ``max_answer_length``, ``n_best``, ``null_threshold``, ``negative_ratio``, ``version_2``. Metrics (percent): ``f1``,
    ``exact``, ``HasAns_*`` / ``NoAns_*``, ``best_f1``; and ``loss``."""

    name = "question_answering"
    aliases = ("qa", "extractive_qa", "squad")
    default_metric = "f1"
    default_mode = "max"
    head_modules = ["qa_outputs"]
    peft_task_type = "QUESTION_ANS"
    default_target_modules = ["query", "value"]
    data_keys = tuple(OPTIONS)  # extra keys of the config's data: section

    def __init__(self, labels=None):
        super().__init__(labels)
        self.options = dict(OPTIONS)
        self._training_records = None

    def _set_options(self, cfg: dict) -> None:
        for k, default in OPTIONS.items():
            v = cfg.get(k)
            if v is None:
                continue
            if k in ("doc_stride", "max_answer_length", "n_best") and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"data.{k}: expected an integer >= 1, got {v!r}")
            if k in ("null_threshold", "negative_ratio") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"data.{k}: expected a number, got {v!r}")
            if k == "version_2" and not isinstance(v, bool):
                raise ValueError(f"data.version_2: expected true, false or null (from the file), got {v!r}")
            if k == "negative_ratio" and v < 0:
                raise ValueError(f"data.negative_ratio: expected >= 0, got {v!r}")
            self.options[k] = v

    def read(self, path, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        self._set_options(cfg)
        if isinstance(path, (str, os.PathLike)):
            return read_squad(str(path), with_labels, limit)
        rows = from_hf_dataset(path, ["id", "context", "question"] + (["answers"] if with_labels else []), limit)
        out = []
        for r in rows:
            ans = r.get("answers") or {"text": [], "answer_start": []}
            qa = {"id": r["id"], "question": r["question"], "is_impossible": not ans["text"],
                  "answers": [{"text": t, "answer_start": s} for t, s in zip(ans["text"], ans["answer_start"])]}
            out.append(dict(_qa_record(qa, r["context"], str(r["id"]), None, f"dataset row {r['_line']}",
                                       with_labels, source_name(path), r["_line"]), _v2=qa["is_impossible"]))
        return out

    def fit_labels(self, records):
        """No label vocabulary; remembers the training records (``negative_ratio`` applies to them only)."""
        self._training_records = records
        return None

    def state(self) -> dict:
        return {"task": self.name, "labels": None}

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        stride = self.options["doc_stride"] or max_length // 4
        if stride >= max_length:
            raise ValueError(f"data.doc_stride: {stride} must be smaller than max_length={max_length}")
        pad_right = getattr(tokenizer, "padding_side", "right") == "right"
        q_first = [r["question"].lstrip() for r in records]
        ctx = [r["context"] for r in records]
        enc = tokenizer(q_first if pad_right else ctx, ctx if pad_right else q_first,
                        truncation="only_second" if pad_right else "only_first", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        ctx_id = 1 if pad_right else 0
        feats, positive = [], []
        for i in range(len(enc["input_ids"])):
            ex = enc["overflow_to_sample_mapping"][i]
            seq = enc.sequence_ids(i)
            offsets = [tuple(o) if seq[t] == ctx_id else None for t, o in enumerate(enc["offset_mapping"][i])]
            f = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            f["_example"] = ex
            f["_offsets"] = offsets
            if with_labels:
                s, e = self._positions(records[ex], offsets)
                f["start_positions"], f["end_positions"] = s, e
                positive.append(s != 0)
            feats.append(f)
        if with_labels and records is self._training_records and self.options["negative_ratio"] is not None:
            feats = self._sample_negatives(feats, positive)
        ds = EncodedDataset(feats, records)
        return ds

    @staticmethod
    def _positions(rec: dict, offsets) -> tuple[int, int]:
        """Token positions of the first answer in this window, or (0, 0) when it is not wholly inside."""
        if rec["is_impossible"] or not rec["answers"]:
            return 0, 0
        a = rec["answers"][0]
        cs, ce = a["start"], a["start"] + len(a["text"])
        ctx_tokens = [t for t, o in enumerate(offsets) if o is not None]
        if not ctx_tokens or offsets[ctx_tokens[0]][0] > cs or offsets[ctx_tokens[-1]][1] < ce:
            return 0, 0
        s = next(t for t in ctx_tokens if offsets[t][1] > cs)
        e = next(t for t in reversed(ctx_tokens) if offsets[t][0] < ce)
        return s, max(s, e)

    def _sample_negatives(self, feats, positive):
        pos = [f for f, p in zip(feats, positive) if p]
        neg = [f for f, p in zip(feats, positive) if not p]
        k = min(len(neg), int(round(self.options["negative_ratio"] * max(len(pos), 1))))
        g = torch.Generator().manual_seed(0)
        keep = set(torch.randperm(len(neg), generator=g)[:k].tolist())
        chosen = {id(f) for j, f in enumerate(neg) if j in keep} | {id(f) for f in pos}
        return [f for f in feats if id(f) in chosen]  # original order

    def build_model(self, model_path: str):
        from transformers import AutoModelForQuestionAnswering
        from ..models import load_base_model
        return load_base_model(model_path, AutoModelForQuestionAnswering)

    def forward(self, model, batch, loss_fn=None):
        """(loss, logits [B, T, 2]: start and end logits stacked)."""
        out = model(**model_inputs(batch))
        logits = torch.stack([out.start_logits, out.end_logits], dim=-1)
        return (out.loss if loss_fn is None else loss_fn(out, batch)), logits

    # ---- evaluation / prediction
    @torch.no_grad()
    def decode(self, model, loader, dataset):
        """(per-record (text, start, score, null_score_diff), mean loss or None)."""
        windows = collections.defaultdict(list)
        loss_sum, n = 0.0, 0
        device = device_of(model)
        for batch in loader:
            batch = to_device(batch, device)
            out = model(**model_inputs(batch))
            s_all, e_all = out.start_logits.float().cpu(), out.end_logits.float().cpu()
            for b, (ex, offs) in enumerate(zip(batch["_example"], batch["_offsets"])):
                windows[ex].append((s_all[b], e_all[b], offs))
            if getattr(out, "loss", None) is not None:
                loss_sum += float(out.loss) * len(batch["input_ids"])
                n += len(batch["input_ids"])
        o = self.options
        results = []
        for ex, rec in enumerate(dataset.records):
            text, start, score, null = best_span(windows.get(ex, []), rec["context"], n_best=o["n_best"],
                                                 max_answer_length=o["max_answer_length"])
            diff = null - score if text is not None else float("inf")
            results.append((text, start, score, diff))
        return results, (loss_sum / n if n else None)

    def _version_2(self, dataset) -> bool:
        """SQuAD 2.0 rules ("no answer" allowed): ``version_2`` when set, else from the data (a ``v2``
        version field or an ``is_impossible`` key in the file; an unanswerable row of a dataset)."""
        if self.options["version_2"] is not None:
            return self.options["version_2"]
        return any(r.get("_v2") for r in dataset.records)

    def _answer(self, text, diff, v2: bool) -> str:
        if text is None or (v2 and diff > self.options["null_threshold"]):
            return ""
        return text

    def evaluate(self, model, loader, dataset) -> dict:
        results, loss = self.decode(model, loader, dataset)
        v2 = self._version_2(dataset)
        golds = {r["id"]: [a["text"] for a in r["answers"]] for r in dataset.records}
        preds = {r["id"]: self._answer(t, d, v2) for r, (t, _, _, d) in zip(dataset.records, results)}
        na = {r["id"]: d for r, (_, _, _, d) in zip(dataset.records, results)} if v2 else None
        out = squad_scores(golds, preds, na)
        out["loss"] = loss
        return out

    def predict(self, model, loader, dataset) -> list[dict]:
        results, _ = self.decode(model, loader, dataset)
        v2 = self._version_2(dataset)
        out = []
        for r, (text, start, score, diff) in zip(dataset.records, results):
            ans = self._answer(text, diff, v2)
            out.append({"id": r["id"], "question": r["question"], "answer": ans,
                        "start": start if ans else None, "end": start + len(ans) if ans else None,
                        "no_answer": not ans, "score": score if ans else None,
                        "null_score_diff": None if diff == float("inf") else diff})
        return out
