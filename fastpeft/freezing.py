"""Layer freezing from the classic fine-tuning recipe: train only the top k transformer
blocks (plus the head), or everything, chosen by a small config.

The block list is found automatically (``encoder.layer`` of BERT/ViT, ``transformer.h``
of GPT-2, ``model.layers`` of Llama, or in general the ``nn.ModuleList`` of same-type
modules holding the most parameters) or named with ``blocks_path``.  Parameters
registered before the first block are the "embeddings", those after the last block the
"head" (final norm, pooler, classifier, LM head).  Equivalent PyTorch::

    for p in model.parameters(): p.requires_grad_(False)
    for block in blocks[len(blocks) - k:]: block.requires_grad_(True)
    head.requires_grad_(train_head); embeddings.requires_grad_(train_embeddings)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .blocks import find_block_list

@dataclass
class FreezeConfig:
    """train_top_k: None -> train every block; k >= 0 -> only the top (last) k blocks.
    train_embeddings: None -> True when all blocks train, else False.
    train_head: train the parameters after the blocks (norm, pooler, classifier, LM head).
    blocks_path: dotted path of the block ``nn.ModuleList`` (None: detect)."""

    train_top_k: Optional[int] = None
    train_embeddings: Optional[bool] = None
    train_head: bool = True
    blocks_path: Optional[str] = None

    def __post_init__(self):
        k = self.train_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"FreezeConfig.train_top_k: expected None (all blocks) or an int >= 0, got {k!r}")
        for name in ("train_embeddings", "train_head"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"FreezeConfig.{name}: expected a bool, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FreezeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"FreezeConfig: unknown keys {unknown}; expected {sorted(names)}")
        return cls(**d)


def apply_freezing(model: nn.Module, config: FreezeConfig) -> dict:
    """Set ``requires_grad`` per ``config``; returns a summary
    ``{"blocks_path", "num_blocks", "trained_blocks", "trainable", "total"}`` (parameter counts)."""
    if isinstance(config, dict):
        config = FreezeConfig.from_dict(config)
    if not isinstance(config, FreezeConfig):
        raise TypeError(f"config: expected FreezeConfig or dict, got {type(config).__name__}")
    path, blocks = find_block_list(model, config.blocks_path)
    n = len(blocks)
    k = n if config.train_top_k is None else config.train_top_k
    if k > n:
        raise ValueError(f"FreezeConfig.train_top_k={k} but the model has only {n} blocks (at {path!r})")
    train_emb = (k == n) if config.train_embeddings is None else config.train_embeddings
    block_of = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            block_of[id(p)] = i
    seen_block = False
    total = trainable = 0
    for _, p in model.named_parameters():
        if id(p) in block_of:
            seen_block = True
            train = block_of[id(p)] >= n - k
        else:
            train = config.train_head if seen_block else train_emb
        p.requires_grad_(train)
        total += p.numel()
        trainable += p.numel() if train else 0
    return {"blocks_path": path, "num_blocks": n, "trained_blocks": list(range(n - k, n)),
            "trainable": trainable, "total": total}


__all__ = ["FreezeConfig", "apply_freezing"]
