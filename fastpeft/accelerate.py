"""``fastpeft.accelerate`` / ``fastpeft.restore``: switch the LoRA layers of a model made
by Hugging Face PEFT to fastpeft's fused LoRA op in place, and back; ``fastpeft.fusion_report``:
what the fusable LoRA layers of a model (fastpeft's own or switched) actually ran.

How: each supported ``peft.tuners.lora.Linear`` instance gets its ``__class__``
swapped to a subclass whose ``forward`` runs :func:`fastpeft.ops.lora_linear` when
the layer's state allows it and PEFT's own ``forward`` otherwise.  No parameter,
buffer or attribute is added or renamed, so ``state_dict`` keys and
``save_pretrained`` output are unchanged; ``restore`` swaps the original class back.

HF PEFT's ``lora.bnb.Linear4bit`` and ``Linear8bitLt`` layers (QLoRA) are switched the same way to
:func:`fastpeft.ops.lora_linear_4bit` / :func:`fastpeft.ops.lora_linear_8bit` (:mod:`fastpeft.tuners.lora_quant`;
an 8-bit layer runs fused only where bitsandbytes computes with the dequantised weight: training mode on a CPU).
Otherwise the fused path is taken at a call only when the layer's base layer is a plain ``nn.Linear`` or
transformers ``Conv1D`` and the call and the layer's state allow it (one active,
unmerged, enabled vanilla adapter; dtypes the op pairs, or ``torch.autocast`` in fp16 / bf16): the
rule is :mod:`fastpeft.ops.lora_linear.layer`, shared with fastpeft's own LoRA layers.  Otherwise
PEFT's forward runs.  Every call is counted per layer with its reason (eager mode);
:func:`fusion_report` reads the counts.

Mixed-adapter batches (HF PEFT's ``model(..., adapter_names=[...])`` / ``generate(..., adapter_names=...)``):
the switched Linear / Conv1D layers run :func:`fastpeft.ops.lora_linear_multi` on the layer's adapters
stacked once (no loop over the adapters), and HF PEFT's ``lora.Embedding`` layers are switched too, for
:func:`fastpeft.ops.lora_embedding_multi` (their single-adapter calls keep PEFT's forward); rows on an adapter
the op cannot take (DoRA, ``lora_bias``, other variants) and quantised base layers keep PEFT's loop
(:mod:`fastpeft.ops.lora_linear_multi.layer`).  ``modules_to_save`` heads are PEFT's own.

Note: with ``lora_dropout > 0`` in training mode the fused op draws its mask from
fastpeft's Philox RNG (seeded from torch's generator), not from ``nn.Dropout``'s, so
individual masks differ from PEFT's while the distribution is the same.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from ._optional import peft_lora_linear_cls
from .tuners.lora_quant import AUTOCAST_REASON as QUANT_AUTOCAST_REASON
from .tuners.lora_quant import INT8_ACTIVATIONS_REASON, quant_kind
from .tuners.lora_quant import quant_call_reason, switch_peft_quant_layer
from .ops.lora_linear.layer import (base_layer_reason, call_counts, call_reason, forget_autocast_copies,
                                    lora_forward, reset_call_counts)
from .ops.lora_linear_multi.layer import mixed_forward

_FAST_CLASSES: dict = {}
_ORIG_ATTR = "_fastpeft_original_class"

# what still takes the unfused forward at call time, whatever accelerate() saw (the rule is
# fastpeft.ops.lora_linear.layer.call_reason); the summary prints it
CALL_TIME_FALLBACKS = ("extra forward arguments; adapter_names (mixed-adapter batch) runs lora_linear_multi "
                       "instead, except for DoRA / lora_bias adapters",
                       "an input dtype other than the base weight's, outside torch.autocast",
                       "torch.autocast in a dtype other than float16 / bfloat16, or on float64 tensors",
                       "a later change of state: merged, disabled, several active adapters")


@dataclass
class AccelerateSummary:
    """What :func:`accelerate` / :func:`restore` did."""

    accelerated: int = 0            # patched layers whose current state takes the fused path
    patched: int = 0                # layers switched (fused whenever their state allows)
    skipped: dict = field(default_factory=dict)   # reason -> number of layers running PEFT's forward
    restored: int = 0
    note: str = ""
    call_time: tuple = ()           # conditions that still take PEFT's forward at call time
    embeddings: int = 0             # LoRA Embedding layers switched for mixed-adapter batches

    def __str__(self) -> str:
        lines = []
        if self.note:
            lines.append(self.note)
        if self.restored:
            lines.append(f"fastpeft.restore: {self.restored} LoRA layer(s) back on PEFT's forward")
        else:
            lines.append(f"fastpeft.accelerate: {self.accelerated} LoRA layer(s) on the fused path "
                         f"({self.patched} patched)")
        if self.embeddings:
            lines.append(f"  {self.embeddings} LoRA Embedding layer(s) run mixed-adapter batches on "
                         "lora_embedding_multi (PEFT's forward otherwise)")
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} layer(s) use PEFT's forward: {reason}")
        if self.call_time and self.patched:
            lines.append("  a call of a patched layer still takes PEFT's forward on: " + "; ".join(self.call_time)
                         + " (fastpeft.fusion_report(model) counts what ran)")
        return "\n".join(lines)

    __repr__ = __str__


def _mixed(layer, x, args, kwargs):
    """The multi-adapter op's output for an HF PEFT mixed-adapter call (``adapter_names`` only), or None."""
    names = kwargs.get("adapter_names")
    if names is None or args or len(kwargs) != 1 or not isinstance(names, (list, tuple)):
        return None
    return mixed_forward(layer, x, names, strict=False)


