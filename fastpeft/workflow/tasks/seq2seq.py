"""Sequence-to-sequence generation: translation and summarisation on ``AutoModelForSeq2SeqLM`` bases.

Data (the ``data:`` section; every key has a default):

* two aligned plain-text files, one example per line: ``source_lang: en`` and ``target_lang: de`` make a
  split's path a prefix (``train: data/train`` reads ``data/train.en`` and ``data/train.de``; the source
  file itself, ``data/train.en``, names the same pair).  Files of different lengths, and empty lines, are a
  :class:`~fastpeft.workflow.data.DataError` naming both files / the file and line;
* otherwise TSV / CSV / JSONL with ``source_column`` (default ``source``) and ``target_column`` (default
  ``target``) columns (``document`` / ``summary`` for summarisation, say);
* ``source_prefix``: text put before every source (T5's ``"translate English to German: "``);
  ``max_length`` truncates sources, ``max_target_length`` (default: ``max_length``) targets and
  generations; ``num_beams`` (default 4) is the beam width of evaluation and prediction.

Training is teacher forcing: ``labels`` are the target token ids (the tokenizer appends ``</s>``), padded
with -100 so padding costs no loss; the model shifts them right into ``decoder_input_ids`` itself (T5,
BART, Marian).  Evaluation decodes with beam search and scores the detokenised text with sacrebleu (BLEU,
chrF, on the raw references) and rouge-score (ROUGE-1/2/L F-measure, stemmed), plus the teacher-forced
token loss.  ``predict`` returns ``{"source", "generated"}`` per example.

No pretrained seq2seq model ships offline: :func:`~fastpeft.workflow.tasks.seq2seq_base.make_seq2seq_base`
trains a tokenizer on your text and saves a random-init T5 / BART / Marian base next to it.
"""
from __future__ import annotations

import itertools
import os

import torch

from ..._optional import import_extra
from ..data import DataError, EncodedDataset
from .base import Task, device_of, model_inputs, read_rows, register_task, source_name, to_device


# --------------------------------------------------------------------------- readers

def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def read_parallel(source_path: str, target_path: str | None, limit: int | None = None) -> list[dict]:
    """Aligned plain-text files (line i of one translates line i of the other) as records
    ``{"source", "target", "_line", "_source"}``; ``target_path=None`` reads sources only.

    Raises :class:`DataError` for a missing file, files of different lengths (naming both files and their
    line counts), an empty line (naming file and line) or no lines at all. ``limit`` keeps the first lines.
    """
    for p in (source_path, target_path):
        if p is not None and not os.path.isfile(p):
            raise DataError(f"{p}: file not found")
    if target_path is not None:
        ns, nt = _count_lines(source_path), _count_lines(target_path)
        if ns != nt:
            raise DataError(f"parallel files differ in length: {source_path} has {ns} lines, {target_path} "
                            f"has {nt}; line i of one must translate line i of the other")
    with open(source_path, encoding="utf-8") as f:
        sources = [line.rstrip("\r\n") for line in itertools.islice(f, limit)]
    targets = None
    if target_path is not None:
        with open(target_path, encoding="utf-8") as f:
            targets = [line.rstrip("\r\n") for _, line in zip(range(len(sources)), f)]
    if not sources:
        raise DataError(f"{source_path}: empty file (no lines)")
    out = []
    for i, src in enumerate(sources):
        rec = {"source": src, "_line": i + 1, "_source": source_path}
        if not src.strip():
            raise DataError(f"{source_path}:{i + 1}: empty source line")
        if targets is not None:
            if not targets[i].strip():
                raise DataError(f"{target_path}:{i + 1}: empty target line")
            rec["target"] = targets[i]
            rec["_target_file"] = target_path
        out.append(rec)
    return out


def parallel_paths(path: str, source_lang: str, target_lang: str) -> tuple[str, str]:
    """``(prefix.src, prefix.tgt)`` for a prefix, or for the source file itself (``prefix.src``)."""
    suffix = f".{source_lang}"
    prefix = path[:-len(suffix)] if path.endswith(suffix) and os.path.isfile(path) else path
    return prefix + suffix, f"{prefix}.{target_lang}"


# --------------------------------------------------------------------------- metrics

def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, exponential smoothing; chrF char
    6-grams, beta 2), one reference per hypothesis, on detokenised text; 0-100."""
    sacrebleu = import_extra("sacrebleu", "the seq2seq task's BLEU / chrF")
    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score)}


def rouge(hypotheses: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1 / ROUGE-2 / ROUGE-L F-measure (rouge-score, Porter stemming), 0-100."""
    rouge_scorer = import_extra("rouge_score.rouge_scorer", "the seq2seq task's ROUGE")
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    sums = dict.fromkeys(keys, 0.0)
    for h, r in zip(hypotheses, references):
        s = scorer.score(r, h)
        for k in keys:
            sums[k] += s[k].fmeasure
    n = max(len(hypotheses), 1)
    return {k: 100.0 * v / n for k, v in sums.items()}


# --------------------------------------------------------------------------- batching

