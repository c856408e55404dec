"""Shared harness of the decoder-op benchmarks (bench_rms_norm.py, bench_rope.py, bench_glu.py).

Each case is timed as forward + backward (``out.backward(grad)``) in four variants, one
``benchmark.group`` per shape so they line up:

* ``fused``    -- the fastpeft op on the best backend here (cpu / triton);
* ``eager``    -- the op's ``torch`` backend: transformers' unfused PyTorch composition, eager;
* ``compiled`` -- ``torch.compile`` of that composition (inductor; compiled in the warm-up call);
* ``liger``    -- Liger-Kernel's Triton kernel for the same job (GPU only; skipped, with the reason,
  when ``liger_kernel`` is not importable or has no such function).

CPU timings need a quiet machine (see README.md).
"""
from __future__ import annotations

import os

import pytest
import torch

VARIANTS = ("fused", "eager", "compiled", "liger")


def tiny() -> bool:
    """FASTPEFT_BENCH_TINY=1: smoke-test sizes."""
    return os.environ.get("FASTPEFT_BENCH_TINY", "") not in ("", "0")


def leaves(*tensors):
    """Detached copies that require grad (the inputs of one timed forward + backward)."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def fwd_bwd(forward, inputs, grads):
    """A zero-argument callable: ``forward(*inputs)`` then backward of its output(s) with ``grads``."""
    def step():
        for t in inputs:
            t.grad = None
        out = forward(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)

    return step


def liger_function(module: str, name: str):
    """``liger_kernel.<module>.<name>``, or skip saying why not."""
    if not torch.cuda.is_available():
        pytest.skip("Liger-Kernel runs on CUDA only")
    try:
        mod = __import__(f"liger_kernel.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as e:  # not installed, or another version without it
        pytest.skip(f"liger_kernel.{module}.{name} not available: {type(e).__name__}: {e}")


def compiled(fn):
    """``torch.compile`` of an eager composition (skips where inductor cannot compile here)."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable: {e}")


def run(benchmark, group: str, variant: str, step, device: str, **info) -> None:
    """Warm up (and compile) once, then time ``step`` under pytest-benchmark."""
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, device=device, **info)
    if device == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    try:
        timed()
    except Exception as e:  # noqa: BLE001 - another Liger-Kernel version may take other arguments
        if variant != "liger":
            raise
        pytest.skip(f"Liger-Kernel call failed (another version's signature?): {type(e).__name__}: {e}")
    benchmark(timed)
