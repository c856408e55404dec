"""``adv_perturb_update``: the cases of ``fastpeft bench`` (shapes, inputs, variants and floor documented in
``fastpeft/bench/cases/ops/adv_perturb_update.py``) under pytest-benchmark, one group per case.

    pytest benchmarks/bench_adv_perturb_update.py --benchmark-only --benchmark-group-by=group
"""
from conftest import op_benchmark

test_adv_perturb_update = op_benchmark("adv_perturb_update")
