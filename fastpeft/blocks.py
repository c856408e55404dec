"""Where a model's transformer blocks are: one module for every feature that needs them.

* :func:`find_block_list` -- the ``nn.ModuleList`` of blocks (``encoder.layer`` of BERT/ViT,
  ``transformer.h`` of GPT-2, ``model.layers`` of Llama, or in general the list of same-type modules
  holding the most parameters), or the one named by ``blocks_path``.  Used by layer freezing.
* :func:`find_typed_blocks` -- every block whose layout is one of the known architectures (:data:`ARCHS`),
  with that architecture's name.  Used by the bottleneck adapters, which insert themselves at named
  sites inside a block.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

KNOWN_BLOCK_PATHS = ("encoder.layer", "transformer.h", "model.layers", "layers", "h", "blocks",
                     "encoder.layers", "decoder.layers")


def _module_lists(model: nn.Module) -> list:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            out.append((name, m))
    return out


def find_block_list(model: nn.Module, blocks_path: Optional[str] = None):
    """``(path, nn.ModuleList)`` of the model's transformer blocks."""
    if blocks_path is not None:
        try:
            m = model.get_submodule(blocks_path)
        except AttributeError:
            m = None
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            cands = [n for n, _ in _module_lists(model)]
            raise ValueError(f"FreezeConfig.blocks_path={blocks_path!r} is not a non-empty nn.ModuleList of "
                             f"{type(model).__name__}; candidates: {cands}")
        return blocks_path, m
    lists = _module_lists(model)
    if not lists:
        raise ValueError(f"layer freezing: {type(model).__name__} has no nn.ModuleList of blocks; give "
                         f"FreezeConfig.blocks_path")
    for name, m in lists:
        if any(name == p or name.endswith("." + p) for p in KNOWN_BLOCK_PATHS):
            return name, m
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _has(m: nn.Module, path: str) -> bool:
    for part in path.split("."):
        m = getattr(m, part, None)
        if not isinstance(m, nn.Module):
            return False
    return True


#: kind -> (attention-output site, FFN-output site, parallel input site, parallel add site)
ARCHS = {
    "bert": ("attention.output.dense", "output.dense", "intermediate", "output.dense"),
    "llama": ("self_attn.o_proj", "mlp.down_proj", "mlp", "mlp"),
    "gpt2": ("attn.c_proj", "mlp.c_proj", "mlp", "mlp"),
    "vit": ("attention.o_proj", "mlp.fc2", "mlp", "mlp"),  # transformers 5 ViTLayer
}


def _block_kind(m: nn.Module) -> Optional[str]:
    for kind, sites in ARCHS.items():
        if all(_has(m, s) for s in sites):
            return kind
    return None


def find_typed_blocks(model: nn.Module) -> list:
    """``[(path, block, kind)]`` of the transformer blocks of ``model``, outermost matches only."""
    out = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p, _, _ in out):
            continue
        kind = _block_kind(m)
        if kind is not None and name:
            out.append((name, m, kind))
    return out


__all__ = ["find_block_list", "find_typed_blocks", "KNOWN_BLOCK_PATHS", "ARCHS"]
