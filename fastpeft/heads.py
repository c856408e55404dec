"""Task heads for backbone models, marked trainable through ``modules_to_save``.

A backbone (``transformers`` ``BertModel`` / ``GPT2Model`` / ``LlamaModel`` / ``ViTModel``,
or any module returning hidden states ``[B, L, H]`` first) gets a head and becomes a
:class:`ModelWithHead` whose forward returns ``logits`` (and ``loss`` with ``labels``)::

    h = backbone(**inputs)[0]                                   # [B, L, H]
    sequence classification: logits = head(dropout(pool(h)))    # [B, C]; pool = cls | mean | last
    token classification:    logits = head(dropout(h))          # [B, L, C]
    language modelling:      logits = head(h)                   # [B, L, V]

Losses: cross-entropy (MSE when a sequence head has one label); token-level labels equal
to -100 are ignored; the LM loss is shifted by one token.  The head is a child named
``head_name`` (``classifier`` / ``lm_head`` by default), so adding that name to a PEFT
config's ``modules_to_save`` (:func:`mark_trainable`) trains and saves it with the
adapter under HF PEFT's key convention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("cls", "mean", "last")
KNOWN_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "cls", "head")


def _hidden_size(backbone: nn.Module, hidden_size: Optional[int]) -> int:
    if hidden_size is not None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size: expected an int > 0, got {hidden_size!r}")
        return hidden_size
    cfg = getattr(backbone, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"hidden_size: {type(backbone).__name__} has no config.hidden_size; pass hidden_size=")


def _check_labels_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name}: expected an int > 0, got {n!r}")
    return n


class ModelWithHead(nn.Module):
    """``backbone`` + a head child (see module doc).  Attribute access falls through to the
    backbone (``config``, ``get_input_embeddings`` ...)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str, head_name: str,
                 pooling: str = "cls", dropout: float = 0.0):
        super().__init__()
        if task not in ("seq_cls", "token_cls", "lm"):
            raise ValueError(f"task: expected 'seq_cls', 'token_cls' or 'lm', got {task!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        if not isinstance(head_name, str) or not head_name.isidentifier() or head_name == "backbone":
            raise ValueError(f"head_name: expected a Python identifier other than 'backbone', got {head_name!r}")
        self.backbone = backbone
        self.add_module(head_name, head)
        self.head_name = head_name
        self.task = task
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("backbone",):
                raise
            return getattr(self._modules["backbone"], name)

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_name)

    def _pool(self, h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        if mask is None:
            return h.mean(1) if self.pooling == "mean" else h[:, -1]
        m = mask[:, -h.shape[1]:].to(h.dtype)  # prompt-tuned backbones add positions in front
        if self.pooling == "mean":
            return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        last = (m.cumsum(1) * m).argmax(1)  # index of the last attended position (right padding)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, *args, labels: Optional[torch.Tensor] = None, **kwargs):
        out = self.backbone(*args, **kwargs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.task == "seq_cls":
            logits = self.head(self.dropout(self._pool(h, kwargs.get("attention_mask"))))
        elif self.task == "token_cls":
            logits = self.head(self.dropout(h))
        else:
            logits = self.head(h)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        return _output(self.task, loss, logits, out)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "seq_cls":
            if logits.shape[-1] == 1:
                return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            return F.cross_entropy(logits, labels)
        if self.task == "token_cls":
            if labels.shape[1] != logits.shape[1]:  # prompt tuning: virtual positions carry no label
                pad = labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100)
                labels = torch.cat([pad, labels], 1)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        if labels.shape[1] != logits.shape[1]:
            pad = labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100)
            labels = torch.cat([pad, labels], 1)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _output(task: str, loss, logits, out):
    try:
        from transformers.modeling_outputs import (CausalLMOutput, SequenceClassifierOutput,
                                                   TokenClassifierOutput)
    except Exception:  # pragma: no cover - transformers absent
        return {"loss": loss, "logits": logits}
    cls = {"seq_cls": SequenceClassifierOutput, "token_cls": TokenClassifierOutput, "lm": CausalLMOutput}[task]
    return cls(loss=loss, logits=logits, hidden_states=getattr(out, "hidden_states", None),
               attentions=getattr(out, "attentions", None))


