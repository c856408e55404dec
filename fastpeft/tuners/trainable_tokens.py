"""``LoraConfig(trainable_token_indices=...)``: train only some rows (token ids) of an embedding, HF PEFT's
layout and file format.

An embedding layer ``emb`` (``nn.Embedding``, or ``nn.Linear`` such as a tied ``lm_head``) is replaced by a
:class:`TrainableTokensWrapper` whose ``token_adapter`` (:class:`TrainableTokensLayer`) holds, per adapter,
``trainable_tokens_delta[adapter]`` ([len(ids), dim], initialised to the rows' current values) and the ids.
The forward uses ``W' = W.index_copy(0, ids, delta)`` (the rows are replaced, not added to)::

    nn.Embedding: F.embedding(x, W', padding_idx, ...)          nn.Linear: F.linear(x, W')

On disk (HF PEFT's key): ``<emb path>.token_adapter.trainable_tokens_delta``.  With tied input / output
embeddings (``config.tie_word_embeddings``) the output layer gets a wrapper that shares the input's
deltas and writes nothing to disk (HF PEFT's ``tied_adapter``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrainableTokensLayer(nn.Module):
    """Per-adapter replacement rows of ``base_layer.weight`` (HF: ``peft.tuners.trainable_tokens.layer``)."""

    def __init__(self, base_layer: nn.Module, tied: Optional["TrainableTokensLayer"] = None):
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not registered as a submodule
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict = {}
            self._originals: dict = {}  # rows before merging
        else:
            self.trainable_tokens_delta = tied.trainable_tokens_delta
            self.token_indices = tied.token_indices
            self._originals = tied._originals
        self.active_adapters: list = []
        self.merged_adapters: list = []
        self._disable_adapters = False

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    def update_layer(self, adapter_name: str, token_indices: list, init_weights: bool = True) -> None:
        if self.tied_adapter is not None:
            return
        w = self.base_layer.weight
        n = w.shape[0]
        bad = [i for i in token_indices if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"trainable_token_indices: ids {bad[:10]} are out of range for a layer with {n} rows")
        self.token_indices[adapter_name] = [int(i) for i in token_indices]
        rows = w.detach()[self.token_indices[adapter_name]]
        values = rows.clone() if init_weights else torch.randn_like(rows)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self._originals[adapter_name] = rows.clone()

    def delete_adapter(self, adapter_name: str) -> None:
        if self.tied_adapter is None and adapter_name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[adapter_name]
            self.token_indices.pop(adapter_name, None)
            self._originals.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def _check_disjoint(self, names) -> None:
        seen: set = set()
        for a in dict.fromkeys(list(self.merged_adapters) + list(names)):
            ids = set(self.token_indices[a])
            if seen & ids:
                raise ValueError(f"trainable_token_indices of adapter {a!r} overlap those of another active adapter; "
                                 "only disjoint token ids can be combined")
            seen |= ids

    def merged_weight(self, names) -> torch.Tensor:
        W = self.base_layer.weight
        for a in names:
            idx = torch.tensor(self.token_indices[a], device=W.device)
            W = W.index_copy(0, idx, self.trainable_tokens_delta[a].to(W))
        return W

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [a for a in self.active_adapters if a in self.trainable_tokens_delta]
        if self._disable_adapters or self.merged_adapters or not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(names)
        W = self.merged_weight(names)
        b = self.base_layer
        if isinstance(b, nn.Embedding):
            out = F.embedding(x, W, padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                              scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)
            scale = getattr(b, "embed_scale", None)
            if isinstance(scale, (int, float, torch.Tensor)):
                out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
            return out
        if isinstance(b, nn.Linear):
            return F.linear(x, W, b.bias)
        raise TypeError(f"trainable_token_indices: cannot run a {type(b).__name__} layer")

    @torch.no_grad()
    def merge(self, names) -> None:
        names = [a for a in names if a in self.trainable_tokens_delta and a not in self.merged_adapters]
        self._check_disjoint(names)
        self.base_layer.weight.data = self.merged_weight(names).detach()
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        W = self.base_layer.weight
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            W.data.index_copy_(0, torch.tensor(self.token_indices[a], device=W.device), self._originals[a].to(W))


class TrainableTokensWrapper(nn.Module):
    """Replaces the embedding module; holds :class:`TrainableTokensLayer` as ``token_adapter``."""

    def __init__(self, module: nn.Module, adapter_name: str, token_indices: list,
                 tied: Optional[TrainableTokensLayer] = None):
        super().__init__()
        if not isinstance(module, (nn.Embedding, nn.Linear)):
            raise TypeError(f"trainable_token_indices: the layer must be nn.Embedding or nn.Linear, got "
                            f"{type(module).__name__}")
        self.token_adapter = TrainableTokensLayer(module, tied)
        self.update(adapter_name, token_indices)
        self.set_adapter([adapter_name])

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def _disable_adapters(self) -> bool:
        return self.token_adapter._disable_adapters

    def __getattr__(self, name: str):
        return nn.Module.__getattr__(self, name)  # never peft's AuxiliaryTrainingWrapper lookup (expose_to_peft)

    @property
    def tied(self) -> bool:
        return self.token_adapter.tied_adapter is not None

    @property
    def weight(self) -> torch.Tensor:
        """The weight with the active adapters' rows (models read ``embed_tokens.weight``)."""
        t = self.token_adapter
        names = [a for a in t.active_adapters if a in t.trainable_tokens_delta]
        return t.base_layer.weight if (t._disable_adapters or not names) else t.merged_weight(names)

    def update(self, adapter_name: str, token_indices: list) -> None:
        self.token_adapter.update_layer(adapter_name, token_indices)

    def adapters(self) -> list:
        return list(self.token_adapter.token_indices)

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        t = self.token_adapter
        t.active_adapters = [a for a in names if a in t.trainable_tokens_delta]
        if not self.tied:
            for a, p in t.trainable_tokens_delta.items():
                p.requires_grad_(a in t.active_adapters and not inference_mode)

    def enable(self, enabled: bool) -> None:
        self.token_adapter._disable_adapters = not enabled

    def forward(self, x, *args, **kwargs):
        return self.token_adapter(x, *args, **kwargs)

    def adapter_entries(self, adapter_name: str) -> dict:
        """On-disk entries (relative to this module) of ``adapter_name``; none for a tied layer."""
        if self.tied or adapter_name not in self.token_adapter.trainable_tokens_delta:
            return {}
        return {"token_adapter.trainable_tokens_delta": self.token_adapter.trainable_tokens_delta[adapter_name]}

    # HF PEFT's AuxiliaryTrainingWrapper interface (peft.get_peft_model_state_dict / set_peft_model_state_dict)
    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        if not self.adapter_entries(adapter_name):
            return {}
        return {"token_adapter.trainable_tokens_delta":
                state_dict[f"token_adapter.trainable_tokens_delta.{adapter_name}"]}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        if not self.adapter_entries(adapter_name):
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for name, m in model.named_modules():
        if emb is not None and m is emb:
            return name
    return "embed_tokens"


