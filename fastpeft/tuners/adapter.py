"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; parallel, He et al. 2022)
inserted into the transformer blocks of BERT-like, Llama-like, GPT-2-like and ViT models.

Every adapter computes, through the fused op :func:`fastpeft.ops.bottleneck_adapter`::

    adapter(h) = drop(act(h @ W_downᵀ + b_down)) @ W_upᵀ + b_up     # W_down [Bn, H], W_up [H, Bn]

and is placed as follows (``adapter_type``):

* ``"houlsby"``: serially after the attention output projection and after the FFN
  output projection, ``y = s + adapter(s)`` where ``s`` is the sub-layer output
  *before* the block adds its residual (and, in BERT, applies LayerNorm), as in the paper;
* ``"pfeiffer"``: the FFN one only;
* ``"parallel"``: beside the FFN, ``y = ffn(x) + adapter(x)`` with ``x`` the FFN input.

Hook sites per architecture (a block is recognised by these attributes):

=============  =========================  =================  ==========================
block          attention output           FFN output         parallel (input -> add)
=============  =========================  =================  ==========================
BERT/ViT-like  ``attention.output.dense``  ``output.dense``    ``intermediate`` -> ``output.dense``
Llama-like     ``self_attn.o_proj``        ``mlp.down_proj``   ``mlp`` -> ``mlp``
GPT-2-like     ``attn.c_proj``             ``mlp.c_proj``      ``mlp`` -> ``mlp``
ViT (tf 5)     ``attention.o_proj``        ``mlp.fc2``         ``mlp`` -> ``mlp``
=============  =========================  =================  ==========================

Parameters live on the block: ``<block>.bottleneck_adapter_attn.<adapter>.adapter_down.weight``
(``_ffn`` likewise; on disk without ``.<adapter>``).

With ``target_modules`` (any model, e.g. a CNN) the adapters go serially after each named ``nn.Linear`` /
``nn.Conv2d`` instead, ``y = s + adapter(s)`` with ``s`` the module's output; on a Conv2d output
``[N, C, H, W]`` the adapter runs over the channels at every pixel (a 1×1-conv bottleneck, as the residual
adapters of Rebuffi et al. 2017): ``adapter(s.movedim(1, -1)).movedim(-1, 1)``.  Parameters then live on the
targeted module: ``<module>.bottleneck_adapter_out.<adapter>.adapter_down.weight``.  The up-projection starts at
zero (``init_weights=True``) so a fresh adapter leaves the model's outputs unchanged.
Adapters are forward hooks: :func:`remove` takes the hooks and parameters away again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..blocks import ARCHS, find_typed_blocks
from .base import PeftConfig
from .registry import register_tuner
from .targeting import find_targets, linear_types

PEFT_TYPE = "BOTTLENECK_ADAPTER"
ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
ACTIVATION_NAMES = ("relu", "gelu", "gelu_tanh", "silu")
_STATE_ATTR = "_fastpeft_bottleneck"
_CONTAINERS = {"attn": "bottleneck_adapter_attn", "ffn": "bottleneck_adapter_ffn",
               "out": "bottleneck_adapter_out"}  # "out": on a module named by target_modules


