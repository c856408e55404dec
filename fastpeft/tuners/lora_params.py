"""``LoraConfig(target_parameters=[...])``: LoRA on an ``nn.Parameter`` itself (e.g. the stacked expert weights
of a mixture-of-experts layer, which are not ``nn.Linear`` modules), HF PEFT's ``lora.ParamWrapper``.

The module owning the parameter is wrapped by :class:`ParamWrapper` (one per targeted parameter; two
parameters of one module give nested wrappers).  For a 2-D parameter ``W [out, in]``, ``ΔW = s · B A`` (A
``[r, in]``, B ``[out, r]``); for a 3-D parameter ``[E, d1, d2]`` (E experts) A is ``[r·E, d2]`` and B
``[d1, r·E]`` (``in``/``out`` swapped unless the module sets ``is_transposed``) and
``ΔW[e] = s · B[:, e-th block] A[e-th block]`` (HF's ``einsum("o r e, e r i -> e o i")``).  The forward runs
the module with ``W + ΔW`` through ``torch.nn.utils.parametrize`` (the parametrization lives only during the
call), so the module's own code is unchanged.  No dropout, DoRA or ``fan_in_fan_out`` (as HF PEFT).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .lora import LoraLayer, _check_rank
from .targeting import get_submodule_parent, pattern_value


class _DeltaProxy(nn.Module):
    """Parametrization ``W -> W + delta`` (half-precision weights are added in the delta's dtype)."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if W.dtype in (torch.float16, torch.bfloat16) and self.delta.dtype == torch.float32:
            info = torch.finfo(W.dtype)
            return (W.float() + self.delta).clamp(info.min, info.max).to(W.dtype)
        return W + self.delta.to(W.dtype)


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on ``base_layer.<parameter_name>`` (see the module doc)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int, lora_alpha: float,
                 config):
        super().__init__()
        self._init_lora_state(base_layer)
        self.parameter_name = parameter_name
        for field, bad in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                           ("use_dora", config.use_dora)):
            if bad:
                raise ValueError(f"target_parameters: {field} is not supported for LoRA on parameters "
                                 f"({parameter_name}), as in HF PEFT")
        shape = tuple(self.get_param().shape)
        if len(shape) == 3:
            self.num_experts, self.in_features, self.out_features = shape
            self._swapped = not getattr(self.get_base_layer(), "is_transposed", False)
            if self._swapped:
                self.in_features, self.out_features = self.out_features, self.in_features
        elif len(shape) == 2:
            self.num_experts, self.in_features, self.out_features, self._swapped = 1, shape[1], shape[0], False
        else:
            raise ValueError(f"target_parameters: {parameter_name} has shape {shape}; only 2-D and 3-D parameters "
                             "can be targeted")
        self.fan_in_fan_out = False
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def get_base_layer(self) -> nn.Module:
        """The module that owns the parameter (below nested wrappers)."""
        m = self.base_layer
        while isinstance(m, ParamWrapper):
            m = m.base_layer
        return m

    def get_param(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config) -> None:
        from .lora_init import init_linear
        if config.init_lora_weights not in (True, False, "gaussian", "orthogonal"):
            raise ValueError(f"target_parameters: init_lora_weights={config.init_lora_weights!r} is not supported "
                             "for LoRA on parameters (True, False, 'gaussian' or 'orthogonal')")
        self._common_update(adapter_name, r, lora_alpha, config)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        init_linear(self, adapter_name, config.init_lora_weights, config.loftq_config)
        p = self.get_param()
        for d in (self.lora_A, self.lora_B):
            d[adapter_name] = d[adapter_name].to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        s = self.scaling[adapter]
        if self.num_experts == 1:
            delta = (B @ A) * s
        else:
            A3 = A.reshape(self.num_experts, -1, A.shape[-1])                 # [E, r, in]
            B3 = B.reshape(B.shape[0], -1, self.num_experts)                  # [out, r, E]
            delta = torch.einsum("o r e, e r i -> e o i" if self._swapped else "o r e, e r i -> e i o", B3, A3) * s
        p = self.get_param()
        return delta.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else delta.dtype)

    @contextmanager
    def _lora_applied(self, names):
        if not names:
            yield
            return
        delta = sum(self.get_delta_weight(a) for a in names)
        owner = self.get_base_layer()
        grad = self.get_param().requires_grad
        parametrize.register_parametrization(owner, self.parameter_name, _DeltaProxy(delta))
        owner.parametrizations[self.parameter_name].original.requires_grad_(grad)
        try:
            yield
        finally:
            plist = owner.parametrizations[self.parameter_name]
            if len(plist) == 1:
                parametrize.remove_parametrizations(owner, self.parameter_name, leave_parametrized=False)
            else:
                del plist[len(plist) - 1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names: mixed-adapter batches are not supported for LoRA on parameters "
                             "(nor by HF PEFT)")
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        with self._lora_applied([a for a in self._active_adapter if a in self.lora_A]):
            return self.base_layer(x, *args, **kwargs)

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        p = self.get_param()
        new = p.data + self.get_delta_weight(a).to(p.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights; adapter {a!r} seems broken")
        p.data.copy_(new)

    def _unmerge_one(self, a: str) -> None:
        if a in self.r:
            p = self.get_param()
            p.data.sub_(self.get_delta_weight(a).to(p.dtype))

    def __repr__(self) -> str:
        rep = "lora." + super().__repr__()
        idx = rep.find("(") + 1
        return f"{rep[:idx]}\n  parameter_name='{self.parameter_name}',{rep[idx:]}"


def _strip_base_layer(name: str) -> str:
    while ".base_layer" in name:
        prefix, _, suffix = name.rpartition(".base_layer")
        name = prefix + suffix
    return name


def _outermost(model: nn.Module, name: str) -> str:
    """The path of the outermost wrapper around module ``name`` (``name`` itself when unwrapped)."""
    while name.endswith(".base_layer") or name == "base_layer":
        parent = name[: -len(".base_layer")] if name.endswith(".base_layer") else ""
        if not parent or not isinstance(model.get_submodule(parent), ParamWrapper):
            break
        name = parent
    return name


def inject_parameters(model: nn.Module, config, adapter_name: str) -> tuple:
    """Wrap every parameter named by ``config.target_parameters`` (a full ``module.param`` path or a suffix of
    it).  Returns ``(targeted parameter paths, undo list)``; raises ValueError when nothing matches."""
    targets = sorted(set(config.target_parameters))
    done, swapped, updated = [], [], []
    try:
        for module_name, module in list(model.named_modules()):
            if not module_name or isinstance(module, ParamWrapper) or hasattr(module, "adapter_layer_names"):
                continue
            for param_name, _ in list(module.named_parameters(recurse=False)):
                key = f"{_strip_base_layer(module_name)}.{param_name}"
                if key not in targets and not any(key.endswith(f".{t}") for t in targets):
                    continue
                outer = _outermost(model, module_name)
                parent_name = outer.rpartition(".")[0]
                if outer.endswith("base_layer") and hasattr(model.get_submodule(parent_name), "adapter_layer_names"):
                    raise ValueError(f"target_parameters: {key} belongs to {parent_name}, which target_modules made a "
                                     "LoRA layer already; target it one way only")
                existing = model.get_submodule(outer)
                while isinstance(existing, ParamWrapper) and existing.parameter_name != param_name:
                    existing = existing.base_layer
                r = pattern_value(config.rank_pattern, key, config.r)
                alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
                _check_rank(f"rank_pattern for {key}", r)
                if isinstance(existing, ParamWrapper):
                    existing.update_layer(adapter_name, r, alpha, config)
                    updated.append(existing)
                else:
                    parent, child = get_submodule_parent(model, outer)
                    old = getattr(parent, child)
                    setattr(parent, child, ParamWrapper(old, adapter_name, param_name, r, alpha, config))
                    swapped.append((parent, child, old))
                done.append(key)
    except Exception:
        undo_parameters(updated, swapped, adapter_name)
        raise
    if not done:
        raise ValueError(f"target_parameters={config.target_parameters!r} matched no parameter of "
                         f"{type(model).__name__}")
    return done, (updated, swapped)


def undo_parameters(updated, swapped, adapter_name: str) -> None:
    for layer in updated:
        layer.delete_adapter(adapter_name)
    for parent, child, old in reversed(swapped):
        setattr(parent, child, old)


__all__ = ["ParamWrapper", "inject_parameters", "undo_parameters"]
