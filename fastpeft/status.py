"""HF PEFT's ``get_layer_status`` / ``get_model_status`` for fastpeft models: what every adapter layer holds,
which adapters are active, merged and trainable, and where their weights are (same dataclasses and rules as
``peft.peft_model.TunerLayerStatus`` / ``TunerModelStatus``, so code that inspects them works unchanged)."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn as nn

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list
    merged_adapters: list
    requires_grad: dict
    available_adapters: list
    devices: dict
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list, Irregular]
    merged_adapters: Union[list, Irregular]
    requires_grad: dict
    available_adapters: list
    devices: dict
    quantization_backend: Union[str, None, Irregular] = None


def _adapter_dicts(module: nn.Module):
    """The per-adapter containers of an adapter layer (None: not an adapter layer)."""
    from .peft_model import ModulesToSaveWrapper
    from .tuners.ia3 import IA3Linear
    if isinstance(module, ModulesToSaveWrapper):
        return ("modules_to_save",)
    if isinstance(module, IA3Linear):
        return ("ia3_l",)
    names = getattr(module, "adapter_layer_names", None)
    return tuple(names) if names and hasattr(module, "base_layer") else None


def _irregular(vals) -> Union[bool, Irregular]:
    vals = list(vals)
    if all(v is True for v in vals):
        return True
    if all(v is False for v in vals):
        return False
    return "irregular"


def _layer_status(name: str, module: nn.Module, dicts: tuple) -> TunerLayerStatus:
    grads, devices = collections.defaultdict(list), collections.defaultdict(list)
    for attr in dicts:
        container = getattr(module, attr)
        for key, item in container.items():
            params = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            grads[key] += [p.requires_grad for p in params]
            devices[key] += [p.device.type for p in params]
    from .peft_model import ModulesToSaveWrapper
    if isinstance(module, ModulesToSaveWrapper):
        active, merged, available = [module.active_adapter], [], list(module.modules_to_save)
        enabled = not module._disable_adapters
    else:
        active = list(module.active_adapters)
        merged = list(getattr(module, "merged_adapters", []))
        available = sorted({k for attr in dicts for k in getattr(module, attr).keys()})
        enabled = not bool(module.disable_adapters)
    return TunerLayerStatus(name=name, module_type=repr(module).partition("(")[0], enabled=enabled,
                            active_adapters=active, merged_adapters=merged,
                            requires_grad={k: _irregular(v) for k, v in grads.items()},
                            available_adapters=sorted(available),
                            devices={k: sorted(set(v)) for k, v in devices.items()})


def get_layer_status(model: nn.Module) -> list:
    """One :class:`TunerLayerStatus` per adapter layer (and ``modules_to_save`` wrapper) of ``model`` (a
    fastpeft ``PeftModel`` or a model with injected adapters); ValueError when there is none."""
    from .peft_model import PeftModel
    root = model.base_model if isinstance(model, PeftModel) else model
    out = []
    for name, module in root.named_modules():
        dicts = _adapter_dicts(module)
        if dicts is not None:
            out.append(_layer_status(name, module, dicts))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The :class:`TunerModelStatus` of ``model``: the layers' states combined (``"irregular"`` where the
    layers disagree), parameter counts and the adapters' PEFT types."""
    from .peft_model import PeftModel
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {k: str(getattr(c.peft_type, "value", c.peft_type)) for k, c in model.peft_config.items()}
        first = next(iter(peft_types.values()), "")
        adapter_type = {"LORA": "LoraModel", "IA3": "IA3Model"}.get(first, f"{first.title()}Model")
    else:
        base_type = type(model).__name__ if hasattr(model, "config") else "other"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        peft_types, adapter_type = {}, "None"
    layers = get_layer_status(model)
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: Union[list, Irregular] = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads, devices = collections.defaultdict(list), collections.defaultdict(list)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k] += v
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=[] if not actives else (list(actives.pop()) if len(actives) == 1 else "irregular"),
        merged_adapters=merged, requires_grad={k: _irregular(v) for k, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={k: sorted(set(v)) for k, v in devices.items()}, quantization_backend=None)


__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]
