"""``linear_cross_entropy``: the cases of ``fastpeft bench`` (shapes, inputs, variants documented in
``fastpeft/bench/cases/ops/linear_cross_entropy.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_linear_cross_entropy.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_linear_cross_entropy = op_benchmark("linear_cross_entropy")
