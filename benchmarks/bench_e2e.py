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
The quick suite by default (``FASTPEFT_BENCH_SUITE`` picks another; ``FASTPEFT_BENCH_TINY=1``
the smoke sizes).

    pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest

from fastpeft.bench import e2e

from conftest import case_params, run_variant, suite, tiny

VARIANTS = ("fastpeft", "hf_peft", "fastpeft_accelerate", "floor", "plain", "freelb_k3")


@pytest.mark.parametrize("device,case,variant", case_params(e2e.cases, VARIANTS, suite("quick")))
def test_e2e(benchmark, device, case, variant):
    run_variant(benchmark, device, case, variant, rounds=3 if tiny() else 5)
