"""Dialogue: supervised fine-tuning of a causal LM on chat conversations, the loss on the assistant's turns only.

Data: JSONL, one conversation per line, either a JSON list of messages or an object whose
``messages_column`` (default ``messages``) is that list; a message is ``{"role": "system" | "user" |
"assistant", "content": str}``.  A message with another role, or without string content, is a
:class:`~fastpeft.workflow.data.DataError` naming the file and line.

Rendering: the tokenizer's chat template when it has one, else :data:`FALLBACK_CHAT_TEMPLATE`::

    <|system|>\\n{content}{eos}\\n<|user|>\\n{content}{eos}\\n<|assistant|>\\n{content}{eos}\\n

(generation prompt ``<|assistant|>\\n``; ``{eos}`` is the tokenizer's EOS token, or its SEP token when it has
no EOS, which then becomes its EOS).  The rendered text is tokenised once, without extra special tokens (a
template writes its own BOS).  Which tokens are the assistant's is found in text space: for the assistant
message ``i`` the span runs from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])`` -- its content and the template's end-of-turn marker, so the model learns to stop.
A template that does not render prefixes consistently (``render(messages[:i])`` not a prefix of the whole) is
an error naming the line.  Every other token has label -100.  Truncation (``max_length``) cuts the end; a
conversation left without an assistant token is skipped with a warning.

Multi-turn: every assistant turn of a conversation is learnt in one sequence (one example per conversation,
not per turn).  ``data.packing: true`` also packs several conversations into one row of at most
``max_length`` tokens, with ``position_ids`` restarting at 0 for each and no ``attention_mask``: transformers
(5.x) then builds a block-diagonal causal mask from the position resets (``find_packed_sequence_indices``;
only without a KV cache, so the task's forward passes ``use_cache=False``), and no token attends to another
conversation -- the test compares packed and unpacked logits, so a transformers that stops doing this fails it.  The first token
of each conversation is never a label, so no loss crosses a boundary.  Without packing (default) each row is
one conversation, right-padded with an attention mask.

Metrics: loss (mean cross-entropy over assistant tokens), perplexity, token accuracy.  ``predict`` renders each
conversation up to its last non-assistant message with the generation prompt and generates the reply greedily
(``max_new_tokens``), stopping at EOS or the template's end-of-turn token.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from .. import metrics as M
from ..data import DataError, EncodedDataset, PaddingCollator, from_hf_dataset
from .base import Task, device_of, model_inputs, register_task, source_name, to_device

ROLES = ("system", "user", "assistant")
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def read_chat_jsonl(path: str, column: str = "messages", limit: int | None = None) -> list[dict]:
    """Conversations of a JSONL file -> records ``{"messages": [...], "_source", "_line"}`` (messages
    checked: roles in :data:`ROLES`, string content)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    recs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if isinstance(obj, dict):
                if column not in obj:
                    raise DataError(f"{path}:{lineno}: no {column!r} (messages_column); this line has {sorted(obj)}")
                obj = obj[column]
            recs.append({"messages": check_messages(obj, f"{path}:{lineno}"), "_source": path, "_line": lineno})
            if limit is not None and len(recs) >= limit:
                break
    if not recs:
        raise DataError(f"{path}: empty file (no conversations)")
    return recs


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or a DataError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got "
                        f"{type(messages).__name__}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {k} must be an object with 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {k} has unknown role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k} ({m['role']}): content must be a string, got "
                            f"{type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def ensure_chat_template(tokenizer):
    """Give ``tokenizer`` :data:`FALLBACK_CHAT_TEMPLATE` when it has no chat template (returns True then)."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        if getattr(tokenizer, "sep_token", None) is None:
            raise ValueError("dialogue: the tokenizer has no chat template and no EOS / SEP token to end turns with")
        tokenizer.eos_token = tokenizer.sep_token
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans of the assistant turns: content + end-of-turn marker)."""
    try:
        text = render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            full = render(tokenizer, messages[:i + 1])
            if not (full.startswith(pre) and text.startswith(full)):
                raise DataError(f"{where}: the chat template does not render this conversation prefix-consistently "
                                f"(turn {i}); assistant tokens cannot be located")
            spans.append((len(pre), len(full)))
    except DataError:
        raise
    except Exception as e:  # jinja2 TemplateError, template-raised exceptions ("roles must alternate")
        raise DataError(f"{where}: the chat template rejects this conversation ({type(e).__name__}: {e})") from None
    return text, spans


