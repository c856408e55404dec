"""Fused forwards of transformers' decoder modules, installed per instance (``module.forward``).

Each forward computes what the module's own forward computes, through a fastpeft op:

* RMSNorm, Llama order (Llama, Mistral, Qwen2/3, Phi-3): ``rms_norm(x, weight, eps, cast_before_weight=True)``;
  Gemma order (Gemma, Gemma2): ``rms_norm(x, weight, eps, offset=1.0)``;
* gated MLP: ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (geglu for Gemma's GELU); Phi-3's fused
  ``gate_up_proj``: ``down_proj(swiglu(*gate_up_proj(x).chunk(2, -1)))``;
* attention: the class's own forward, with transformers' ``apply_rotary_pos_emb`` of its modeling module
  answered by :func:`fastpeft.ops.rope` while this instance's forward runs (``RopeSwitch``).

An instance attribute ``forward`` shadows the class's; deleting it restores the module.  No parameter,
buffer or state_dict key changes.
"""
from __future__ import annotations

import sys
import threading
import types

from ..ops import geglu, rms_norm, rope, swiglu


def rms_norm_llama_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, cast_before_weight=True)


def rms_norm_gemma_forward(self, x):
    return rms_norm(x, self.weight, self.eps, offset=1.0)


def _glu(act: str):
    if act == "silu":
        return swiglu
    return lambda gate, up: geglu(gate, up, approximate=act)


def gated_mlp_forward(act: str):
    glu = _glu(act)

    def forward(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x)))

    return forward


def fused_gate_up_mlp_forward(act: str):
    glu = _glu(act)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(glu(gate, up))

    return forward


def install(module, forward) -> None:
    module.forward = types.MethodType(forward, module)


def uninstall(module) -> None:
    module.__dict__.pop("forward", None)


# -- rotary embeddings: the modeling module's apply_rotary_pos_emb, switched per attention instance --
_LOCAL = threading.local()


def _fused_active() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


class RopeSwitch:
    """Replaces ``apply_rotary_pos_emb`` in a transformers modeling module by a function that calls
    :func:`fastpeft.ops.rope` while a patched attention instance runs (and the original otherwise), so
    unpatched models in the same process keep transformers' code.  Installed while at least one
    attention instance of that module is patched (reference count), removed with the last."""

    _installed: dict[str, tuple] = {}   # modeling module name -> (original function, count)

    @classmethod
    def acquire(cls, module_name: str) -> bool:
        mod = sys.modules.get(module_name)
        if mod is None or not callable(getattr(mod, "apply_rotary_pos_emb", None)):
            return False
        if module_name in cls._installed:
            orig, n = cls._installed[module_name]
            cls._installed[module_name] = (orig, n + 1)
            return True
        orig = mod.apply_rotary_pos_emb

        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            if _fused_active():
                unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
                return rope(q, k, cos, sin, unsqueeze_dim)
            return orig(q, k, cos, sin, *args, **kwargs)

        apply_rotary_pos_emb.__wrapped__ = orig
        mod.apply_rotary_pos_emb = apply_rotary_pos_emb
        cls._installed[module_name] = (orig, 1)
        return True

    @classmethod
    def release(cls, module_name: str) -> None:
        if module_name not in cls._installed:
            return
        orig, n = cls._installed[module_name]
        if n > 1:
            cls._installed[module_name] = (orig, n - 1)
            return
        del cls._installed[module_name]
        mod = sys.modules.get(module_name)
        if mod is not None:
            mod.apply_rotary_pos_emb = orig


def attention_forward(self, *args, **kwargs):
    """The class's forward with the fused rope switched on for its duration."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _LOCAL.depth -= 1
