"""``PeftModel``: the wrapper returned by :func:`fastpeft.get_peft_model`.

Structure (and so ``state_dict`` keys) as HF PEFT's::

    PeftModel
      .base_model          TunerModel   (HF: LoraModel / IA3Model ...)
        .model             the user's model, with adapter layers injected in place

so a parameter's key is ``base_model.model.<module path>...`` and attribute access
(``.config``, ``.generate``, ...) falls through to the user's model.  The PEFT method
itself is a registered tuner (:mod:`fastpeft.tuners.registry`); ``modules_to_save`` (task heads
trained in full) is handled here for every method with PEFT's ``ModulesToSaveWrapper``
layout (``original_module`` + ``modules_to_save.<adapter>``; on disk
``base_model.model.<path>.<param>``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import types
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from .checkpoint import SAFETENSORS_NAME, load_adapter_weights, save_safetensors
from .tuners import get_tuner
from .tuners.base import PeftConfig, as_fastpeft_config

PREFIX = "base_model.model."
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy per adapter of a module (a task head); the original stays frozen."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name == self._active_adapter)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        self._active_adapter = adapter_name
        for k, m in self.modules_to_save.items():
            m.requires_grad_(k == adapter_name and not inference_mode)

    def _current(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._modules["original_module"], name)


class TunerModel(nn.Module):
    """``peft_model.base_model``: holds the user's model as ``.model`` (HF: ``LoraModel``)."""

    def __init__(self, model: nn.Module, peft_type: str):
        super().__init__()
        self.model = model
        self.peft_type = peft_type
        self.peft_config: dict[str, PeftConfig] = {}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)


def _matches_module(key: str, names) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