def add_classification_head(backbone: nn.Module, num_labels: int, *, pooling: str = "cls", dropout: float = 0.1,
                            hidden_size: Optional[int] = None, head_name: str = "classifier") -> ModelWithHead:
    """Sequence classification: ``Linear(H, num_labels)`` on the pooled hidden state."""
    H = _hidden_size(backbone, hidden_size)
    head = nn.Linear(H, _check_labels_count("num_labels", num_labels))
    _match_device(head, backbone)
    return ModelWithHead(backbone, head, "seq_cls", head_name, pooling=pooling, dropout=dropout)


def add_token_classification_head(backbone: nn.Module, num_labels: int, *, dropout: float = 0.1,
                                  hidden_size: Optional[int] = None,
                                  head_name: str = "classifier") -> ModelWithHead:
    """Token classification (NER, POS): ``Linear(H, num_labels)`` on every position."""
    H = _hidden_size(backbone, hidden_size)
    head = nn.Linear(H, _check_labels_count("num_labels", num_labels))
    _match_device(head, backbone)
    return ModelWithHead(backbone, head, "token_cls", head_name, dropout=dropout)


def add_lm_head(backbone: nn.Module, vocab_size: Optional[int] = None, *, tie_weights: bool = False,
                hidden_size: Optional[int] = None, head_name: str = "lm_head") -> ModelWithHead:
    """Language modelling: ``Linear(H, V, bias=False)``; ``tie_weights`` shares the input
    embedding matrix (then the head has no parameters of its own to train or save)."""
    H = _hidden_size(backbone, hidden_size)
    emb = backbone.get_input_embeddings() if callable(getattr(backbone, "get_input_embeddings", None)) else None
    if vocab_size is None:
        if not isinstance(emb, nn.Embedding):
            raise ValueError("vocab_size: the backbone has no input embedding to take it from; pass vocab_size=")
        vocab_size = emb.num_embeddings
    head = nn.Linear(H, _check_labels_count("vocab_size", vocab_size), bias=False)
    if tie_weights:
        if not isinstance(emb, nn.Embedding) or tuple(emb.weight.shape) != (vocab_size, H):
            raise ValueError(f"tie_weights: needs an input embedding of shape ({vocab_size}, {H})")
        head.weight = emb.weight
    else:
        _match_device(head, backbone)
    return ModelWithHead(backbone, head, "lm", head_name)


def _match_device(head: nn.Module, backbone: nn.Module) -> None:
    p = next(backbone.parameters(), None)
    if p is not None:
        head.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)


def mark_trainable(config, head_names) -> object:
    """Add ``head_names`` to ``config.modules_to_save`` (PEFT trains and saves those modules in
    full); returns the config."""
    names = [head_names] if isinstance(head_names, str) else list(head_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"head_names: expected module names, got {head_names!r}")
    current = list(getattr(config, "modules_to_save", None) or [])
    config.modules_to_save = current + [n for n in names if n not in current]
    return config


def find_head_names(model: nn.Module) -> list:
    """Names of the usual task heads present as direct children (``classifier``, ``score``, ``lm_head`` ...)."""
    return [n for n, _ in model.named_children() if n in KNOWN_HEAD_NAMES]


def set_trainable(model: nn.Module, head_names) -> list:
    """Without PEFT: make the named modules trainable (``requires_grad``), return their parameter names."""
    names = [head_names] if isinstance(head_names, str) else list(head_names)
    out = []
    for n in names:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"head_names: {type(model).__name__} has no module {n!r}; heads present: "
                             f"{find_head_names(model)}") from None
        m.requires_grad_(True)
        out += [f"{n}.{k}" for k, _ in m.named_parameters()]
    return out


__all__ = ["ModelWithHead", "add_classification_head", "add_token_classification_head", "add_lm_head",
           "mark_trainable", "find_head_names", "set_trainable"]
