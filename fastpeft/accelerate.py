"""``fastpeft.accelerate`` / ``fastpeft.restore``: switch the LoRA layers of a model made
by Hugging Face PEFT to fastpeft's fused LoRA op in place, and back.

How: each supported ``peft.tuners.lora.Linear`` instance gets its ``__class__``
swapped to a subclass whose ``forward`` runs :func:`fastpeft.ops.lora_linear` when
the layer's state allows it and PEFT's own ``forward`` otherwise.  No parameter,
buffer or attribute is added or renamed, so ``state_dict`` keys and
``save_pretrained`` output are unchanged; ``restore`` swaps the original class back.

The fused path is taken at a call only when the layer's base layer is a plain ``nn.Linear`` or
transformers ``Conv1D`` (not quantised) and the call and the layer's state allow it (one active,
unmerged, enabled vanilla adapter; dtypes the op pairs; no autocast): the rule is
:mod:`fastpeft.ops.lora_linear.layer`, shared with fastpeft's own LoRA layers.  Otherwise PEFT's
forward runs.

Note: with ``lora_dropout > 0`` in training mode the fused op draws its mask from
fastpeft's Philox RNG (seeded from torch's generator), not from ``nn.Dropout``'s, so
individual masks differ from PEFT's while the distribution is the same.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from ._optional import peft_lora_linear_cls
from .ops.lora_linear.layer import base_layer_reason, call_reason, fused_lora_forward

_FAST_CLASSES: dict = {}
_ORIG_ATTR = "_fastpeft_original_class"


@dataclass
class AccelerateSummary:
    """What :func:`accelerate` / :func:`restore` did."""

    accelerated: int = 0            # patched layers whose current state takes the fused path
    patched: int = 0                # layers switched (fused whenever their state allows)
    skipped: dict = field(default_factory=dict)   # reason -> number of layers running PEFT's forward
    restored: int = 0
    note: str = ""

    def __str__(self) -> str:
        lines = []
        if self.note:
            lines.append(self.note)
        if self.restored:
            lines.append(f"fastpeft.restore: {self.restored} LoRA layer(s) back on PEFT's forward")
        else:
            lines.append(f"fastpeft.accelerate: {self.accelerated} LoRA layer(s) on the fused path "
                         f"({self.patched} patched)")
        for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} layer(s) use PEFT's forward: {reason}")
        return "\n".join(lines)

    __repr__ = __str__


def _fast_forward(self, x, *args, **kwargs):
    if call_reason(self, x, args, kwargs) is not None:
        return super(type(self), self).forward(x, *args, **kwargs)
    return fused_lora_forward(self, x)


def _original_name(self) -> str:
    """``nn.Module._get_name``: PEFT's class name, so ``print(model)`` and ``get_layer_status()`` show
    ``lora.Linear`` as before the switch, not the swapped class."""
    return getattr(type(self), _ORIG_ATTR).__name__


def _fast_class(orig: type) -> type:
    cls = _FAST_CLASSES.get(orig)
    if cls is None:
        name = "Fastpeft" + orig.__name__
        cls = type(name, (orig,), {"forward": _fast_forward, "_get_name": _original_name, _ORIG_ATTR: orig,
                                   "__module__": __name__})
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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_fastpeft_model(model) -> bool:
    from .peft_model import PeftModel
    return isinstance(model, PeftModel)


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
    summary = AccelerateSummary()
    skipped = Counter()
    found = False
    for _, m in peft_model.named_modules():
        orig = getattr(type(m), _ORIG_ATTR, None)
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


__all__ = ["accelerate", "restore", "AccelerateSummary", "is_accelerated"]
