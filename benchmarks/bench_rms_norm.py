"""rms_norm, forward + backward (dx and dweight): fused vs eager vs torch.compile vs Liger-Kernel.

Variants: see decoder_bench.py.  ``eager`` is transformers' LlamaRMSNorm / GemmaRMSNorm arithmetic
(fastpeft's ``torch`` backend).  Sizes: CPU 512 tokens x hidden {768, 2048}, float32 and bfloat16
(Llama order), plus bfloat16 hidden 2048 in Gemma's order (offset 1); GPU: Llama-1B, 4x2048 tokens x
hidden 2048, bfloat16, both orders.  ``FASTPEFT_BENCH_TINY=1`` shrinks to a smoke test.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft
from decoder_bench import VARIANTS, compiled, fwd_bwd, leaves, liger_function, run, tiny
from fastpeft.ops import rms_norm
from fastpeft.ops.rms_norm import rms_norm_reference

EPS = 1e-6
MODES = {"llama": (0.0, True), "gemma": (1.0, False)}  # (offset, cast_before_weight)


def cpu_cases():
    """(tokens, hidden, dtype, mode)."""
    if tiny():
        return [(16, 64, torch.float32, "llama"), (16, 64, torch.bfloat16, "gemma")]
    return [(512, h, dt, "llama") for h in (768, 2048) for dt in (torch.float32, torch.bfloat16)] + \
        [(512, 2048, torch.bfloat16, "gemma")]


def gpu_cases():
    if tiny():
        return [(64, 256, torch.bfloat16, m) for m in MODES]
    return [(4 * 2048, 2048, torch.bfloat16, m) for m in MODES]


def make_step(variant, M, H, dtype, mode, device):
    offset, cast = MODES[mode]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, H, generator=g).to(device, dtype)
    w = (torch.randn(H, generator=g) * 0.1 + (0.0 if offset else 1.0)).to(device, dtype)
    dy = torch.randn(M, H, generator=g).to(device, dtype)
    inputs = leaves(x, w)
    if variant == "fused":
        return fwd_bwd(lambda x, w: rms_norm(x, w, EPS, offset, cast), inputs, (dy,))
    if variant == "eager":
        def eager(x, w):
            with fastpeft.use_backend("torch", op="rms_norm"):
                return rms_norm(x, w, EPS, offset, cast)
        return fwd_bwd(eager, inputs, (dy,))
    if variant == "compiled":
        return fwd_bwd(compiled(lambda x, w: rms_norm_reference(x, w, EPS, offset, cast)), inputs, (dy,))
    fn = liger_function("ops.rms_norm", "LigerRMSNormFunction")
    return fwd_bwd(lambda x, w: fn.apply(x, w, EPS, offset, mode), inputs, (dy,))


def _id(c):
    M, H, dt, mode = c
    return f"M{M}-H{H}-{str(dt).replace('torch.', '')}-{mode}"


def _bench(benchmark, variant, case, device):
    M, H, dtype, mode = case
    run(benchmark, f"rms_norm-{device}-{_id(case)}", variant, make_step(variant, M, H, dtype, mode, device),
        device, M=M, H=H, dtype=str(dtype), mode=mode)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "liger"])
@pytest.mark.parametrize("case", cpu_cases(), ids=_id)
def test_rms_norm_cpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_id)
def test_rms_norm_gpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cuda")
