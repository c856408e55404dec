"""``fastpeft.get_peft_model``: wrap a model with a PEFT method (one line in, one line out)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch.nn as nn

from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .tuners.base import PeftConfig, as_fastpeft_config, task_type_of


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Inject ``peft_config``'s adapter (named ``adapter_name``) into ``model`` in place and return the
    :class:`~fastpeft.PeftModel` wrapping it -- of the class of ``peft_config.task_type``
    (``PeftModelForCausalLM``, ``PeftModelForSequenceClassification``, ...), as ``peft.get_peft_model``.

    ``peft_config`` may also be an HF PEFT config (e.g. ``peft.LoraConfig``): it is converted, and a field
    fastpeft does not implement is refused by name.  ``revision`` (of the base model) is recorded in the
    config, as HF PEFT does.  ``mixed=True`` (HF's ``PeftMixedModel``, several methods at once) is not
    implemented: ValueError.  ``low_cpu_mem_usage`` is accepted (the adapter weights are created directly).

    Raises ValueError (listing candidate module names) when the config targets nothing,
    and leaves ``model`` unchanged when it fails.  ``autocast_adapter_dtype`` (default True, as
    in HF PEFT) upcasts adapter weights created in fp16/bf16 to fp32."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mixed:
        raise ValueError("mixed=True: fastpeft has no PeftMixedModel (several PEFT methods in one model); use "
                         "peft.get_peft_model(..., mixed=True), and fastpeft.accelerate(...) on the result")
    peft_config = as_fastpeft_config(peft_config)
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, "
                          f"overwriting with revision {revision}", stacklevel=2)
        peft_config.revision = revision
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type_of(peft_config), PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


__all__ = ["get_peft_model"]
