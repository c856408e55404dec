"""HF PEFT's state-dict functions for fastpeft models, and what :class:`fastpeft.PeftModel` saves besides a
method's own weights.

Public (HF PEFT's signatures and semantics):

* :func:`get_peft_model_state_dict` -- an adapter's tensors under their on-disk keys;
* :func:`set_peft_model_state_dict` -- load such a dict into a model that has the adapter (lenient, as
  HF's: returns the missing / unexpected keys);
* :func:`inject_adapter_in_model` -- add adapter layers to a plain model in place (no ``PeftModel``).

They take a fastpeft ``PeftModel`` or a model given adapters by :func:`inject_adapter_in_model`.  HF PEFT's
own ``peft.get_peft_model_state_dict`` / ``set_peft_model_state_dict`` work on fastpeft models too: the first
time they read ``model.peft_config[...]`` (a :class:`PeftConfigs`), fastpeft's layer and wrapper classes are
made recognisable to peft (:func:`expose_to_peft`).

Besides the method's weights an adapter file holds ("side entries"): ``modules_to_save`` heads
(``<head>.<param>``), trainable token rows (``<emb>.token_adapter.trainable_tokens_delta``) and, with
``save_embedding_layers``, the base embedding weights (``<emb>.base_layer.weight`` when the embedding is
LoRA-targeted, ``<emb>.weight`` when it was resized): HF PEFT's keys and rules.
"""
from __future__ import annotations

import collections
import copy
import re
import sys
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from .adapter_io import check_adapter_name, check_adapter_tensors
from .hub import HUB_KWARGS
from .tuners import get_tuner
from .tuners import trainable_tokens

PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # HF PEFT's peft.utils.other.EMBEDDING_LAYER_NAMES

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


# -- making fastpeft models readable by HF PEFT's functions ---------------------------------------------
class PeftConfigs(dict):
    """``model.peft_config``: adapter name -> config.  Reading an entry while ``peft`` is imported makes
    the model's fastpeft classes recognisable to HF PEFT's functions (they all start by reading it)."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model = weakref.ref(model)
        self._exposed = False  # (PeftModel exposes wrappers it adds later itself, once peft is imported)

    def __getitem__(self, key):
        if not self._exposed and "peft" in sys.modules:
            m = self._model()
            if m is not None:
                expose_to_peft(m)
            self._exposed = True
        return super().__getitem__(key)

    def __deepcopy__(self, memo):
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def __reduce__(self):
        return dict, (dict(self),)


_PEFT_SUBCLASSES: dict = {}


def expose_to_peft(model: nn.Module) -> None:
    """When ``peft`` is imported: register fastpeft's adapter-layer classes as virtual subclasses of peft's
    ``BaseTunerLayer`` (the ``TunerModel`` of ``BaseTuner``), and give the ``modules_to_save`` / trainable-token
    wrappers of ``model`` a class that is also peft's ``AuxiliaryTrainingWrapper`` (same object, same
    attributes; only ``isinstance`` changes), so ``peft.get_peft_model_state_dict`` and
    ``peft.set_peft_model_state_dict`` see fastpeft's adapters.  Nothing happens without peft."""
    if "peft" not in sys.modules:
        return
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except Exception:  # a broken or very different peft: its functions then do not see fastpeft's classes
        return
    from .peft_model import ModulesToSaveWrapper, TunerModel
    from .tuners.lora import LoraLayer
    from .tuners.ia3 import IA3Linear
    for cls in (LoraLayer, IA3Linear):
        if not issubclass(cls, BaseTunerLayer):
            BaseTunerLayer.register(cls)
    if not issubclass(TunerModel, BaseTuner):
        BaseTuner.register(TunerModel)
    for m in model.modules():
        if isinstance(m, (ModulesToSaveWrapper, trainable_tokens.TrainableTokensWrapper)) \
                and not isinstance(m, AuxiliaryTrainingWrapper):
            m.__class__ = _peft_visible(type(m), AuxiliaryTrainingWrapper)


