"""PEFT methods (tuners): LoRA, IA3, bottleneck adapters, BitFit, prompt and prefix tuning.

Each method is a module that registers itself in :mod:`fastpeft.tuners.registry` (where the
contract a method implements is documented).  The in-tree methods are imported here
unconditionally: a broken one fails ``import fastpeft`` with its own error.
"""
from __future__ import annotations

from .base import PeftConfig
from .registry import Tuner, config_class_for, get_tuner, register_tuner, registered_tuners
from . import adapter, bitfit, ia3, lora, prefix, prompt  # noqa: F401  (each registers itself)

__all__ = ["PeftConfig", "Tuner", "register_tuner", "get_tuner", "config_class_for", "registered_tuners"]
