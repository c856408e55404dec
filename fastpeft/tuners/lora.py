"""LoRA (plus rsLoRA scaling, rank/alpha patterns and DoRA) for fastpeft.

Layer modules mirror HF PEFT's ``LoraLayer`` (``base_layer``; ``lora_A`` / ``lora_B``
ModuleDicts and ``lora_embedding_A`` / ``lora_embedding_B`` ParameterDicts keyed by
adapter name; ``lora_dropout``; ``scaling``; ``lora_magnitude_vector`` for DoRA),
so ``state_dict`` keys are HF PEFT's.

* :class:`Linear` wraps ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight
  ``[in, out]``, ``fan_in_fan_out=True``).  With exactly one active, unmerged,
  enabled vanilla adapter it runs the fused op :func:`fastpeft.ops.lora_linear`
  (``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``, dropout inside the op on fastpeft's Philox
  RNG; fp32 adapters on an fp16/bf16 model are fused too, computing in the activation
  dtype, and so are calls under ``torch.autocast``); otherwise (several adapters, merged,
  disabled, DoRA, other dtypes) the plain PyTorch path, which is HF PEFT's forward.
* :class:`Embedding` and :class:`Conv2d` (``conv(k×k, in→r)`` then ``1×1 conv r→out``)
  use plain PyTorch LoRA.
* Mixed-adapter batches (``adapter_names=`` here or the :func:`fastpeft.mixed_batch.mixed_adapters` context
  that ``PeftModel`` enters): Linear / Conv1D / Embedding layers run
  :func:`fastpeft.ops.lora_linear_multi` / ``lora_embedding_multi`` on the stacked adapters
  (:mod:`fastpeft.ops.lora_linear_multi.layer`), other layers a loop over the adapters present.
* DoRA (Linear / Conv1D): ``y = base + (m/‖W + s·BA‖ - 1) · (x Wᵀ) + (m/‖·‖) · s · B A x``
  with the row norm detached, as HF PEFT; the norm is cached per adapter and only
  rebuilt when A, B or W changed (tensor version counters).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mixed_batch import BASE_ADAPTER, current_adapter_names
from ..ops.lora_linear.layer import lora_forward
from ..ops.lora_linear_multi.layer import expand_names, mixed_forward
from .base import PeftConfig
from .lora_init import check_init, init_linear
from .._optional import conv1d_cls
from .registry import register_tuner
from .targeting import find_targets, get_submodule_parent, pattern_value

PEFT_TYPE = "LORA"
_BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA config with HF PEFT's field names (``adapter_config.json`` is interchangeable).

    ``target_modules``: list of module names (exact path or suffix after a dot), a regex
    matched with ``re.fullmatch`` on the module path, or ``"all-linear"``.
    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``);
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per module (regex on the path).
    """

    peft_type: Optional[str] = "LORA"
    r: int = 8
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    loftq_config: dict = field(default_factory=dict)
    trainable_token_indices: Optional[Union[list, dict]] = None
    target_parameters: Optional[list] = None

    #: HF LoraConfig fields that fastpeft does not implement, accepted only at these (HF default, off)
    #: values; any other value is refused by ``from_dict`` with an error naming the field
    _HF_INERT = {"megatron_core": ("megatron.core",), "qalora_group_size": None, "runtime_config": None}

    def __post_init__(self):
        if self.peft_type is None or str(self.peft_type).upper().endswith("LORA") is False:
            raise ValueError(f"peft_type: LoraConfig needs 'LORA', got {self.peft_type!r}")
        self.peft_type = "LORA"
        _check_rank("r", self.r)
        for k, v in (self.rank_pattern or {}).items():
            _check_rank(f"rank_pattern[{k!r}]", v)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise TypeError(f"lora_alpha: expected a number, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout: expected a float in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias: expected one of {_BIAS_MODES}, got {self.bias!r}")
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported by fastpeft (use HF PEFT for it)")
        check_init(self.init_lora_weights, self.loftq_config)
        if self.loftq_config and self.init_lora_weights != "loftq":
            raise ValueError(f"loftq_config is set but init_lora_weights={self.init_lora_weights!r}; "
                             "LoftQ runs only with init_lora_weights='loftq'")
        _check_trainable_tokens(self.trainable_token_indices, self.modules_to_save)
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.target_parameters is not None and (not isinstance(self.target_parameters, (list, tuple, set))
                                                   or not all(isinstance(t, str) for t in self.target_parameters)):
            raise TypeError(f"target_parameters: expected a list of parameter names, got {self.target_parameters!r}")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
            if self.use_dora:
                raise ValueError("target_parameters: DoRA on parameters is not supported (nor by HF PEFT)")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        if self.alpha_pattern is None:
            self.alpha_pattern = {}


