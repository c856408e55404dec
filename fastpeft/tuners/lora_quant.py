"""LoRA over bitsandbytes' quantised linear layers (QLoRA): ``Linear4bit`` (nf4 / fp4, double
quantisation or not, any blocksize) and ``Linear8bitLt``.

* :class:`Linear4bit` / :class:`Linear8bitLt` -- fastpeft's LoRA layers on those bases (HF PEFT's
  ``lora.bnb`` classes' attributes and ``state_dict`` keys: ``base_layer``, ``lora_A.<name>.weight``
  [r, in_features], ``lora_B.<name>.weight`` [out_features, r]; in/out features come from the layer, not
  from the packed ``Params4bit`` shape).  The LoRA weights stay in full precision (fp32 by default).
  With exactly one active, unmerged, enabled vanilla adapter a 4-bit layer runs the fused op
  :func:`fastpeft.ops.lora_linear_4bit` (dequantisation inside the GEMMs, Philox dropout), and an 8-bit
  layer runs :func:`fastpeft.ops.lora_linear_8bit` wherever bitsandbytes itself computes with the
  dequantised weight (training mode on a CPU / XPU: ``MatMul8bitFp``); otherwise, HF PEFT's forward:
  bitsandbytes' layer plus the LoRA branch.  An 8-bit layer in eval mode or on CUDA keeps it because
  bitsandbytes' LLM.int8() forward (``MatMul8bitLt``) also quantises the activations, which the fused op,
  a weight-only dequantisation, would not reproduce.
* merge / unmerge dequantise the base weight, add / subtract ``s · B A`` and quantise again, warning
  about rounding exactly as HF PEFT does.
* :func:`switch_peft_quant_layer` -- :func:`fastpeft.accelerate`'s switch of HF PEFT's
  ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` layers to the fused ops (a class swap, as for ``lora.Linear``).
* :func:`prepare_model_for_kbit_training` -- HF PEFT's function of that name, same semantics.

bitsandbytes is imported only here, only when a model holds its layers (``fastpeft._optional``).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .._optional import bnb_linear_classes, require_bnb
from ..ops.lora_linear.layer import active_lora_adapter, adapter_state_reason, autocast_dtype, count_call
from .lora import Linear, LoraConfig

_QUANT_INITS = (True, False, "gaussian")


def quant_kind(module: nn.Module) -> Optional[str]:
    """'4bit' for ``bitsandbytes.nn.Linear4bit``, '8bit' for ``Linear8bitLt``, else None (bitsandbytes
    is not imported for a model that does not hold its layers)."""
    classes = bnb_linear_classes()
    if not classes:
        return None
    if isinstance(module, classes[0]):
        return "4bit"
    if isinstance(module, classes[1]):
        return "8bit"
    return None


def _check_quant_state(name: str, base: nn.Module) -> None:
    """A 4-bit layer must carry its quant state, of a type the op decodes."""
    if quant_kind(base) != "4bit":
        return
    qs = getattr(base.weight, "quant_state", None)
    if qs is None:
        raise ValueError(f"target_modules: {name} is a bitsandbytes Linear4bit whose weight has no quant_state "
                         "(never quantised: bitsandbytes quantises it when the layer is moved to a device, "
                         "layer.to('cpu') / .cuda(), or when the model is loaded with BitsAndBytesConfig)")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"target_modules: {name} has bitsandbytes quant_type {qs.quant_type!r}; fastpeft's "
                         "4-bit LoRA supports 'nf4' and 'fp4'")


class _QuantLinear(Linear):
    """LoRA on a bitsandbytes quantised linear layer (shared by the 4-bit and 8-bit classes)."""

    _bits = ""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig):
        nn.Module.__init__(self)
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        if config.use_dora:
            raise ValueError(f"use_dora: fastpeft does not run DoRA on a bitsandbytes {self._bits} base layer "
                             "(use HF PEFT for QDoRA)")
        if config.init_lora_weights not in _QUANT_INITS:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r}: on a bitsandbytes {self._bits} "
                             f"base layer fastpeft supports {_QUANT_INITS} (PiSSA / OLoRA / LoftQ need the "
                             "full-precision weight)")
        super().update_layer(adapter_name, r, lora_alpha, config)

    def _weight_out_in(self) -> torch.Tensor:  # only DoRA reads it, which is refused above
        raise NotImplementedError("a quantised base layer has no full-precision weight")

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight [out, in], dequantised (a full-precision copy: merge / unmerge only)."""
        raise NotImplementedError

    def _set_weight(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        warnings.warn(f"Merge lora module to {self._bits} linear may get different generations due to rounding "
                      "errors.")
        W = self.dequantized_weight()
        new = W + self.get_delta_weight(a).to(W.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights; adapter {a!r} seems broken")
        self._set_weight(new)

    def _unmerge_one(self, a: str) -> None:
        if a not in self.r:
            return
        warnings.warn(f"Unmerge lora module to {self._bits} linear may get different generations due to "
                      "rounding errors.")
        W = self.dequantized_weight()
        self._set_weight(W - self.get_delta_weight(a).to(W.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return quant_lora_forward(self, x, args, kwargs, self._plain_forward)


class Linear4bit(_QuantLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (HF PEFT: ``peft.tuners.lora.bnb.Linear4bit``)."""

    _bits = "4-bit"

    def dequantized_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return require_bnb("merging LoRA into a 4-bit layer").functional.dequantize_4bit(w.data, w.quant_state)

    def _set_weight(self, new: torch.Tensor) -> None:
        bnb = require_bnb("merging LoRA into a 4-bit layer")
        w = self.base_layer.weight
        kwargs = {k: v for k, v in w.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["bnb_quantized"], kwargs["requires_grad"] = False, False
        self.base_layer.weight = bnb.nn.Params4bit(new.to("cpu"), **kwargs).to(w.device)


class Linear8bitLt(_QuantLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (HF PEFT: ``peft.tuners.lora.bnb.Linear8bitLt``):
    int8 weight ``CB`` [out, in] with per-row scales ``SCB``; value ``CB · SCB / 127``."""

    _bits = "8-bit"

    def dequantized_weight(self) -> torch.Tensor:
        cb, scb = int8_state(self.base_layer)
        return cb.float() * (scb.float().view(-1, 1) / 127.0)

    def _set_weight(self, new: torch.Tensor) -> None:
        bnb = require_bnb("merging LoRA into an 8-bit layer")
        w = self.base_layer.weight
        self.base_layer.weight = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False,
                                                   has_fp16_weights=w.has_fp16_weights).to(w.device)
        self.base_layer.state.reset_grads()
        self.base_layer.state.SCB = None
        self.base_layer.state.CB = None


def int8_state(base: nn.Module):
    """``(CB int8 [out, in], SCB fp32 [out])`` of a quantised ``Linear8bitLt`` (``state`` once a forward
    has moved them there, else the weight's), or ``(None, None)`` when it is not quantised."""
    state, w = base.state, base.weight
    cb = state.CB if state.CB is not None else (w.data if w.dtype == torch.int8 else None)
    scb = state.SCB if state.SCB is not None else getattr(w, "SCB", None)
    return (cb, scb) if cb is not None and scb is not None else (None, None)


def new_quant_layer(name: str, target: nn.Module, adapter_name: str, r: int, alpha: float,
                    config: LoraConfig) -> Optional[nn.Module]:
    """fastpeft's LoRA layer for a bitsandbytes layer ``target``, or None when it is not one."""
    kind = quant_kind(target)
    if kind is None:
        return None
    _check_quant_state(name, target)
    if config.fan_in_fan_out:
        warnings.warn(f"{name}: fan_in_fan_out=True but the layer is a bitsandbytes linear layer; using False",
                      stacklevel=4)
    cls = Linear4bit if kind == "4bit" else Linear8bitLt
    return cls(target, adapter_name, r, alpha, config)


# -- the forward rule -----------------------------------------------------------------------
# the one call-time condition under which a switched quantised layer takes PEFT's forward (accelerate's
# summary names it whenever it switched a quantised layer)
AUTOCAST_REASON = "torch.autocast (bitsandbytes decides the compute dtype of its layer)"
# where an 8-bit layer keeps bitsandbytes' forward: its LLM.int8() matmul quantises the activations too
INT8_ACTIVATIONS_REASON = ("8-bit base layer {where}: bitsandbytes' LLM.int8() forward quantises the activations, "
                           "the fused op dequantises the weight only")


def _base_reason(base, kind: str, x: Optional[torch.Tensor]) -> Optional[str]:
    """Why the quantised base layer's weight, state or input rules the fused op out (None: they do not)."""
    if kind == "4bit":
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or qs.quant_type not in ("nf4", "fp4"):
            return "4-bit weight without an nf4 / fp4 quant state"
        if getattr(base.weight, "packing_format_for_cpu", False):
            return "bitsandbytes repacked the weight for its CPU kernel"
        return None
    if base.state.has_fp16_weights:
        return "8-bit base layer with has_fp16_weights=True (bitsandbytes re-quantises a trainable weight)"
    if int8_state(base)[0] is None:
        return "8-bit weight not quantised yet (no CB / SCB)"
    if not base.training:
        return INT8_ACTIVATIONS_REASON.format(where="in eval mode")
    device = x.device if x is not None else base.weight.device
    if device.type not in ("cpu", "xpu"):
        return INT8_ACTIVATIONS_REASON.format(where=f"on {device.type}")
    return None


def quant_call_reason(layer, x: Optional[torch.Tensor] = None, args=(), kwargs=None) -> Optional[str]:
    """Why this call of a LoRA layer on a bitsandbytes base cannot run :func:`fastpeft.ops.lora_linear_4bit`
    / :func:`fastpeft.ops.lora_linear_8bit` (None: it can).  The same state rules as
    ``fastpeft.ops.lora_linear.layer.call_reason``, then the base."""
    why = adapter_state_reason(layer, args, kwargs)
    if why is not None:
        return why
    a = active_lora_adapter(layer)
    base = layer.get_base_layer()
    kind = quant_kind(base)
    if kind is None:
        return "not a quantised base"
    why = _base_reason(base, kind, x)
    if why is not None:
        return why
    if x is not None and autocast_dtype(x) is not None:
        return AUTOCAST_REASON
    A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
    cd = _compute_dtype(base, x)
    if A.dtype != B.dtype or A.dtype not in (torch.float32, cd):
        return "LoRA weights in a dtype the fused op does not pair with the compute dtype"
    if x is not None and not x.dtype.is_floating_point:
        return "non-floating input"
    return None


def _compute_dtype(base, x) -> torch.dtype:
    """The dtype bitsandbytes computes the layer in: a 4-bit layer's ``compute_dtype`` (x's dtype when it
    has none), an 8-bit layer's input dtype."""
    cd = getattr(base, "compute_dtype", None) if quant_kind(base) == "4bit" else None
    if cd is None:
        cd = x.dtype if x is not None else torch.float32
    return cd


def fused_quant_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """:func:`fastpeft.ops.lora_linear_4bit` / :func:`fastpeft.ops.lora_linear_8bit` for ``layer``'s
    active adapter, computing as bitsandbytes' layer does: x and the bias in the compute dtype
    (:func:`_compute_dtype`), output in x's dtype; LoRA weights as they are (fp32 adapters compute in the
    compute dtype, gradients come back in fp32)."""
    a = active_lora_adapter(layer)
    base = layer.get_base_layer()
    cd = _compute_dtype(base, x)
    A, B = layer.lora_A[a].weight, layer.lora_B[a].weight
    bias = base.bias
    if bias is not None and bias.dtype != cd:
        bias = bias.to(cd)
    drop = layer.lora_dropout[a]
    p = float(drop.p) if (layer.training and type(drop) is nn.Dropout) else 0.0
    if quant_kind(base) == "4bit":
        from ..ops.lora_linear_4bit import lora_linear_4bit
        w = base.weight
        y = lora_linear_4bit(x.to(cd), w.data, w.quant_state, bias, A, B, layer.scaling[a], dropout_p=p, seed=None)
    else:
        from ..ops.lora_linear_8bit import lora_linear_8bit
        cb, scb = int8_state(base)
        y = lora_linear_8bit(x.to(cd), cb, scb, bias, A, B, layer.scaling[a], dropout_p=p, seed=None)
    return y.to(x.dtype)


def quant_lora_forward(layer, x: torch.Tensor, args, kwargs, unfused):
    reason = quant_call_reason(layer, x, args, kwargs)
    count_call(layer, reason)
    if reason is None:
        return fused_quant_forward(layer, x)
    return unfused(x, *args, **kwargs)


# -- fastpeft.accelerate on HF PEFT's bnb LoRA layers -------------------------------------------
_ORIG_ATTR = "_fastpeft_original_class"   # the attribute fastpeft.accelerate / restore read
_FAST_QUANT_CLASSES: dict = {}


def _fast_quant_forward(self, x, *args, **kwargs):
    return quant_lora_forward(self, x, args, kwargs, super(type(self), self).forward)


def _original_name(self) -> str:
    return getattr(type(self), _ORIG_ATTR).__name__


def _fast_quant_class(orig: type) -> type:
    cls = _FAST_QUANT_CLASSES.get(orig)
    if cls is None:
        name = "Fastpeft" + orig.__name__
        cls = type(name, (orig,), {"forward": _fast_quant_forward, "_get_name": _original_name, _ORIG_ATTR: orig,
                                   "__module__": __name__})
        cls.__qualname__ = name
        _FAST_QUANT_CLASSES[orig] = cls
    return cls


def _peft_bnb_classes() -> tuple:
    if not bnb_linear_classes():
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit as P4, Linear8bitLt as P8
        return (P4, P8)
    except Exception:
        return ()


def switch_peft_quant_layer(m: nn.Module) -> Optional[str]:
    """For :func:`fastpeft.accelerate`: None when ``m`` is not one of HF PEFT's bnb LoRA layers; else
    ``""`` after switching it (or finding it switched) to the fused forward, or why it keeps PEFT's."""
    orig = getattr(type(m), _ORIG_ATTR, None)
    if orig is not None and type(m) is _FAST_QUANT_CLASSES.get(orig):
        return ""
    peft_classes = _peft_bnb_classes()
    if not peft_classes or not isinstance(m, peft_classes):
        return None
    expected = "4bit" if isinstance(m, peft_classes[0]) else "8bit"
    if quant_kind(getattr(m, "base_layer", None)) != expected:
        return "the base layer is another adapter layer"
    m.__class__ = _fast_quant_class(type(m))
    return ""


# -- prepare_model_for_kbit_training ----------------------------------------------------------
def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """HF PEFT's ``prepare_model_for_kbit_training`` (same semantics): freeze every parameter; cast
    fp16 / bf16 parameters that are not 4-bit ``Params4bit`` to fp32; on a model loaded in 4 / 8 bit with
    ``use_gradient_checkpointing``, make the input embeddings' output require grad (unless
    ``use_reentrant=False``) and turn on gradient checkpointing.  Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    method = getattr(model, "quantization_method", None)
    other_quant = method in ("gptq", "aqlm", "eetq", "torchao", "hqq") or getattr(model, "hqq_quantized", False)
    gc_kwargs = {} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
    for p in model.parameters():
        p.requires_grad = False
    if not other_quant:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (kbit or other_quant) and use_gradient_checkpointing:
        if gc_kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                def make_inputs_require_grad(module, input, output):
                    output.requires_grad_(True)
                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        supports_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(
            model.gradient_checkpointing_enable).parameters
        if not supports_kwargs and gc_kwargs:
            warnings.warn("gradient_checkpointing_kwargs is not supported by this model's "
                          "gradient_checkpointing_enable; ignored", FutureWarning)
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": gc_kwargs} if supports_kwargs else {}))
    return model


__all__ = ["Linear4bit", "Linear8bitLt", "quant_kind", "int8_state", "new_quant_layer", "quant_call_reason", "fused_quant_forward",
           "quant_lora_forward", "switch_peft_quant_layer", "prepare_model_for_kbit_training"]
