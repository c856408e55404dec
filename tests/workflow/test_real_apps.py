"""Real applications on the bundled MiniLM (slow: ~10+ minutes each on 2 cores; run with ``-m slow``).

SST-2: LoRA r=8 on query/value + classifier, one epoch over a fixed 20,000-example subset: dev accuracy >= 0.85.
CoNLL-2003: LoRA r=8 on all linear layers + token head, one epoch: entity micro-F1 on valid >= 0.80.
Each also runs HF PEFT with its own loop on the same settings (reported, not asserted), uses early
stopping on the validation split, and has a kill-and-resume check on a subset.
These tests run only when selected with ``-m slow`` (or FASTPEFT_RUN_SLOW=1).
"""
import importlib.util
import json
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("real_data_run_selected")]

_spec = importlib.util.spec_from_file_location(
    "real_apps", os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "real_apps.py"))
real_apps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_apps)



def _report(name, entry):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", f"real_apps_{name}.json")
    with open(path, "w") as f:
        json.dump(entry, f, indent=1, default=str)
    for lib in ("fastpeft", "hf_peft"):
        if lib in entry:
            e = entry[lib]
            print(f"{name} {lib}: {e['metric']}={e['value']:.4f} train {e['train_seconds']:.0f}s")


@pytest.mark.parametrize("app", ["sst2", "conll"])
def test_real_app_reaches_target_and_hf_peft_beside_it(app, shared_data, tmp_path):
    metric, target = real_apps.TARGET[app]
    entry = {"fastpeft": real_apps.run_fastpeft(real_apps.app_config(app, shared_data, str(tmp_path / "fp"),
                                                                     progress=False))}
    entry["hf_peft"] = real_apps.run_hf_peft(real_apps.app_config(app, shared_data, str(tmp_path / "hf"),
                                                                  progress=False))
    _report(app, entry)
    assert entry["fastpeft"]["metric"] == metric
    assert entry["fastpeft"]["value"] >= target, entry["fastpeft"]


@pytest.mark.parametrize("app", ["sst2", "conll"])
def test_real_app_resume_from_checkpoint(app, shared_data, tmp_path):
    r = real_apps.run_resume_check(app, shared_data, str(tmp_path), train_limit=320, steps=8, kill_at=3)
    assert r["resumed_from"].endswith("checkpoint-3")
    assert r["n_losses"] == (8, 8)
    assert r["max_loss_diff"] < 1e-4, r
    key = real_apps.TARGET[app][0]
    assert r["metric_ref"][key] == pytest.approx(r["metric_resumed"][key], abs=1e-6)
