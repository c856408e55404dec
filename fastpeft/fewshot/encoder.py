"""Sentence encoder helpers shared by the few-shot methods: load a transformers encoder, tokenise once,
mean-pool token states over the attention mask, embed many texts in batches.

Shapes: ``hidden`` [B, L, D], ``attention_mask`` [B, L] -> sentence embedding [B, D]. Equivalent
PyTorch of :func:`mean_pool` (the sentence-transformers pooling of all-MiniLM-L6-v2)::

    m = attention_mask.unsqueeze(-1).to(hidden.dtype)           # [B, L, 1]
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)        # [B, D]
    emb = torch.nn.functional.normalize(emb, dim=-1)            # when normalize=True
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resolve_encoder_path(model: str | None) -> str:
    """``None`` / ``"minilm"`` -> the bundled MiniLM-L6 directory; else a local transformers directory."""
    from ..workflow.models import resolve_model_path
    return resolve_model_path(model or "minilm")


def load_encoder(model: str | None = None):
    """``(AutoModel in eval mode, tokenizer)`` from a bundled name or local directory (offline)."""
    from transformers import AutoModel

    from ..workflow.models import load_base_model, load_tokenizer
    path = resolve_encoder_path(model)
    enc = load_base_model(path, AutoModel)
    enc.eval()
    return enc, load_tokenizer(path)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, L, D] over positions where ``attention_mask`` [B, L] is 1 -> [B, D]."""
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"mean_pool: expected hidden [B, L, D] and attention_mask [B, L], got "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class Tokenized:
    """Texts tokenised once (no padding); :meth:`batch` pads a subset to its longest member."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("texts: expected at least one text, got none")
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self):
        return len(self.input_ids)

    def extend(self, rows: Sequence[Sequence[int]]) -> "Tokenized":
        """Append already-tokenised rows (lists of token ids, special tokens included)."""
        rows = [[int(t) for t in r] for r in rows]
        if any(not r for r in rows):
            raise ValueError("rows: expected non-empty token-id lists, got an empty one")
        self.input_ids = list(self.input_ids) + rows
        return self

    def batch(self, idx: Sequence[int], device=None) -> dict:
        rows = [self.input_ids[i] for i in idx]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def sentence_embeddings(model, batch: dict, normalize: bool = False) -> torch.Tensor:
    """Mean-pooled last hidden states of ``model(**batch)`` -> [B, D] (L2-normalised if asked)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    emb = mean_pool(hidden, batch["attention_mask"])
    return F.normalize(emb, dim=-1) if normalize else emb


def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64,
                normalize: bool = True) -> torch.Tensor:
    """Embeddings [N, D] (float32, CPU) of ``texts``; batches sorted by length (less padding), results
    returned in input order. The model is put in eval mode for the call and restored after."""
    return embed_tokenized(model, Tokenized(tokenizer, texts, max_length), batch_size=batch_size,
                           normalize=normalize)


@torch.no_grad()
def embed_tokenized(model, tk: Tokenized, *, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
    """:func:`embed_texts` for texts already tokenised (:class:`Tokenized`) -> [len(tk), D]."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    order = sorted(range(len(tk)), key=lambda i: len(tk.input_ids[i]))
    out = [None] * len(tk)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            emb = sentence_embeddings(model, tk.batch(idx, dev), normalize=normalize).float().cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j]
    finally:
        model.train(was_training)
    return torch.stack(out)
