"""When a LoRA layer can run :func:`~fastpeft.ops.lora_linear`, and the call that runs it.

One rule for both places that fuse a LoRA layer: fastpeft's own ``tuners.lora.Linear`` and HF PEFT's
``peft.tuners.lora.Linear`` switched by :func:`fastpeft.accelerate`.  Both layer classes have HF PEFT's
attributes (``get_base_layer()``, ``lora_A`` / ``lora_B`` ModuleDicts, ``lora_dropout``, ``scaling``,
``active_adapters``, ``merged``, ``disable_adapters``, ``use_dora``, ``fan_in_fan_out``), so the rule reads
only those.

* :func:`base_layer_reason` -- why the layer's base layer can never be fused (checked once, when a layer
  is switched): it must be exactly ``nn.Linear`` or transformers' ``Conv1D`` with the matching
  ``fan_in_fan_out``.
* :func:`call_reason` -- why this call cannot be fused (checked at every call): extra forward arguments,
  adapters disabled or merged, not exactly one active adapter, a LoRA variant (DoRA), ``lora_bias``, a
  dropout module other than ``nn.Dropout`` / ``nn.Identity``, dtypes the op does not pair, autocast.
* :func:`fused_lora_forward` -- the ``lora_linear`` call for the layer's active adapter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..._optional import conv1d_cls

Reason = Optional[str]


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is enabled for ``x``'s device type."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


def lora_dtypes_fusable(lora_A: torch.Tensor, lora_B: torch.Tensor, act_dtype: torch.dtype) -> bool:
    """Whether the fused op takes these LoRA weights with activations of ``act_dtype``: the same
    dtype, or fp32 adapters on a half-precision model (HF PEFT's default upcast).  In the mixed
    case the op computes in the activation dtype and returns fp32 gradients; PEFT computes the
    low-rank branch in fp32, so the two agree to the activation dtype's rounding."""
    if lora_A.dtype != lora_B.dtype:
        return False
    return lora_A.dtype == act_dtype or (lora_A.dtype == torch.float32
                                         and act_dtype in (torch.float16, torch.bfloat16))


def base_layer_reason(layer) -> Reason:
    """Why ``layer``'s base layer can never take the fused path (None: it can).  The *direct* base layer
    must be the linear layer: a LoRA layer wrapping another adapter layer (a mixed model: LoHa / LoKr
    under LoRA) keeps PEFT's forward, which runs the inner adapter (``get_base_layer()`` would skip it)."""
    base = getattr(layer, "base_layer", None)
    if base is None:
        base = layer.get_base_layer()
    conv1d = conv1d_cls()
    if type(base) is nn.Linear:
        return None if not layer.fan_in_fan_out else "fan_in_fan_out=True on an nn.Linear base layer"
    if conv1d is not None and type(base) is conv1d:
        return None if layer.fan_in_fan_out else "Conv1D base layer without fan_in_fan_out"
    if hasattr(base, "base_layer"):
        return f"the base layer is another adapter layer ({type(base).__module__}.{type(base).__name__})"
    return f"unsupported or quantised base layer ({type(base).__name__})"


def active_lora_adapter(layer) -> Reason:
    """The single active adapter that has LoRA weights on ``layer``, or None."""
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    return active[0] if len(active) == 1 else None


def call_reason(layer, x: Optional[torch.Tensor] = None, args=(), kwargs=None) -> Reason:
    """Why this call (or, with ``x`` None, the layer's current state) cannot take the fused path."""
    if kwargs:
        return "adapter_names (mixed-adapter batch)" if "adapter_names" in kwargs else "extra forward arguments"
    if args:
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    a = active_lora_adapter(layer)
    if a is None:
        n = sum(a in layer.lora_A.keys() for a in layer.active_adapters)
        return "several active adapters" if n else "no active adapter on this layer"
    if a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a, False):
        return "LoRA variant (DoRA or other)"
    if layer.lora_B[a].bias is not None:
        return "lora_bias"
    if type(layer.lora_dropout[a]) not in (nn.Dropout, nn.Identity):
        return "custom dropout module"
    base = layer.get_base_layer()
    w = base.weight
    if not w.dtype.is_floating_point:
        return "non-floating base weight"
    if not lora_dtypes_fusable(layer.lora_A[a].weight, layer.lora_B[a].weight, w.dtype):
        return "LoRA weights in a dtype the fused op does not pair with the base weight's"
    if base.bias is not None and base.bias.dtype != w.dtype:
        return "base bias dtype differs from weight"
    if x is not None:
        if x.dtype != w.dtype:
            return "input dtype differs from the weight"
        if autocast_on(x):
            return "autocast enabled"
    return None


def fused_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``lora_linear`` for ``layer``'s active adapter (call only when :func:`call_reason` is None):
    the base weight in ``[out, in]`` layout, dropout ``p`` in training mode (fresh Philox seed)."""
    from . import lora_linear
    a = active_lora_adapter(layer)
    base = layer.get_base_layer()
    w = base.weight.t() if layer.fan_in_fan_out else base.weight
    drop = layer.lora_dropout[a]
    p = float(drop.p) if (layer.training and type(drop) is nn.Dropout) else 0.0
    return lora_linear(x, w, base.bias, layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a],
                       dropout_p=p, seed=None)


__all__ = ["autocast_on", "lora_dtypes_fusable", "base_layer_reason", "call_reason", "active_lora_adapter",
           "fused_lora_forward"]
