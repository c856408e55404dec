"""``bottleneck_adapter``: the cases of ``fastpeft bench`` (shapes, inputs, variants and floor documented in
``fastpeft/bench/cases/ops/bottleneck_adapter.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_bottleneck_adapter.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_bottleneck_adapter = op_benchmark("bottleneck_adapter")
