"""(IA)³: learned per-feature scaling vectors (Liu et al. 2022), HF PEFT compatible.

Each targeted ``nn.Linear`` / transformers ``Conv1D`` (or ``nn.Conv2d`` / ``nn.Conv3d``:
:class:`IA3Conv`) is replaced by an :class:`IA3Linear` wrapper (``base_layer`` + ``ia3_l`` ParameterDict), so
in-memory ``state_dict`` keys are HF PEFT's (``<path>.base_layer.weight``,
``<path>.ia3_l.<adapter>``) and on-disk keys are ``<path>.ia3_l``.

Equivalent PyTorch (l = product of the active adapters' vectors)::

    y = base(x) * l.flatten()        # attention-type target, l: [out, 1]
    y = base(x * l.flatten())        # feed-forward target,   l: [1, in]

Merging folds ``l`` into the weight (and, for attention-type targets, the bias):
``W' = W * l`` (rows or columns), unmerge divides it back out.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .base import PeftConfig
from .._optional import conv1d_cls
from .registry import register_tuner
from .targeting import find_targets, linear_types, candidate_names

PEFT_TYPE = "IA3"

#: HF PEFT's defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING), for common types.
DEFAULT_TARGETS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@dataclass
class IA3Config(PeftConfig):
    """HF PEFT ``IA3Config`` fields.

    target_modules: module names (list: exact name or ``.name`` suffix) or a regex (str, full match).
    exclude_modules: same forms; matching modules are skipped.
    feedforward_modules: the subset of targets scaled on their *input* (``[1, in]``); others scale the output.
    fan_in_fan_out: True when the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``; set automatically).
    init_ia3_weights: True -> vectors start at 1 (identity); False -> random normal (tests).
    """

    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    feedforward_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        self.peft_type = PEFT_TYPE
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, list, tuple, set)):
                raise ValueError(f"IA3Config.{name}: expected a list of names or a regex str, got {v!r}")
            if isinstance(v, (tuple, set)):
                setattr(self, name, sorted(v))
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"IA3Config.feedforward_modules must be a subset of target_modules; "
                                 f"not in target_modules: {extra}")


def _matches(spec, key: str) -> bool:
    """HF PEFT's rule: a str is a full-match regex; a list matches ``key == t`` or ``key`` ending in ``.t``."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


