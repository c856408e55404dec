"""``rope`` cases: forward + backward (dq and dk) of :func:`fastpeft.ops.rope` against transformers'
``apply_rotary_pos_emb`` arithmetic eager (fastpeft's ``torch`` backend, the baseline),
``torch.compile`` of it and Liger-Kernel's ``liger_rotary_pos_emb`` (GPU); see ``_decoder.py`` for
the variants.  q/k are [B, H, S, D] views of [B, S, H, D] projection outputs, as attention gets them;
cos/sin [1, S, D] in the model dtype (transformers' rotary tables).

Shapes: CPU batch 1 x 512 tokens, heads x dim 12 x 64 (hidden 768, MHA) and 32/8 x 64 (hidden 2048,
GQA), float32 and bfloat16 (full suite only); GPU Llama-1B, batch 4 x 2048 tokens, 32 query / 8 key
heads x 64, bfloat16 (quick and full); smoke: 16 tokens, 4/2 heads x 16, float32 and bfloat16 (CPU),
2 x 64 tokens, 8/2 heads x 64, bfloat16 (GPU).  Bytes per call: 4·(q + k) elements (each pass reads
and writes q and k).
"""
from __future__ import annotations

import torch

from .. import Case
from . import dtype_name, require
from ._decoder import OURS, VARIANTS, decoder_built  # noqa: F401 - VARIANTS: this module's variants

LIGER = ("transformers.rope", "liger_rotary_pos_emb")


def rope_build(B: int, S: int, Hq: int, Hk: int, D: int, dtype: torch.dtype):
    def build(device: torch.device):
        rope = require("fastpeft.ops", "rope")
        reference = require("fastpeft.ops.rope", "rope_reference")
        g = torch.Generator().manual_seed(0)

        def heads(H):  # [B, H, S, D] view of [B, S, H, D] memory
            return torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2)

        q, k, dq, dk = heads(Hq), heads(Hk), heads(Hq), heads(Hk)
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        emb = torch.cat([torch.arange(S, dtype=torch.float32)[:, None] * inv] * 2, dim=-1)[None]
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        return decoder_built(
            device, "rope", fused=lambda q, k: rope(q, k, cos, sin), reference=lambda q, k: reference(q, k, cos, sin),
            inputs=[q, k], grads=(dq, dk), op_args=(q, k, cos, sin, 1),
            liger=(*LIGER, lambda fn, q, k: fn(q, k, cos, sin)),
            nbytes=4 * B * S * (Hq + Hk) * D * torch.finfo(dtype).bits // 8,
            eager_note="transformers' apply_rotary_pos_emb arithmetic, eager")

    return build


def _grid(suite: str, device: torch.device) -> list:
    """(B, S, Hq, Hk, D, dtype)."""
    bf16, f32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        return [(2, 64, 8, 2, 64, bf16)] if suite == "smoke" else [(4, 2048, 32, 8, 64, bf16)]
    if suite == "smoke":
        return [(1, 16, 4, 2, 16, dt) for dt in (f32, bf16)]
    if suite == "quick":
        return []
    return [(1, 512, hq, hk, 64, dt) for hq, hk in ((12, 12), (32, 8)) for dt in (f32, bf16)]


def cases(suite: str, device: torch.device) -> list[Case]:
    return [Case(f"rope/B{B}_S{S}_Hq{Hq}_Hk{Hk}_D{D}_{dtype_name(dt)}", "rope", rope_build(B, S, Hq, Hk, D, dt),
                 {"B": B, "S": S, "Hq": Hq, "Hk": Hk, "D": D, "dtype": dtype_name(dt)}, ours=OURS)
            for B, S, Hq, Hk, D, dt in _grid(suite, device)]
