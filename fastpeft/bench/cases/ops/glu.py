"""``glu`` cases (ops ``swiglu`` and ``geglu``): forward + backward (dgate and dup) of
:func:`fastpeft.ops.swiglu` / :func:`fastpeft.ops.geglu` (tanh GELU) against transformers'
``act_fn(gate) * up`` eager (fastpeft's ``torch`` backend, the baseline), ``torch.compile`` of it and
Liger-Kernel's ``LigerSiLUMulFunction`` / ``LigerGELUMulFunction`` (GPU; Liger's GeGLU is the tanh
form); see ``_decoder.py`` for the variants.

Shapes: CPU 512 tokens x intermediate {2048, 5632}, float32 and bfloat16 (full suite only); GPU
Llama-1B's MLP, 4x2048 tokens x intermediate 8192, bfloat16 (quick and full); smoke: 16 x 64, float32
and bfloat16 (CPU), 64 x 256 bfloat16 (GPU); each for both ops.  Bytes per call: 8·M·N elements
(forward: read gate and up, write y; backward: read dy, gate and up, write dgate and dup).
"""
from __future__ import annotations

import torch

from .. import Case
from . import dtype_name, require
from ._decoder import OURS, VARIANTS, decoder_built  # noqa: F401 - VARIANTS: this module's variants

# op: (public function's arguments after gate and up, reference, Liger-Kernel module and function)
OPS = {
    "swiglu": ((), "swiglu_reference", "ops.swiglu", "LigerSiLUMulFunction"),
    "geglu": (("tanh",), "geglu_reference", "ops.geglu", "LigerGELUMulFunction"),
}


def glu_build(op: str, M: int, N: int, dtype: torch.dtype):
    extra, reference_name, liger_module, liger_name = OPS[op]

    def build(device: torch.device):
        fn = require("fastpeft.ops", op)
        reference = require("fastpeft.ops.glu", reference_name)
        g = torch.Generator().manual_seed(0)
        gate, up, dy = (torch.randn(M, N, generator=g).to(device, dtype) for _ in range(3))
        return decoder_built(
            device, op, fused=lambda g, u: fn(g, u, *extra), reference=lambda g, u: reference(g, u, *extra),
            inputs=[gate, up], grads=(dy,), op_args=(gate, up, *extra),
            liger=(liger_module, liger_name, lambda f, g, u: f.apply(g, u)),
            nbytes=8 * M * N * torch.finfo(dtype).bits // 8, eager_note="transformers' act_fn(gate) * up, eager")

    return build


def _grid(suite: str, device: torch.device) -> list:
    """(tokens, intermediate, dtype)."""
    bf16, f32 = torch.bfloat16, torch.float32
    if device.type == "cuda":
        return [(64, 256, bf16)] if suite == "smoke" else [(4 * 2048, 8192, bf16)]
    if suite == "smoke":
        return [(16, 64, dt) for dt in (f32, bf16)]
    if suite == "quick":
        return []
    return [(512, n, dt) for n in (2048, 5632) for dt in (f32, bf16)]


def cases(suite: str, device: torch.device) -> list[Case]:
    return [Case(f"glu/{op}_M{M}_N{N}_{dtype_name(dt)}", "glu", glu_build(op, M, N, dt),
                 {"op": op, "M": M, "N": N, "dtype": dtype_name(dt)}, ours=OURS)
            for M, N, dt in _grid(suite, device) for op in OPS]