def _fast_forward(self, x, *args, **kwargs):
    out = _mixed(self, x, args, kwargs)
    if out is not None:
        return out
    return lora_forward(self, x, args, kwargs, super(type(self), self).forward)


def _fast_embedding_forward(self, x, *args, **kwargs):
    out = _mixed(self, x, args, kwargs)
    if out is not None:
        return out
    return super(type(self), self).forward(x, *args, **kwargs)


def _forgetting_casts(name: str):
    """PEFT's method ``name``, then the base layer's cached autocast copies dropped: PEFT merges and
    unmerges through ``weight.data`` in place, which no version counter sees."""
    def method(self, *args, **kwargs):
        try:
            return getattr(super(type(self), self), name)(*args, **kwargs)
        finally:
            base = self.get_base_layer()
            forget_autocast_copies(base.weight, getattr(base, "bias", None))

    method.__name__ = method.__qualname__ = name
    return method


def _original_name(self) -> str:
    """``nn.Module._get_name``: PEFT's class name, so ``print(model)`` and ``get_layer_status()`` show
    ``lora.Linear`` as before the switch, not the swapped class."""
    return getattr(type(self), _ORIG_ATTR).__name__


def _fast_class(orig: type, embedding: bool = False) -> type:
    cls = _FAST_CLASSES.get(orig)
    if cls is None:
        name = "Fastpeft" + orig.__name__
        cls = type(name, (orig,), {"forward": _fast_embedding_forward if embedding else _fast_forward,
                                   "_fastpeft_mixed_only": embedding, "merge": _forgetting_casts("merge"),
                                   "unmerge": _forgetting_casts("unmerge"), "_get_name": _original_name,
                                   _ORIG_ATTR: orig, "__module__": __name__})
        cls.__qualname__ = name
        globals()[name] = cls  # importable by name, so a patched model pickles
        _FAST_CLASSES[orig] = cls
    return cls


