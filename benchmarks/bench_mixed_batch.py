"""Mixed-adapter serving forward (issue 19): fastpeft's mixed-adapter batch vs the same batch on one adapter vs
HF PEFT's mixed-adapter batch vs ``fastpeft.accelerate`` of it vs the base model alone.  Cases and builders are
``fastpeft.bench.mixed`` (the same as ``fastpeft bench``): MiniLM sequence classification, 8 adapters x 4
sequences of 64 tokens, r=8.  The kernel cases of the same issue are ``bench_lora_linear_multi.py``.

    pytest benchmarks/bench_mixed_batch.py --benchmark-only --benchmark-group-by=group
"""
from __future__ import annotations

import pytest

from fastpeft.bench import mixed

from conftest import case_params, run_variant, suite, tiny


@pytest.mark.parametrize("device,case,variant", case_params(mixed.cases, mixed.VARIANTS, suite("quick")))
def test_mixed_batch(benchmark, device, case, variant):
    run_variant(benchmark, device, case, variant, rounds=3 if tiny() else 5)