def _peft_visible(cls: type, aux: type) -> type:
    """``cls`` + peft's ``AuxiliaryTrainingWrapper`` as a base: importable from this module by name (so a model
    holding one pickles), printed under ``cls``'s name."""
    sub = _PEFT_SUBCLASSES.get(cls)
    if sub is None:
        name = "PeftVisible" + cls.__name__
        sub = type(name, (cls, aux), {"__module__": __name__, "__qualname__": name,
                                      "_get_name": lambda self, n=cls.__name__: n})
        _PEFT_SUBCLASSES[cls] = sub
        globals()[name] = sub
    return sub


def __getattr__(name: str):
    # unpickling a model that peft's functions had seen, in a fresh process: rebuild the class
    if name.startswith("PeftVisible"):
        from .peft_model import ModulesToSaveWrapper
        for cls in (ModulesToSaveWrapper, trainable_tokens.TrainableTokensWrapper):
            if name == "PeftVisible" + cls.__name__:
                from peft.utils.other import AuxiliaryTrainingWrapper
                return _peft_visible(cls, AuxiliaryTrainingWrapper)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- what an adapter file holds ----------------------------------------------------------------------
def aux_wrappers(model: nn.Module) -> list:
    """(path, wrapper) of the ``modules_to_save`` and trainable-token wrappers of ``model``."""
    from .peft_model import ModulesToSaveWrapper
    return [(k, m) for k, m in model.named_modules()
            if isinstance(m, (ModulesToSaveWrapper, trainable_tokens.TrainableTokensWrapper))]


def prefixes(config) -> tuple:
    """(prefix of the method's keys, prefix of the side entries) on disk, HF PEFT's: prompt learning
    methods write their own keys bare and the heads under ``base_model.``."""
    return ("", "base_model.") if config.is_prompt_learning else (PREFIX, PREFIX)


def embedding_is_targeted(model: nn.Module, config) -> bool:
    tm = getattr(config, "target_modules", None)
    if isinstance(tm, str) and tm != "all-linear":
        return any(re.fullmatch(tm, k) for k, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    if tm and not isinstance(tm, str):
        return any(k in tm for k in EMBEDDING_LAYER_NAMES)
    return False


def _embedding_layers(model: nn.Module) -> list:
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            layer = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            layer = None
        if layer is not None:
            out.append(layer)
    return out


def _module_name(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module), None)


