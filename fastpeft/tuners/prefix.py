"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes for every attention layer.

HF PEFT compatible: ``PrefixTuningConfig`` fields, ``PrefixEncoder`` parameter names
(``prompt_encoder.<adapter>.embedding.weight`` and, with ``prefix_projection``,
``transform.{0,2}``), on-disk key ``prompt_embeddings`` ([n, num_layers * 2 * token_dim]:
the prefix itself, i.e. the projected output when ``prefix_projection`` is on).

Patching is a forward pre-hook on the module that takes the KV cache (the model itself
for ``*ForCausalLM``, its backbone -- e.g. ``model.bert`` -- for classification heads
whose forward has no cache argument).  Equivalent PyTorch of one forward without a
cache (n = virtual tokens, h = KV heads, d = head dim)::

    P = encoder(arange(n))                              # [n, num_layers * 2 * h * d]
    P = P.view(n, num_layers * 2, h, d).permute(1, 2, 0, 3)
    cache = DynamicCache([(P[2i], P[2i + 1]) for i in layers])   # each [B, h, n, d] after expand
    attention_mask = torch.cat([ones(B, n), attention_mask], 1)
    position_ids = position_ids + n (when given)
    backbone(input_ids, attention_mask=..., cache=cache, ...)

With a non-empty cache (decoding) the prefix is assumed to be inside it already: only
the mask (when it lacks the n prefix columns) and ``position_ids`` are adjusted, like
HF PEFT.  For grouped-query attention the prefix has ``num_key_value_heads`` heads
(HF PEFT's rule).  Works with transformers models whose attention layers append to a
``Cache`` (BERT-, GPT-2- and Llama-like); encoder-decoder models are not supported.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .prompt import (CACHE_NAMES, PromptLearningConfig, bind_args, cache_len, check_state_common,
                     enable_common, extend_mask, freeze_all_but_encoder, get_cache, input_len_and_batch,
                     install_state, model_dims, owner_of, pl_state, remove_common, set_adapter_common)
from .registry import register_tuner

PEFT_TYPE = "PREFIX_TUNING"


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """HF PEFT ``PrefixTuningConfig``: encoder_hidden_size (MLP width, default token_dim),
    prefix_projection (reparametrise the prefix through Embedding -> Linear -> Tanh -> Linear),
    init_weights (None: random; "zero": the prefix starts at zero)."""

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self):
        self.peft_type = PEFT_TYPE
        self._check_common()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights: expected None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (isinstance(self.encoder_hidden_size, bool) or
                                                     not isinstance(self.encoder_hidden_size, int) or
                                                     self.encoder_hidden_size <= 0):
            raise ValueError(f"PrefixTuningConfig.encoder_hidden_size: expected an int > 0 or None, "
                             f"got {self.encoder_hidden_size!r}")


class PrefixEncoder(nn.Module):
    """HF PEFT's ``PrefixEncoder`` (same parameter names and shapes)."""

    def __init__(self, config: PrefixTuningConfig, device=None):
        super().__init__()
        n, D, Lr = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(n, D, device=device)
            self.transform = nn.Sequential(nn.Linear(D, config.encoder_hidden_size, device=device), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, Lr * 2 * D, device=device))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, Lr * 2 * D, device=device)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prefix(self) -> torch.Tensor:
        """[n, num_layers * 2 * token_dim]"""
        if hasattr(self, "transform"):
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(prefix)
        return self.transform(emb) if hasattr(self, "transform") else emb


def _cache_param(module: nn.Module) -> Optional[str]:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in CACHE_NAMES:
        if name in params:
            return name
    return None


def _hook_target(model: nn.Module):
    if _cache_param(model) is not None:
        return model, ""
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model and _cache_param(backbone) is not None:
        path = next((n for n, m in model.named_modules() if m is backbone), None)
        if path is not None:
            return backbone, path
    return None, None


def prefix_key_values(enc: PrefixEncoder, cfg: PrefixTuningConfig, batch: int, dtype) -> list:
    """``[(key, value)]`` per layer, each [batch, heads, n, head_dim] (HF PEFT's get_prompt layout)."""
    n, Lr, h = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
    P = enc.prefix().to(dtype).view(n, Lr * 2, h, cfg.token_dim // h).permute(1, 2, 0, 3)  # [2Lr, h, n, d]
    P = P.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [2Lr, B, h, n, d]
    return [(P[2 * i], P[2 * i + 1]) for i in range(Lr)]


def _prefix_hook(cache_name: str):
    """The pre-hook (holds only the cache argument name; see install_state)."""
    def pre(module, args, kwargs):
        model, st = owner_of(module)
        if st is None or not st.enabled or not st.active:
            return None
        name = st.active[0]
        cfg = st.configs[name]
        n = cfg.num_virtual_tokens
        kw = bind_args(module, args, kwargs)
        L, B = input_len_and_batch(kw)
        found, cache = get_cache(kw)
        past = cache_len(cache)
        if past == 0:
            emb = model.get_input_embeddings()
            dtype = emb.weight.dtype if emb is not None and emb.weight.is_floating_point() else torch.float32
            kv = prefix_key_values(model.prompt_encoder[name], cfg, B, dtype)
            if cache is None:
                from transformers import DynamicCache
                cache = DynamicCache(kv)
            else:  # an empty cache handed in (e.g. by generate): fill it in place
                for i, (k, v) in enumerate(kv):
                    cache.update(k, v, i)
            if found is not None and found != cache_name:
                kw.pop(found)
            kw[cache_name] = cache
            needed = n + L
        else:
            needed = past + L
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, needed)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + n
        return (), kw
    return pre


