"""``lora_linear_multi``: the cases of ``fastpeft bench`` (shapes, inputs, variants, targets and floor documented
in ``fastpeft/bench/cases/ops/lora_linear_multi.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_lora_linear_multi.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_lora_linear_multi = op_benchmark("lora_linear_multi")
