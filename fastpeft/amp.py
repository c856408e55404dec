"""fastpeft.amp: mixed-precision training front end built on the fused gradient tail.

A drop-in for ``torch.amp.GradScaler`` whose unscale / clip / overflow check is ONE
multi-tensor read pass plus one light write pass (:func:`fastpeft.ops.grad_tail`),
with a number of launches that does not depend on the number of parameters::

    scaler = fastpeft.amp.GradScaler(precision="fp16")      # or "bf16" / "fp32"
    for batch in loader:
        with fastpeft.amp.autocast("cuda", "fp16"):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        stepped = scaler.step(optimizer, max_norm=1.0)    # unscale + clip + skip-on-overflow; True if it stepped
        scaler.update()                                    # dynamic loss scale (fp16)
        optimizer.zero_grad(set_to_none=True)

API (``torch.amp.GradScaler`` names where they exist):

* ``GradScaler(precision="fp16", init_scale=2**16, growth_factor=2.0, backoff_factor=0.5,
  growth_interval=2000, enabled=True, device=None, fuse_into_optimizer=True, grad_tail="fused")``.
  - ``"fp16"``: dynamic loss scaling: the loss is multiplied by ``scale``; a step whose
    gradients hold inf/NaN is skipped and the scale is multiplied by ``backoff_factor``;
    after ``growth_interval`` consecutive clean steps it is multiplied by ``growth_factor``
    (exactly ``torch._amp_update_scale_``, as torch's GradScaler).
  - ``"bf16"`` / ``"fp32"``: no loss scaling (scale stays 1), but the same fused clip and
    the same skip of steps whose gradients are non-finite.
  - ``enabled=False``: ``scale`` returns its input, ``step`` clips (if asked) and always steps.
  - ``grad_tail="torch"``: the same unscale / clip / skip-on-overflow / loss-scale rules computed
    with torch's own ops instead of the fused op, for gradients the fused op cannot take: FSDP2
    shards (DTensor gradients; :func:`fastpeft.ops.grad_tail` has no DTensor sharding rule).
    Equivalent PyTorch, which is what runs::

        for g in grads: g.mul_(1 / scale)                             # fp16 only
        total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # or get_total_norm(grads)
        found_inf = not torch.isfinite(total_norm)                     # a DTensor norm: full_tensor()

    It never hands ``grad_scale`` / ``found_inf`` to a fused optimizer.  The fastpeft trainer
    selects it for FSDP runs.
* ``scale(outputs)`` -> outputs × scale (a tensor or nested lists/tuples of tensors).
* ``unscale_(optimizer, max_norm=None)`` -> :class:`~fastpeft.ops.grad_tail.GradTailStats`:
  unscales (and clips when ``max_norm`` is given) the gradients of the optimizer's params in
  place; no host sync.  At most once per optimizer between ``update()`` calls.
* ``clip_grad_norm_(optimizer, max_norm)`` -> total norm (0-dim tensor, unscaled, pre-clip):
  ``unscale_`` with clipping; replaces ``scaler.unscale_(opt); clip_grad_norm_(params, max_norm)``.
* ``step(optimizer, *args, max_norm=None, master_weights=None, **kwargs)`` -> bool: runs the
  fused tail if ``unscale_`` was not called yet, then ``optimizer.step(*args, **kwargs)``
  unless a gradient was non-finite (one host sync on the overflow flag, as torch's
  GradScaler).  With ``master_weights`` (a :class:`MasterWeights`) the model grads are
  moved to the fp32 masters first and the stepped masters are copied back to the model.
  Optimizers with a fused kernel that honours torch's ``grad_scale`` / ``found_inf`` contract
  (``_step_supports_amp_scaling``: ``torch.optim.AdamW(fused=True)``, ``Adam``/``SGD(fused=True)``)
  get ``grad_scale = 1/multiplier`` and ``found_inf`` directly, so only pass 1 runs (the optimizer
  applies the multiplier and skips itself on overflow); ``fuse_into_optimizer=False`` disables that.
* ``update(new_scale=None)``: updates the scale from the overflow flags of this iteration.
* ``get_scale()``, ``get_growth_factor()``, ``get_backoff_factor()``, ``get_growth_interval()``,
  ``is_enabled()``, ``state_dict()``, ``load_state_dict(sd)`` (accepts torch GradScaler state dicts).
* Extra: ``last_stats`` (the last GradTailStats), ``last_grad_norm`` (tensor or None),
  ``num_skipped_steps`` (steps skipped for non-finite gradients, counted at the sync in ``step``).

On an overflow step the fused apply pass multiplies by 0, so non-finite entries become NaN
and finite ones 0 (torch leaves them at ``g/scale``); the step is skipped either way and the
next ``zero_grad`` clears them.

:class:`MasterWeights` keeps fp32 master copies of the trainable parameters of a model that
runs in fp16/bf16 (the optimizer steps the masters)::

    master = fastpeft.amp.MasterWeights(model)             # trainable params only
    optimizer = torch.optim.AdamW(master.parameters(), lr=1e-4)
    ...
    scaler.scale(loss).backward()
    scaler.step(optimizer, max_norm=1.0, master_weights=master)   # grads -> fp32, tail, step, copy back

:func:`autocast` is ``torch.autocast`` taking ``"fp16"``/``"bf16"``/``"fp32"`` (fp32 disables it).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import torch

from .ops.grad_tail import DEFAULT_EPS, GradTailStats, collect_grads, grad_tail, grad_tail_apply_

GRAD_TAILS = ("fused", "torch")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32",
            torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

_READY, _UNSCALED, _STEPPED = 0, 1, 2


def normalize_precision(precision: Union[str, torch.dtype]) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` for a precision name or dtype."""
    p = _ALIASES.get(precision, precision)
    if p not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)} (or a float16/bfloat16/float32 dtype), "
                         f"got {precision!r}")
    return p