def _check_trainable_tokens(indices, modules_to_save) -> None:
    """HF PEFT's ``trainable_token_indices``: a list of token ids (of the input embedding) or
    ``{layer name: list of ids}``; a layer cannot also be in ``modules_to_save``."""
    if indices is None:
        return
    table = indices if isinstance(indices, dict) else {None: indices}
    for layer, ids in table.items():
        if (not isinstance(ids, (list, tuple)) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise ValueError(f"trainable_token_indices{'' if layer is None else f'[{layer!r}]'}: expected a "
                             f"non-empty list of token ids (ints >= 0), got {ids!r}")
        if layer is not None and modules_to_save and layer in modules_to_save:
            raise ValueError(f"trainable_token_indices: {layer!r} is also in modules_to_save; train it fully "
                             "(modules_to_save) or some of its rows (trainable_token_indices), not both")


def _check_rank(name, r):
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name}: expected a positive int, got {r!r}")
    if r <= 0:
        raise ValueError(f"{name}: the LoRA rank must be a positive int, got {r}")


class DoraMagnitude(nn.Module):
    """Holds DoRA's trainable magnitude vector ``weight`` [out_features] (HF: ``DoraLinearLayer``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=True)


# -- layers ---------------------------------------------------------------------------
class LoraLayer:
    """State shared by the LoRA layer modules (HF PEFT's attribute names)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def _init_lora_state(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.use_dora, self.use_rslora = {}, {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = []
        self._dora_norm_cache: dict = {}
        self._dora_merge_norm: dict = {}

    # HF-compatible views of the state
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self):
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # the base layer's weight / bias, as HF PEFT's BaseTunerLayer gives them: model code reads them off
    # the layer it calls (T5's feed-forward casts to ``self.wo.weight.dtype``)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def adapters(self) -> list[str]:
        return list(self.r)

    def set_adapter(self, names, inference_mode: bool = False) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name)
            for key, mod in d.items():
                train = (key in names) and not inference_mode
                if isinstance(mod, nn.Parameter):
                    mod.requires_grad_(train)
                else:
                    mod.requires_grad_(train)
        self._active_adapter = names

    def _dropout(self, adapter: str) -> nn.Module:
        return self.lora_dropout[adapter]

    def _common_update(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        _check_rank("r", r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = (nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0
                                           else nn.Identity())
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = bool(config.use_rslora)
        self.use_dora[adapter_name] = bool(config.use_dora)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        w = self.base_layer.weight
        dtype = w.dtype if w.dtype.is_floating_point else None
        for layer_name in self.adapter_layer_names:
            d = getattr(self, layer_name)
            if adapter_name not in d:
                continue
            if isinstance(d, nn.ParameterDict):
                p = d[adapter_name]
                d[adapter_name] = nn.Parameter(p.data.to(device=w.device, dtype=dtype or p.dtype),
                                               requires_grad=p.requires_grad)
            else:
                d[adapter_name] = d[adapter_name].to(device=w.device, dtype=dtype)

    def _summed_forward(self, x: torch.Tensor, adapters, *args, **kwargs) -> torch.Tensor:
        """PEFT's forward: base output plus each active adapter's term (``adapters`` is the
        dict whose keys are this layer's adapters); base only when disabled or merged."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = current_adapter_names()
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for a in self._active_adapter:
            if a in adapters:
                result = self._adapter_rows(a, x, result)
        return result.to(dtype)

    def _merge_one(self, a, safe_merge):
        w = self.base_layer.weight
        new = w + self.get_delta_weight(a).to(w.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights; adapter {a!r} seems broken")
        w.copy_(new)

    def _unmerge_one(self, a):
        if a in self.r:
            w = self.base_layer.weight
            w.sub_(self.get_delta_weight(a).to(w.dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        for layer_name in self.adapter_layer_names + ("lora_dropout",):
            d = getattr(self, layer_name)
            if adapter_name in d:
                del d[adapter_name]
        for attr in ("r", "lora_alpha", "scaling", "use_dora", "use_rslora", "_dora_merge_norm"):
            getattr(self, attr).pop(adapter_name, None)
        self._dora_norm_cache.pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names, **kwargs) -> torch.Tensor:
        """Sequence i of the batch uses adapter ``adapter_names[i]`` (``"__base__"``: none); HF PEFT's rule.
        An input of k·B rows for B names gives each name k consecutive rows (beam search).  Linear / Conv1D /
        Embedding layers run the multi-adapter op (one call, no loop over the adapters); the rest, and
        base layers the op does not take (quantised, custom), loop over the adapters present."""
        if self.merged:
            raise ValueError("adapter_names: cannot run a mixed-adapter batch while adapters are merged")
        if any(self.use_dora.get(a) for a in set(adapter_names)):
            raise ValueError("adapter_names: mixed-adapter batches are not supported with DoRA (as in HF PEFT)")
        if not args and not kwargs and isinstance(self, (Linear, Embedding)):
            out = mixed_forward(self, x, adapter_names)
            if out is not None:
                return out
        adapter_names = expand_names(adapter_names, x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for a in dict.fromkeys(adapter_names):
            if a == BASE_ADAPTER or a not in self.r:
                continue
            idx = [i for i, n in enumerate(adapter_names) if n == a]
            result[idx] = self._adapter_rows(a, x[idx], result[idx]).to(dtype)
        return result

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        with torch.no_grad():
            while self.merged_adapters:
                self._unmerge_one(self.merged_adapters.pop())
        self._dora_norm_cache.clear()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [a for a in names if a in self.r and a not in self.merged_adapters]
        with torch.no_grad():
            for a in names:
                self._merge_one(a, safe_merge)
                self.merged_adapters.append(a)
        self._dora_norm_cache.clear()


class Linear(nn.Module, LoraLayer):
    """LoRA on ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``: weight ``[in, out]``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig, fan_in_fan_out: bool = False):
        super().__init__()
        self._init_lora_state(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> None:
        self._common_update(adapter_name, r, lora_alpha, config)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        init_linear(self, adapter_name, config.init_lora_weights, config.loftq_config)
        self._move_adapter_to_base(adapter_name)
        if config.use_dora:
            with torch.no_grad():
                W = self._weight_out_in().float()
                lw = self.lora_B[adapter_name].weight.float() @ self.lora_A[adapter_name].weight.float()
                norm = torch.linalg.norm(W + self.scaling[adapter_name] * lw, dim=1)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(
                norm.to(self.lora_A[adapter_name].weight.dtype))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # weight as [out, in] (a view for Conv1D)
    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s · B A`` in the base weight's layout ([out, in], or [in, out] for Conv1D)."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        d = (B.float() @ A.float()) if cast else (B @ A)
        d = (d.t() if self.fan_in_fan_out else d) * self.scaling[adapter]
        return d.to(A.dtype)

    def _dora_weight_norm(self, adapter: str, W: torch.Tensor) -> torch.Tensor:
        """Detached ``‖W + s·B A‖`` per output row, cached until A, B or W change."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        wp = self.base_layer.weight
        key = (A._version, B._version, wp._version, A.data_ptr(), B.data_ptr(), wp.data_ptr(),
               self.scaling[adapter], W.dtype, W.device)
        hit = self._dora_norm_cache.get(adapter)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            lw = (B @ A).to(W.dtype)
            norm = torch.linalg.norm(W + self.scaling[adapter] * lw, dim=1).to(W.dtype)
        self._dora_norm_cache[adapter] = (key, norm)
        return norm

    def clear_dora_cache(self) -> None:
        """Forget cached DoRA norms (needed only after writing weights through ``.data``)."""
        self._dora_norm_cache.clear()

    def _dora_delta(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[adapter], self.lora_B[adapter]
        dropout, s = self.lora_dropout[adapter], self.scaling[adapter]
        W = self._weight_out_in().to(x.dtype)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
            bias = self.base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            x = dropout(x)
            base_result = F.linear(x, W)
        weight_norm = self._dora_weight_norm(adapter, W)
        mag_norm_scale = (self.lora_magnitude_vector[adapter].weight / weight_norm).view(1, -1)
        lora_result = B(A(x))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * s

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if "adapter_names" in kwargs or current_adapter_names() is not None:  # a mixed-adapter batch
            return self._plain_forward(x, *args, **kwargs)
        return lora_forward(self, x, args, kwargs, self._plain_forward)

    def _adapter_rows(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        xa = x.to(self.lora_A[a].weight.dtype)
        if self.use_dora.get(a):
            return result + self._dora_delta(a, xa, result)
        return result + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](xa))) * self.scaling[a]

    def _plain_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._summed_forward(x, self.lora_A, *args, **kwargs)

    def _merge_one(self, a: str, safe_merge: bool) -> None:
        w = self.base_layer.weight
        delta = self.get_delta_weight(a).to(w.dtype)
        if self.use_dora.get(a):
            W = self._weight_out_in()
            d_oi = delta.t() if self.fan_in_fan_out else delta
            norm = torch.linalg.norm(W + d_oi, dim=1).to(W.dtype)
            factor = (self.lora_magnitude_vector[a].weight / norm).view(-1, 1)
            new_oi = factor * (W + d_oi)
            new = (new_oi.t() if self.fan_in_fan_out else new_oi).to(w.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {a!r} seems broken")
            self._dora_merge_norm[a] = norm
            w.copy_(new)
        else:
            if safe_merge and not torch.isfinite(w + delta).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {a!r} seems broken")
            w.add_(delta)

    def _unmerge_one(self, a: str) -> None:
        if a not in self.r:
            return
        w = self.base_layer.weight
        delta = self.get_delta_weight(a).to(w.dtype)
        if self.use_dora.get(a):
            norm = self._dora_merge_norm.pop(a)
            factor = (self.lora_magnitude_vector[a].weight / norm).view(-1, 1)
            W = self._weight_out_in()
            d_oi = delta.t() if self.fan_in_fan_out else delta
            new_oi = W / factor - d_oi
            w.copy_(new_oi.t() if self.fan_in_fan_out else new_oi)
        else:
            w.sub_(delta)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(nn.Module, LoraLayer):
    """LoRA on ``nn.Embedding``: ``y = E[x] + s · A[:, x]ᵀ Bᵀ`` (A [r, num_embeddings], B [dim, r])."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig):
        super().__init__()
        self._init_lora_state(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name, r, lora_alpha, config):
        if config.use_dora:
            raise ValueError("use_dora: fastpeft implements DoRA for Linear and GPT-2 Conv1D layers only, "
                             "not nn.Embedding")
        self._common_update(adapter_name, r, lora_alpha, config)
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))
        if config.init_lora_weights == "loftq":
            raise ValueError("init_lora_weights='loftq': fastpeft runs LoftQ on Linear layers only, not "
                             "nn.Embedding (HF PEFT fails there too)")
        # as HF PEFT: every other init (pissa, olora, orthogonal, gaussian) is A = 0, B ~ N(0, 1) on embeddings
        if config.init_lora_weights is not False:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        d = (B.float() @ A.float()) if cast else (B @ A)
        return (d.t() * self.scaling[adapter]).to(A.dtype)

    def _embed(self, x, weight):
        b = self.base_layer
        return F.embedding(x, weight, padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                           scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)

    def _adapter_rows(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        after_A = self._embed(x, self.lora_embedding_A[a].T)
        out = (after_A @ self.lora_embedding_B[a].T) * self.scaling[a]
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(embed_scale, (int, float, torch.Tensor)):
            # scaled embeddings (e.g. Gemma) scale in forward: the LoRA term gets the same factor
            out = out * (embed_scale.to(out.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
        return result + out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._summed_forward(x, self.lora_embedding_A, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv2d(nn.Module, LoraLayer):
    """LoRA on ``nn.Conv2d`` as a low-rank convolution: ``conv_k×k(in→r)`` then ``conv_1×1(r→out)``."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, r: int, lora_alpha: float,
                 config: LoraConfig):
        super().__init__()
        if base_layer.groups != 1 or tuple(base_layer.dilation) != (1, 1) or base_layer.padding_mode != "zeros":
            raise ValueError(f"target_modules: fastpeft's LoRA Conv2d supports groups=1, dilation=1 and "
                             f"padding_mode='zeros'; got groups={base_layer.groups}, "
                             f"dilation={base_layer.dilation}, padding_mode={base_layer.padding_mode!r}")
        self._init_lora_state(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name, r, lora_alpha, config):
        if config.use_dora:
            raise ValueError("use_dora: fastpeft implements DoRA for Linear and GPT-2 Conv1D layers only, "
                             "not nn.Conv2d")
        self._common_update(adapter_name, r, lora_alpha, config)
        b = self.base_layer
        self.lora_A[adapter_name] = nn.Conv2d(self.in_features, r, b.kernel_size, b.stride, b.padding, bias=False)
        self.lora_B[adapter_name] = nn.Conv2d(r, self.out_features, (1, 1), (1, 1), bias=False)
        if config.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r}: not supported for nn.Conv2d "
                             "(True, False or 'gaussian'; HF PEFT refuses it too)")
        if config.init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        elif config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A[adapter_name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[adapter_name].weight)
        self._move_adapter_to_base(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        if tuple(self.base_layer.weight.shape[2:4]) == (1, 1):
            d = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            d = F.conv2d(A.transpose(0, 1), B).transpose(0, 1)
        return (d * self.scaling[adapter]).to(self.lora_A[adapter].weight.dtype)

    def _adapter_rows(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[a], self.lora_B[a]
        xa = x.to(A.weight.dtype)
        return result + B(A(self.lora_dropout[a](xa))) * self.scaling[a]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._summed_forward(x, self.lora_A, *args, **kwargs)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


LORA_LAYER_TYPES = (Linear, Embedding, Conv2d)


# -- tuner functions (the contract of fastpeft.tuners.registry) ------------------------
def _supported_types() -> tuple:
    c = conv1d_cls()
    base = (nn.Linear, nn.Embedding, nn.Conv2d) + LORA_LAYER_TYPES
    return base if c is None else base + (c,)


def lora_layers(model: nn.Module, adapter_name: Optional[str] = None):
    """(name, layer) of the LoRA layers of ``model`` (holding ``adapter_name`` if given)."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and (adapter_name is None or adapter_name in m.r):
            yield name, m


def _new_layer(name: str, target: nn.Module, adapter_name: str, r: int, alpha: float, config: LoraConfig):
    from .lora_quant import new_quant_layer  # bitsandbytes 4-bit / 8-bit bases (QLoRA)
    quant = new_quant_layer(name, target, adapter_name, r, alpha, config)
    if quant is not None:
        return quant
    conv1d = conv1d_cls()
    if conv1d is not None and isinstance(target, conv1d):
        if not config.fan_in_fan_out:
            warnings.warn(f"{name}: transformers Conv1D stores its weight as [in, out]; using "
                          "fan_in_fan_out=True for it (as HF PEFT does)", stacklevel=4)
        return Linear(target, adapter_name, r, alpha, config, fan_in_fan_out=True)
    if isinstance(target, nn.Linear):
        if config.fan_in_fan_out:
            warnings.warn(f"{name}: fan_in_fan_out=True but the layer is nn.Linear; using False", stacklevel=4)
        return Linear(target, adapter_name, r, alpha, config, fan_in_fan_out=False)
    if isinstance(target, nn.Embedding):
        return Embedding(target, adapter_name, r, alpha, config)
    if isinstance(target, nn.Conv2d):
        return Conv2d(target, adapter_name, r, alpha, config)
    raise ValueError(f"target_modules: {name} has unsupported type {type(target).__name__}")


def _is_lora_param(name: str) -> bool:
    return "lora_" in name


def _mark_trainable(model: nn.Module, config: LoraConfig) -> None:
    """HF PEFT's rule: only LoRA parameters train (plus biases per ``bias``); inactive
    adapters stay frozen (layer.set_adapter decides per adapter)."""
    for n, p in model.named_parameters():
        if not _is_lora_param(n) and "modules_to_save" not in n:
            p.requires_grad_(False)
    if config.inference_mode:
        for n, p in model.named_parameters():
            if _is_lora_param(n):
                p.requires_grad_(False)
        return
    if config.bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, m in lora_layers(model):
            b = getattr(m.base_layer, "bias", None)
            if b is not None:
                b.requires_grad_(True)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[str]:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config: expected a LoraConfig, got {type(config).__name__}")
    only_params = bool(config.target_parameters) and not config.target_modules
    targets = [] if only_params else find_targets(model, config, _supported_types())
    existing = {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    if existing:
        raise ValueError(f"adapter_name: adapter {adapter_name!r} already exists on {sorted(existing)[:5]}")
    swapped, updated = [], []
    try:
        for name in targets:
            target = model.get_submodule(name)
            r = pattern_value(config.rank_pattern, name, config.r)
            alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
            _check_rank(f"rank_pattern for {name}", r)
            if isinstance(target, LoraLayer):
                updated.append(target)
                target.update_layer(adapter_name, r, alpha, config)
            else:
                new = _new_layer(name, target, adapter_name, r, alpha, config)
                parent, child = get_submodule_parent(model, name)
                setattr(parent, child, new)
                swapped.append((parent, child, target))
        if config.target_parameters:
            from .lora_params import inject_parameters
            targets = targets + inject_parameters(model, config, adapter_name)[0]
    except Exception:
        for layer in updated:
            layer.delete_adapter(adapter_name)
        for parent, child, old in reversed(swapped):
            setattr(parent, child, old)
        raise
    _mark_trainable(model, config)
    return targets


def _disk_entries(model: nn.Module, adapter_name: str) -> dict:
    """on-disk key -> in-memory parameter of ``adapter_name``."""
    out = {}
    for name, m in lora_layers(model, adapter_name):
        if adapter_name in m.lora_A:
            out[f"{name}.lora_A.weight"] = m.lora_A[adapter_name].weight
            out[f"{name}.lora_B.weight"] = m.lora_B[adapter_name].weight
        if adapter_name in m.lora_embedding_A:
            out[f"{name}.lora_embedding_A"] = m.lora_embedding_A[adapter_name]
            out[f"{name}.lora_embedding_B"] = m.lora_embedding_B[adapter_name]
        if adapter_name in m.lora_magnitude_vector:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name].weight
    return out


def _bias_entries(model: nn.Module, config: Optional[LoraConfig]) -> dict:
    if config is None or config.bias == "none":
        return {}
    if config.bias == "all":
        return {n: p for n, p in model.named_parameters()
                if "bias" in n and "lora_" not in n and "modules_to_save" not in n and "original_module" not in n}
    return {f"{name}.base_layer.bias": m.base_layer.bias for name, m in lora_layers(model)
            if getattr(m.base_layer, "bias", None) is not None}


def adapter_state_dict(model: nn.Module, adapter_name: str, *, config: Optional[LoraConfig] = None) -> dict:
    entries = _disk_entries(model, adapter_name)
    entries.update(_bias_entries(model, config))
    return {k: v.detach() for k, v in entries.items()}


def load_adapter_state_dict(model: nn.Module, state: dict, adapter_name: str, *,
                            config: Optional[LoraConfig] = None) -> None:
    expected = _disk_entries(model, adapter_name)
    optional = _bias_entries(model, config)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in optional)
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
                 for k, p in {**expected, **optional}.items() if k in state and tuple(state[k].shape) != tuple(p.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if bad_shape:
        problems.append(f"shape mismatches {bad_shape[:10]}{' ...' if len(bad_shape) > 10 else ''}")
    if problems:
        raise ValueError(f"adapter {adapter_name!r} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in {**expected, **optional}.items():
            if k in state:
                p.copy_(state[k].to(device=p.device, dtype=p.dtype))
    for _, m in lora_layers(model, adapter_name):
        m._dora_norm_cache.clear()


def remove(model: nn.Module, adapter_name: str, *, unwrap_empty: bool = True) -> None:
    """Delete ``adapter_name`` from every LoRA layer; a layer left without adapters is
    replaced by its base layer unless ``unwrap_empty`` is False (HF PEFT's delete_adapter
    keeps it)."""
    for name, m in reversed(list(lora_layers(model, adapter_name))):  # inner (nested) layers first
        m.delete_adapter(adapter_name)
        if unwrap_empty and not m.r:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, m.base_layer)


def unload_all(model: nn.Module) -> None:
    """Replace every LoRA layer by its base layer (weights as they are, merged or not)."""
    for name, m in reversed(list(lora_layers(model))):  # inner (nested) layers first
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, m.base_layer)


def merge(model: nn.Module, adapter_names: Optional[list[str]] = None, *, safe_merge: bool = False) -> None:
    for _, m in lora_layers(model):
        m.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def unmerge(model: nn.Module) -> None:
    for _, m in lora_layers(model):
        if m.merged:
            m.unmerge()


def set_adapter(model: nn.Module, adapter_names: list[str], *, inference_mode: bool = False) -> None:
    for _, m in lora_layers(model):
        m.set_adapter(adapter_names, inference_mode=inference_mode)


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    for _, m in lora_layers(model):
        m._disable_adapters = not enabled


register_tuner(PEFT_TYPE, LoraConfig, inject, adapter_state_dict, load_adapter_state_dict,
               remove=remove, merge=merge, unmerge=unmerge, set_adapter=set_adapter,
               enable_adapters=enable_adapters)

__all__ = ["LoraConfig", "LoraLayer", "Linear", "Embedding", "Conv2d", "inject", "adapter_state_dict",
           "load_adapter_state_dict", "remove", "merge", "unmerge", "lora_layers"]