def embedding_entries(model: nn.Module, config) -> dict:
    """HF PEFT's ``save_embedding_layers`` entries: the base weights of the input / output embeddings
    (of a LoRA-wrapped embedding: its ``base_layer``; of an untargeted, resized one: the layer)."""
    targeted = embedding_is_targeted(model, config)
    out = {}
    for layer in _embedding_layers(model):
        base = getattr(layer, "base_layer", None)
        module = base if isinstance(base, nn.Module) else (None if targeted else layer)
        name = _module_name(model, module) if module is not None else None
        if name:
            out.update({f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return out


def embedding_candidates(model: nn.Module) -> dict:
    """On-disk key -> base parameter of every embedding weight an adapter file may carry."""
    out = {}
    for layer in _embedding_layers(model):
        base = getattr(layer, "base_layer", None)
        for module in (layer, base if isinstance(base, nn.Module) else None):
            name = _module_name(model, module) if module is not None else None
            if name and not hasattr(module, "adapter_layer_names"):
                out.update({f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return out


def _resolve_save_embeddings(model: nn.Module, config, value) -> bool:
    if value != "auto":
        return bool(value)
    tokens = getattr(config, "trainable_token_indices", None) is not None
    if embedding_is_targeted(model, config) and not tokens:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      stacklevel=4)
        return True
    return _vocab_resized(model, config)


def _vocab_resized(model: nn.Module, config) -> bool:
    """HF PEFT's check for a resized vocabulary, against the base model's local ``config.json``."""
    import json
    import os
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    path = getattr(config, "base_model_name_or_path", None) or \
        getattr(getattr(model, "config", None), "_name_or_path", None)
    file = os.path.join(path, "config.json") if path else None
    if not vocab or not file or not os.path.isfile(file):
        return False
    try:
        with open(file, encoding="utf-8") as f:
            base_vocab = json.load(f).get("vocab_size")
    except (OSError, ValueError):
        return False
    if base_vocab is not None and base_vocab != vocab:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", stacklevel=5)
        return True
    return False


def adapter_entries(model: nn.Module, tuner, config, adapter_name: str, save_embedding_layers="auto") -> tuple:
    """(the method's entries, side entries) of ``adapter_name``: on-disk keys relative to ``model`` (no
    prefix) -> the live tensors."""
    own = tuner.adapter_state_dict(model, adapter_name, config=config)
    side = {}
    for key, w in aux_wrappers(model):
        side.update({f"{key}.{k}": v for k, v in w.adapter_entries(adapter_name).items()})
    if not config.is_prompt_learning and _resolve_save_embeddings(model, config, save_embedding_layers):
        side.update(embedding_entries(model, config))
    return own, side


def split_side_entries(model: nn.Module, config, adapter_name: str, state: dict, side_prefix: str,
                       legacy_prefix: Optional[str] = None) -> tuple:
    """Take the side entries out of ``state`` (on-disk keys, ``side_prefix`` included): returns
    ``([(live tensor, loaded tensor)], problems)``; a missing head tensor or a shape mismatch is a problem."""
    side, problems = [], []

    def take(key):
        for p in (side_prefix, legacy_prefix):
            if p is not None and p + key in state:
                return state.pop(p + key)
        return None

    for path, w in aux_wrappers(model):
        for k, live in w.adapter_entries(adapter_name).items():
            v = take(f"{path}.{k}")
            if v is None:
                problems.append(f"missing key {side_prefix}{path}.{k!r} ({type(w).__name__})")
            elif tuple(v.shape) != tuple(live.shape):
                problems.append(f"{side_prefix}{path}.{k}: checkpoint shape {tuple(v.shape)} vs model "
                                f"{tuple(live.shape)}")
            else:
                side.append((live, v))
    if not config.is_prompt_learning:
        for key, live in embedding_candidates(model).items():
            v = take(key)
            if v is None:
                continue
            if tuple(v.shape) != tuple(live.shape):
                problems.append(f"{side_prefix}{key}: the file's embedding weight has shape {tuple(v.shape)}, the "
                                f"model's {tuple(live.shape)}: resize the base model's token embeddings "
                                f"(model.resize_token_embeddings({v.shape[0]})) before loading")
            else:
                side.append((live, v))
    return side, problems


@torch.no_grad()
def copy_side_entries(side: list) -> None:
    for live, v in side:
        live.copy_(v.to(device=live.device, dtype=live.dtype))


def _memory_names(root: nn.Module) -> dict:
    """Storage identity -> state_dict key of ``root`` (to name a tensor the way ``root.state_dict()`` does)."""
    out = {}
    for k, t in root.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.numel():
            out.setdefault(_ident(t), k)
    return out


def _ident(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def take_from_state_dict(root: nn.Module, out: dict, state_dict: dict) -> dict:
    """``out`` (on-disk key -> live tensor) with each value replaced by the entry of ``state_dict`` (a full
    model state dict, keys as ``root.state_dict()``) for the same tensor (HF's ``state_dict=`` argument)."""
    names = _memory_names(root)
    res = {}
    for k, t in out.items():
        name = names.get(_ident(t))
        if name is None or name not in state_dict:
            raise KeyError(f"state_dict: no entry for {k!r} (model key {name!r})")
        res[k] = state_dict[name]
    return res


# -- conversions ----------------------------------------------------------------------------------
def convert_to_plain_lora(sd: dict, config, path: str) -> tuple:
    """HF PEFT's ``path_initial_model_for_weight_conversion``: ``W_res + s B A = W + s [B, -B0] [A; A0]``,
    so a PiSSA / OLoRA adapter (A, B; initial A0, B0 saved at ``path``) is the plain LoRA adapter of rank 2r
    ``([A; A0], [B, -B0])`` with ``lora_alpha`` doubled (same scaling) on the unchanged base weight."""
    from .checkpoint import load_adapter_weights
    if str(config.peft_type).upper() != "LORA":
        raise ValueError("path_initial_model_for_weight_conversion: only LoRA adapters can be converted")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion: not supported with use_rslora together with "
                         "rank_pattern / alpha_pattern (as in HF PEFT)")
    if getattr(config, "use_dora", False):
        raise ValueError("path_initial_model_for_weight_conversion: DoRA adapters cannot be converted")
    init = load_adapter_weights(path)
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            if k not in init:
                raise ValueError(f"path_initial_model_for_weight_conversion: {path!r} has no {k!r}; it must be the "
                                 "adapter saved right after initialisation")
            out[k] = torch.cat([v, init[k].to(v)], 0) if ".lora_A." in k else torch.cat([v, -init[k].to(v)], 1)
        else:
            out[k] = v
    cfg = copy.deepcopy(config)
    cfg.init_lora_weights = True
    cfg.r *= 2
    cfg.lora_alpha = cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2)
    cfg.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: 2 * v for k, v in (cfg.alpha_pattern or {}).items()}
    return out, cfg


def auto_mapping(model: nn.Module) -> dict:
    """HF PEFT's ``auto_mapping`` for an adapter without ``task_type`` (read by ``AutoPeftModel``)."""
    cls = type(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def apply_key_mapping(state: dict, mapping: Optional[dict]) -> dict:
    """HF PEFT's ``key_mapping``: each key, without ``base_model.model.``, goes through the first regex of
    ``mapping`` that matches it (``re.subn``), then gets its prefix back."""
    if not mapping:
        return state
    out = {}
    for k, v in state.items():
        has = k.startswith(PREFIX)
        key = k[len(PREFIX):] if has else k
        for pattern, repl in mapping.items():
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[(PREFIX if has else "") + key] = v
    return out


# -- HF PEFT's functions --------------------------------------------------------------------------
def _split(model):
    """(root, wrapped model, key prefix of the method's entries, of side entries, is a PeftModel)."""
    from .peft_model import PeftModel
    if isinstance(model, PeftModel):
        return model, model._model, True
    if not isinstance(getattr(model, "peft_config", None), dict):
        raise TypeError(f"model: expected a fastpeft PeftModel or a model given adapters by "
                        f"fastpeft.inject_adapter_in_model, got {type(model).__name__}")
    return model, model, False


def get_peft_model_state_dict(model, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict:
    """The tensors of adapter ``adapter_name`` under their on-disk keys (HF PEFT's function): what
    ``save_pretrained`` writes.  ``state_dict``: take the values from this full model state dict."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    root, inner, is_peft = _split(model)
    if adapter_name not in root.peft_config:
        raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; the model has {list(root.peft_config)}")
    if is_peft:
        return root.get_adapter_state_dict(adapter_name, save_embedding_layers=save_embedding_layers,
                                           state_dict=state_dict)
    cfg = root.peft_config[adapter_name]
    own, side = adapter_entries(inner, get_tuner(cfg.peft_type), cfg, adapter_name, save_embedding_layers)
    if not own and not side:
        raise ValueError(f"adapter {adapter_name!r}: no fastpeft adapter layer holds it (adapters injected by HF "
                         "PEFT are read with peft.get_peft_model_state_dict)")
    out = {k: v.detach() for k, v in {**own, **side}.items()}
    return take_from_state_dict(root, out, state_dict) if state_dict is not None else out


@torch.no_grad()
def set_peft_model_state_dict(model, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False,
                              allow_nonfinite: bool = False):
    """Load on-disk keys (as :func:`get_peft_model_state_dict` gives them) into adapter ``adapter_name``
    of ``model`` (HF PEFT's function, lenient like it): returns ``(missing_keys, unexpected_keys)`` named
    as in ``model.state_dict()``.  Tensors must be floating point and finite (``allow_nonfinite``: warn
    instead); a shape mismatch raises unless ``ignore_mismatched_sizes`` (then the entry is skipped with a
    warning)."""
    root, inner, is_peft = _split(model)
    if adapter_name not in root.peft_config:
        raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; the model has {list(root.peft_config)}")
    cfg = root.peft_config[adapter_name]
    own_prefix, side_prefix = prefixes(cfg) if is_peft else ("", "")
    state = dict(peft_model_state_dict)
    check_adapter_tensors(state, f"set_peft_model_state_dict (adapter {adapter_name!r})", allow_nonfinite)
    own, side = adapter_entries(inner, get_tuner(cfg.peft_type), cfg, adapter_name, save_embedding_layers=False)
    if not own and not side:
        raise ValueError(f"adapter {adapter_name!r}: no fastpeft adapter layer holds it (adapters injected by HF "
                         "PEFT are loaded with peft.set_peft_model_state_dict)")
    expected = {own_prefix + k: v for k, v in own.items()}
    expected.update({side_prefix + k: v for k, v in side.items()})
    if not cfg.is_prompt_learning:
        for k, v in embedding_candidates(inner).items():
            expected.setdefault(side_prefix + k, v)
    if not is_peft:  # HF: keys written by a PeftModel load into an injected model without the prefix
        state = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}
    names = _memory_names(root)
    mismatched, loaded = [], set()
    for k, v in state.items():
        live = expected.get(k)
        if live is None:
            continue
        if tuple(v.shape) != tuple(live.shape):
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(live.shape)}")
            continue
        live.copy_(v.to(device=live.device, dtype=live.dtype))
        loaded.add(k)
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(f"set_peft_model_state_dict: shape mismatches {mismatched[:10]} (pass "
                         "ignore_mismatched_sizes=True to skip them)")
    if mismatched:
        warnings.warn(f"set_peft_model_state_dict: skipped entries of another shape: {mismatched[:10]}", stacklevel=3)
    embedding_keys = {side_prefix + k for k in embedding_candidates(inner)} if not cfg.is_prompt_learning else set()
    missing = [names.get(_ident(v), k) for k, v in expected.items() if k not in loaded and k not in embedding_keys
               and not any(k == m.split(":")[0] for m in mismatched)]
    unexpected = [k for k in state if k not in expected]
    return IncompatibleKeys(missing, unexpected)


def inject_adapter_in_model(peft_config, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Add adapter ``adapter_name`` of ``peft_config`` to ``model`` in place and return ``model`` (HF PEFT's
    function: no ``PeftModel`` wrapper; ``model.peft_config`` records the adapters).  ``state_dict``: target
    exactly the modules this adapter state dict has weights for (HF: the targets come from the checkpoint).
    ``low_cpu_mem_usage`` is accepted (the adapter weights are created directly)."""
    from .peft_model import PeftModel
    from .tuners.base import as_fastpeft_config
    check_adapter_name(adapter_name)
    config = copy.deepcopy(as_fastpeft_config(peft_config))
    if state_dict is not None:
        config = _targets_from_state_dict(config, state_dict)
    existing = getattr(model, "peft_config", None)
    if isinstance(existing, dict) and adapter_name in existing:
        raise ValueError(f"adapter_name: the model already has an adapter {adapter_name!r}")
    if isinstance(existing, dict) and existing:
        other = next(iter(existing.values()))
        if get_tuner(other.peft_type).peft_type != get_tuner(config.peft_type).peft_type:
            raise ValueError(f"peft_config: the model holds {other.peft_type} adapters; cannot inject a "
                             f"{config.peft_type} adapter")
    PeftModel(model, config, adapter_name, autocast_adapter_dtype=False)  # injects into `model` in place
    configs = PeftConfigs(model, existing if isinstance(existing, dict) else {})
    configs[adapter_name] = config
    model.peft_config = configs
    return model


def _targets_from_state_dict(config, state_dict: dict):
    if config.is_prompt_learning or not hasattr(config, "target_modules"):
        return config
    names = set()
    for k in state_dict:
        k = k[len(PREFIX):] if k.startswith(PREFIX) else k
        m = re.match(r"(.+?)\.(lora_[A-Za-z_]+|ia3_l)(\.|$)", k)
        if m:
            names.add(m.group(1))
    if not names:
        raise ValueError("state_dict: no adapter weights (lora_* / ia3_l keys) to take the target modules from")
    config.target_modules = sorted(names)
    return config


__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model", "PeftConfigs",
           "expose_to_peft", "HUB_KWARGS", "EMBEDDING_LAYER_NAMES"]