class Seq2SeqCollator:
    """Pads ``input_ids`` (with ``pad_token_id``) and ``attention_mask`` (0) to the batch's longest source,
    and ``labels`` (-100: no loss) to its longest target, separately. ``_`` keys pass through as lists."""

    def __init__(self, pad_token_id: int, label_pad: int = -100):
        self.pad_token_id = int(pad_token_id)
        self.label_pad = label_pad

    def __call__(self, features: list[dict]) -> dict:
        batch: dict = {}
        for key in features[0]:
            vals = [f[key] for f in features]
            if key.startswith("_"):
                batch[key] = vals
                continue
            pad = {"input_ids": self.pad_token_id, "labels": self.label_pad}.get(key, 0)
            longest = max(len(v) for v in vals)
            batch[key] = torch.tensor([list(v) + [pad] * (longest - len(v)) for v in vals], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- the task

@register_task
class Seq2Seq(Task):
    """Translation / summarisation with an encoder-decoder (see the module doc for data and metrics)."""

    name = "seq2seq"
    aliases = ("translation", "summarization", "summarisation", "seq2seq_lm")
    default_metric = "bleu"
    default_mode = "max"
    head_modules: list[str] = []
    peft_task_type = "SEQ_2_SEQ_LM"
    #: every linear layer of encoder and decoder (self- and cross-attention, feed-forward); not lm_head
    default_target_modules = "all-linear"
    num_beams = 4
    max_target_length: int | None = None
    source_prefix = ""

    def metric_mode(self, metric: str) -> str:
        return "min" if "loss" in metric or metric == "gen_len" else "max"

    # ---- reading
    def _settings(self, cfg: dict) -> None:
        """Generation / prefix settings from the ``data:`` section (also read back at evaluate / predict)."""
        self.source_prefix = cfg.get("source_prefix") or ""
        for key in ("num_beams", "max_target_length"):
            v = cfg.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"data.{key}: expected a positive integer, got {v!r}")
            setattr(self, key, v)

    def read(self, path, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        self._settings(cfg)
        src_lang, tgt_lang = cfg.get("source_lang"), cfg.get("target_lang")
        if isinstance(path, (str, os.PathLike)) and (src_lang or tgt_lang):
            if not (src_lang and tgt_lang):
                raise DataError("data: source_lang and target_lang go together (files <prefix>.<lang>)")
            src, tgt = parallel_paths(str(path), src_lang, tgt_lang)
            return read_parallel(src, tgt if with_labels else None, limit)
        sc, tc = cfg.get("source_column", "source"), cfg.get("target_column", "target")
        rows = read_rows(path, [sc, tc] if with_labels else [sc], cfg, limit)
        where = source_name(path)
        out = []
        for r in rows:
            rec = {"source": "" if r[sc] is None else str(r[sc]), "_line": r["_line"], "_source": where}
            if not rec["source"].strip():
                raise DataError(f"{where}:{r['_line']}: empty source ({sc!r})")
            if with_labels:
                rec["target"] = "" if r[tc] is None else str(r[tc])
                if not rec["target"].strip():
                    raise DataError(f"{where}:{r['_line']}: empty target ({tc!r})")
            out.append(rec)
        return out

    # ---- encoding and batches
    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        srcs = [self.source_prefix + r["source"] for r in records]
        enc = tokenizer(srcs, truncation=True, max_length=max_length)
        labels = None
        if with_labels:
            tgt_len = self.max_target_length or max_length
            labels = tokenizer([r["target"] for r in records], truncation=True, max_length=tgt_len)["input_ids"]
        feats = []
        for i in range(len(records)):
            f = {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
            if labels is not None:
                f["labels"] = list(labels[i])
            feats.append(f)
        ds = EncodedDataset(feats, records)
        ds.tokenizer = tokenizer
        ds.max_length = max_length
        return ds

    def collator(self, tokenizer):
        pad = getattr(tokenizer, "pad_token_id", None)
        return Seq2SeqCollator(pad if pad is not None else 0)

    def build_model(self, model_path: str):
        from transformers import AutoModelForSeq2SeqLM
        from ..models import load_base_model
        return load_base_model(model_path, AutoModelForSeq2SeqLM)

    # ---- generation, evaluation, prediction
    def generate(self, model, batch: dict, tokenizer, max_new_tokens: int) -> list[str]:
        """Beam-search (``num_beams``; greedy at 1) continuations of a batch's sources, detokenised."""
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             num_beams=self.num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                             early_stopping=self.num_beams > 1)
        return tokenizer.batch_decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _max_new(self, dataset) -> int:
        return self.max_target_length or getattr(dataset, "max_length", None) or 128

    @torch.no_grad()
    def evaluate(self, model, loader, dataset) -> dict:
        tok = dataset.tokenizer
        dev = device_of(model)
        hyps, loss_sum, n = [], 0.0, 0
        for batch in loader:
            batch = to_device(batch, dev)
            if "labels" in batch:
                out = model(**model_inputs(batch))
                k = int((batch["labels"] != -100).sum())
                loss_sum += float(out.loss) * k
                n += k
            hyps += self.generate(model, batch, tok, self._max_new(dataset))
        refs = [r["target"] for r in dataset.records]
        metrics = {**bleu_chrf(hyps, refs), **rouge(hyps, refs)}
        metrics["loss"] = loss_sum / n if n else None
        metrics["gen_len"] = sum(len(h.split()) for h in hyps) / max(len(hyps), 1)
        return metrics

    @torch.no_grad()
    def predict(self, model, loader, dataset) -> list[dict]:
        tok = dataset.tokenizer
        dev = device_of(model)
        if loader is None:
            from ..data import make_loader
            loader = make_loader(dataset, self.collator(tok), 32, shuffle=False)
        hyps = []
        for batch in loader:
            hyps += self.generate(model, to_device(batch, dev), tok, self._max_new(dataset))
        return [{"source": r["source"], "generated": h} for r, h in zip(dataset.records, hyps)]
