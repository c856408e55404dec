"""``lora_linear_8bit``: the cases of ``fastpeft bench`` (shapes, inputs, variants and floor documented in
``fastpeft/bench/cases/ops/lora_linear_8bit.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_lora_linear_8bit.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_lora_linear_8bit = op_benchmark("lora_linear_8bit")