def _find(model: nn.Module, layer_name: str) -> list:
    return [(n, m) for n, m in model.named_modules()
            if (n == layer_name or n.endswith("." + layer_name)) and ".token_adapter" not in f".{n}"]


def _set(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply(model: nn.Module, indices, adapter_name: str, modules_to_save=None) -> list:
    """Wrap the layers of ``indices`` (``LoraConfig.trainable_token_indices``) for ``adapter_name``.
    Returns ``[(key, wrapper, created)]`` (created: a new wrapper replaced the layer) for undoing."""
    table = indices if isinstance(indices, dict) else {_input_embedding_name(model): indices}
    done = []
    try:
        for layer_name, ids in table.items():
            found = _find(model, layer_name)
            if not found:
                raise ValueError(f"trainable_token_indices: no layer named {layer_name!r} in the model")
            for key, m in found:
                if isinstance(m, TrainableTokensWrapper):
                    m.update(adapter_name, ids)
                    done.append((key, m, False))
                elif hasattr(m, "adapter_layer_names") or hasattr(m, "base_layer"):
                    raise TypeError(f"trainable_token_indices: {key} is already an adapter layer "
                                    f"({type(m).__name__}); do not also target it with target_modules")
                else:
                    w = TrainableTokensWrapper(m, adapter_name, ids)
                    _set(model, key, w)
                    done.append((key, w, True))
        done += _tie_output(model, adapter_name, table)
    except Exception:
        undo(model, done, adapter_name)
        raise
    return done


def _tie_output(model: nn.Module, adapter_name: str, table: dict) -> list:
    """HF PEFT: with tied word embeddings, the output embedding shares the input embedding's token rows."""
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not tied or not callable(get_in) or not callable(get_out):
        return []
    emb, out = get_in(), get_out()
    if not isinstance(emb, TrainableTokensWrapper) or out is None or isinstance(out, TrainableTokensWrapper):
        return []
    if getattr(out, "weight", None) is not emb.original_module.weight:
        return []
    key = next(n for n, m in model.named_modules() if m is out)
    w = TrainableTokensWrapper.__new__(TrainableTokensWrapper)
    nn.Module.__init__(w)
    w.token_adapter = TrainableTokensLayer(out, tied=emb.token_adapter)
    w.set_adapter([adapter_name])
    _set(model, key, w)
    return [(key, w, True)]


def undo(model: nn.Module, done: list, adapter_name: str) -> None:
    for key, w, created in reversed(done):
        if created:
            _set(model, key, w.original_module)
        else:
            w.token_adapter.delete_adapter(adapter_name)


def wrappers(model: nn.Module) -> list:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, TrainableTokensWrapper)]


__all__ = ["TrainableTokensLayer", "TrainableTokensWrapper", "apply", "undo", "wrappers"]
