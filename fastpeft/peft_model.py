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

Recognised by transformers' ``Trainer``, TRL and accelerate as a PEFT model: ``PeftModel(model, ...)``
(and so ``get_peft_model``) returns an instance of :func:`wrapper_class` ``(PeftModel, type(model))``, a
subclass made once per wrapped model class.

* Its ``forward`` carries the wrapped model's signature: ``Trainer`` finds ``labels`` with
  ``find_labels(model.__class__)`` and drops unused dataset columns by that signature.
* Where HF PEFT is installed (and transformers or peft imported, as ``Trainer`` and TRL import them),
  it is also a subclass of ``peft.PeftModel``: the ``isinstance`` test by which ``Trainer`` takes
  labels from ``get_base_model()``, writes adapter-only checkpoints with ``save_pretrained`` and
  restores the best one / resumes with ``load_adapter``, TRL patches ``get_base_model()`` (whose
  ``.base_model`` is the transformers backbone), and accelerate tells a PEFT model.  Nothing of
  HF PEFT's class is inherited: every name it defines that fastpeft does not reads as missing
  (:class:`_NotInherited`), so attribute access falls through to the wrapped model exactly as without
  HF PEFT.
* Without HF PEFT, ``Trainer`` and TRL know no PEFT model: the signature still gives labels and
  columns, but checkpoints hold the full ``state_dict`` (``fastpeft[peft]`` gives adapter checkpoints).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from ._optional import peft_model_cls
from . import mixed_batch
from . import state_dict as sdf
from .adapter_io import check_adapter_name, check_adapter_tensors, replace_adapter_dir
from .checkpoint import SAFETENSORS_NAME, load_adapter_weights, save_safetensors
from .tuners import get_tuner
from .tuners import trainable_tokens
from .tuners.base import PeftConfig, as_fastpeft_config, task_type_of