@dataclass
class BottleneckAdapterConfig(PeftConfig):
    """adapter_type: "houlsby" | "pfeiffer" | "parallel".
    reduction_factor: bottleneck size Bn = H // reduction_factor (at least 1), unless
    bottleneck_size (> 0) is given.  activation: "relu" | "gelu" | "gelu_tanh" | "silu".
    adapter_dropout: dropout on the bottleneck activation while training, in [0, 1).
    init_weights: True -> zero up-projection (identity at start); False -> small random (tests).
    layers_to_transform: block indices (in model order) to adapt; None -> all.
    target_modules: None (the transformer-block sites above), or names (exact path or ``.name`` suffix) /
    a regex (full match) of ``nn.Linear`` / ``nn.Conv2d`` modules to put a serial adapter after (any model,
    CNNs included; Conv2d: over the channels); ``adapter_type`` must then be "houlsby" or "pfeiffer"
    (they mean the same there) and ``layers_to_transform`` None."""

    adapter_type: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    activation: str = "relu"
    adapter_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: Optional[list] = None
    target_modules: Optional[Union[list, str]] = None

    def __post_init__(self):
        self.peft_type = PEFT_TYPE
        if self.target_modules is not None:
            if isinstance(self.target_modules, (tuple, set)):
                self.target_modules = sorted(self.target_modules)
            if not isinstance(self.target_modules, (list, str)):
                raise ValueError(f"BottleneckAdapterConfig.target_modules: expected None, a list of module names "
                                 f"or a regex str, got {self.target_modules!r}")
            if self.adapter_type == "parallel":
                raise ValueError("BottleneckAdapterConfig.target_modules: adapters after named modules are serial; "
                                 "adapter_type='parallel' needs the transformer-block sites (target_modules=None)")
            if self.layers_to_transform is not None:
                raise ValueError("BottleneckAdapterConfig.layers_to_transform: applies to transformer blocks; "
                                 "with target_modules, name the modules instead")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"BottleneckAdapterConfig.adapter_type: expected one of {ADAPTER_TYPES}, "
                             f"got {self.adapter_type!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or self.reduction_factor <= 0:
            raise ValueError(f"BottleneckAdapterConfig.reduction_factor: expected a number > 0, "
                             f"got {self.reduction_factor!r}")
        if self.bottleneck_size is not None and (isinstance(self.bottleneck_size, bool) or
                                                 not isinstance(self.bottleneck_size, int) or
                                                 self.bottleneck_size <= 0):
            raise ValueError(f"BottleneckAdapterConfig.bottleneck_size: expected an int > 0 or None, "
                             f"got {self.bottleneck_size!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"BottleneckAdapterConfig.activation: expected one of {ACTIVATION_NAMES}, "
                             f"got {self.activation!r}")
        if not isinstance(self.adapter_dropout, (int, float)) or not 0.0 <= float(self.adapter_dropout) < 1.0:
            raise ValueError(f"BottleneckAdapterConfig.adapter_dropout: expected a float in [0, 1), "
                             f"got {self.adapter_dropout!r}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def bottleneck_for(self, hidden: int) -> int:
        return self.bottleneck_size if self.bottleneck_size is not None else max(1, int(hidden // self.reduction_factor))


class BottleneckAdapter(nn.Module):
    """One adapter: ``adapter_down`` (H -> Bn) and ``adapter_up`` (Bn -> H), run by the fused op."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, dropout: float, init_weights: bool,
                 device=None, dtype=None):
        super().__init__()
        self.adapter_down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        self.activation = activation
        self.dropout = float(dropout)
        with torch.no_grad():
            if init_weights:
                nn.init.zeros_(self.adapter_up.weight)
                nn.init.zeros_(self.adapter_up.bias)
            else:
                nn.init.normal_(self.adapter_up.weight, std=0.1)
                nn.init.normal_(self.adapter_up.bias, std=0.1)

    def forward(self, x: torch.Tensor, residual: bool = True) -> torch.Tensor:
        from ..ops.bottleneck_adapter import bottleneck_adapter
        p = self.dropout if self.training else 0.0
        return bottleneck_adapter(x, self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight,
                                  self.adapter_up.bias, activation=self.activation, dropout_p=p, seed=None,
                                  residual=residual)

    def forward_reference(self, x: torch.Tensor, residual: bool = True) -> torch.Tensor:
        """Plain PyTorch (no dropout): ``x + up(act(down(x)))``."""
        from ..ops.bottleneck_adapter.reference import ACTIVATIONS
        y = self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(x)))
        return x + y if residual else y

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"


def _out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    w = getattr(m, "weight", None)
    if getattr(m, "nf", None) is not None:  # transformers Conv1D
        return int(m.nf)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.shape[0]
    raise ValueError(f"cannot tell the output size of {type(m).__name__}")


class _State:
    def __init__(self):
        self.handles: dict = {}       # adapter -> [hook handles]
        self.configs: dict = {}       # adapter -> config
        self.active: list = []
        self.enabled = True


def _state(model: nn.Module, create: bool = False) -> _State:
    st = model.__dict__.get(_STATE_ATTR)
    if st is None:
        st = _State()
        if create:
            object.__setattr__(model, _STATE_ATTR, st)
    return st


def _tensor_out(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_out(output, y):
    return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y


# Hooks keep no references of their own: they find (state, container, slot) in the hooked
# module's ``__dict__`` under _CTX_ATTR[adapter], so ``copy.deepcopy(model)`` gives a copy
# whose hooks use the copy's adapters (deepcopy's memo maps those references).
_CTX_ATTR = "_fastpeft_bottleneck_ctx"


def _set_ctx(module: nn.Module, name: str, ctx: tuple) -> None:
    d = module.__dict__.get(_CTX_ATTR)
    if d is None:
        d = {}
        object.__setattr__(module, _CTX_ATTR, d)
    d[name] = ctx


def _ctx(module: nn.Module, name: str):
    st, container, slot = module.__dict__[_CTX_ATTR][name]
    return st, container, slot


def _first_arg(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def _serial_hook(name: str):
    def hook(module, args, output):
        st, container, _ = _ctx(module, name)
        if not st.enabled or name not in st.active:
            return None
        return _replace_out(output, container[name](_tensor_out(output), residual=True))
    return hook


def _serial_channel_hook(name: str):  # Conv2d output [N, C, H, W]: the adapter runs over C
    def hook(module, args, output):
        st, container, _ = _ctx(module, name)
        if not st.enabled or name not in st.active:
            return None
        y = _tensor_out(output)
        return _replace_out(output, container[name](y.movedim(1, -1), residual=True).movedim(-1, 1))
    return hook


def _parallel_same_module_hook(name: str):  # Llama / GPT-2 / ViT: y = mlp(x) + adapter(x)
    def hook(module, args, kwargs, output):
        st, container, _ = _ctx(module, name)
        if not st.enabled or name not in st.active:
            return None
        return _replace_out(output, _tensor_out(output) + container[name](_first_arg(args, kwargs), residual=False))
    return hook


def _parallel_capture_hook(name: str):  # BERT: x = input of `intermediate`
    def capture(module, args, kwargs):
        _ctx(module, name)[2]["x"] = _first_arg(args, kwargs)
        return None
    return capture


def _parallel_add_hook(name: str):  # BERT: output.dense(...) + adapter(x)
    def add(module, args, output):
        st, container, slot = _ctx(module, name)
        x = slot.pop("x", None)
        if not st.enabled or name not in st.active:
            return None
        if x is None:
            raise RuntimeError("bottleneck adapter (parallel): the FFN input was not captured; the block "
                               "did not call its `intermediate` module before `output.dense`")
        return _replace_out(output, _tensor_out(output) + container[name](x, residual=False))
    return add


def inject(model: nn.Module, config: BottleneckAdapterConfig, adapter_name: str = "default") -> list:
    """Add ``adapter_name``'s adapters to every recognised block; returns the hooked module paths."""
    if not isinstance(config, BottleneckAdapterConfig):
        raise TypeError(f"config: expected BottleneckAdapterConfig, got {type(config).__name__}")
    st = _state(model)
    if adapter_name in st.configs:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    if config.target_modules is not None:
        touched = _inject_at_targets(model, config, adapter_name, st)
        object.__setattr__(model, _STATE_ATTR, st)
        st.configs[adapter_name] = config
        if not st.active:
            st.active = [adapter_name]
        _mark_trainable(model, st, config.inference_mode)
        return touched
    blocks = find_typed_blocks(model)
    if not blocks:
        lists = [f"{n} ({type(m[0]).__name__} x{len(m)})" for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m)]
        raise ValueError("bottleneck adapters: no transformer block recognised in "
                         f"{type(model).__name__}; a block needs "
                         + "; ".join(f"{k}-like: {', '.join(v[:2])}" for k, v in ARCHS.items())
                         + f". Module lists of the model (candidates): {lists or 'none'}")
    if config.layers_to_transform is not None:
        bad = [i for i in config.layers_to_transform if not isinstance(i, int) or not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"BottleneckAdapterConfig.layers_to_transform: indices {bad} out of range; the "
                             f"model has {len(blocks)} blocks (0..{len(blocks) - 1})")
        blocks = [b for i, b in enumerate(blocks) if i in set(config.layers_to_transform)]
    kinds = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}[config.adapter_type]
    # plan everything first (sizes, devices), then mutate: nothing half-done on error
    plan = []
    for path, block, kind in blocks:
        attn_site, ffn_site, par_in, par_add = ARCHS[kind]
        for k in kinds:
            site = attn_site if k == "attn" else ffn_site
            size_src = block.get_submodule(ffn_site if k == "ffn" else attn_site)
            H = _out_features(size_src)
            ref = next(size_src.parameters())
            dtype = ref.dtype if ref.is_floating_point() else None
            plan.append((path, block, kind, k, site, H, ref.device, dtype))
    created, handles, touched, ctx_mods = [], [], [], []
    try:
        for path, block, kind, k, site, H, device, dtype in plan:
            cname = _CONTAINERS[k]
            container = getattr(block, cname, None)
            if container is None:
                container = nn.ModuleDict()
                block.add_module(cname, container)
                created.append((block, cname))
            container[adapter_name] = BottleneckAdapter(H, config.bottleneck_for(H), config.activation,
                                                        config.adapter_dropout, config.init_weights,
                                                        device=device, dtype=dtype)
            if config.adapter_type == "parallel":
                _, _, par_in, par_add = ARCHS[kind]
                slot = {}
                add_mod = block.get_submodule(par_add)
                _set_ctx(add_mod, adapter_name, (st, container, slot))
                ctx_mods.append(add_mod)
                if par_in == par_add:
                    handles.append(add_mod.register_forward_hook(_parallel_same_module_hook(adapter_name),
                                                                 with_kwargs=True))
                else:
                    in_mod = block.get_submodule(par_in)
                    _set_ctx(in_mod, adapter_name, (st, container, slot))
                    ctx_mods.append(in_mod)
                    handles.append(in_mod.register_forward_pre_hook(_parallel_capture_hook(adapter_name),
                                                                    with_kwargs=True))
                    handles.append(add_mod.register_forward_hook(_parallel_add_hook(adapter_name)))
                touched.append(f"{path}.{par_add}")
            else:
                site_mod = block.get_submodule(site)
                _set_ctx(site_mod, adapter_name, (st, container, None))
                ctx_mods.append(site_mod)
                handles.append(site_mod.register_forward_hook(_serial_hook(adapter_name)))
                touched.append(f"{path}.{site}")
    except Exception:
        for h in handles:
            h.remove()
        for m in ctx_mods:
            m.__dict__.get(_CTX_ATTR, {}).pop(adapter_name, None)
        for path, block, kind, k, *_ in plan:
            c = getattr(block, _CONTAINERS[k], None)
            if c is not None and adapter_name in c:
                del c[adapter_name]
        for block, cname in created:
            delattr(block, cname)
        raise
    object.__setattr__(model, _STATE_ATTR, st)  # the object the hooks hold
    st.handles[adapter_name] = handles
    st.configs[adapter_name] = config
    if not st.active:
        st.active = [adapter_name]
    _mark_trainable(model, st, config.inference_mode)
    return touched


def _inject_at_targets(model: nn.Module, config: BottleneckAdapterConfig, adapter_name: str, st: _State) -> list:
    """Serial adapters after every targeted Linear / Conv2d (``config.target_modules``); all or nothing."""
    names = [n for n in find_targets(model, config, linear_types() + (nn.Conv2d,),
                                     what="BottleneckAdapterConfig.target_modules")
             if n.rsplit(".", 1)[-1] not in ("adapter_down", "adapter_up")]
    created, handles = [], []
    try:
        for n in names:
            mod = model.get_submodule(n)
            conv = isinstance(mod, nn.Conv2d)
            H = mod.out_channels if conv else _out_features(mod)
            ref = mod.weight
            container = getattr(mod, _CONTAINERS["out"], None)
            if container is None:
                container = nn.ModuleDict()
                mod.add_module(_CONTAINERS["out"], container)
                created.append(mod)
            container[adapter_name] = BottleneckAdapter(H, config.bottleneck_for(H), config.activation,
                                                        config.adapter_dropout, config.init_weights,
                                                        device=ref.device, dtype=ref.dtype)
            _set_ctx(mod, adapter_name, (st, container, None))
            handles.append(mod.register_forward_hook((_serial_channel_hook if conv else _serial_hook)(adapter_name)))
    except Exception:
        for h in handles:
            h.remove()
        for n in names:
            mod = model.get_submodule(n)
            mod.__dict__.get(_CTX_ATTR, {}).pop(adapter_name, None)
            c = getattr(mod, _CONTAINERS["out"], None)
            if c is not None and adapter_name in c:
                del c[adapter_name]
        for mod in created:
            delattr(mod, _CONTAINERS["out"])
        raise
    st.handles[adapter_name] = handles
    return names


def _adapter_modules(model: nn.Module, adapter_name: str):
    """``[(on-disk prefix, BottleneckAdapter)]`` of one adapter."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleDict) and name.rsplit(".", 1)[-1] in _CONTAINERS.values() \
                and adapter_name in m:
            out.append((name, m[adapter_name]))
    return out


def _mark_trainable(model: nn.Module, st: _State, inference_mode: bool) -> None:
    for n, p in model.named_parameters():
        if ".bottleneck_adapter_" not in f".{n}" and "modules_to_save" not in n:
            p.requires_grad_(False)
    for name in st.configs:
        for _, m in _adapter_modules(model, name):
            m.requires_grad_(name in st.active and not inference_mode)


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", *, config=None) -> dict:
    out = {}
    for prefix, m in _adapter_modules(model, adapter_name):
        for k, v in m.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str = "default", *, config=None) -> None:
    params = {}
    for prefix, m in _adapter_modules(model, adapter_name):
        for k, p in m.named_parameters():
            params[f"{prefix}.{k}"] = p
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
                 for k in set(params) & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if missing or unexpected or bad:
        raise ValueError(f"bottleneck adapter does not match the model: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}, shape mismatches {bad[:10]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def remove(model: nn.Module, adapter_name: str = "default", *, unwrap_empty: bool = True) -> None:
    """Take the adapter's hooks and parameters away (hooks, not wrapper layers: nothing to unwrap)."""
    st = _state(model)
    if adapter_name not in st.configs:
        raise ValueError(f"adapter_name: no bottleneck adapter {adapter_name!r} (present: {sorted(st.configs)})")
    for h in st.handles.pop(adapter_name):
        h.remove()
    for m in model.modules():
        ctx = m.__dict__.get(_CTX_ATTR)
        if ctx is not None:
            ctx.pop(adapter_name, None)
            if not ctx:
                object.__delattr__(m, _CTX_ATTR)
    del st.configs[adapter_name]
    if adapter_name in st.active:
        st.active.remove(adapter_name)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.ModuleDict) and name.rsplit(".", 1)[-1] in _CONTAINERS.values():
            if adapter_name in m:
                del m[adapter_name]
            if len(m) == 0:
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                delattr(parent, name.rsplit(".", 1)[-1])
    if not st.configs:
        object.__delattr__(model, _STATE_ATTR)


def set_adapter(model: nn.Module, adapter_names, *, inference_mode: bool = False) -> None:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    st = _state(model)
    unknown = [n for n in names if n not in st.configs]
    if unknown:
        raise ValueError(f"adapter_names: unknown bottleneck adapters {unknown} (present: {sorted(st.configs)})")
    st.active = names
    for name in st.configs:
        for _, m in _adapter_modules(model, name):
            m.requires_grad_(name in names and not inference_mode)


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    _state(model, create=True).enabled = bool(enabled)


register_tuner(PEFT_TYPE, BottleneckAdapterConfig, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, set_adapter=set_adapter, enable_adapters=enable_adapters)
