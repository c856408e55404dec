"""``rms_norm`` cases: forward + backward (dx and dweight) of :func:`fastpeft.ops.rms_norm` against
transformers' LlamaRMSNorm / GemmaRMSNorm arithmetic eager (fastpeft's ``torch`` backend, the
baseline), ``torch.compile`` of it and Liger-Kernel's ``LigerRMSNormFunction`` (GPU); see
``_decoder.py`` for the variants.  Modes: ``llama`` (offset 0, cast before the weight) and ``gemma``
(offset 1, everything in float32).

Shapes: CPU 512 tokens x hidden {768, 2048}, float32 and bfloat16 in Llama's order, plus bfloat16
hidden 2048 in Gemma's (full suite only); GPU Llama-1B, 4x2048 tokens x hidden 2048, bfloat16, both
orders (quick and full); smoke: 16 x 64 (CPU, float32 llama and bfloat16 gemma), 64 x 256 bfloat16
(GPU).  Bytes per call: 5·M·H elements (forward: read x, write y; backward: read x and dy, write dx).
"""
from __future__ import annotations

import torch

from .. import Case
from . import dtype_name, require
from ._decoder import OURS, VARIANTS, decoder_built  # noqa: F401 - VARIANTS: this module's variants

EPS = 1e-6
MODES = {"llama": (0.0, True), "gemma": (1.0, False)}  # (offset, cast_before_weight)
LIGER = ("ops.rms_norm", "LigerRMSNormFunction")


def rms_norm_build(M: int, H: int, dtype: torch.dtype, mode: str):
    offset, cast = MODES[mode]

    def build(device: torch.device):
        rms_norm = require("fastpeft.ops", "rms_norm")
        reference = require("fastpeft.ops.rms_norm", "rms_norm_reference")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, H, generator=g).to(device, dtype)
        w = (torch.randn(H, generator=g) * 0.1 + (0.0 if offset else 1.0)).to(device, dtype)
        dy = torch.randn(M, H, generator=g).to(device, dtype)
        return decoder_built(
            device, "rms_norm", fused=lambda x, w: rms_norm(x, w, EPS, offset, cast),
            reference=lambda x, w: reference(x, w, EPS, offset, cast), inputs=[x, w], grads=(dy,),
            op_args=(x, w, EPS, offset, cast), liger=(*LIGER, lambda fn, x, w: fn.apply(x, w, EPS, offset, mode)),
            nbytes=5 * M * H * torch.finfo(dtype).bits // 8,
            eager_note=f"transformers' {'Llama' if mode == 'llama' else 'Gemma'}RMSNorm arithmetic, eager")

    return build


def _grid(suite: str, device: torch.device) -> list:
    """(tokens, hidden, dtype, mode)."""
    bf16, f32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        return [(64, 256, bf16, m) for m in MODES] if suite == "smoke" else [(4 * 2048, 2048, bf16, m) for m in MODES]
    if suite == "smoke":
        return [(16, 64, f32, "llama"), (16, 64, bf16, "gemma")]
    if suite == "quick":
        return []
    return [(512, h, dt, "llama") for h in (768, 2048) for dt in (f32, bf16)] + [(512, 2048, bf16, "gemma")]


def cases(suite: str, device: torch.device) -> list[Case]:
    return [Case(f"rms_norm/M{M}_H{H}_{dtype_name(dt)}_{mode}", "rms_norm", rms_norm_build(M, H, dt, mode),
                 {"M": M, "H": H, "dtype": dtype_name(dt), "mode": mode}, ours=OURS)
            for M, H, dt, mode in _grid(suite, device)]
