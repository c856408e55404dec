"""swiglu / geglu, forward + backward (dgate, dup): fused vs eager vs torch.compile vs Liger-Kernel.

Variants: see decoder_bench.py.  ``eager`` is transformers' ``act_fn(gate) * up`` (fastpeft's
``torch`` backend).  Sizes: CPU 512 tokens x intermediate {2048, 5632}, float32 and bfloat16;
GPU: Llama-1B's MLP, 4x2048 tokens x intermediate 8192, bfloat16.  Activations: silu (SwiGLU) and
gelu tanh (GeGLU; Liger's GeGLU is the tanh form).  ``FASTPEFT_BENCH_TINY=1`` shrinks to a smoke test.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft
from decoder_bench import VARIANTS, compiled, fwd_bwd, leaves, liger_function, run, tiny
from fastpeft.ops import geglu, swiglu
from fastpeft.ops.glu import geglu_reference, swiglu_reference

# act: (fused, reference, registry op, liger module, liger function)
ACTS = {
    "silu": (swiglu, swiglu_reference, "swiglu", "ops.swiglu", "LigerSiLUMulFunction"),
    "gelu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh"), "geglu",
                  "ops.geglu", "LigerGELUMulFunction"),
}


def cpu_cases():
    """(tokens, intermediate, dtype, act)."""
    if tiny():
        return [(16, 64, dt, a) for dt in (torch.float32, torch.bfloat16) for a in ACTS]
    return [(512, n, dt, a) for n in (2048, 5632) for dt in (torch.float32, torch.bfloat16) for a in ACTS]


def gpu_cases():
    if tiny():
        return [(64, 256, torch.bfloat16, a) for a in ACTS]
    return [(4 * 2048, 8192, torch.bfloat16, a) for a in ACTS]


def make_step(variant, M, N, dtype, act, device):
    fused, reference, op, liger_mod, liger_name = ACTS[act]
    g = torch.Generator().manual_seed(0)
    gate, up, dy = (torch.randn(M, N, generator=g).to(device, dtype) for _ in range(3))
    inputs = leaves(gate, up)
    if variant == "fused":
        return fwd_bwd(fused, inputs, (dy,))
    if variant == "eager":
        def eager(g, u):
            with fastpeft.use_backend("torch", op=op):
                return fused(g, u)
        return fwd_bwd(eager, inputs, (dy,))
    if variant == "compiled":
        return fwd_bwd(compiled(reference), inputs, (dy,))
    fn = liger_function(liger_mod, liger_name)
    return fwd_bwd(lambda g, u: fn.apply(g, u), inputs, (dy,))


def _id(c):
    M, N, dt, act = c
    return f"M{M}-N{N}-{str(dt).replace('torch.', '')}-{act}"


def _bench(benchmark, variant, case, device):
    M, N, dtype, act = case
    run(benchmark, f"glu-{device}-{_id(case)}", variant, make_step(variant, M, N, dtype, act, device), device,
        M=M, N=N, dtype=str(dtype), activation=act)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "liger"])
@pytest.mark.parametrize("case", cpu_cases(), ids=_id)
def test_glu_cpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", gpu_cases(), ids=_id)
def test_glu_gpu(benchmark, variant, case):
    _bench(benchmark, variant, case, "cuda")