class IA3Linear(nn.Module):
    """(IA)³ wrapper of an ``nn.Linear`` or GPT-2 ``Conv1D`` (``base_layer``), HF PEFT parameter names."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        conv1d = conv1d_cls()
        self.fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.active_adapters: list = []
        self.merged_adapters: list = []
        self.disable_adapters = False

    def add(self, adapter_name: str, init_ones: bool) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        w = self.base_layer.weight
        p = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(p.to(device=w.device, dtype=torch.float32
                                                    if not w.is_floating_point() else w.dtype))
        if not self.active_adapters:  # HF PEFT: a new layer activates it, an existing one keeps its choice
            self.active_adapters.append(adapter_name)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _weight_scale(self, vec: torch.Tensor) -> torch.Tensor:
        # weight is [out, in] (Linear) or [in, out] (Conv1D); vec is [out, 1] or [1, in]
        return vec.t() if self.fan_in_fan_out else vec

    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names or self.active_adapters)
                 if n in self.ia3_l and n not in self.merged_adapters]
        base = self.base_layer
        with torch.no_grad():
            for n in names:
                vec = self.ia3_l[n].detach()
                if safe_merge and not (torch.isfinite(base.weight * self._weight_scale(vec)).all()
                                       and torch.isfinite(vec).all()):
                    raise ValueError(f"IA3 merge: adapter {n!r} gives non-finite merged weights; nothing merged "
                                     f"for this layer")
                base.weight.mul_(self._weight_scale(vec).to(base.weight.dtype))
                if not self.is_feedforward and base.bias is not None:
                    base.bias.mul_(vec.reshape(base.bias.shape).to(base.bias.dtype))
                self.merged_adapters.append(n)

    def unmerge(self) -> None:
        base = self.base_layer
        with torch.no_grad():
            while self.merged_adapters:
                n = self.merged_adapters.pop()
                vec = self.ia3_l[n].detach()
                # same +1e-8 guard as HF PEFT (a zero scale cannot be undone exactly)
                base.weight.div_(self._weight_scale(vec).to(base.weight.dtype) + 1e-8)
                if not self.is_feedforward and base.bias is not None:
                    base.bias.div_(vec.reshape(base.bias.shape).to(base.bias.dtype) + 1e-8)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = None
        for n in self.active_adapters:
            if n in self.ia3_l:
                v = self.ia3_l[n].flatten()
                scale = v if scale is None else scale * v
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x * scale.to(x.dtype)), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return y * scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, adapters={list(self.ia3_l.keys())}"


class IA3Conv(IA3Linear):
    """(IA)³ wrapper of an ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's ``ia3.Conv2d``/``Conv3d``): vectors
    ``[1, C, 1, 1(, 1)]`` scale the input channels (feed-forward) or the output channels."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        nn.Module.__init__(self)
        if is_feedforward and base_layer.groups != 1:
            raise ValueError("IA3: feed-forward (input-scaling) targets must be convolutions with groups=1")
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._kernel_dim = base_layer.weight.dim()
        self.active_adapters = []
        self.merged_adapters = []
        self.disable_adapters = False

    def add(self, adapter_name: str, init_ones: bool) -> None:
        c = self.in_features if self.is_feedforward else self.out_features
        shape = (1, c) + (1,) * (self._kernel_dim - 2)
        w = self.base_layer.weight
        p = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(p.to(device=w.device, dtype=w.dtype))
        if not self.active_adapters:
            self.active_adapters.append(adapter_name)

    def _weight_scale(self, vec: torch.Tensor) -> torch.Tensor:
        # weight [out, in, k...]: output scaling -> [out, 1, 1...]; input scaling -> [1, in, 1...]
        return vec if self.is_feedforward else vec.transpose(0, 1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = None
        for n in self.active_adapters:
            if n in self.ia3_l:
                scale = self.ia3_l[n] if scale is None else scale * self.ia3_l[n]
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return y * scale.to(y.dtype)


def _parent(model: nn.Module, name: str):
    if "." in name:
        p, c = name.rsplit(".", 1)
        return model.get_submodule(p), c
    return model, name


def _resolve_targets(model: nn.Module, config: IA3Config):
    targets, ff = config.target_modules, config.feedforward_modules
    if targets is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGETS:
            raise ValueError(f"IA3Config.target_modules: not given and no default for model_type {mt!r} "
                             f"(defaults exist for {sorted(DEFAULT_TARGETS)}); candidates: "
                             f"{_candidates(model)}")
        targets, default_ff = DEFAULT_TARGETS[mt]
        ff = default_ff if ff is None else ff
    if ff is None:
        ff = []
    return targets, ff


def _candidates(model: nn.Module) -> list:
    return candidate_names(model, linear_types())


def iter_ia3_layers(model: nn.Module):
    for n, m in model.named_modules():
        if isinstance(m, IA3Linear):
            yield n, m


def inject(model: nn.Module, config: IA3Config, adapter_name: str = "default") -> list:
    """Wrap every targeted Linear/Conv1D (:class:`IA3Linear`) or Conv2d/Conv3d (:class:`IA3Conv`)
    and add ``adapter_name``'s vector.

    Returns the touched module names.  Raises ``ValueError`` (model unchanged) when nothing
    matches or a matched module has an unsupported type."""
    if not isinstance(config, IA3Config):
        raise TypeError(f"config: expected IA3Config, got {type(config).__name__}")
    targets, ff = _resolve_targets(model, config)
    cfg = dataclasses.replace(config, target_modules=targets) if targets is not config.target_modules else config
    names = find_targets(model, cfg, linear_types() + (nn.Conv2d, nn.Conv3d, IA3Linear),
                         what="IA3Config.target_modules")
    plan = [(n, model.get_submodule(n)) for n in names]
    for name, mod in plan:
        if isinstance(mod, IA3Linear) and adapter_name in mod.ia3_l:
            raise ValueError(f"adapter_name: {adapter_name!r} already exists on {name}")
    # build every new wrapper first (constructors validate), then mutate the model
    wrappers = {}
    for name, mod in plan:
        if not isinstance(mod, IA3Linear):
            cls = IA3Conv if isinstance(mod, (nn.Conv2d, nn.Conv3d)) else IA3Linear
            wrappers[name] = cls(mod, is_feedforward=_matches(ff, name))
    touched = []
    for name, mod in plan:
        layer = wrappers.get(name, mod)
        layer.add(adapter_name, config.init_ia3_weights)
        if name in wrappers:
            parent, child = _parent(model, name)
            setattr(parent, child, layer)
        touched.append(name)
    _mark_trainable(model, config.inference_mode)
    return touched


def _mark_trainable(model: nn.Module, inference_mode: bool) -> None:
    """HF PEFT's rule: only the active adapters' (IA)³ vectors train; everything else is frozen
    (``modules_to_save`` copies are PeftModel's business)."""
    for n, p in model.named_parameters():
        if ".ia3_l." not in n and "modules_to_save" not in n:
            p.requires_grad_(False)
    for _, m in iter_ia3_layers(model):
        for k, p in m.ia3_l.items():
            p.requires_grad_(k in m.active_adapters and not inference_mode)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *, config=None) -> dict:
    """On-disk tensors: ``{"<path>.ia3_l": tensor}`` (HF PEFT keys without ``base_model.model.``)."""
    out = {}
    for n, m in iter_ia3_layers(model):
        if adapter_name in m.ia3_l:
            out[f"{n}.ia3_l"] = m.ia3_l[adapter_name].detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str = "default", *, config=None) -> None:
    """Validate (missing / unexpected keys, shapes) and copy ``state`` into ``adapter_name``'s vectors."""
    params = {f"{n}.ia3_l": m.ia3_l[adapter_name] for n, m in iter_ia3_layers(model) if adapter_name in m.ia3_l}
    _check_and_copy(params, state, "IA3")


