"""Classes from optional packages (transformers, peft), imported only when asked for.

Each function returns the class, or None when its package is missing or fails to import; no import of
fastpeft pulls these packages in.
"""
from __future__ import annotations


def conv1d_cls():
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers absent or broken
        return None


def peft_lora_linear_cls():
    """HF PEFT's ``peft.tuners.lora.layer.Linear``, or None."""
    try:
        from peft.tuners.lora.layer import Linear
        return Linear
    except Exception:  # peft absent or broken
        return None


__all__ = ["conv1d_cls", "peft_lora_linear_cls"]
