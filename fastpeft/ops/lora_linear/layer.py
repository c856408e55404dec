"""When a LoRA layer can run :func:`~fastpeft.ops.lora_linear`, the call that runs it, and the count of
what ran.

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
  dropout module other than ``nn.Dropout`` / ``nn.Identity``, dtypes the op does not pair.
* :func:`fused_lora_forward` -- the ``lora_linear`` call for the layer's active adapter.
* :func:`lora_forward` -- the forward of a fusable layer: the rule, the count, then the fused call or the
  layer's own (unfused) forward.

Autocast (``torch.autocast``: HF Trainer / TRL ``bf16=True`` / ``fp16=True``, any AMP loop) is fused too,
computing exactly what the unfused layer computes under it.  Autocast runs ``F.linear`` in its dtype ``ad``
(bf16 or fp16): it casts x, the base weight and the bias to ``ad``, and HF PEFT's LoRA branch
``lora_B(lora_A(dropout(x)))`` runs in ``ad`` too (``lora_A`` / ``lora_B`` are ``nn.Linear``; autocast casts
their fp32 weights).  So the fused call gets x, weight and bias cast to ``ad`` (``Tensor.to``, differentiable:
dx comes back in x's dtype) and fp32 LoRA weights as they are -- the op computes the LoRA products in the
activation dtype and returns fp32 gradients, which is what autocast's differentiable casts of the
fp32 parameters give, so the optimizer sees fp32 gradients either way.  LoRA weights in the other half
dtype are cast to ``ad``.  Output: ``ad``, as autocast's ``F.linear``.  Not fused under autocast: an
autocast dtype other than fp16 / bf16, and float64 tensors (autocast leaves those uncast).  The op's
own kernels run on tensors already in ``ad``, so nesting them in the autocast region changes nothing.

The frozen base weight (and bias) cast to ``ad`` is cached per tensor (:func:`autocast_copy`), so a
training loop casts each frozen weight once instead of at every call: torch's own autocast cache keeps
only casts of leaf tensors that *require grad*, and only until the autocast region exits, so the
unfused layer re-casts its frozen weight at every call.  The cache entry is keyed on the tensor's
version counter, data pointer, dtype, device, shape and strides: any in-place write through the
parameter (``copy_``, ``add_``, ``load_state_dict``, fastpeft's merge), a ``.data`` re-assignment, a
``.to(...)`` invalidate it.  Writes *through* ``.data`` in place (``w.data += d``) are invisible to the
version counter: HF PEFT's merge / unmerge do this, so the layers switched by :func:`fastpeft.accelerate`
drop their entry after those; other code that does it calls :func:`clear_autocast_cache`.  Memory: one
copy of each fused frozen weight in ``ad`` (half the fp32 size) lives as long as the weight, while
the unfused path keeps the same copy only from forward to backward; a model whose weights are
already in ``ad`` casts (and caches) nothing.  Tensors that require grad, tensor subclasses (DTensor)
and inference-mode calls are cast at every call, never cached.  Under ``torch.compile`` the casts are
traced as plain ``.to`` (no cache).

Counting (:func:`count_call`, read by :func:`fastpeft.fusion_report`): each call of :func:`lora_forward`
adds one to a per-layer counter keyed by its fallback reason (None: fused), in eager mode only -- under
``torch.compile`` the counter is skipped at trace time, so compiled calls are not counted and cause no
graph break.
"""
from __future__ import annotations

from typing import Callable, Optional
import weakref

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from ..._optional import conv1d_cls