def autocast(device_type: str = "cuda", dtype: Union[str, torch.dtype] = "bf16", enabled: bool = True,
             cache_enabled: Optional[bool] = None):
    """``torch.autocast(device_type, dtype)`` with fastpeft's precision names; ``"fp32"`` disables it."""
    p = normalize_precision(dtype)
    kwargs = {} if cache_enabled is None else {"cache_enabled": cache_enabled}
    return torch.autocast(device_type, dtype=PRECISIONS[p] if p != "fp32" else torch.bfloat16,
                          enabled=bool(enabled) and p != "fp32", **kwargs)


def _optimizer_params(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


class MasterWeights:
    """fp32 master copies of the trainable parameters of a low-precision model.

    Args:
        model_or_params: an ``nn.Module`` (its parameters with ``requires_grad``) or an
            iterable of parameters.  fp32 parameters are their own master (no copy).

    ``parameters()`` are the fp32 masters to give the optimizer.  ``grads_to_master()``
    moves the model's gradients onto the masters as fp32 (model grads set to None), and
    ``master_to_model()`` copies the masters back into the model's parameters (rounded to
    their dtype).  Equivalent PyTorch::

        master = [p.detach().float().requires_grad_() for p in params]
        ...  m.grad = p.grad.float(); p.grad = None   ...   p.data.copy_(m)
    """

    def __init__(self, model_or_params: Union[torch.nn.Module, Iterable[torch.nn.Parameter]]):
        if isinstance(model_or_params, torch.nn.Module):
            params = [p for p in model_or_params.parameters() if p.requires_grad]
        else:
            params = [p for p in model_or_params if p.requires_grad]
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"model_or_params[{i}]: expected a floating-point parameter, got "
                                f"{type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}")
        self.model_params = params
        self.master_params = [p if p.dtype == torch.float32 else
                              torch.nn.Parameter(p.detach().float().clone(), requires_grad=True) for p in params]

    def parameters(self) -> list:
        return list(self.master_params)

    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master_params):
            if m is p:
                continue
            if p.grad is None:
                m.grad = None
            else:
                m.grad = p.grad.detach().float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        pairs = [(p, m) for p, m in zip(self.model_params, self.master_params) if m is not p]
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    def state_dict(self) -> dict:
        return {"master": [m.detach().clone() for m in self.master_params]}

    def load_state_dict(self, sd: dict) -> None:
        masters = sd.get("master")
        if not isinstance(masters, (list, tuple)) or len(masters) != len(self.master_params):
            raise ValueError(f"MasterWeights.load_state_dict: expected 'master' with {len(self.master_params)} "
                             f"tensors, got {type(masters).__name__} of length "
                             f"{len(masters) if isinstance(masters, (list, tuple)) else '?'}")
        with torch.no_grad():
            for i, (m, t) in enumerate(zip(self.master_params, masters)):
                if tuple(t.shape) != tuple(m.shape):
                    raise ValueError(f"MasterWeights.load_state_dict: master[{i}] has shape {tuple(t.shape)}, "
                                     f"expected {tuple(m.shape)}")
                m.copy_(t)
        self.master_to_model()


