"""``AutoPeftModel*``: base model and adapter in one call, HF PEFT's classes::

    model = fastpeft.AutoPeftModelForCausalLM.from_pretrained("my-adapter")

reads ``adapter_config.json``, loads the base model ``base_model_name_or_path`` (at ``revision``) with the
transformers auto class of the adapter's ``task_type`` (for ``AutoPeftModel``: the class recorded in
``auto_mapping``, only from an allowed library), grows its token embeddings when the adapter directory has
a larger tokenizer, and loads the adapter with ``PeftModel.from_pretrained``.  Keyword arguments of
``PeftModel.from_pretrained`` go there, Hub options (``revision``, ``token``, ...) to both downloads, all
others to the base model's ``from_pretrained`` (``num_labels``, ``torch_dtype``, ...).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from .hub import HUB_KWARGS, resolve_adapter_dir
from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                         PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                         PeftModelForTokenClassification, MODEL_TYPE_TO_PEFT_MODEL_MAPPING)
from .tuners.base import PeftConfig, read_config_dict, task_type_of

DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")
_PEFT_LOAD_KWARGS = ("torch_device", "allow_pickle", "allow_nonfinite", "autocast_adapter_dtype",
                     "ephemeral_gpu_offload", "low_cpu_mem_usage", "key_mapping", "subfolder")


def _allowed(allowlist, library: str) -> bool:
    return library in allowlist or any(library.startswith(f"{a}.") for a in allowlist)


class _BaseAutoPeftModel:
    _target_class: Optional[str] = None  # name of the transformers auto class
    _target_peft_class = PeftModel

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is made with {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: Optional[PeftConfig] = None, revision: Optional[str] = None,
                        import_allowlist: Optional[list] = None, **kwargs):
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        peft_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _PEFT_LOAD_KWARGS}
        path = resolve_adapter_dir(pretrained_model_name_or_path, subfolder=peft_kw.get("subfolder"),
                                   revision=revision, allow_pickle=bool(peft_kw.get("allow_pickle")), **hub)
        d = read_config_dict(path)
        peft_config = config if config is not None else PeftConfig.from_pretrained(path)
        task_type = task_type_of(peft_config) or None
        if cls._target_class is None and task_type is not None:
            raise ValueError("Cannot use `AutoPeftModel` with a task type, please use a specific class for your task "
                             f"type (e.g. `AutoPeftModelForCausalLM` for `task_type='CAUSAL_LM'`); got {task_type!r}")
        transformers = importlib.import_module("transformers")
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
            if expected is None or expected is not cls._target_peft_class:
                raise ValueError(f"Expected target PEFT class: {getattr(expected, '__name__', task_type)}, but you have "
                                 f"asked for: {cls._target_peft_class.__name__} make sure that you are loading the "
                                 "correct model for your task type.")
            target = getattr(transformers, cls._target_class)
        elif cls._target_class is not None:
            target = getattr(transformers, cls._target_class)
        elif d.get("auto_mapping"):
            library, name = d["auto_mapping"]["parent_library"], d["auto_mapping"]["base_model_class"]
            allow = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else import_allowlist
            if not _allowed(allow, library):
                raise ValueError(f"The auto mapping wants to import '{library}' which is not in the import allowlist. "
                                 f"If you are sure that importing this library is safe, specify "
                                 f"`import_allowlist=['{library}']` in `from_pretrained()`.")
            target = getattr(importlib.import_module(library), name)
        else:
            raise ValueError("Cannot infer the auto class from the config (no task_type and no auto_mapping), please "
                             "make sure that you are loading the correct model for your task type.")
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{pretrained_model_name_or_path!r}: adapter_config.json has no base_model_name_or_path; "
                             "load the base model yourself and use PeftModel.from_pretrained(model, path)")
        base = target.from_pretrained(base_path, revision=peft_config.revision, **hub, **kwargs)
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")) and hasattr(base, "get_input_embeddings"):
            tok = transformers.AutoTokenizer.from_pretrained(path)
            if len(tok) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tok))
        return cls._target_peft_class.from_pretrained(base, path, adapter_name=adapter_name,
                                                      is_trainable=is_trainable, config=peft_config,
                                                      **{k: v for k, v in peft_kw.items() if k != "subfolder"})


def _auto_class(name: str, target: Optional[str], peft_class: type) -> type:
    """``name``: loads the base model with ``transformers.<target>`` and wraps it in ``peft_class``."""
    return type(name, (_BaseAutoPeftModel,), {"_target_class": target, "_target_peft_class": peft_class,
                                              "__module__": __name__, "__doc__": f"HF PEFT's ``{name}``."})


AutoPeftModel = _auto_class("AutoPeftModel", None, PeftModel)
AutoPeftModelForCausalLM = _auto_class("AutoPeftModelForCausalLM", "AutoModelForCausalLM", PeftModelForCausalLM)
AutoPeftModelForSeq2SeqLM = _auto_class("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", PeftModelForSeq2SeqLM)
AutoPeftModelForSequenceClassification = _auto_class(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification", PeftModelForSequenceClassification)
AutoPeftModelForTokenClassification = _auto_class(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", PeftModelForTokenClassification)
AutoPeftModelForQuestionAnswering = _auto_class(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", PeftModelForQuestionAnswering)
AutoPeftModelForFeatureExtraction = _auto_class("AutoPeftModelForFeatureExtraction", "AutoModel",
                                                PeftModelForFeatureExtraction)


__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"]