Reason = Optional[str]
HALF_DTYPES = (torch.float16, torch.bfloat16)
AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)   # dtypes autocast casts to its dtype


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is enabled for ``x``'s device type."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs ``F.linear`` in for ``x``'s device type, or None when autocast is off."""
    if not autocast_on(x):
        return None
    try:
        return torch.get_autocast_dtype(x.device.type)
    except (AttributeError, TypeError):  # older torch
        return torch.get_autocast_gpu_dtype() if x.is_cuda else torch.get_autocast_cpu_dtype()


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _autocast_reason(ad: torch.dtype, tensors) -> Reason:
    """Why a call under autocast in dtype ``ad`` cannot be fused (None: it can)."""
    if ad not in HALF_DTYPES:
        return f"autocast dtype {_dtype_name(ad)} (the fused op runs autocast in float16 / bfloat16)"
    if any(t is not None and t.dtype not in AUTOCAST_CASTS for t in tensors):
        return "autocast with a float64 input or weight (autocast leaves it uncast)"
    return None


def adapter_state_reason(layer, args=(), kwargs=None) -> Reason:
    """Why a LoRA layer's adapter state (call arguments, active adapter, variant, dropout module) rules out a
    fused call (None: it does not); the rules every fused LoRA forward shares (full-precision and quantised
    bases)."""
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
    return None


def call_reason(layer, x: Optional[torch.Tensor] = None, args=(), kwargs=None) -> Reason:
    """Why this call (or, with ``x`` None, the layer's current state outside autocast) cannot take
    the fused path."""
    why = adapter_state_reason(layer, args, kwargs)
    if why is not None:
        return why
    a = active_lora_adapter(layer)
    base = layer.get_base_layer()
    w = base.weight
    if not w.dtype.is_floating_point:
        return "non-floating base weight"
    A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
    ad = autocast_dtype(x) if x is not None else None
    if ad is not None:
        return _autocast_reason(ad, (x, w, base.bias, A, B))
    if not lora_dtypes_fusable(A, B, w.dtype):
        return "LoRA weights in a dtype the fused op does not pair with the base weight's"
    if base.bias is not None and base.bias.dtype != w.dtype:
        return "base bias dtype differs from weight"
    if x is not None and x.dtype != w.dtype:
        return "input dtype differs from the weight (without autocast)"
    return None


# -- the frozen weights cast for autocast -------------------------------------------------
_AUTOCAST_COPIES = WeakIdKeyDictionary()   # frozen tensor -> (key, its copy in the autocast dtype)


def autocast_copy(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``; for a frozen plain tensor the copy is cached until ``t`` changes (module doc)."""
    if t is None or t.dtype == dtype:
        return t
    if (t.requires_grad or torch.compiler.is_compiling() or type(t) not in (torch.Tensor, nn.Parameter)
            or torch.is_inference_mode_enabled()):
        return t.to(dtype)
    key = (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride(), dtype)
    hit = _AUTOCAST_COPIES.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy = t.detach().to(dtype)
    _AUTOCAST_COPIES[t] = (key, copy)
    return copy


def forget_autocast_copies(*tensors) -> None:
    """Drop the cached autocast copies of ``tensors`` (after writing them through ``.data`` in place)."""
    for t in tensors:
        if t is not None:
            _AUTOCAST_COPIES.pop(t, None)


def clear_autocast_cache() -> None:
    """Drop every cached autocast copy of a frozen base weight (see the module doc)."""
    _AUTOCAST_COPIES.clear()


def fused_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``lora_linear`` for ``layer``'s active adapter (call only when :func:`call_reason` is None):
    the base weight in ``[out, in]`` layout, dropout ``p`` in training mode (fresh Philox seed);
    under autocast x, weight and bias in the autocast dtype (module doc)."""
    from . import lora_linear
    a = active_lora_adapter(layer)
    base = layer.get_base_layer()
    w, bias = base.weight, base.bias
    A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
    ad = autocast_dtype(x)
    if ad is not None:
        x, w, bias = x.to(ad), autocast_copy(w, ad), autocast_copy(bias, ad)
        if A.dtype != B.dtype or A.dtype not in (torch.float32, ad):
            A, B = A.to(ad), B.to(ad)
    drop = layer.lora_dropout[a]
    p = float(drop.p) if (layer.training and type(drop) is nn.Dropout) else 0.0
    return lora_linear(x, w.t() if layer.fan_in_fan_out else w, bias, A, B, layer.scaling[a],
                       dropout_p=p, seed=None)


# -- what ran --------------------------------------------------------------------------
_CALLS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()   # layer -> {reason: n}


def count_call(layer: nn.Module, reason: Reason) -> None:
    """Add one call of ``layer`` (fused when ``reason`` is None); eager mode only (module doc)."""
    if torch.compiler.is_compiling():
        return
    counts = _CALLS.get(layer)
    if counts is None:
        counts = _CALLS[layer] = {}
    counts[reason] = counts.get(reason, 0) + 1


def call_counts(layer: nn.Module) -> dict:
    """``{reason: calls}`` of ``layer`` since the last reset (``None``: fused calls)."""
    return dict(_CALLS.get(layer, {}))


def reset_call_counts(layers=None) -> None:
    """Forget the counts of ``layers`` (an iterable of modules; None: every layer)."""
    if layers is None:
        _CALLS.clear()
        return
    for m in layers:
        _CALLS.pop(m, None)


def lora_forward(layer, x: torch.Tensor, args, kwargs, unfused: Callable) -> torch.Tensor:
    """A fusable layer's forward: :func:`fused_lora_forward` when :func:`call_reason` allows it, else
    ``unfused(x, *args, **kwargs)``; the call is counted either way."""
    reason = call_reason(layer, x, args, kwargs)
    count_call(layer, reason)
    if reason is None:
        return fused_lora_forward(layer, x)
    return unfused(x, *args, **kwargs)


__all__ = ["autocast_on", "autocast_dtype", "lora_dtypes_fusable", "base_layer_reason", "call_reason",
           "active_lora_adapter", "fused_lora_forward", "lora_forward", "autocast_copy", "forget_autocast_copies",
           "clear_autocast_cache", "count_call", "call_counts", "reset_call_counts"]
