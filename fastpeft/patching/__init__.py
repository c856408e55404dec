"""Decoder-LLM patching: fastpeft's fused ops swapped into a transformers decoder, in place and reversibly.

    summary = fastpeft.patch_model(model)      # rms_norm, rope, mlp (swiglu / geglu), cross_entropy
    print(summary)                             # what was patched, and why anything was not
    fastpeft.unpatch_model(model)              # the model's own forwards again

``model`` is a transformers model (``*ForCausalLM``, or the bare decoder), an HF PEFT model or a fastpeft
``PeftModel`` around one.  Families (``config.model_type``): Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2,
Phi-3 (RMSNorm, rotary embeddings, gated MLP, loss) and GPT-2 (the loss only: its LayerNorm and
non-gated GELU MLP have no fused op, and the summary says so).  Another architecture raises
``ValueError`` listing the supported ones.

What changes: each patched module gets an instance ``forward`` that computes the same thing through a
fastpeft op (:mod:`.modules`); the ``*ForCausalLM`` gets a ``forward`` that, for a labelled call under
autograd, computes transformers' causal-LM loss with :func:`fastpeft.ops.linear_cross_entropy` and
returns ``logits=None`` (no [batch, seq, vocab] tensor; :mod:`.loss`).  Calls without labels, under
``torch.no_grad()`` (evaluation, ``generate()``) or with ``return_dict=False`` compute the logits as
usual.  No parameter, buffer, state_dict key or saved file changes; ``unpatch_model`` deletes the
instance forwards.  Gradient checkpointing works unchanged: the patched forwards are recomputed like the
originals, and fastpeft's LoRA dropout draws its Philox seed from torch's generator, whose state
``torch.utils.checkpoint`` restores, so the recomputed masks are the same.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from . import loss as _loss
from . import modules as _modules
from .families import SUPPORTED, activation_kind, family_of

OPS = ("rms_norm", "rope", "mlp", "cross_entropy")


@dataclass
class PatchSummary:
    """What :func:`patch_model` did: ``patched[op]`` = number of modules switched to the fused op,
    ``skipped[op]`` = why an op was not patched; ``print`` it for a readable report."""

    model_type: str
    patched: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastpeft.patch_model ({self.model_type}):"]
        for op in OPS:
            if self.patched.get(op):
                lines.append(f"  {op}: {self.patched[op]} module(s) patched")
            elif op in self.skipped:
                lines.append(f"  {op}: not patched: {self.skipped[op]}")
        return "\n".join(lines)


# transformers model -> [(kind, module, extra)] of what was installed
_PATCHED: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside an HF PEFT / fastpeft ``PeftModel`` (or ``model`` itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model or a PEFT model), "
                        f"got {type(model).__name__}")
    m = model
    for _ in range(4):
        get = getattr(m, "get_base_model", None)
        inner = get() if callable(get) else None
        if inner is None or inner is m:
            break
        m = inner
    if getattr(m, "config", None) is None or not hasattr(m.config, "model_type"):
        raise TypeError(f"model: expected a transformers model (with a .config.model_type), or a PEFT model "
                        f"around one; got {type(m).__name__}")
    return m


def _head_reason(head) -> str | None:
    if head is None:
        return "the model has no LM head (a bare decoder: no loss to fuse)"
    if type(head) is not nn.Linear:
        return (f"the LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA / modules_to_save / "
                "quantised heads keep the unfused loss)")
    return None


def patch_model(model: nn.Module, rms_norm: bool = True, rope: bool = True, mlp: bool = True,
                cross_entropy: bool = True) -> PatchSummary:
    """Switch ``model``'s RMSNorms, rotary embeddings, gated MLPs and causal-LM loss to fastpeft's fused ops,
    in place (see the module doc).  Patching a patched model first undoes the earlier patch.

    Returns a :class:`PatchSummary`.  Raises ``ValueError`` for an unsupported architecture (listing the
    supported ones), ``TypeError`` for something that is not a transformers / PEFT model.
    """
    for name, flag in (("rms_norm", rms_norm), ("rope", rope), ("mlp", mlp), ("cross_entropy", cross_entropy)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    tm = transformers_model(model)
    fam = family_of(tm.config.model_type)
    if tm in _PATCHED:
        unpatch_model(tm)
    wanted = {"rms_norm": rms_norm, "rope": rope, "mlp": mlp, "cross_entropy": cross_entropy}
    summary = PatchSummary(tm.config.model_type)
    for op, reason in fam.why_not:
        if wanted[op]:
            summary.skipped[op] = reason
    for op in OPS:
        if not wanted[op]:
            summary.skipped[op] = "not asked for"
    done: list = []
    counts = dict.fromkeys(OPS, 0)
    mlp_reasons = set()
    for _, m in tm.named_modules():
        cls = type(m).__name__
        if rms_norm and fam.norm and cls == f"{fam.prefix}RMSNorm":
            fwd = _modules.rms_norm_llama_forward if fam.norm == "llama" else _modules.rms_norm_gemma_forward
            _modules.install(m, fwd)
            done.append(("module", m, None))
            counts["rms_norm"] += 1
        elif mlp and fam.mlp and cls == f"{fam.prefix}MLP":
            act = activation_kind(getattr(m, "act_fn", None) or getattr(m, "activation_fn", None))
            if act is None:
                mlp_reasons.add(f"activation {type(getattr(m, 'act_fn', getattr(m, 'activation_fn', None))).__name__} "
                                "has no fused gated op (silu, gelu, gelu_pytorch_tanh have)")
                continue
            fwd = (_modules.gated_mlp_forward if fam.mlp == "gate_up" else _modules.fused_gate_up_mlp_forward)(act)
            _modules.install(m, fwd)
            done.append(("module", m, None))
            counts["mlp"] += 1
        elif rope and fam.rope and cls == f"{fam.prefix}Attention":
            module_name = type(m).__module__
            if not _modules.RopeSwitch.acquire(module_name):
                summary.skipped["rope"] = f"{module_name} has no apply_rotary_pos_emb"
                continue
            _modules.install(m, _modules.attention_forward)
            done.append(("attention", m, module_name))
            counts["rope"] += 1
    if cross_entropy and "cross_entropy" not in summary.skipped:
        get_head = getattr(tm, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        reason = _head_reason(head)
        if reason is None and not type(tm).__name__.endswith("ForCausalLM") and type(tm).__name__ != "GPT2LMHeadModel":
            reason = f"{type(tm).__name__} is not a causal-LM model"
        if reason is None:
            _loss.install(tm, head)
            done.append(("loss", tm, head))
            counts["cross_entropy"] = 1
        else:
            summary.skipped["cross_entropy"] = reason
    for op in ("rms_norm", "rope", "mlp"):
        if wanted[op] and not counts[op] and op not in summary.skipped:
            summary.skipped[op] = ("; ".join(sorted(mlp_reasons)) if op == "mlp" and mlp_reasons
                                   else f"no {fam.prefix} module of this kind found")
    summary.patched = {op: n for op, n in counts.items() if n}
    _PATCHED[tm] = done
    return summary


def unpatch_model(model: nn.Module) -> bool:
    """Undo :func:`patch_model` on ``model`` (the model passed then, or its PEFT wrapper / inner model).
    Returns whether anything was patched."""
    tm = transformers_model(model)
    done = _PATCHED.pop(tm, None)
    if done is None:
        return False
    for kind, m, extra in reversed(done):
        if kind == "loss":
            _loss.uninstall(m, extra)
        else:
            _modules.uninstall(m)
            if kind == "attention":
                _modules.RopeSwitch.release(extra)
    return True


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the transformers model inside it) is patched."""
    return transformers_model(model) in _PATCHED


__all__ = ["SUPPORTED", "PatchSummary", "is_patched", "patch_model", "unpatch_model"]
