"""Batched inference over one group (one base model, its adapters): a batch may mix adapters.

A mixed batch goes through the model in one call, ``model(..., adapter_names=[one name per row])`` /
``model.generate(..., adapter_names=...)`` (``"__base__"`` = the base model's row), which fastpeft's
``PeftModel`` runs through the ``lora_linear_multi`` kernel.  Where the model cannot (it raises
``NotImplementedError`` / ``TypeError``, or transformers' ``generate`` refuses the unknown keyword), the
group remembers it and runs one sub-batch per adapter instead (``set_adapter``; the base under
``disable_adapter()``): same answers, one forward per adapter.

Every function here runs in the group's worker thread with the group's lock held, so the active adapter
of the model is never changed under another batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

try:  # the name of a base-model row in a mixed batch
    from ..mixed_batch import BASE_ADAPTER as BASE_ROW
except ImportError:  # a fastpeft without mixed-adapter batches: the fallback runs
    BASE_ROW = "__base__"


@dataclass
class ClassifyItem:
    adapter: str
    features: dict        # one encoded example of the workflow task (input_ids, ..., _word_starts)
    words: list | None    # token classification: the words, else None
    cancelled: bool = False


@dataclass
class GenerateItem:
    adapter: str | None   # None: the base model
    prompt_ids: list
    max_tokens: int
    stop: list = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    on_text: object = None  # called with each new piece of text (streaming), from the worker thread
    cancelled: bool = False
    streamed: bool = False  # some text was already sent (a failed mixed call is then not retried)


class ItemError(Exception):
    """One request of a batch failed (the others are answered)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "set_adapter")


def _refuses_adapter_names(e: Exception) -> bool:
    return isinstance(e, (NotImplementedError, TypeError)) or (isinstance(e, ValueError)
                                                               and "adapter_names" in str(e))


@contextlib.contextmanager
def _only(model, adapter: str | None):
    """The model running ``adapter`` alone (None: the base model)."""
    if not _is_peft(model):
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    active = model.active_adapters
    if active != [adapter]:
        model.set_adapter(adapter)
    yield


def _missing(group, items) -> dict:
    """Items whose adapter was unloaded while they waited: index -> ItemError."""
    return {i: ItemError(f"model: adapter {it.adapter!r} was unloaded; loaded: {sorted(group.adapters)}", 404)
            for i, it in enumerate(items) if it.adapter is not None and it.adapter not in group.adapters}


def _groups_by_adapter(items) -> dict:
    out: dict = {}
    for i, it in enumerate(items):
        out.setdefault(it.adapter, []).append(i)
    return out


# --------------------------------------------------------------------------- classification

def _collate(group, feats):
    from ..workflow.tasks.base import model_inputs, to_device
    from ..workflow.tasks.base import device_of
    batch = group.task.collator(group.tokenizer)([dict(f) for f in feats])
    return batch, to_device(model_inputs(batch), device_of(group.model))


@torch.no_grad()
def _logits(group, items) -> list:
    """Per item, the logits tensor of its row ([n_labels] or [seq, n_labels]) of a padded batch."""
    names = [it.adapter for it in items]
    if group.multi_forward is not False and _is_peft(group.model) and len(set(names)) > 1:
        batch, inputs = _collate(group, [it.features for it in items])
        try:
            logits = group.model(**inputs, adapter_names=names).logits
            group.multi_forward = True
            return list(logits.float().cpu())
        except Exception as e:  # noqa: BLE001
            if not _refuses_adapter_names(e):
                raise
            group.multi_forward = False
    out = [None] * len(items)
    for name, idx in _groups_by_adapter(items).items():
        _, inputs = _collate(group, [items[i].features for i in idx])
        with _only(group.model, name):
            logits = group.model(**inputs).logits.float().cpu()
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return out


def classify(group, items: list[ClassifyItem]) -> list:
    """Answers (dicts) or ItemErrors, one per item, in order."""
    results: list = [None] * len(items)
    for i, err in _missing(group, items).items():
        results[i] = err
    todo = [i for i in range(len(items)) if results[i] is None]
    if not todo:
        return results
    logits = _logits(group, [items[i] for i in todo])
    for i, lg in zip(todo, logits):
        it = items[i]
        labels = group.adapters[it.adapter].labels
        if group.kind == "sequence_classification":
            probs = torch.softmax(lg, -1).tolist()
            results[i] = {"label": labels[int(lg.argmax())], "scores": dict(zip(labels, probs))}
        else:
            ids = lg.argmax(-1).tolist()
            tags = [labels[ids[p]] for p in it.features["_word_starts"]]
            tags += ["O"] * (len(it.words) - len(tags))  # words cut off by max_length (as fastpeft predict)
            results[i] = {"tokens": it.words, "tags": tags}
    return results


# --------------------------------------------------------------------------- generation

