"""End-to-end LoRA training step: fastpeft vs HF PEFT vs fastpeft.accelerate vs the floor.

Groups (``benchmark.group``) are one model/config each, so the variants compare side by side:

* ``fastpeft``            — ``fastpeft.get_peft_model(model, fastpeft.LoraConfig(...))``;
* ``hf_peft``             — ``peft.get_peft_model`` with the same config, seed and batch;
* ``fastpeft_accelerate`` — ``fastpeft.accelerate(<HF PEFT model>)``;
* ``floor``               — every weight frozen, gradients to ``inputs_embeds`` only.

One step = forward, backward, AdamW step, zero grads (the floor: forward + backward).
Cases and builders are ``fastpeft.bench.e2e`` (the same as ``fastpeft bench``): MiniLM
sequence classification (batch 32 × 64, r=8, dropout 0 and 0.1) and a random-init
Llama-style decoder (~20M on CPU, ~1B bf16 seq 2048 on GPU, r=16).
``FASTPEFT_BENCH_TINY=1`` uses the smoke sizes.

    pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastpeft.bench import e2e
from fastpeft.bench.cases import Skip

from conftest import tiny

VARIANTS = ("fastpeft", "hf_peft", "fastpeft_accelerate", "floor")
SUITE = "smoke" if tiny() else "quick"


def _cases(device: str):
    return {c.name: c for c in e2e.cases(SUITE, torch.device(device))}


CPU_CASES = _cases("cpu")
GPU_CASES = _cases("cuda") if torch.cuda.is_available() else {}


@functools.lru_cache(maxsize=1)  # one case's models alive at a time; variants of a case reuse them
def _built(device: str, name: str):
    case = (CPU_CASES if device == "cpu" else GPU_CASES)[name]
    try:
        return case.build(torch.device(device)), None
    except Skip as e:
        return None, str(e)


def _run(benchmark, device: str, name: str, variant: str):
    built, why = _built(device, name)
    if built is None:
        pytest.skip(why)
    if variant not in built.variants:
        pytest.skip(built.skipped.get(variant, f"variant {variant!r} is not available here"))
    fn = built.variants[variant]
    if device == "cuda":
        step = fn

        def fn():
            step()
            torch.cuda.synchronize()
    benchmark.group = f"e2e-{device}-{name.split('/', 1)[1]}"
    benchmark.extra_info.update(variant=variant, tokens=built.tokens, note=built.notes.get(variant))
    benchmark.pedantic(fn, rounds=3 if tiny() else 5, warmup_rounds=1 if tiny() else 2, iterations=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_e2e_cpu(benchmark, name, variant):
    _run(benchmark, "cpu", name, variant)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(GPU_CASES) or ["-/none"])
def test_e2e_gpu(benchmark, name, variant):
    if name == "-/none":
        pytest.skip("needs a CUDA device")
    _run(benchmark, "cuda", name, variant)