class PeftModel(nn.Module):
    """A model with one or more named adapters of one PEFT method (see module docstring)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        # Like HF PEFT: adapter weights created in fp16/bf16 (a half-precision base model)
        # are upcast to fp32, for stable optimiser updates.
        self._autocast_adapter_dtype = bool(autocast_adapter_dtype)
        peft_config = as_fastpeft_config(peft_config)
        if isinstance(model, PeftModel):
            raise TypeError("model: already a fastpeft PeftModel; use add_adapter to add another adapter")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty str without dots, got {adapter_name!r}")
        self._tuner = get_tuner(peft_config.peft_type)
        self.base_model = TunerModel(model, self._tuner.peft_type)
        self.active_adapter = adapter_name
        self._add(adapter_name, peft_config)
        self._set_active([adapter_name])
        self._expose_forward_signature(model)

    def _expose_forward_signature(self, model: nn.Module) -> None:
        """Give ``forward`` the wrapped model's signature, so tools that inspect it (HF
        ``Trainer`` dropping unused dataset columns) see the real argument names."""
        try:
            sig = inspect.signature(type(model).forward)
        except (TypeError, ValueError):
            return

        def forward(self_, *args, **kwargs):
            return self_._run(*args, **kwargs)

        forward.__signature__ = sig
        forward.__doc__ = type(model).forward.__doc__
        self.forward = types.MethodType(forward, self)

    # -- attribute forwarding ---------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_tuner"):
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def peft_config(self) -> dict:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return list(a) if isinstance(a, (list, tuple)) else [a]

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def _model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def _run(self, *args, adapter_names: Optional[list] = None, **kwargs):
        """Forward; ``adapter_names`` (one adapter name, or ``"__base__"``, per batch row)
        runs a mixed-adapter batch (inference only), as in HF PEFT."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        if self.training:
            raise ValueError("adapter_names: mixed-adapter batches are for inference; call model.eval() first")
        unknown = sorted({a for a in adapter_names if a != "__base__" and a not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        if self._mts_wrappers():
            raise NotImplementedError("adapter_names: fastpeft does not run mixed-adapter batches through "
                                      "modules_to_save heads yet")
        from .tuners.lora import LoraLayer
        names = list(adapter_names)

        def hook(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.modules()
                   if isinstance(m, LoraLayer)]
        if not handles:
            raise ValueError(f"adapter_names: mixed-adapter batches are supported for LoRA only, not "
                             f"{self._tuner.peft_type}")
        try:
            return self.base_model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def generate(self, *args, **kwargs):
        return self.base_model.model.generate(*args, **kwargs)

    # -- adapters -----------------------------------------------------------------------
    def _modules_to_save_names(self, config: PeftConfig) -> list[str]:
        names = list(config.modules_to_save or [])
        task = str(config.task_type or "").upper()
        for head in _TASK_HEADS.get(task, ()):
            if head not in names and any(_matches_module(k, [head]) for k, _ in self._model.named_modules()):
                names.append(head)
        return names

    def _add(self, adapter_name: str, config: PeftConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
        if get_tuner(config.peft_type).peft_type != self._tuner.peft_type:
            raise ValueError(f"peft_config: this model holds {self._tuner.peft_type} adapters; cannot add a "
                             f"{config.peft_type} adapter to it")
        model = self._model
        touched = self._tuner.inject(model, config, adapter_name)
        wrapped = []
        try:
            mts = self._modules_to_save_names(config)
            if mts:
                found = False
                for key, module in list(model.named_modules()):
                    if not _matches_module(key, mts) or ".modules_to_save." in f".{key}." \
                            or ".original_module." in f".{key}.":
                        continue
                    found = True
                    if isinstance(module, ModulesToSaveWrapper):
                        module.update(adapter_name)
                        wrapped.append((key, module, False))
                    else:
                        parent, child = _parent(model, key)
                        w = ModulesToSaveWrapper(module, adapter_name)
                        setattr(parent, child, w)
                        wrapped.append((key, w, True))
                if not found:
                    warnings.warn(f"modules_to_save={mts}: no module of the model has such a name", stacklevel=3)
                if config.modules_to_save is not None or mts:
                    config.modules_to_save = mts
        except Exception:
            self._undo_modules_to_save(wrapped, adapter_name)
            if self._tuner.remove is not None:
                self._tuner.remove(model, adapter_name, unwrap_empty=True)
            raise
        self.peft_config[adapter_name] = config
        self.base_model.targeted_module_names = touched
        if self._autocast_adapter_dtype:
            cast_adapter_dtype(model, adapter_name)

    def _undo_modules_to_save(self, wrapped, adapter_name):
        model = self._model
        for key, w, created in reversed(wrapped):
            if created:
                parent, child = _parent(model, key)
                setattr(parent, child, w.original_module)
            elif adapter_name in w.modules_to_save:
                del w.modules_to_save[adapter_name]

    def _mts_wrappers(self):
        return [(k, m) for k, m in self._model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    def _set_active(self, names: list[str]) -> None:
        inference = all(self.peft_config[n].inference_mode for n in names)
        if self._tuner.set_adapter is not None:
            self._tuner.set_adapter(self._model, names, inference_mode=inference)
        elif len(self.peft_config) > 1:
            raise NotImplementedError(f"{self._tuner.peft_type}: switching between several adapters is not "
                                      "supported by this method")
        for key, w in self._mts_wrappers():
            present = [n for n in names if n in w.modules_to_save]
            if len(present) > 1:
                raise ValueError(f"set_adapter: adapters {present} each have their own copy of {key} "
                                 "(modules_to_save); only one of them can be active at a time")
        for _, w in self._mts_wrappers():
            present = [n for n in names if n in w.modules_to_save]
            w.set_adapter(present[0] if present else names[0], inference_mode=inference)
        self.active_adapter = names[0] if len(names) == 1 else list(names)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a new (inactive) adapter; ``set_adapter`` activates it."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty str without dots, got {adapter_name!r}")
        active = self.active_adapters
        self._add(adapter_name, as_fastpeft_config(peft_config))
        self._set_active(active)

    def set_adapter(self, adapter_name: Union[str, list]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"adapter_name: unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self._set_active(names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter.  As in HF PEFT, an adapter layer left without adapters stays in
        place (it then runs its base layer only), so state_dict keys match PEFT's."""
        self._delete(adapter_name, unwrap_empty=False)

    def _delete(self, adapter_name: str, unwrap_empty: bool) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this model has "
                             f"{list(self.peft_config)}")
        if self._tuner.remove is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: deleting an adapter is not supported")
        if self._tuner.unmerge is not None:
            self._tuner.unmerge(self._model)
        self._tuner.remove(self._model, adapter_name, unwrap_empty=unwrap_empty)
        for key, w in self._mts_wrappers():
            if adapter_name in w.modules_to_save:
                del w.modules_to_save[adapter_name]
            if len(w.modules_to_save) == 0:
                parent, child = _parent(self._model, key)
                setattr(parent, child, w.original_module)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self._set_active(remaining)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: run the base model without any adapter (and original heads)."""
        if self._tuner.enable_adapters is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: disabling adapters is not supported")
        wrappers = self._mts_wrappers()
        self._tuner.enable_adapters(self._model, False)
        for _, w in wrappers:
            w._disable_adapters = True
        try:
            yield
        finally:
            self._tuner.enable_adapters(self._model, True)
            for _, w in wrappers:
                w._disable_adapters = False

    # -- merging ------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if self._tuner.merge is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: merging is not supported")
        self._tuner.merge(self._model, adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        if self._tuner.unmerge is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: unmerging is not supported")
        self._tuner.unmerge(self._model)

    def _unload(self, merge: bool, adapter_names=None, safe_merge: bool = False) -> nn.Module:
        if self._tuner.remove is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: unloading is not supported")
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        elif self._tuner.unmerge is not None:
            self._tuner.unmerge(self._model)
        model = self._model
        for name in list(self.peft_config):
            self._tuner.remove(model, name, unwrap_empty=True)
        for key, w in self._mts_wrappers():
            parent, child = _parent(model, key)
            setattr(parent, child, w._current() if merge else w.original_module)
        self.peft_config.clear()
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Fold the active adapters into the base weights and return the plain model."""
        return self._unload(True, adapter_names, safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerged) and return the plain model."""
        return self._unload(False)

    # -- parameters -----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    # -- state dicts ------------------------------------------------------------------
    def get_adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict:
        """The adapter's tensors under HF PEFT's on-disk keys (what ``save_pretrained`` writes)."""
        adapter_name = adapter_name or self.active_adapters[0]
        cfg = self.peft_config[adapter_name]
        sd = self._tuner.adapter_state_dict(self._model, adapter_name, config=cfg)
        prefix = "" if cfg.is_prompt_learning else PREFIX
        out = {prefix + k: v for k, v in sd.items()}
        for key, w in self._mts_wrappers():
            if adapter_name in w.modules_to_save:
                for k, v in w.modules_to_save[adapter_name].state_dict().items():
                    out[f"{PREFIX}{key}.{k}"] = v.detach()
        return out

    def load_adapter_state_dict(self, state: dict, adapter_name: str) -> None:
        """Load on-disk keys (as ``get_adapter_state_dict`` gives them) into ``adapter_name``.
        Validates everything first; the model is unchanged when it raises."""
        cfg = self.peft_config[adapter_name]
        state = dict(state)
        mts_loads = []
        problems = []
        for key, w in self._mts_wrappers():
            if adapter_name not in w.modules_to_save:
                continue
            target = w.modules_to_save[adapter_name].state_dict()
            sub = {}
            for k, p in target.items():
                disk = f"{PREFIX}{key}.{k}"
                if disk not in state:
                    problems.append(f"missing key {disk!r} (modules_to_save)")
                elif tuple(state[disk].shape) != tuple(p.shape):
                    problems.append(f"{disk}: checkpoint shape {tuple(state[disk].shape)} vs model "
                                    f"{tuple(p.shape)}")
                else:
                    sub[k] = state.pop(disk)
            mts_loads.append((w.modules_to_save[adapter_name], sub))
        if problems:
            raise ValueError(f"adapter {adapter_name!r} does not match the model: " + "; ".join(problems))
        if not cfg.is_prompt_learning:
            bad = sorted(k for k in state if not k.startswith(PREFIX))
            if bad:
                raise ValueError(f"adapter {adapter_name!r}: unexpected keys {bad[:10]} (expected keys starting "
                                 f"with {PREFIX!r})")
            state = {k[len(PREFIX):]: v for k, v in state.items()}
        self._tuner.load_adapter_state_dict(self._model, state, adapter_name, config=cfg)
        for module, sub in mts_loads:
            module.load_state_dict(sub, strict=False)

    # -- files ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter (HF PEFT's
        layout: the ``default`` adapter in ``save_directory``, others in ``save_directory/<name>``)."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: fastpeft writes safetensors only (no pickle files)")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory!r} is a file, expected a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters: unknown adapter(s) {unknown}; this model has "
                             f"{list(self.peft_config)}")
        for name in names:
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out_dir, exist_ok=True)
            sd = self.get_adapter_state_dict(name)
            save_safetensors(sd, os.path.join(out_dir, SAFETENSORS_NAME), metadata={"format": "pt"})
            cfg = copy.deepcopy(self.peft_config[name])
            if cfg.base_model_name_or_path is None:
                mc = getattr(self._model, "config", None)
                cfg.base_model_name_or_path = getattr(mc, "_name_or_path", None) or None
            cfg.inference_mode = True
            cfg.save_pretrained(out_dir)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False) -> None:
        """Add adapter ``adapter_name`` from a directory saved by fastpeft or HF PEFT."""
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        state = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        active = self.active_adapters
        self._add(adapter_name, config)
        try:
            self.load_adapter_state_dict(state, adapter_name)
        except Exception:
            self._delete(adapter_name, unwrap_empty=True)
            raise
        self._set_active(active)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        allow_pickle: bool = False, autocast_adapter_dtype: bool = True,
                        **kwargs) -> "PeftModel":
        """Load an adapter saved by fastpeft or HF PEFT onto ``model``.  ``model`` is left
        unchanged if the files do not match it."""
        if config is None:
            config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        state = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        pm = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            pm.load_adapter_state_dict(state, adapter_name)
        except Exception:
            pm.unload()
            raise
        if not is_trainable:
            pm.eval()
        return pm


_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def cast_adapter_dtype(model: nn.Module, adapter_name: str) -> None:
    """Upcast the fp16/bf16 weights of adapter ``adapter_name`` to fp32, as HF PEFT does by
    default (``autocast_adapter_dtype=True``): on a half-precision model the adapter then
    trains in fp32 and the fused LoRA op computes in the activation dtype."""
    for module in model.modules():
        if not hasattr(module, "adapter_layer_names"):
            continue
        for sub in module.modules():
            if not isinstance(sub, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in sub:
                continue
            item = sub[adapter_name]
            if isinstance(item, nn.Parameter):
                if item.dtype in _UPCAST_DTYPES:
                    sub[adapter_name] = nn.Parameter(item.data.float(), requires_grad=item.requires_grad)
            else:
                for p in item.parameters():
                    if p.dtype in _UPCAST_DTYPES:
                        p.data = p.data.float()


def _parent(model: nn.Module, key: str):
    if "." in key:
        p, c = key.rsplit(".", 1)
        return model.get_submodule(p), c
    return model, key


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    pass


__all__ = ["PeftModel", "TunerModel", "ModulesToSaveWrapper", "PeftModelForCausalLM",
           "PeftModelForSequenceClassification"]