class GradScaler:
    """GradScaler-compatible loss scaler over the fused gradient tail (see the module doc)."""

    def __init__(self, precision: Union[str, torch.dtype] = "fp16", init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True, device: Optional[Union[str, torch.device]] = None,
                 fuse_into_optimizer: bool = True, grad_tail: str = "fused"):
        self.precision = normalize_precision(precision)
        if grad_tail not in GRAD_TAILS:
            raise ValueError(f"grad_tail: expected one of {GRAD_TAILS}, got {grad_tail!r}")
        self.grad_tail = grad_tail
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale: expected a finite number > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor: expected > 1.0, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor: expected in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval: expected an int >= 1, got {growth_interval!r}")
        self._enabled = bool(enabled)
        self._scaling = self._enabled and self.precision == "fp16"
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._init_growth_tracker = 0
        self._device = torch.device(device) if device is not None else None
        self._scale: Optional[torch.Tensor] = None
        self._growth_tracker: Optional[torch.Tensor] = None
        self._per_optimizer: dict[int, dict] = {}
        self.fuse_into_optimizer = bool(fuse_into_optimizer)
        self.last_stats: Optional[GradTailStats] = None
        self.num_skipped_steps = 0

    # -- scale ----------------------------------------------------------------
    def is_enabled(self) -> bool:
        return self._enabled

    def _lazy_init(self, device: torch.device) -> None:
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)

    def scale(self, outputs: Any) -> Any:
        """``outputs * scale`` (fp16 mode); the input unchanged otherwise."""
        if not self._scaling:
            return outputs
        if isinstance(outputs, torch.Tensor):
            self._lazy_init(self._device or outputs.device)
            return outputs * self._scale.to(outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"outputs: expected a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def _inv_scale(self, device: torch.device) -> Union[float, torch.Tensor]:
        if not self._scaling:
            return 1.0
        if self._scale is None:
            raise RuntimeError("GradScaler: scale(loss) must be called (and backward run) before unscale_/step")
        return self._scale.double().reciprocal().float().to(device, non_blocking=True)

    # -- unscale / clip / step -------------------------------------------------
    def _state(self, optimizer) -> dict:
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY, "stats": None})

    def unscale_(self, optimizer, max_norm: Optional[float] = None) -> GradTailStats:
        """Unscale (and clip to ``max_norm``) the optimizer's gradients in place: two fused passes, no sync."""
        state = self._state(optimizer)
        if state["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads = collect_grads(_optimizer_params(optimizer))
        if self._scaling and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("GradScaler(precision='fp16'): the optimizer holds float16 gradients; unscaled in "
                             "float16 they underflow (torch's GradScaler refuses them too). Keep fp32 master "
                             "weights: fastpeft.amp.MasterWeights(model) and step(..., master_weights=master).")
        device = grads[0].device if grads else (self._scale.device if self._scale is not None else torch.device("cpu"))
        if self.grad_tail == "torch":
            stats = self._torch_tail(optimizer, grads, max_norm, device)
        else:
            stats = grad_tail(grads, inv_scale=self._inv_scale(device), max_norm=max_norm)
            grad_tail_apply_(grads, stats.multiplier)
        state["stats"] = stats
        state["stage"] = _UNSCALED
        self.last_stats = stats
        return stats

    def _torch_tail(self, optimizer, grads: list, max_norm: Optional[float], device) -> GradTailStats:
        """``grad_tail="torch"``: unscale, clip and check with torch's ops (DTensor gradients too)."""
        inv = self._inv_scale(device)
        if self._scaling:
            inv = float(inv)  # a Python scalar multiplies DTensor shards as well as plain tensors
            for g in grads:
                g.mul_(inv)
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(_optimizer_params(optimizer), max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients is a DTensor
            norm = norm.full_tensor()
        norm = norm.float()
        found_inf = (~torch.isfinite(norm)).float()
        clip = torch.ones_like(norm) if max_norm is None else (max_norm / (norm + DEFAULT_EPS)).clamp(max=1.0)
        multiplier = torch.where(found_inf.bool(), torch.zeros_like(norm), clip * inv)
        return GradTailStats(multiplier, norm, found_inf)

    def clip_grad_norm_(self, optimizer, max_norm: float) -> torch.Tensor:
        """Unscale and clip; returns the unscaled pre-clip total norm (like ``clip_grad_norm_``)."""
        if max_norm is None:
            raise ValueError("max_norm: expected a finite number >= 0, got None")
        return self.unscale_(optimizer, max_norm=max_norm).total_norm

    def step(self, optimizer, *args, max_norm: Optional[float] = None,
             master_weights: Optional[MasterWeights] = None, **kwargs) -> bool:
        """Fused unscale + clip, then ``optimizer.step(*args, **kwargs)`` unless a gradient was
        non-finite.  Returns True if the optimizer stepped."""
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        state = self._state(optimizer)
        if state["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if master_weights is not None:
            if state["stage"] == _UNSCALED:
                raise RuntimeError("step(master_weights=...): call it without a prior unscale_(), which would "
                                   "have run on the model's gradients instead of the masters'")
            master_weights.grads_to_master()
        if state["stage"] == _READY and self._enabled and self.fuse_into_optimizer and self.grad_tail == "fused" \
                and getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._fused_optimizer_step(optimizer, state, max_norm, master_weights, args, kwargs)
        if state["stage"] == _READY:
            self.unscale_(optimizer, max_norm=max_norm)
        elif max_norm is not None:
            raise RuntimeError("step(max_norm=...) after unscale_(): the gradients were already unscaled; "
                               "pass max_norm to unscale_() / clip_grad_norm_() instead")
        stats = state["stats"]
        state["stage"] = _STEPPED
        if self._enabled and bool(stats.found_inf.item()):  # the one host sync of the step, as torch's scaler
            self.num_skipped_steps += 1
            return False
        optimizer.step(*args, **kwargs)
        if master_weights is not None:
            master_weights.master_to_model()
        return True

    def _fused_optimizer_step(self, optimizer, state, max_norm, master_weights, args, kwargs) -> bool:
        """Pass 1 only; the optimizer's fused kernel divides the grads by ``1/multiplier`` and skips
        the update when ``found_inf`` is set (torch's ``grad_scale`` / ``found_inf`` contract of
        optimizers with ``_step_supports_amp_scaling``, e.g. ``AdamW(fused=True)``): no apply pass."""
        grads = collect_grads(_optimizer_params(optimizer))
        if self._scaling and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("GradScaler(precision='fp16'): the optimizer holds float16 gradients; use "
                             "fastpeft.amp.MasterWeights(model) and step(..., master_weights=master).")
        device = grads[0].device if grads else (self._scale.device if self._scale is not None else torch.device("cpu"))
        stats = grad_tail(grads, inv_scale=self._inv_scale(device), max_norm=max_norm)
        state["stats"] = stats
        state["stage"] = _STEPPED
        self.last_stats = stats
        optimizer.grad_scale = stats.multiplier.reciprocal()  # 1/0 = inf only when found_inf (step skipped)
        optimizer.found_inf = stats.found_inf
        try:
            optimizer.step(*args, **kwargs)
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
        stepped = not bool(stats.found_inf.item())  # the host sync, after the step was issued
        if not stepped:
            self.num_skipped_steps += 1
        elif master_weights is not None:
            master_weights.master_to_model()
        return stepped

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """Update the loss scale (fp16): back off if any step of this iteration overflowed,
        grow after ``growth_interval`` clean iterations.  Resets the per-optimizer state."""
        if not self._scaling:
            self._per_optimizer.clear()
            return
        if self._scale is None:
            return
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or not new_scale.is_floating_point():
                    raise ValueError("new_scale: expected a float or a one-element float tensor")
                self._scale.copy_(new_scale.reshape(()))
            else:
                self._scale.fill_(float(new_scale))
        else:
            found = [s["stats"].found_inf.to(self._scale.device) for s in self._per_optimizer.values()
                     if s["stats"] is not None]
            if not found:
                raise AssertionError("No inf checks were recorded prior to update().")
            found_inf = torch.stack(found).sum().reshape(1) if len(found) > 1 else found[0].reshape(1)
            torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, self._growth_factor,
                                     self._backoff_factor, self._growth_interval)
        self._per_optimizer.clear()

    # -- introspection / checkpoints --------------------------------------------
    @property
    def last_grad_norm(self) -> Optional[torch.Tensor]:
        return None if self.last_stats is None else self.last_stats.total_norm

    def get_scale(self) -> float:
        if not self._scaling:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def _get_growth_tracker(self) -> int:
        if self._growth_tracker is None:
            return self._init_growth_tracker
        return int(self._growth_tracker.item())

    def state_dict(self) -> dict:
        """torch GradScaler's keys plus ``precision`` and ``num_skipped_steps`` (plain Python values)."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker(), "precision": self.precision,
                "num_skipped_steps": self.num_skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled "
                               "instance of GradScaler.")
        if "precision" in state_dict and normalize_precision(state_dict["precision"]) != self.precision:
            raise ValueError(f"state_dict: saved with precision {state_dict['precision']!r}, this scaler is "
                             f"{self.precision!r}")
        for key in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"):
            if key not in state_dict:
                raise KeyError(f"state_dict: missing key {key!r}")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        self.num_skipped_steps = int(state_dict.get("num_skipped_steps", 0))
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
        if self._growth_tracker is not None:
            self._growth_tracker.fill_(self._init_growth_tracker)


__all__ = ["GradScaler", "MasterWeights", "autocast", "normalize_precision", "PRECISIONS", "GRAD_TAILS"]
