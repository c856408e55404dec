"""kill -9 at several points of checkpoint and adapter writes, then ``resume_from="latest"``: the resumed
run ends bit-exactly where an uninterrupted one does (losses, evaluations, adapter file), the torn pieces
are cleaned up, and nothing half-written is ever taken for a checkpoint (issue 16)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ._kill9_worker import run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_cls_files):
    out = str(tmp_path_factory.mktemp("k9") / "ref")
    threads = torch.get_num_threads()
    try:
        _, result = run(tiny_model_dir, *tiny_cls_files, out)
    finally:
        torch.set_num_threads(threads)
    return out, result


def _evals(history):
    return [(h["step"], h["accuracy"], h["loss"]) for h in history if h["type"] == "eval"]


@pytest.mark.parametrize("point,latest_before", [
    ("state-tensors:4", 3),    # inside checkpoint-4's temporary directory (3: the evaluation's checkpoint)
    ("rename:checkpoint-4", 3),  # checkpoint-4 complete, not yet renamed into place
    ("prune:2", 4),            # checkpoint-4 in place, the old checkpoint-2 half deleted
    ("rename:adapter", 6),     # the run is over; the final adapter is not yet in place
])
def test_kill9_then_resume_is_bit_exact(point, latest_before, tmp_path, reference, tiny_model_dir, tiny_cls_files):
    ref_out, ref = reference
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "tests.reliability._kill9_worker", tiny_model_dir, *tiny_cls_files,
                        out, point], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    from fastpeft.workflow import checkpointing as ckpt
    assert ckpt.latest_checkpoint(out).endswith(f"checkpoint-{latest_before}")
    left = [n for n in os.listdir(out) if n.startswith(".")]
    assert left or point.startswith("prune")  # the killed writer left its temporary behind ...
    threads = torch.get_num_threads()
    try:
        _, res = run(tiny_model_dir, *tiny_cls_files, out, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # ... and the next start removed it
    assert res["resumed_from"].endswith(f"checkpoint-{latest_before}")
    assert res["losses"] == ref["losses"] and _evals(res["history"]) == _evals(ref["history"])
    a = load_file(os.path.join(ref_out, "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(out, "result.json")))["steps"] == 6
