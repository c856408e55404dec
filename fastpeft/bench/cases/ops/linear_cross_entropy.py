"""``linear_cross_entropy`` cases: the loss of a causal LM's head, forward + backward to the hidden
states with the LM head frozen (a LoRA run), of :func:`fastpeft.ops.linear_cross_entropy` (chunked, no
[tokens, vocab] logits) against the eager composition ``F.cross_entropy(F.linear(h, W).float(), y)``
(fastpeft's ``torch`` backend: transformers' ``ForCausalLMLoss`` arithmetic, the baseline),
``torch.compile`` of it and Liger-Kernel's ``LigerFusedLinearCrossEntropyFunction`` (GPU); see
``_decoder.py`` for the variants.  One label in 8 is ignored (-100).

Shapes: CPU quick 2x256 tokens x hidden 256 x vocab 32000 (the quick suite's Llama-style 20M model),
full 2x512 x 768 x 32000 (the 110M case) in float32 and bfloat16; GPU Llama-1B, 4x2048 tokens x
hidden 2048 x vocab 128256, bfloat16 (quick and full); smoke: 16 x 64 x 512 (CPU float32), 64 x 256 x
4096 bfloat16 (GPU).  Bytes per call: hidden and the weight read, dhidden written (the logits are the
traffic the fused op avoids).
"""
from __future__ import annotations

import torch

from .. import Case
from . import dtype_name, require
from ._decoder import OURS, VARIANTS, decoder_built  # noqa: F401 - VARIANTS: this module's variants

LIGER = ("ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")


def _liger_call(fn, h, w, y):
    out = fn.apply(h, w, y)  # (input, weight, target): bias None, ignore_index -100, mean
    return out[0] if isinstance(out, tuple) else out


def lce_build(N: int, H: int, V: int, dtype: torch.dtype):
    def build(device: torch.device):
        lce = require("fastpeft.ops", "linear_cross_entropy")
        reference = require("fastpeft.ops.linear_cross_entropy", "linear_cross_entropy_reference")
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, H, generator=g).to(device, dtype)
        w = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)
        y = torch.randint(0, V, (N,), generator=g)
        y[::8] = -100
        y = y.to(device)
        one = torch.ones((), device=device)
        return decoder_built(
            device, "linear_cross_entropy", fused=lambda h: lce(h, w, y),
            reference=lambda h: reference(h, w, y, None, -100, 0.0, 0.0, "mean", 0), inputs=[h], grads=(one,),
            op_args=(h, w, y, None, -100, 0.0, 0.0, "mean", 1),
            liger=(*LIGER, lambda fn, h: _liger_call(fn, h, w, y)),
            nbytes=(2 * N * H + V * H) * torch.finfo(dtype).bits // 8,
            eager_note="F.cross_entropy(F.linear(h, W).float(), labels) (transformers' ForCausalLMLoss): "
                       "the full [N, V] logits, eager")

    return build


def _grid(suite: str, device: torch.device) -> list:
    """(tokens, hidden, vocab, dtype)."""
    bf16, f32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        return [(64, 256, 4096, bf16)] if suite == "smoke" else [(4 * 2048, 2048, 128256, bf16)]
    if suite == "smoke":
        return [(16, 64, 512, f32)]
    if suite == "quick":
        return [(512, 256, 32000, f32)]
    return [(1024, 768, 32000, dt) for dt in (f32, bf16)]


def cases(suite: str, device: torch.device) -> list[Case]:
    return [Case(f"linear_cross_entropy/N{N}_H{H}_V{V}_{dtype_name(dt)}", "linear_cross_entropy",
                 lce_build(N, H, V, dt), {"N": N, "H": H, "V": V, "dtype": dtype_name(dt)}, ours=OURS)
            for N, H, V, dt in _grid(suite, device)]
