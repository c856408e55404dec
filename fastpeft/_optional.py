"""Optional packages, imported only when asked for; no import of fastpeft pulls them in.

* :func:`conv1d_cls`, :func:`peft_lora_linear_cls`, :func:`peft_model_cls`: classes from transformers /
  peft that the patching layer and the PEFT wrapper recognise, or None when the package is missing or
  fails to import;
* :func:`bnb_linear_classes`: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, only once something
  (a quantised model) has imported bitsandbytes -- a model cannot hold its layers otherwise;
  :func:`require_bnb` imports it or fails with one line naming ``fastpeft[bnb]``;
* :func:`import_extra`: a package that a feature needs and an extra of fastpeft installs (PyYAML,
  matplotlib, tqdm, transformers for the applications), or :class:`MissingExtra` saying which extra.
"""
from __future__ import annotations

import importlib

# top-level import name -> (distribution to install, the extra of fastpeft that installs it)
EXTRAS = {"yaml": ("PyYAML", "train"), "matplotlib": ("matplotlib", "train"), "tqdm": ("tqdm", "train"),
          "transformers": ("transformers", "train"), "peft": ("peft", "peft"),
          "fastapi": ("fastapi", "serve"), "uvicorn": ("uvicorn", "serve"),
          "prometheus_client": ("prometheus-client", "serve"),
          "bitsandbytes": ("bitsandbytes", "bnb"),
          "sacrebleu": ("sacrebleu", "train"), "rouge_score": ("rouge-score", "train"),
          "tokenizers": ("tokenizers", "train")}


class MissingExtra(ImportError):
    """An optional package is not installed; the message is one line naming the extra that installs it."""


def import_extra(module: str, feature: str):
    """``importlib.import_module(module)``; when its package is not installed, :class:`MissingExtra`:
    ``"<feature> needs PyYAML: pip install 'fastpeft[train]'"``. A package that is installed but fails to
    import raises its own error."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != top:
            raise
        dist, extra = EXTRAS[top]
        raise MissingExtra(f"{feature} needs {dist}: pip install 'fastpeft[{extra}]'") from None


def conv1d_cls():
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers absent or broken
        return None


def peft_model_cls():
    """HF PEFT's ``peft.PeftModel``, or None."""
    try:
        from peft import PeftModel
        return PeftModel
    except Exception:  # peft absent or broken
        return None


def peft_lora_linear_cls():
    """HF PEFT's ``peft.tuners.lora.layer.Linear``, or None."""
    try:
        from peft.tuners.lora.layer import Linear
        return Linear
    except Exception:  # peft absent or broken
        return None


def bnb_linear_classes() -> tuple:
    """``(bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)`` when bitsandbytes is already imported
    (a model holding its layers imported it), else ``()``.  Never imports bitsandbytes itself: checking a
    plain model for quantised layers costs nothing."""
    import sys
    if "bitsandbytes" not in sys.modules:
        return ()
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
        return (Linear4bit, Linear8bitLt)
    except Exception:  # broken install: such a model cannot exist either
        return ()


def require_bnb(feature: str):
    """``import bitsandbytes`` for ``feature``; :class:`MissingExtra` (one line) when it is not installed."""
    return import_extra("bitsandbytes", feature)


__all__ = ["bnb_linear_classes", "require_bnb", "conv1d_cls", "peft_lora_linear_cls", "peft_model_cls", "import_extra", "MissingExtra", "EXTRAS"]