@register_task
class Dialogue(Task):
    """Chat fine-tuning of a causal LM, loss on assistant turns (see the module doc)."""

    name = "dialogue"
    aliases = ("chat", "sft")
    default_metric = "loss"
    default_mode = "min"
    head_modules: list[str] = []
    peft_task_type = "CAUSAL_LM"
    default_target_modules = "all-linear"
    data_keys = ("messages_column", "packing")
    max_new_tokens = 64

    def __init__(self, labels=None):
        super().__init__(labels)
        self.packing = False

    def load_tokenizer(self, model_path: str):
        tok = super().load_tokenizer(model_path)
        if not tok.is_fast:
            raise ValueError("dialogue: needs a fast tokenizer (offsets locate the assistant tokens)")
        ensure_chat_template(tok)
        return tok

    def build_model(self, model_path: str):
        from transformers import AutoModelForCausalLM
        from ..models import load_base_model
        return load_base_model(model_path, AutoModelForCausalLM)

    def read(self, path, cfg: dict, limit: int | None = None, with_labels: bool = True) -> list[dict]:
        packing = cfg.get("packing", False)
        if not isinstance(packing, bool):
            raise ValueError(f"data.packing: expected true or false, got {packing!r}")
        self.packing = packing
        col = cfg.get("messages_column") or "messages"
        if isinstance(path, (str, os.PathLike)):
            recs = read_chat_jsonl(str(path), col, limit)
        else:
            rows = from_hf_dataset(path, [col], limit)
            recs = [{"messages": check_messages(r[col], f"dataset row {r['_line']}"), "_source": source_name(path),
                     "_line": r["_line"]} for r in rows]
        if with_labels:
            for r in recs:
                if not any(m["role"] == "assistant" for m in r["messages"]):
                    raise DataError(f"{r['_source']}:{r['_line']}: no assistant message to learn from")
        return recs

    # ---- encoding
    def encode_one(self, record, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
        where = f"{record.get('_source', '<data>')}:{record.get('_line', '?')}"
        text, spans = assistant_spans(tokenizer, record["messages"], where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= s < b for a, b in spans) and e > s else -100
                  for t, (s, e) in zip(ids, enc["offset_mapping"])]
        if labels:
            labels[0] = -100  # never predicted from another conversation (packing) or from nothing
        return ids, labels

    def encode(self, records, tokenizer, max_length: int, with_labels: bool = True) -> EncodedDataset:
        ensure_chat_template(tokenizer)
        seqs, kept, skipped = [], [], []
        for r in records:
            ids, labels = self.encode_one(r, tokenizer, max_length)
            if with_labels and all(l == -100 for l in labels):
                skipped.append(f"{r.get('_source')}:{r.get('_line')}")
                continue
            seqs.append((ids, labels))
            kept.append(r)
        if skipped:
            warnings.warn(f"dialogue: {len(skipped)} conversation(s) have no assistant token within max_length="
                          f"{max_length} and are skipped (first: {skipped[0]})", stacklevel=2)
        if not seqs:
            raise DataError(f"dialogue: no conversation has an assistant token within max_length={max_length}")
        if self.packing and with_labels:
            feats = pack(seqs, max_length)
        else:
            feats = [{"input_ids": ids, "attention_mask": [1] * len(ids), **({"labels": labels} if with_labels else {})}
                     for ids, labels in seqs]
        ds = EncodedDataset(feats, kept)
        ds.tokenizer = tokenizer
        return ds

    def collator(self, tokenizer):
        pad = getattr(tokenizer, "pad_token_id", None)
        return PaddingCollator(pad if pad is not None else 0)

    def forward(self, model, batch, loss_fn=None):
        # use_cache=False: transformers derives the packed rows' block-diagonal mask from position_ids only
        # without a cache (with one it would let packed conversations attend to each other)
        out = model(**model_inputs(batch), use_cache=False)
        return (out.loss if loss_fn is None else loss_fn(out, batch)), out.logits

    # ---- metrics
    @torch.no_grad()
    def evaluate(self, model, loader, dataset) -> dict:
        loss_sum, n, correct = 0.0, 0, 0
        dev = device_of(model)
        for batch in loader:
            batch = to_device(batch, dev)
            out = model(**model_inputs(batch), use_cache=False)
            gold = batch["labels"][:, 1:]
            mask = gold != -100
            k = int(mask.sum())
            if k == 0:
                continue
            logp = out.logits[:, :-1].float().log_softmax(-1)
            tok_lp = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss_sum += float(-(tok_lp * mask).sum())
            correct += int(((logp.argmax(-1) == gold) & mask).sum())
            n += k
        loss = loss_sum / max(n, 1)
        return {"loss": loss, "perplexity": M.perplexity(loss), "token_accuracy": correct / max(n, 1)}

    # ---- generation
    def stop_token_ids(self, tokenizer) -> list[int]:
        """EOS and the template's end-of-turn token (the first token after an assistant message's content)."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            text = render(tokenizer, probe)
            after = text[text.rindex("y") + 1:]
            first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
            if first and first[0] in set(tokenizer.all_special_ids):
                ids.append(first[0])
        except Exception:
            pass
        return list(dict.fromkeys(ids))

    @torch.no_grad()
    def predict(self, model, loader, dataset) -> list[dict]:
        tok = dataset.tokenizer
        dev = device_of(model)
        stop = self.stop_token_ids(tok)
        out = []
        for r in dataset.records:
            msgs = r["messages"]
            reference = None
            if msgs[-1]["role"] == "assistant":
                reference, msgs = msgs[-1]["content"], msgs[:-1]
            prompt = render(tok, msgs, add_generation_prompt=True)
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=dev)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                 do_sample=False, eos_token_id=stop or None, pad_token_id=tok.pad_token_id)
            reply = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
            users = [m["content"] for m in msgs if m["role"] == "user"]
            rec = {"line": r.get("_line"), "user": users[-1] if users else None, "reply": reply}
            if reference is not None:
                rec["reference"] = reference
            out.append(rec)
        return out


def pack(seqs: list[tuple[list[int], list[int]]], max_length: int) -> list[dict]:
    """Conversations (ids, labels) in order into rows of at most ``max_length`` tokens (a row is closed when
    the next conversation does not fit); ``position_ids`` restart at 0 for each conversation."""
    rows, cur = [], {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in seqs:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_length:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        rows.append(cur)
    return rows
