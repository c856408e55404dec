"""The decoder families ``patch_model`` knows: which modules of a transformers model get which fused op.

A family is found by ``config.model_type``; its modules by class name (``<Prefix>RMSNorm``,
``<Prefix>MLP``, ``<Prefix>Attention``), so no transformers module is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    prefix: str                          # class-name prefix: LlamaRMSNorm, LlamaMLP, LlamaAttention
    norm: str | None                     # "llama" (weight * n.to(dtype)), "gemma" ((1 + weight) in float32) or None
    rope: bool                           # attention applies transformers' apply_rotary_pos_emb
    mlp: str | None                      # "gate_up": gate_proj / up_proj / down_proj; "fused_gate_up": Phi-3's
                                         # gate_up_proj chunked; None: no gated MLP
    why_not: tuple = ()                  # (op, reason) pairs for the ops this family cannot take


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "llama", True, "gate_up"),
    "mistral": Family("Mistral", "llama", True, "gate_up"),
    "qwen2": Family("Qwen2", "llama", True, "gate_up"),
    "qwen3": Family("Qwen3", "llama", True, "gate_up"),
    "gemma": Family("Gemma", "gemma", True, "gate_up"),
    "gemma2": Family("Gemma2", "gemma", True, "gate_up"),
    "phi3": Family("Phi3", "llama", True, "fused_gate_up"),
    "gpt2": Family("GPT2", None, False, None, why_not=(
        ("rms_norm", "GPT-2 normalises with LayerNorm; fastpeft has no fused LayerNorm op"),
        ("rope", "GPT-2 has learned absolute position embeddings, no rotary embedding"),
        ("mlp", "GPT-2's MLP is a non-gated GELU (c_fc -> gelu_new -> c_proj); fastpeft fuses gated MLPs "
                "(swiglu / geglu) only"),
    )),
}

SUPPORTED = sorted(FAMILIES)


def family_of(model_type: str | None) -> Family:
    """The family of ``config.model_type``; ValueError listing the supported ones otherwise."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise ValueError(f"fastpeft.patch_model: unsupported architecture (config.model_type = {model_type!r}); "
                         f"supported: {', '.join(SUPPORTED)}")
    return fam


# transformers' activation modules (ACT2FN) -> geglu's ``approximate`` / "silu"
ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUTanh": "tanh", "PytorchGELUTanh": "tanh"}


def activation_kind(act) -> str | None:
    """"silu", "tanh" (gelu tanh approximation), "none" (exact gelu) or None (not fusable)."""
    name = type(act).__name__
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    if name == "GELUActivation":
        import torch.nn.functional as F
        return "none" if getattr(act, "act", None) is F.gelu else None
    return None
