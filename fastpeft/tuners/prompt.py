"""Prompt tuning (Lester et al. 2021): a trainable soft prompt prepended to the input embeddings.

HF PEFT compatible: ``PromptTuningConfig`` fields, on-disk key ``prompt_embeddings``
([num_virtual_tokens * num_transformer_submodules, token_dim]).  The prompt lives in
``model.prompt_encoder[<adapter>].embedding`` (an ``nn.Embedding``; HF PEFT keeps the
same module on its PeftModel, so in-memory keys differ by that prefix only).

Patching is a forward pre-hook on the model (works for encoders such as BERT and
decoders such as GPT-2 / Llama, ``generate`` included).  Equivalent PyTorch of one
forward without a cache (B = batch, n = virtual tokens)::

    embeds = model.get_input_embeddings()(input_ids)            # [B, L, D]
    embeds = torch.cat([prompt.expand(B, n, D), embeds], 1)     # [B, n+L, D]
    attention_mask = torch.cat([ones(B, n), attention_mask], 1)
    labels = torch.cat([full((B, n), -100), labels], 1)         # token-level labels only
    token_type_ids = torch.cat([zeros(B, n), token_type_ids], 1)
    position_ids = None                                         # the model recomputes them
    model(inputs_embeds=embeds, attention_mask=..., labels=..., ...)

With a non-empty KV cache (decoding) the prompt is already inside the cache: only the
2-D attention mask is extended (when it lacks the n prompt columns) and
``position_ids`` is dropped.  Outputs keep the n prompt positions (logits
``[B, n+L, V]``), as in HF PEFT.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .base import PeftConfig
from .registry import register_tuner

PEFT_TYPE = "PROMPT_TUNING"
INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
_STATE_ATTR = "_fastpeft_prompt_learning"


# -- shared by prompt and prefix tuning -------------------------------------------------------
@dataclass
class PromptLearningConfig(PeftConfig):
    """HF PEFT ``PromptLearningConfig`` fields (filled from the model config at inject when None)."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    is_prompt_learning = True

    def _check_common(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{type(self).__name__}.num_virtual_tokens: expected an int > 0, got {n!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{type(self).__name__}.{name}: expected an int > 0 or None, got {v!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"{type(self).__name__}.num_transformer_submodules={self.num_transformer_submodules}: "
                             f"fastpeft supports decoder-only and encoder-only models (1)")


def model_dims(model: nn.Module) -> dict:
    """hidden size, layers, heads (and KV heads / head dim) of a transformers-style model config."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*names):
        for nm in names:
            v = getattr(cfg, nm, None)
            if v is not None:
                return v
        return None
    return {
        "hidden": first("hidden_size", "n_embd", "d_model"),
        "layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "heads": first("num_attention_heads", "n_head", "num_heads"),
        "kv_heads": first("num_key_value_heads"),
        "head_dim": first("head_dim"),
        "is_encoder_decoder": bool(getattr(cfg, "is_encoder_decoder", False)),
    }


class _PLState:
    def __init__(self, kind: str):
        self.kind = kind            # "prompt" or "prefix"
        self.configs: dict = {}
        self.active: list = []
        self.enabled = True
        self.handle = None


def pl_state(model: nn.Module) -> Optional[_PLState]:
    return model.__dict__.get(_STATE_ATTR)


def bind_args(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of ``module.forward`` turned into keywords."""
    if not args:
        return dict(kwargs)
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TypeError(f"{type(module).__name__}.forward: too many positional arguments for prompt learning")
    out = dict(kwargs)
    for p, a in zip(params, args):
        if p.name in out:
            raise TypeError(f"{type(module).__name__}.forward got multiple values for {p.name!r}")
        out[p.name] = a
    return out


CACHE_NAMES = ("cache", "past_key_values")


def get_cache(kwargs: dict):
    for k in CACHE_NAMES:
        if kwargs.get(k) is not None:
            return k, kwargs[k]
    return None, None


def cache_len(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def input_len_and_batch(kwargs: dict):
    ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if emb is not None:
        return emb.shape[1], emb.shape[0]
    if ids is not None:
        return ids.shape[1], ids.shape[0]
    raise ValueError("prompt learning: the model was called without input_ids or inputs_embeds")


def extend_mask(mask, n: int, needed_len: int):
    """Prepend ``n`` ones to a 2-D mask whose length is ``needed_len - n``."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return mask
    if mask.shape[1] == needed_len - n:
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return mask


_OWNER_ATTR = "_fastpeft_pl_owner"


def install_state(model: nn.Module, kind: str, hook_module: nn.Module, hook) -> _PLState:
    """Attach the state to ``model`` and the pre-hook to ``hook_module`` (the model or its
    backbone).  The hook holds no references: it finds the model (owner of the state and of
    ``prompt_encoder``) from the hooked module, so ``copy.deepcopy`` yields an independent copy."""
    st = pl_state(model)
    if st is None:
        st = _PLState(kind)
        if hook_module is not model:
            object.__setattr__(hook_module, _OWNER_ATTR, model)
        st.handle = hook_module.register_forward_pre_hook(hook, with_kwargs=True)
        st.hook_module_is_model = hook_module is model
        object.__setattr__(model, _STATE_ATTR, st)
    elif st.kind != kind:
        raise ValueError(f"model already holds {st.kind} tuning adapters; cannot add {kind} tuning")
    return st


def owner_of(hooked: nn.Module):
    """``(model, state)`` for a hooked module (the model itself or its backbone)."""
    model = hooked.__dict__.get(_OWNER_ATTR, hooked)
    return model, model.__dict__.get(_STATE_ATTR)


def freeze_all_but_encoder(model: nn.Module, st: _PLState, inference_mode: bool) -> None:
    for n, p in model.named_parameters():
        if not n.startswith("prompt_encoder.") and "modules_to_save" not in n:
            p.requires_grad_(False)
    for name in st.configs:
        model.prompt_encoder[name].requires_grad_(name in st.active and not inference_mode)


def remove_common(model: nn.Module, adapter_name: str) -> None:
    st = pl_state(model)
    if st is None or adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no prompt-learning adapter {adapter_name!r} on this model")
    del st.configs[adapter_name]
    del model.prompt_encoder[adapter_name]
    if adapter_name in st.active:
        st.active.remove(adapter_name)
    if not st.active and st.configs:
        st.active = [next(iter(st.configs))]
    if not st.configs:
        st.handle.remove()
        del model.prompt_encoder
        object.__delattr__(model, _STATE_ATTR)
        for m in model.modules():
            if m.__dict__.get(_OWNER_ATTR) is model:
                object.__delattr__(m, _OWNER_ATTR)


def set_adapter_common(model: nn.Module, adapter_names, *, inference_mode: bool = False) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    st = pl_state(model)
    if st is None:
        raise ValueError("model has no prompt-learning adapters")
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise ValueError(f"adapter_names: unknown adapters {unknown} (present: {sorted(st.configs)})")
    if len(names) != 1:
        raise ValueError(f"prompt learning: exactly one active adapter is supported, got {names}")
    st.active = names
    for n in st.configs:
        model.prompt_encoder[n].requires_grad_(n in names and not inference_mode)


def enable_common(model: nn.Module, enabled: bool) -> None:
    st = pl_state(model)
    if st is not None:
        st.enabled = bool(enabled)


def check_state_common(params: dict, state: dict, what: str) -> None:
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                 for k in set(params) & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"{what} adapter does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {bad}")


# -- prompt tuning -------------------------------------------------------------------------
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """HF PEFT ``PromptTuningConfig``.

    prompt_tuning_init: "RANDOM" (N(0, 1), nn.Embedding's default), "SAMPLE_VOCAB" (rows of the
    model's input embeddings at random token ids) or "TEXT" (the embeddings of
    ``prompt_tuning_init_text`` tokenised with ``tokenizer_name_or_path`` -- a local path; or,
    tokenizer-free, of ``prompt_tuning_init_token_ids``), repeated / cut to the prompt length.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    prompt_tuning_init_token_ids: Optional[list] = None  # fastpeft extra: TEXT init without a tokenizer

    def __post_init__(self):
        self.peft_type = PEFT_TYPE
        if hasattr(self.prompt_tuning_init, "value"):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        if isinstance(self.prompt_tuning_init, str):
            self.prompt_tuning_init = self.prompt_tuning_init.upper()
        if self.prompt_tuning_init not in INIT_CHOICES:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init: expected one of {INIT_CHOICES}, "
                             f"got {self.prompt_tuning_init!r}")
        self._check_common()
        if self.prompt_tuning_init == "TEXT":
            ids = self.prompt_tuning_init_token_ids
            if ids is not None:
                if not isinstance(ids, (list, tuple)) or not ids or \
                        not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                    raise ValueError("PromptTuningConfig.prompt_tuning_init_token_ids: expected a non-empty list "
                                     f"of token ids >= 0, got {ids!r}")
            elif not self.prompt_tuning_init_text or not self.tokenizer_name_or_path:
                raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                                 "tokenizer_name_or_path, or prompt_tuning_init_token_ids (tokenizer-free)")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("PromptTuningConfig.tokenizer_kwargs: only valid with prompt_tuning_init='TEXT'")


class PromptEmbedding(nn.Module):
    """HF PEFT's ``PromptEmbedding``: ``embedding`` [total_virtual_tokens, token_dim]."""

    def __init__(self, total: int, token_dim: int, init: Optional[torch.Tensor] = None, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(total, token_dim, device=device, dtype=dtype)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def _init_token_ids(config: PromptTuningConfig, total: int, vocab: int) -> Optional[list]:
    if config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab, (total,)).tolist()
    ids = config.prompt_tuning_init_token_ids
    if ids is None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
        ids = tok(config.prompt_tuning_init_text)["input_ids"]
    ids = list(ids)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"PromptTuningConfig: init token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    if len(ids) > total:
        ids = ids[:total]
    elif len(ids) < total:
        ids = (ids * math.ceil(total / len(ids)))[:total]
    return ids


def _prompt_pre_hook(module, args, kwargs):
    model, st = owner_of(module)
    if st is None or not st.enabled or not st.active:
        return None
    name = st.active[0]
    cfg = st.configs[name]
    n = cfg.num_virtual_tokens * (cfg.num_transformer_submodules or 1)
    kw = bind_args(module, args, kwargs)
    L, B = input_len_and_batch(kw)
    _, cache = get_cache(kw)
    past = cache_len(cache)
    if past == 0:
        emb = kw.get("inputs_embeds")
        if emb is None:
            emb = module.get_input_embeddings()(kw["input_ids"])
        prompt = model.prompt_encoder[name].embedding.weight
        kw["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1).to(emb.dtype), emb], 1)
        kw["input_ids"] = None
        labels = kw.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == L:
            kw["labels"] = torch.cat([labels.new_full((B, n), -100), labels], 1)
        tt = kw.get("token_type_ids")
        if isinstance(tt, torch.Tensor) and tt.dim() == 2 and tt.shape[1] == L:
            kw["token_type_ids"] = torch.cat([tt.new_zeros(B, n), tt], 1)
        needed = n + L
    else:
        needed = past + L
    kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, needed)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = None  # as HF PEFT: recomputed by the model from the cache length
    return (), kw


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default") -> list:
    """Add a soft prompt named ``adapter_name`` (``model.prompt_encoder[adapter_name]``) and the
    forward pre-hook that prepends it; returns ``["prompt_encoder.<adapter_name>"]``."""
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config: expected PromptTuningConfig, got {type(config).__name__}")
    get_emb = getattr(model, "get_input_embeddings", None)
    word = get_emb() if callable(get_emb) else None
    if not isinstance(word, nn.Embedding):
        raise ValueError(f"prompt tuning: {type(model).__name__} has no get_input_embeddings() returning an "
                         f"nn.Embedding; prompt tuning needs a transformers-style model")
    dims = model_dims(model)
    if dims["is_encoder_decoder"]:
        raise ValueError("prompt tuning: encoder-decoder models are not supported by fastpeft "
                         "(num_transformer_submodules=2)")
    token_dim = config.token_dim or word.embedding_dim
    if token_dim != word.embedding_dim:
        raise ValueError(f"PromptTuningConfig.token_dim={token_dim} differs from the model's embedding size "
                         f"{word.embedding_dim}")
    st = pl_state(model)
    if st is not None and adapter_name in st.configs:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    if st is not None and st.kind != "prompt":
        raise ValueError(f"model already holds {st.kind} tuning adapters; cannot add prompt tuning")
    total = config.num_virtual_tokens  # num_transformer_submodules is 1 (decoder- or encoder-only)
    ids = _init_token_ids(config, total, word.num_embeddings)
    init = word.weight.detach()[torch.tensor(ids, device=word.weight.device)].float() if ids is not None else None
    enc = PromptEmbedding(total, token_dim, init, device=word.weight.device)
    # fill HF's derived fields (adapter_config.json matches HF PEFT's)
    config.token_dim = token_dim
    config.num_transformer_submodules = 1
    config.num_layers = config.num_layers or dims["layers"]
    config.num_attention_heads = config.num_attention_heads or dims["heads"]
    if not hasattr(model, "prompt_encoder"):
        model.add_module("prompt_encoder", nn.ModuleDict())
    model.prompt_encoder[adapter_name] = enc
    st = install_state(model, "prompt", model, _prompt_pre_hook)
    st.configs[adapter_name] = config
    if not st.active:
        st.active = [adapter_name]
    freeze_all_but_encoder(model, st, config.inference_mode)
    return [f"prompt_encoder.{adapter_name}"]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *, config=None) -> dict:
    """``{"prompt_embeddings": [n, token_dim]}`` exactly as HF PEFT writes it."""
    st = pl_state(model)
    if st is None or adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no prompt tuning adapter {adapter_name!r}")
    return {"prompt_embeddings": model.prompt_encoder[adapter_name].embedding.weight.detach()}


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str = "default", *, config=None) -> None:
    st = pl_state(model)
    if st is None or adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no prompt tuning adapter {adapter_name!r}")
    w = model.prompt_encoder[adapter_name].embedding.weight
    check_state_common({"prompt_embeddings": w}, state, "prompt tuning")
    with torch.no_grad():
        w.copy_(state["prompt_embeddings"].to(device=w.device, dtype=w.dtype))


def remove(model: nn.Module, adapter_name: str = "default", *, unwrap_empty: bool = True) -> None:
    remove_common(model, adapter_name)


register_tuner(PEFT_TYPE, PromptTuningConfig, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, set_adapter=set_adapter_common, enable_adapters=enable_common)
