"""``scaled_add``: the cases of ``fastpeft bench`` (shapes, inputs, variants and floor documented in
``fastpeft/bench/cases/ops/scaled_add.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_scaled_add.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_scaled_add = op_benchmark("scaled_add")