def __getattr__(name: str):
    # Unpickling a model saved while accelerated, in a fresh process: rebuild the class.
    if name == "Fastpeft" + "Linear":
        lin = peft_lora_linear_cls()
        if lin is not None:
            return _fast_class(lin)
    if name == "Fastpeft" + "Embedding":
        emb = _peft_lora_embedding_cls()
        if emb is not None:
            return _fast_class(emb, embedding=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _peft_lora_embedding_cls():
    try:
        from peft.tuners.lora import Embedding
    except Exception:  # peft missing or broken: nothing to switch
        return None
    return Embedding


def _is_fastpeft_model(model) -> bool:
    from .peft_model import PeftModel
    return isinstance(model, PeftModel)


def _quant_call_time(m) -> tuple:
    """The call-time conditions under which switched bitsandbytes layer ``m`` takes PEFT's forward."""
    if quant_kind(getattr(m, "base_layer", None)) == "4bit":
        return (f"on a 4-bit base: {QUANT_AUTOCAST_REASON}",)
    return (f"on an 8-bit base: {QUANT_AUTOCAST_REASON}",
            INT8_ACTIVATIONS_REASON.format(where="in eval mode or on CUDA"))


def accelerate(peft_model: nn.Module) -> AccelerateSummary:
    """Switch the supported LoRA Linear / Conv1D layers of an HF PEFT model to the fused op,
    in place.  Returns an :class:`AccelerateSummary` (``print`` it for a readable report)."""
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model: expected a torch.nn.Module made by peft, got {type(peft_model).__name__}")
    if _is_fastpeft_model(peft_model):
        from .tuners.lora import Linear as FastLinear
        n = sum(isinstance(m, FastLinear) for m in peft_model.modules())
        return AccelerateSummary(note=f"already a fastpeft model: its {n} LoRA Linear layer(s) use the fused "
                                      "op natively; nothing to do")
    lin = peft_lora_linear_cls()
    if lin is None:
        raise ImportError("fastpeft.accelerate needs the `peft` package (pip install peft)")
    summary = AccelerateSummary(call_time=CALL_TIME_FALLBACKS)
    skipped = Counter()
    found = False
    emb = _peft_lora_embedding_cls()
    for _, m in peft_model.named_modules():
        quant = switch_peft_quant_layer(m)  # HF PEFT's bnb (QLoRA) layers: fastpeft.tuners.lora_quant
        if quant is not None:
            found = True
            if quant:
                skipped[quant] += 1
                continue
            summary.patched += 1
            for quant_call_time in _quant_call_time(m):
                if quant_call_time not in summary.call_time:
                    summary.call_time += (quant_call_time,)
            reason = quant_call_reason(m)
            if reason is None:
                summary.accelerated += 1
            else:
                skipped[f"{reason} (re-checked at every call)"] += 1
            continue
        orig = getattr(type(m), _ORIG_ATTR, None)
        if orig is not None and getattr(type(m), "_fastpeft_mixed_only", False):
            found = True
            summary.embeddings += 1
            continue
        if emb is not None and type(m) is emb:  # mixed-adapter batches only
            found = True
            m.__class__ = _fast_class(emb, embedding=True)
            summary.embeddings += 1
            continue
        if orig is not None:  # accelerated already
            found = True
            summary.patched += 1
        elif isinstance(m, lin):
            found = True
            if type(m) is not lin:
                skipped[f"unsupported LoRA layer class {type(m).__name__}"] += 1
                continue
            reason = base_layer_reason(m)
            if reason is not None:
                skipped[reason] += 1
                continue
            m.__class__ = _fast_class(type(m))
            summary.patched += 1
        else:
            try:
                from peft.tuners.tuners_utils import BaseTunerLayer
                if isinstance(m, BaseTunerLayer):
                    found = True
                    skipped[f"not a LoRA Linear layer ({type(m).__name__})"] += 1
            except Exception:
                pass
            continue
        reason = call_reason(m)
        if reason is None:
            summary.accelerated += 1
        else:
            skipped[f"{reason} (re-checked at every call)"] += 1
    if not found:
        raise ValueError(f"peft_model: no PEFT LoRA layer found in {type(peft_model).__name__}; expected a model "
                         "made by peft.get_peft_model or peft.PeftModel.from_pretrained")
    summary.skipped = dict(skipped)
    return summary


def restore(peft_model: nn.Module) -> AccelerateSummary:
    """Undo :func:`accelerate`: every patched layer gets PEFT's class (and forward) back."""
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model: expected a torch.nn.Module, got {type(peft_model).__name__}")
    n = 0
    for m in peft_model.modules():
        orig = getattr(type(m), _ORIG_ATTR, None)
        if orig is not None:
            m.__class__ = orig
            n += 1
    note = "" if n or not _is_fastpeft_model(peft_model) else "fastpeft model: nothing to restore"
    return AccelerateSummary(restored=n, note=note)


def is_accelerated(module: nn.Module) -> bool:
    return getattr(type(module), _ORIG_ATTR, None) is not None


# -- what ran ----------------------------------------------------------------------------
@dataclass
class FusionReport:
    """Calls of a model's fusable LoRA layers since the last reset (:func:`fusion_report`).

    ``layers``: module path -> ``{"fused": n, <fallback reason>: n, ...}`` for every fusable layer
    (fastpeft's LoRA ``Linear`` and the layers :func:`accelerate` switched), called or not."""

    layers: dict = field(default_factory=dict)

    @property
    def fused_calls(self) -> int:
        return sum(c.get("fused", 0) for c in self.layers.values())

    @property
    def fallback_calls(self) -> int:
        return sum(n for c in self.layers.values() for k, n in c.items() if k != "fused")

    def fallbacks(self) -> dict:
        """reason -> (calls, [layer paths])."""
        out: dict = {}
        for name, c in self.layers.items():
            for k, n in c.items():
                if k != "fused":
                    calls, names = out.get(k, (0, []))
                    out[k] = (calls + n, names + [name])
        return out

    def __str__(self) -> str:
        idle = sum(not c for c in self.layers.values())
        lines = [f"fastpeft.fusion_report: {self.fused_calls} fused and {self.fallback_calls} unfused call(s) "
                 f"of {len(self.layers)} fusable LoRA layer(s) since the last reset"
                 + (f" ({idle} not called)" if idle else "")]
        for reason, (calls, names) in sorted(self.fallbacks().items(), key=lambda kv: -kv[1][0]):
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            lines.append(f"  {calls} unfused call(s) in {len(names)} layer(s) ({', '.join(names[:2])}{more}): "
                         f"{reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _fusable_layers(model: nn.Module):
    from .tuners.lora import Linear as FastLinear
    for name, m in model.named_modules():
        if isinstance(m, FastLinear) or (is_accelerated(m) and not getattr(type(m), "_fastpeft_mixed_only", False)):
            yield name, m


def fusion_report(model: nn.Module, reset: bool = False) -> FusionReport:
    """What ``model``'s fusable LoRA layers ran since the last reset: fused calls and unfused calls
    per reason, per layer (eager calls only; calls inside ``torch.compile`` are not counted).
    ``reset=True`` then zeroes the counts (as :func:`reset_fusion_report`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = dict(_fusable_layers(model))
    report = FusionReport({name: {("fused" if k is None else k): n for k, n in call_counts(m).items()}
                           for name, m in layers.items()})
    if reset:
        reset_call_counts(layers.values())
    return report


def reset_fusion_report(model: Optional[nn.Module] = None) -> None:
    """Zero the call counts of ``model``'s fusable LoRA layers (None: of every layer)."""
    reset_call_counts(None if model is None else (m for _, m in _fusable_layers(model)))


__all__ = ["accelerate", "restore", "AccelerateSummary", "is_accelerated", "fusion_report", "reset_fusion_report",
           "FusionReport", "CALL_TIME_FALLBACKS"]