class RowStopper:
    """A transformers stopping criterion with per-row answers: EOS, stop strings, each row's own
    ``max_tokens``, cancelled rows; it also streams each row's new text to ``item.on_text``."""

    def __init__(self, tokenizer, prompt_len: int, items, eos_ids: set):
        self.tok, self.prompt_len, self.items, self.eos = tokenizer, prompt_len, items, eos_ids
        self.done = [False] * len(items)
        self.text = [""] * len(items)
        self.sent = [0] * len(items)
        self.finish = [None] * len(items)
        self.n_tokens = [0] * len(items)

    def _emit(self, i: int, final: bool) -> None:
        it, text = self.items[i], self.text[i]
        upto = len(text)
        if not final:  # hold back what may still change: a partial character, a prefix of a stop string
            while upto and text[upto - 1] == "\ufffd":
                upto -= 1
            for s in it.stop:
                for k in range(min(len(s) - 1, upto), 0, -1):
                    if text[:upto].endswith(s[:k]):
                        upto -= k
                        break
        if upto > self.sent[i] and it.on_text is not None:
            it.streamed = True
            it.on_text(text[self.sent[i]:upto])
        self.sent[i] = max(self.sent[i], upto)

    def row(self, i: int, new: list) -> bool:
        if self.done[i]:
            return True
        it = self.items[i]
        finish = None
        if new and new[-1] in self.eos:
            new, finish = new[:-1], "stop"
        self.n_tokens[i] = len(new) + (finish == "stop")
        text = self.tok.decode(new, skip_special_tokens=True)
        cuts = [text.find(s) for s in it.stop if s and s in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif finish is None and len(new) >= it.max_tokens:
            finish = "length"
        elif finish is None and it.cancelled:
            finish = "cancelled"
        self.text[i] = text
        if finish is not None:
            self.done[i], self.finish[i] = True, finish
        self._emit(i, finish is not None)
        return self.done[i]

    def __call__(self, input_ids, scores=None, **kwargs):
        new = input_ids[:, self.prompt_len:].tolist()
        return torch.tensor([self.row(i, n) for i, n in enumerate(new)], dtype=torch.bool,
                            device=input_ids.device)

    def close(self) -> None:
        for i in range(len(self.items)):
            if not self.done[i]:
                self.done[i], self.finish[i] = True, "length"
                self._emit(i, True)


def _eos_ids(group) -> set:
    ids = set()
    for src in (getattr(group.model, "generation_config", None), group.tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(x for x in v if isinstance(x, int))
    return ids


@torch.no_grad()
def _generate(group, items, adapter_names=None, only=False):
    """One ``generate`` call over ``items`` (left-padded); ``adapter_names`` per row, or None (the
    model's current adapter). Returns the RowStopper holding the answers."""
    from ..workflow.tasks.base import device_of
    tok = group.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(it.prompt_ids) for it in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, width - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)
        mask[r, width - len(it.prompt_ids):] = 1
    dev = device_of(group.model)
    stopper = RowStopper(tok, width, items, _eos_ids(group))
    first = items[0]
    sample = first.temperature > 0
    kw = dict(max_new_tokens=max(it.max_tokens for it in items), do_sample=sample, pad_token_id=pad,
              stopping_criteria=_criteria_list([stopper]))
    if sample:
        kw.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    group.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kw)
    stopper.close()
    return stopper


def _criteria_list(criteria):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Wrap(StoppingCriteria):
        def __init__(self, f):
            self.f = f

        def __call__(self, input_ids, scores, **kwargs):
            return self.f(input_ids, scores, **kwargs)

    return StoppingCriteriaList([_Wrap(c) for c in criteria])


def _answer(stopper, j):
    return {"text": stopper.text[j], "finish_reason": stopper.finish[j], "completion_tokens": stopper.n_tokens[j]}


def generate(group, items: list[GenerateItem]) -> list:
    """Answers ``{"text", "finish_reason", "completion_tokens"}`` or ItemErrors, one per item, in order.
    Rows with the same sampling settings share one ``generate`` call whatever their adapters."""
    results: list = [None] * len(items)
    for i, err in _missing(group, items).items():
        results[i] = err
    by_sampling: dict = {}
    for i, it in enumerate(items):
        if results[i] is None and not it.cancelled:
            key = (it.temperature, it.top_p) if it.temperature > 0 else (0.0, 1.0)
            by_sampling.setdefault(key, []).append(i)
    for idx in by_sampling.values():
        sub = [items[i] for i in idx]
        names = [it.adapter or BASE_ROW for it in sub]
        if group.multi_generate is not False and _is_peft(group.model) and len(set(names)) > 1:
            try:
                stopper = _generate(group, sub, adapter_names=names)
                group.multi_generate = True
                for j, i in enumerate(idx):
                    results[i] = _answer(stopper, j)
                continue
            except Exception as e:  # noqa: BLE001
                if not _refuses_adapter_names(e) or any(it.streamed for it in sub):
                    raise
                group.multi_generate = False
        for name, js in _groups_by_adapter(sub).items():
            with _only(group.model, name):
                stopper = _generate(group, [sub[j] for j in js])
            for k, j in enumerate(js):
                results[idx[j]] = _answer(stopper, k)
    for i, it in enumerate(items):
        if results[i] is None:
            results[i] = ItemError("request timed out before it ran", 504)
    return results