def _fill_config(model: nn.Module, config: PrefixTuningConfig) -> None:
    d = model_dims(model)
    for field, key in (("num_layers", "layers"), ("token_dim", "hidden"), ("num_attention_heads", "heads")):
        if getattr(config, field) is None:
            if d[key] is None:
                raise ValueError(f"PrefixTuningConfig.{field}: not given and not found in the model config")
            setattr(config, field, int(d[key]))
    if d["kv_heads"] is not None and config.num_attention_heads != d["kv_heads"]:
        # grouped-query attention (HF PEFT's rule): the prefix has the KV heads
        head_dim = d["head_dim"] or config.token_dim // config.num_attention_heads
        config.token_dim = int(head_dim * d["kv_heads"])
        config.num_attention_heads = int(d["kv_heads"])
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"PrefixTuningConfig: token_dim={config.token_dim} is not a multiple of "
                         f"num_attention_heads={config.num_attention_heads}")
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    config.num_transformer_submodules = 1


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str = "default") -> list:
    """Add a prefix encoder named ``adapter_name`` and the pre-hook that feeds its KV prefix."""
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config: expected PrefixTuningConfig, got {type(config).__name__}")
    if model_dims(model)["is_encoder_decoder"]:
        raise ValueError("prefix tuning: encoder-decoder models are not supported by fastpeft")
    target, prefix = _hook_target(model)
    if target is None:
        raise ValueError(f"prefix tuning: neither {type(model).__name__}.forward nor its backbone's takes a KV "
                         f"cache ({' / '.join(CACHE_NAMES)}); prefix tuning needs a transformers-style model")
    st = pl_state(model)
    if st is not None and adapter_name in st.configs:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    if st is not None and st.kind != "prefix":
        raise ValueError(f"model already holds {st.kind} tuning adapters; cannot add prefix tuning")
    _fill_config(model, config)
    d = model_dims(model)
    if d["layers"] is not None and config.num_layers != d["layers"]:
        raise ValueError(f"PrefixTuningConfig.num_layers={config.num_layers} but the model has {d['layers']} layers")
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    device = emb.weight.device if emb is not None else None
    enc = PrefixEncoder(config, device=device)
    if not hasattr(model, "prompt_encoder"):
        model.add_module("prompt_encoder", nn.ModuleDict())
    model.prompt_encoder[adapter_name] = enc
    st = install_state(model, "prefix", target, _prefix_hook(_cache_param(target)))
    st.configs[adapter_name] = config
    if not st.active:
        st.active = [adapter_name]
    freeze_all_but_encoder(model, st, config.inference_mode)
    return [f"prompt_encoder.{adapter_name}"] + ([prefix] if prefix else [])


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *, config=None) -> dict:
    """``{"prompt_embeddings": [n, num_layers * 2 * token_dim]}`` as HF PEFT writes it."""
    st = pl_state(model)
    if st is None or adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no prefix tuning adapter {adapter_name!r}")
    with torch.no_grad():
        return {"prompt_embeddings": model.prompt_encoder[adapter_name].prefix().detach().clone()}


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str = "default", *, config=None) -> None:
    st = pl_state(model)
    if st is None or adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no prefix tuning adapter {adapter_name!r}")
    enc = model.prompt_encoder[adapter_name]
    if hasattr(enc, "transform"):
        raise ValueError("prefix tuning: a prefix_projection=True adapter is saved as its projected prefix, which "
                         "cannot be loaded back into the trainable MLP; load it with inference_mode=True "
                         "(is_trainable=False), as in HF PEFT")
    w = enc.embedding.weight
    check_state_common({"prompt_embeddings": w}, state, "prefix tuning")
    with torch.no_grad():
        w.copy_(state["prompt_embeddings"].to(device=w.device, dtype=w.dtype))


def remove(model: nn.Module, adapter_name: str = "default", *, unwrap_empty: bool = True) -> None:
    remove_common(model, adapter_name)


register_tuner(PEFT_TYPE, PrefixTuningConfig, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, set_adapter=set_adapter_common, enable_adapters=enable_common)
