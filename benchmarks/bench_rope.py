"""``rope``: the cases of ``fastpeft bench`` (shapes, inputs, variants documented in
``fastpeft/bench/cases/ops/rope.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_rope.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_rope = op_benchmark("rope")
