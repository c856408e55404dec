"""rope, forward + backward (dq, dk): fused vs eager vs torch.compile vs Liger-Kernel.

Variants: see decoder_bench.py.  ``eager`` is transformers' ``apply_rotary_pos_emb`` arithmetic
(fastpeft's ``torch`` backend).  q/k are [B, H, S, D] views of [B, S, H, D] projection outputs, as
attention gets them; cos/sin [1, S, D] in the model dtype.  Sizes: CPU 512 tokens, heads x dim
12 x 64 (hidden 768, MHA) and 32/8 x 64 (hidden 2048, GQA), float32 and bfloat16; GPU: Llama-1B,
batch 4 x 2048 tokens, 32 query / 8 key heads x 64, bfloat16.  ``FASTPEFT_BENCH_TINY=1`` shrinks to
a smoke test.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft
from decoder_bench import VARIANTS, compiled, fwd_bwd, leaves, liger_function, run, tiny
from fastpeft.ops import rope
from fastpeft.ops.rope import rope_reference


def cpu_cases():
    """(B, S, Hq, Hk, D, dtype)."""
    if tiny():
        return [(1, 16, 4, 2, 16, torch.float32), (1, 16, 4, 2, 16, torch.bfloat16)]
    return [(1, 512, hq, hk, 64, dt) for hq, hk in ((12, 12), (32, 8)) for dt in (torch.float32, torch.bfloat16)]


def gpu_cases():
    if tiny():
        return [(2, 64, 8, 2, 64, torch.bfloat16)]
    return [(4, 2048, 32, 8, 64, torch.bfloat16)]


def make_step(variant, B, S, Hq, Hk, D, dtype, device):
    g = torch.Generator().manual_seed(0)

    def heads(H):  # [B, H, S, D] view of [B, S, H, D] memory
        return torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2)

    q, k, dq, dk = heads(Hq), heads(Hk), heads(Hq), heads(Hk)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat([torch.arange(S, dtype=torch.float32)[:, None] * inv] * 2, dim=-1)[None]
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    inputs, grads = leaves(q, k), (dq, dk)
    if variant == "fused":
        return fwd_bwd(lambda q, k: rope(q, k, cos, sin), inputs, grads)
    if variant == "eager":
        def eager(q, k):
            with fastpeft.use_backend("torch", op="rope"):
                return rope(q, k, cos, sin)
        return fwd_bwd(eager, inputs, grads)
    if variant == "compiled":
        return fwd_bwd(compiled(lambda q, k: rope_reference(q, k, cos, sin)), inputs, grads)
    fn = liger_function("transformers.rope", "liger_rotary_pos_emb")
    return fwd_bwd(lambda q, k: fn(q, k, cos, sin), inputs, grads)


def _id(c):
    B, S, Hq, Hk, D, dt = c
    return f"B{B}-S{S}-Hq{Hq}-Hk{Hk}-D{D}-{str(dt).replace('torch.', '')}"


def _bench(benchmark, variant, case, device):
    run(benchmark, f"rope-{device}-{_id(case)}", variant, make_step(variant, *case, device), device,
        shape=_id(case))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "liger"])
@pytest.mark.parametrize("case", cpu_cases(), ids=_id)
def test_rope_cpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_id)
def test_rope_gpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cuda")