def _check_and_copy(params: dict, state: dict, what: str) -> None:
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                 for k in set(params) & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"{what} adapter does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {bad}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def remove(model: nn.Module, adapter_name: str = "default", *, unwrap_empty: bool = True) -> None:
    """Drop ``adapter_name``; wrappers left without adapters are replaced by their base layer
    (always: IA3 does not keep empty wrappers, whatever ``unwrap_empty``)."""
    for name, m in list(iter_ia3_layers(model)):
        if adapter_name not in m.ia3_l:
            continue
        if adapter_name in m.merged_adapters:
            warnings.warn(f"IA3: removing adapter {adapter_name!r} of {name} while merged; "
                          f"the base weights keep the merged scaling")
            m.merged_adapters.remove(adapter_name)
        del m.ia3_l[adapter_name]
        if adapter_name in m.active_adapters:
            m.active_adapters.remove(adapter_name)
        if len(m.ia3_l) == 0:
            parent, child = _parent(model, name)
            setattr(parent, child, m.base_layer)


def merge(model: nn.Module, adapter_names=None, *, safe_merge: bool = False) -> None:
    """Fold the (active or named) adapters into the base weights.  ``safe_merge`` checks every
    layer first and raises, with nothing merged, when a merged weight would be non-finite."""
    layers = [m for _, m in iter_ia3_layers(model)]
    if safe_merge:
        for m in layers:
            for n in (adapter_names or m.active_adapters):
                if n in m.ia3_l and n not in m.merged_adapters:
                    w = m.base_layer.weight.detach() * m._weight_scale(m.ia3_l[n].detach())
                    if not torch.isfinite(w).all():
                        raise ValueError(f"IA3 merge: adapter {n!r} would give non-finite weights; nothing merged")
    for m in layers:
        m.merge(adapter_names)


def unmerge(model: nn.Module) -> None:
    for _, m in iter_ia3_layers(model):
        m.unmerge()


def set_adapter(model: nn.Module, adapter_names, *, inference_mode: bool = False) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for _, m in iter_ia3_layers(model):
        m.active_adapters = [n for n in names if n in m.ia3_l]
        for k, p in m.ia3_l.items():
            p.requires_grad_(k in names and not inference_mode)


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    for _, m in iter_ia3_layers(model):
        m.disable_adapters = not enabled


register_tuner(PEFT_TYPE, IA3Config, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, merge=merge, unmerge=unmerge, set_adapter=set_adapter,
               enable_adapters=enable_adapters)
