"""Few-shot SST-2 with the SetFit-style method (slow: ~5-10 minutes on 2 cores; run with ``-m slow``).

8 shots per class drawn from all of train.tsv, SetFit's templated examples ("This sentence is negative" /
"... positive", 8 copies each; label names from the dataset README), 5 seeds, all 872 dev sentences:
mean accuracy >= 0.75 (issue 8's target). The recipe (contrastive LoRA lr 2.5e-4, 20 pair rounds, logistic
head) was chosen on 500 held-out *train* sentences with seeds 100-104 (0.748 there;
benchmarks/results/fewshot_sst2_tuning.json), then run once on dev: 0.736 +- 0.026 (seeds 0-4: 0.726 0.745
0.748 0.696 0.763; fewshot_sst2_tuned.json). The target is NOT met, so the test is xfail (not strict).
Head-only on frozen features, same shots: 0.652 +- 0.047 (0.686 +- 0.025 with the same templated examples).
Twenty held-out candidates in all; the best, a 3-run seed ensemble (0.750 held-out), reached 0.743 +- 0.022 on
dev (fewshot_sst2_tuned_ens3.json), still short of the target.
"""
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("real_data_run_selected")]

RECIPE = dict(iterations=20, epochs=1, lr=2.5e-4, batch_size=16, max_length=64,
              label_names={"0": "negative", "1": "positive"}, template_samples=8)


@pytest.mark.xfail(strict=False, raises=AssertionError, reason="issue 8 target 0.75 not met: SetFit (lr 2.5e-4, chosen "
                   "on held-out train) + templates 0.736 +- 0.026 over 5 seeds (head-only 0.652 +- 0.047, "
                   "+templates 0.686), fewshot_sst2_tuned.json")
def test_setfit_sst2_8_shot_5_seeds(shared_data):
    from fastpeft.fewshot import FrozenEncoder, evaluate_seeds
    from fastpeft.workflow.data import read_table

    tr = read_table(os.path.join(shared_data, "sst2", "train.tsv"), ["sentence", "label"], quoting="none")
    dv = read_table(os.path.join(shared_data, "sst2", "dev.tsv"), ["content", "label"], quoting="none")
    texts, labels = [r["sentence"] for r in tr], [r["label"] for r in tr]
    dev_t, dev_l = [r["content"] for r in dv], [r["label"] for r in dv]
    assert len(dev_t) == 872
    seeds = [0, 1, 2, 3, 4]
    setfit = evaluate_seeds("setfit", texts, labels, dev_t, dev_l, k=8, seeds=seeds, params=RECIPE, log=print)
    assert all(0.5 < r["accuracy"] <= 1 for r in setfit["per_seed"])
    head = evaluate_seeds("head_only", texts, labels, dev_t, dev_l, k=8, seeds=seeds,
                          params={"encoder": FrozenEncoder("minilm", max_length=64)})
    print(f"SST-2 8-shot: setfit {setfit['mean']:.4f} +- {setfit['std']:.4f}; "
          f"head-only {head['mean']:.4f} +- {head['std']:.4f}")
    assert [r["shots"] for r in setfit["per_seed"]] == [r["shots"] for r in head["per_seed"]]
    assert setfit["mean"] > head["mean"] + 0.03, (setfit["mean"], head["mean"])   # measured +0.083
    assert setfit["mean"] >= 0.75, (setfit["mean"], head["mean"])
