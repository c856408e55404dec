"""``fastpeft.get_peft_model``: wrap a model with a PEFT method (one line in, one line out)."""
from __future__ import annotations

import torch.nn as nn

from .peft_model import PeftModel
from .tuners.base import PeftConfig


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True) -> PeftModel:
    """Inject ``peft_config``'s adapter (named ``adapter_name``) into ``model`` in place and
    return the :class:`~fastpeft.PeftModel` wrapping it.  Same call as ``peft.get_peft_model``.

    ``peft_config`` may also be an HF PEFT config (e.g. ``peft.LoraConfig``): it is converted.

    Raises ValueError (listing candidate module names) when the config targets nothing,
    and leaves ``model`` unchanged when it fails.  ``autocast_adapter_dtype`` (default True, as
    in HF PEFT) upcasts adapter weights created in fp16/bf16 to fp32."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return PeftModel(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)  # (HF PEFT configs are converted)


__all__ = ["get_peft_model"]