PREFIX = "base_model.model."
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}
# Attributes never looked up on the wrapped model: its Hub writers would upload / save the full base model.
_NOT_FORWARDED = frozenset({"_upload_modified_files", "_create_repo", "_get_files_timestamps", "create_model_card"})
# keyword arguments of from_pretrained / load_adapter besides the named ones
_LOAD_KWARGS = ("subfolder", "torch_device", "allow_pickle", "allow_nonfinite") + sdf.HUB_KWARGS


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
        names = mixed_batch.current_adapter_names()
        if names is not None and not self._disable_adapters:  # each adapter's head on its rows
            return mixed_batch.mixed_heads_forward(self, names, args, kwargs)
        return self._current()(*args, **kwargs)

    def enable(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def adapters(self) -> list:
        return list(self.modules_to_save)

    def adapter_entries(self, adapter_name: str) -> dict:
        """On-disk entries (relative to this module, HF PEFT's keys) of ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    # HF PEFT's AuxiliaryTrainingWrapper interface (peft.get_peft_model_state_dict / set_peft_model_state_dict)
    def adapter_state_dict(self, adapter_name: str, state_dict: dict) -> dict:
        return {k: state_dict[f"modules_to_save.{adapter_name}.{k}"] for k in self.adapter_entries(adapter_name)}

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict:
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.adapter_entries(adapter_name)}

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
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
        self.peft_config: dict[str, PeftConfig] = sdf.PeftConfigs(model)

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

    def __new__(cls, model=None, *args, **kwargs):
        if isinstance(model, nn.Module) and "_fastpeft_wraps" not in cls.__dict__:
            cls = wrapper_class(cls, type(model))
        return super(PeftModel, cls).__new__(cls)

    def __reduce_ex__(self, protocol):
        # pickle / deepcopy: rebuild the wrapper class from the two real classes it is made of
        made = type(self)
        base = next(c for c in made.__mro__ if "_fastpeft_wraps" not in c.__dict__)
        return _new_wrapped, (base, made.__dict__.get("_fastpeft_wraps")), self.__getstate__()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        nn.Module.__init__(self)  # not super(): with HF PEFT installed, peft.PeftModel is next in the MRO
        # Like HF PEFT: adapter weights created in fp16/bf16 (a half-precision base model)
        # are upcast to fp32, for stable optimiser updates.
        self._autocast_adapter_dtype = bool(autocast_adapter_dtype)
        # low_cpu_mem_usage (HF: adapter weights first created on the meta device) is accepted: fastpeft creates
        # the (small) adapter weights directly; the model is the same once the weights are loaded.
        peft_config = as_fastpeft_config(peft_config)
        if isinstance(model, PeftModel):
            raise TypeError("model: already a fastpeft PeftModel; use add_adapter to add another adapter")
        check_adapter_name(adapter_name)
        self._tuner = get_tuner(peft_config.peft_type)
        self.base_model = TunerModel(model, self._tuner.peft_type)
        self.active_adapter = adapter_name
        self._add(adapter_name, peft_config)
        self._set_active([adapter_name])

    # -- attribute forwarding ---------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            pass
        base = self.__dict__.get("_modules", {}).get("base_model")
        if base is not None and name not in ("base_model", "_tuner") and name not in _NOT_FORWARDED:
            try:
                return getattr(base, name)
            except AttributeError:
                pass
        inner = type(base.model).__name__ if base is not None and "model" in base._modules else "?"
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' (nor has the wrapped "
                             f"{inner})")

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
        """Forward; ``adapter_names`` (one adapter name, or ``"__base__"``, per sequence) runs a
        mixed-adapter batch (inference only, no autograd), as in HF PEFT; see :mod:`fastpeft.mixed_batch`."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list] = None, **kwargs):
        """transformers' ``generate``; ``adapter_names`` (one per prompt, ``"__base__"`` for the base model)
        generates each prompt with its own adapter in one batch (beam search and ``num_return_sequences``
        included)."""
        if adapter_names is None:
            return self.base_model.model.generate(*args, **kwargs)
        with self._mixed(adapter_names, args, kwargs):
            return self.base_model.model.generate(*args, **kwargs)

    def _mixed(self, adapter_names, args, kwargs):
        """The checked :func:`fastpeft.mixed_batch.mixed_adapters` context of a mixed-adapter call."""
        names = mixed_batch.check_adapter_names(adapter_names, self.peft_config,
                                                mixed_batch.batch_size_of(args, kwargs))
        if self.training:
            raise ValueError("adapter_names: mixed-adapter batches are for inference; call model.eval() first")
        if self._tuner.peft_type != "LORA":
            raise ValueError(f"adapter_names: mixed-adapter batches are supported for LoRA only, not "
                             f"{self._tuner.peft_type}")
        if trainable_tokens.wrappers(self._model):
            raise NotImplementedError("adapter_names: mixed-adapter batches with trainable_token_indices "
                                      "adapters are not supported")
        return mixed_batch.mixed_adapters(names)

    def list_adapters(self) -> list[str]:
        """The names of the loaded adapters, in load order (``"__base__"``, the base model alone, is not one)."""
        return list(self.peft_config)

    # -- adapters -----------------------------------------------------------------------
    def _modules_to_save_names(self, config: PeftConfig) -> list[str]:
        names = list(config.modules_to_save or [])
        task = task_type_of(config)
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
        mts = self._modules_to_save_names(config)
        if mts:  # heads trained in full are never adapter targets (HF PEFT: modules_to_save wins)
            config.modules_to_save = mts
        touched = self._tuner.inject(model, config, adapter_name)
        wrapped, tokens = [], []
        try:
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
            if getattr(config, "trainable_token_indices", None) is not None:
                tokens = trainable_tokens.apply(model, config.trainable_token_indices, adapter_name)
        except Exception:
            trainable_tokens.undo(model, tokens, adapter_name)
            self._undo_modules_to_save(wrapped, adapter_name)
            if self._tuner.remove is not None:
                self._tuner.remove(model, adapter_name, unwrap_empty=True)
            raise
        self.peft_config[adapter_name] = config
        self.base_model.targeted_module_names = touched
        if self._autocast_adapter_dtype:
            cast_adapter_dtype(model, adapter_name)
        sdf.expose_to_peft(model)

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

    def _aux_wrappers(self):
        """modules_to_save and trainable-token wrappers: (path, wrapper)."""
        return sdf.aux_wrappers(self._model)

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
        for _, w in trainable_tokens.wrappers(self._model):
            w.set_adapter(names, inference_mode=inference)
        self.active_adapter = names[0] if len(names) == 1 else list(names)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new (inactive) adapter; ``set_adapter`` activates it."""
        check_adapter_name(adapter_name)
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
        for key, w in trainable_tokens.wrappers(self._model):
            w.token_adapter.delete_adapter(adapter_name)
            if not w.tied and not w.adapters():
                trainable_tokens.undo(self._model, [(key, w, True)], adapter_name)
        for key, w in trainable_tokens.wrappers(self._model):  # tied layers whose source went away
            if w.tied and not w.adapters():
                trainable_tokens.undo(self._model, [(key, w, True)], adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self._set_active(remaining)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: run the base model without any adapter (and original heads)."""
        if self._tuner.enable_adapters is None:
            raise NotImplementedError(f"{self._tuner.peft_type}: disabling adapters is not supported")
        wrappers = self._aux_wrappers()
        self._tuner.enable_adapters(self._model, False)
        for _, w in wrappers:
            w.enable(False)
        try:
            yield
        finally:
            self._tuner.enable_adapters(self._model, True)
            for _, w in wrappers:
                w.enable(True)

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
        for key, w in trainable_tokens.wrappers(model):
            t = w.token_adapter
            if merge and not w.tied:
                t.merge([a for a in (adapter_names or t.active_adapters)])
            parent, child = _parent(model, key)
            setattr(parent, child, w.original_module)
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
    def get_adapter_state_dict(self, adapter_name: Optional[str] = None, save_embedding_layers="auto",
                               state_dict: Optional[dict] = None) -> dict:
        """The adapter's tensors under HF PEFT's on-disk keys (what ``save_pretrained`` writes):
        the method's weights, ``modules_to_save`` heads, trainable token rows and, with
        ``save_embedding_layers`` (HF's rule for ``"auto"``: the embedding layers are targeted), the base
        embedding weights.  ``state_dict`` (HF: a full model state dict, e.g. gathered by DeepSpeed): take the
        values from it instead of the model."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        cfg = self.peft_config[adapter_name]
        own_prefix, side_prefix = sdf.prefixes(cfg)
        own, side = sdf.adapter_entries(self._model, self._tuner, cfg, adapter_name, save_embedding_layers)
        out = {own_prefix + k: v.detach() for k, v in own.items()}
        out.update({side_prefix + k: v.detach() for k, v in side.items()})
        if state_dict is not None:
            out = sdf.take_from_state_dict(self, out, state_dict)
        return out

    def load_adapter_state_dict(self, state: dict, adapter_name: str, allow_nonfinite: bool = False) -> None:
        """Load on-disk keys (as ``get_adapter_state_dict`` gives them) into ``adapter_name``.
        Validates everything first (key set, shapes, floating dtypes, finite values unless
        ``allow_nonfinite``); the model is unchanged when it raises."""
        cfg = self.peft_config[adapter_name]
        state = dict(state)
        check_adapter_tensors(state, f"adapter {adapter_name!r}", allow_nonfinite=allow_nonfinite)
        _, side_prefix = sdf.prefixes(cfg)
        # (earlier fastpeft versions wrote the heads of prompt-learning adapters under base_model.model.: still read)
        side, problems = sdf.split_side_entries(self._model, cfg, adapter_name, state, side_prefix,
                                                legacy_prefix=PREFIX if cfg.is_prompt_learning else None)
        if problems:
            raise ValueError(f"adapter {adapter_name!r} does not match the model: " + "; ".join(problems))
        if not cfg.is_prompt_learning:
            bad = sorted(k for k in state if not k.startswith(PREFIX))
            if bad:
                raise ValueError(f"adapter {adapter_name!r}: unexpected keys {bad[:10]} (expected keys starting "
                                 f"with {PREFIX!r})")
            state = {k[len(PREFIX):]: v for k, v in state.items()}
        self._tuner.load_adapter_state_dict(self._model, state, adapter_name, config=cfg)
        sdf.copy_side_entries(side)

    # -- files ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter (HF PEFT's layout:
        the ``default`` adapter in ``save_directory``, others in ``save_directory/<name>``) and a model
        card (``README.md``, unless there is one).

        The new directory is built next to the old one and replaces it in one rename (files of the old
        directory that this save does not write are kept): a failure leaves the previous adapter intact.
        Nothing is written unless ``is_main_process``.  ``save_embedding_layers``: ``"auto"`` (the base
        embedding weights when an embedding layer is targeted), True or False, as HF PEFT.
        ``path_initial_model_for_weight_conversion``: the directory of a PiSSA / OLoRA adapter saved right
        after initialisation; the adapter is then written as an equivalent plain LoRA adapter of rank 2r
        that loads on the unchanged base model (HF PEFT's conversion)."""
        state_dict = kwargs.pop("state_dict", None)
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}")
        if not safe_serialization:
            raise ValueError("safe_serialization=False: fastpeft writes safetensors only (no pickle files)")
        if save_embedding_layers not in ("auto", True, False):
            raise ValueError(f"save_embedding_layers: expected 'auto', True or False, got {save_embedding_layers!r}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory!r} is a file, expected a directory")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters: unknown adapter(s) {unknown}; this model has "
                             f"{list(self.peft_config)}")
        for n in names:
            check_adapter_name(n, "selected_adapters")
        if not is_main_process:
            return
        outputs = []  # (relative directory, tensors, config, auto_mapping) -- all computed before writing
        for name in names:
            sd = self.get_adapter_state_dict(name, save_embedding_layers=save_embedding_layers,
                                             state_dict=state_dict)
            cfg = copy.deepcopy(self.peft_config[name])
            if cfg.base_model_name_or_path is None:
                mc = getattr(self._model, "config", None)
                cfg.base_model_name_or_path = getattr(mc, "_name_or_path", None) or None
            cfg.inference_mode = True
            if path_initial_model_for_weight_conversion is not None:
                sd, cfg = sdf.convert_to_plain_lora(sd, cfg, path_initial_model_for_weight_conversion)
            auto_mapping = None if cfg.task_type else sdf.auto_mapping(self._model)
            outputs.append(("" if name == "default" else name, sd, cfg, auto_mapping))
        from .hub import model_card, write_model_card
        first = self.peft_config[names[0]] if names else None
        card = model_card(getattr(first, "base_model_name_or_path", None) or
                          getattr(getattr(self._model, "config", None), "_name_or_path", None) or None,
                          self._tuner.peft_type, pipeline_tag="text-generation"
                          if isinstance(self, PeftModelForCausalLM) else None)
        with replace_adapter_dir(save_directory) as tmp:
            for rel, sd, cfg, auto_mapping in outputs:
                out_dir = os.path.join(tmp, rel)
                os.makedirs(out_dir, exist_ok=True)
                stale = os.path.join(out_dir, "adapter_model.bin")  # an older pickle would shadow nothing but
                if os.path.lexists(stale):                            # mislead: the new weights are safetensors
                    os.unlink(stale)
                save_safetensors(sd, os.path.join(out_dir, SAFETENSORS_NAME), metadata={"format": "pt"})
                cfg.save_pretrained(out_dir, auto_mapping_dict=auto_mapping)
            write_model_card(tmp, card)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write the model card ``README.md`` into ``output_dir`` (kept if one exists), as HF PEFT."""
        from .hub import model_card, write_model_card
        cfg = self.active_peft_config
        write_model_card(output_dir, model_card(cfg.base_model_name_or_path, self._tuner.peft_type))

    def push_to_hub(self, repo_id: str, use_temp_dir: Optional[bool] = None, commit_message: Optional[str] = None,
                    private: Optional[bool] = None, token=None, max_shard_size=None, create_pr: bool = False,
                    safe_serialization: bool = True, revision: Optional[str] = None,
                    commit_description: Optional[str] = None, tags=None, **kwargs):
        """Upload the adapter -- exactly the files ``save_pretrained`` writes, never the base model's
        weights -- to the Hugging Face Hub repository ``repo_id`` (created if missing).  Without
        ``huggingface_hub`` or a network it raises and uploads nothing.  ``selected_adapters`` /
        ``save_embedding_layers`` may be passed as for ``save_pretrained``; ``tags`` go into the model
        card; ``use_temp_dir`` and ``max_shard_size`` change nothing (one small weights file, written to a
        temporary directory)."""
        selected = kwargs.pop("selected_adapters", None)
        embeddings = kwargs.pop("save_embedding_layers", "auto")
        if kwargs:
            raise TypeError(f"push_to_hub() got unexpected keyword argument(s) {sorted(kwargs)}")
        from .hub import push_adapter
        return push_adapter(self, repo_id, commit_message=commit_message, private=private, token=token,
                            revision=revision, create_pr=create_pr, commit_description=commit_description,
                            safe_serialization=safe_serialization, selected_adapters=selected,
                            save_embedding_layers=embeddings, tags=tags)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: Optional[dict] = None, **kwargs) -> None:
        """Add adapter ``adapter_name`` from a directory (or Hub repository: ``subfolder``, ``revision``,
        ``cache_dir``, ``token``, ...) saved by fastpeft or HF PEFT.  ``allow_pickle`` loads an
        ``adapter_model.bin``; ``allow_nonfinite`` loads NaN / inf weights (with a warning).
        ``low_cpu_mem_usage`` is accepted (the adapter weights are created directly, then loaded).

        When the model already has ``adapter_name``, the directory's weights are loaded into it instead
        (as HF PEFT does; transformers' ``Trainer`` restores the best checkpoint and resumes this way): its
        config, its trainability and which adapters are active stay as they are, and a mismatching file
        changes nothing."""
        check_adapter_name(adapter_name)
        config, state, allow_nonfinite = _read_adapter(model_id, torch_device, ephemeral_gpu_offload, key_mapping,
                                                       getattr(self._model, "_checkpoint_conversion_mapping", None),
                                                       kwargs)
        if adapter_name in self.peft_config:
            have = self.peft_config[adapter_name].peft_type
            if get_tuner(config.peft_type).peft_type != get_tuner(have).peft_type:
                raise ValueError(f"model_id: {model_id!r} holds a {config.peft_type} adapter; adapter "
                                 f"{adapter_name!r} of this model is {have}")
            self.load_adapter_state_dict(state, adapter_name, allow_nonfinite=allow_nonfinite)
            return
        config.inference_mode = not is_trainable
        active = self.active_adapters
        autocast, self._autocast_adapter_dtype = self._autocast_adapter_dtype, bool(autocast_adapter_dtype)
        try:
            self._add(adapter_name, config)
        finally:
            self._autocast_adapter_dtype = autocast
        try:
            self.load_adapter_state_dict(state, adapter_name, allow_nonfinite=allow_nonfinite)
        except Exception:
            self._delete(adapter_name, unwrap_empty=True)
            raise
        self._set_active(active)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: Optional[dict] = None,
                        **kwargs) -> "PeftModel":
        """Load an adapter saved by fastpeft or HF PEFT onto ``model`` (HF PEFT's arguments; ``model_id``
        a directory or a Hub repository: ``subfolder``, ``revision``, ``cache_dir``, ``token``, ...;
        ``torch_device``; fastpeft's ``allow_pickle`` and ``allow_nonfinite``).  Unknown keyword arguments
        raise TypeError.  Called on :class:`PeftModel`, the result is the class of the adapter's
        ``task_type`` (``PeftModelForCausalLM``, ...), as in HF PEFT.  ``model`` is left unchanged if the
        files do not match it."""
        file_config, state, allow_nonfinite = _read_adapter(
            model_id, kwargs.pop("torch_device", None), ephemeral_gpu_offload, key_mapping,
            getattr(model, "_checkpoint_conversion_mapping", None), kwargs)
        if config is None:
            config = file_config
        elif not isinstance(config, PeftConfig):
            config = as_fastpeft_config(config)
        config.inference_mode = not is_trainable
        klass = cls
        if cls is PeftModel:
            klass = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type_of(config), PeftModel)
        pm = klass(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            pm.load_adapter_state_dict(state, adapter_name, allow_nonfinite=allow_nonfinite)
        except Exception:
            pm.unload()
            raise
        if not is_trainable:
            pm.eval()
        return pm

    # -- HF PEFT's other model methods ------------------------------------------------------
    def get_layer_status(self) -> list:
        """One :class:`fastpeft.status.TunerLayerStatus` per adapter layer (HF PEFT's ``get_layer_status``)."""
        from .status import get_layer_status
        return get_layer_status(self)

    def get_model_status(self):
        """A :class:`fastpeft.status.TunerModelStatus` (HF PEFT's ``get_model_status``)."""
        from .status import get_model_status
        return get_model_status(self)

    def add_weighted_adapter(self, adapters: list, weights: list, adapter_name: str, combination_type: str = "svd",
                             svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                             svd_full_matrices: bool = True, svd_driver: Optional[str] = None,
                             density: Optional[float] = None, majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (HF PEFT's method and
        ``combination_type`` values: svd, linear, cat, ties, ties_svd, dare_linear, dare_ties,
        dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)."""
        from .tuners.lora_weighted import add_weighted_adapter
        check_adapter_name(adapter_name)
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                             svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)


def _read_adapter(model_id, torch_device, ephemeral_gpu_offload, key_mapping, default_mapping, kwargs):
    """(config, on-disk state dict, allow_nonfinite) of an adapter directory / Hub repository; kwargs are
    from_pretrained's / load_adapter's extra keyword arguments (unknown ones raise TypeError)."""
    unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; fastpeft takes {sorted(_LOAD_KWARGS)} besides "
                        "the named arguments")
    if ephemeral_gpu_offload:
        raise ValueError("ephemeral_gpu_offload=True: fastpeft does not offload adapters (use HF PEFT for it)")
    allow_pickle = bool(kwargs.pop("allow_pickle", False))
    allow_nonfinite = bool(kwargs.pop("allow_nonfinite", False))
    kwargs.pop("torch_device", None)
    from .hub import resolve_adapter_dir
    path = resolve_adapter_dir(model_id, allow_pickle=allow_pickle, **kwargs)
    config = PeftConfig.from_pretrained(path)
    state = load_adapter_weights(path, allow_pickle=allow_pickle, device=torch_device or "cpu")
    state = sdf.apply_key_mapping(state, key_mapping if key_mapping is not None else default_mapping)
    return config, state, allow_nonfinite


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


# -- the class of a wrapper (see "Recognised by transformers" in the module doc) -------------
class _NotInherited:
    """A name HF PEFT's ``PeftModel`` defines and fastpeft's does not: reading it raises AttributeError,
    so the lookup goes on to ``PeftModel.__getattr__`` (the wrapped model), as without HF PEFT."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(self.name)


_HF_NAMES_HIDDEN: dict = {}     # peft.PeftModel -> its subclass with every non-dunder name hidden
_WRAPPER_CLASSES: dict = {}     # (fastpeft class, wrapped model class, peft.PeftModel or None) -> class


def _hf_peft_hidden(hf: type) -> type:
    made = _HF_NAMES_HIDDEN.get(hf)
    if made is None:
        names = {n for c in hf.__mro__ if c not in (nn.Module, object) for n in vars(c)
                 if not (n.startswith("__") and n.endswith("__"))}
        made = type("HFPeftModelNamesHidden", (hf,), {"__module__": __name__, **{n: _NotInherited(n) for n in names}})
        _HF_NAMES_HIDDEN[hf] = made
    return made


def _forward_like(model_cls: type):
    """``PeftModel.forward`` with ``model_cls.forward``'s signature and doc, or None."""
    try:
        sig = inspect.signature(model_cls.forward)
    except (AttributeError, TypeError, ValueError):
        return None

    def forward(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    forward.__signature__ = sig
    forward.__doc__ = model_cls.forward.__doc__
    return forward


def wrapper_class(cls: type, model_cls: type) -> type:
    """The class of ``cls(model)`` for a model of class ``model_cls``: a subclass of ``cls`` (same name),
    with ``forward`` carrying ``model_cls.forward``'s signature (unless ``cls`` defines its own
    ``forward``) and, when HF PEFT is installed (and transformers or peft already imported), a subclass
    of ``peft.PeftModel`` whose names are all hidden.  Made once per pair."""
    # HF PEFT is imported (seconds) only where transformers is in use: Trainer / TRL need it
    hf = peft_model_cls() if ("peft" in sys.modules or "transformers" in sys.modules) else None
    key = (cls, model_cls, hf)
    made = _WRAPPER_CLASSES.get(key)
    if made is None:
        ns = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
              "_fastpeft_wraps": model_cls}
        forward = _forward_like(model_cls) if cls.forward is PeftModel.forward else None
        if forward is not None:
            forward.__qualname__ = f"{cls.__qualname__}.forward"
            ns["forward"] = forward
        made = type(cls.__name__, (cls,) if hf is None else (cls, _hf_peft_hidden(hf)), ns)
        _WRAPPER_CLASSES[key] = made
    return made


def _new_wrapped(cls: type, model_cls: Optional[type]) -> PeftModel:
    """Unpickling: an empty instance of ``wrapper_class(cls, model_cls)`` (its state comes next)."""
    made = cls if model_cls is None else wrapper_class(cls, model_cls)
    return super(PeftModel, made).__new__(made)


class PeftModelForCausalLM(PeftModel):
    """A :class:`PeftModel` for ``task_type="CAUSAL_LM"`` (HF PEFT's class; the model card gets the
    ``text-generation`` pipeline tag)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A :class:`PeftModel` for ``task_type="SEQ_2_SEQ_LM"``."""


class PeftModelForSequenceClassification(PeftModel):
    """A :class:`PeftModel` for ``task_type="SEQ_CLS"``: the ``classifier`` / ``score`` head is trained in
    full (``modules_to_save``)."""


class PeftModelForTokenClassification(PeftModel):
    """A :class:`PeftModel` for ``task_type="TOKEN_CLS"``: the ``classifier`` / ``score`` head is trained in
    full (``modules_to_save``)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A :class:`PeftModel` for ``task_type="QUESTION_ANS"``: the ``qa_outputs`` head is trained in full."""


class PeftModelForFeatureExtraction(PeftModel):
    """A :class:`PeftModel` for ``task_type="FEATURE_EXTRACTION"``."""


#: HF PEFT's ``MODEL_TYPE_TO_PEFT_MODEL_MAPPING``: task type -> PeftModel class
MODEL_TYPE_TO_PEFT_MODEL_MAPPING = {
    "CAUSAL_LM": PeftModelForCausalLM, "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification, "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering, "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}

__all__ = ["PeftModel", "TunerModel", "ModulesToSaveWrapper", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM",
           "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftModelForQuestionAnswering",
           "PeftModelForFeatureExtraction", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "wrapper_class"]
