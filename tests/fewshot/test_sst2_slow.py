"""Few-shot SST-2 with the SetFit-style method (slow: ~5-20 minutes on 2 cores; run with ``-m slow``).

8 shots per class drawn from train.tsv (examples with >= 8 words, as in benchmarks/fewshot_sst2.py),
5 seeds, all 872 dev sentences: mean accuracy >= 0.75 (issue 8's target; NOT met so far: 0.625 +- 0.021,
see benchmarks/results/fewshot_sst2.json, so this test fails until the method improves), head-only on frozen features
run on the same shots and reported beside it.
"""
import os

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_when_selected(request):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr.replace("not slow", "") and os.environ.get("FASTPEFT_RUN_SLOW") != "1":
        pytest.skip("slow real-data run: select with -m slow or FASTPEFT_RUN_SLOW=1")


def test_setfit_sst2_8_shot_5_seeds(shared_data):
    from fastpeft.fewshot import FrozenEncoder, evaluate_seeds
    from fastpeft.workflow.data import read_table

    tr = read_table(os.path.join(shared_data, "sst2", "train.tsv"), ["sentence", "label"], quoting="none")
    dv = read_table(os.path.join(shared_data, "sst2", "dev.tsv"), ["content", "label"], quoting="none")
    texts, labels = [r["sentence"] for r in tr], [r["label"] for r in tr]
    dev_t, dev_l = [r["content"] for r in dv], [r["label"] for r in dv]
    assert len(dev_t) == 872
    exclude = {i for i, t in enumerate(texts) if len(t.split()) < 8}
    seeds = [0, 1, 2, 3, 4]
    setfit = evaluate_seeds("setfit", texts, labels, dev_t, dev_l, k=8, seeds=seeds, exclude=exclude,
                            params=dict(iterations=20, epochs=1, lr=1e-3, batch_size=16, max_length=64),
                            log=print)
    head = evaluate_seeds("head_only", texts, labels, dev_t, dev_l, k=8, seeds=seeds, exclude=exclude,
                          params={"encoder": FrozenEncoder("minilm", max_length=64)})
    print(f"SST-2 8-shot: setfit {setfit['mean']:.4f} +- {setfit['std']:.4f}; "
          f"head-only {head['mean']:.4f} +- {head['std']:.4f}")
    assert [r["shots"] for r in setfit["per_seed"]] == [r["shots"] for r in head["per_seed"]]
    assert setfit["mean"] >= 0.75, (setfit["mean"], head["mean"])
