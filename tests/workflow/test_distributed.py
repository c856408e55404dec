"""2 processes (gloo, CPU) under torchrun -- DDP, FSDP2, and FSDP2 killed and resumed from a checkpoint --
equal one process with the same global batch (per-rank batch 4 x 2 accumulation steps x 2 ranks = 16)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastpeft.workflow import Trainer, TrainerConfig

from .conftest import make_cls_setup

WORKER = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, tiny_model_dir, files, kinds):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), WORKER, str(out), tiny_model_dir, files[0], files[1], ",".join(kinds)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    from safetensors.torch import load_file
    return {k: (json.load(open(out / k / "result.json")), load_file(str(out / k / "state.safetensors")))
            for k in kinds}


def _single(tiny_model_dir, files):
    model, task, tr, dv, tok = make_cls_setup(tiny_model_dir, files, lora_dropout=0.0)
    cfg = TrainerConfig(lr=5e-3, batch_size=16, max_steps=4, progress=False, plot=False, seed=0, eval_every=2,
                        distributed="none")
    t = Trainer(model, task, tr, dv, cfg, tokenizer=tok)
    r = t.train()
    return r, t.trainable_state()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_and_fsdp_two_processes_match_single_process(tmp_path, tiny_model_dir, tiny_cls_files):
    runs = _torchrun(tmp_path, tiny_model_dir, tiny_cls_files, ["ddp", "fsdp", "fsdp_resume"])
    ref, ref_state = _single(tiny_model_dir, tiny_cls_files)
    ref_evals = [h for h in ref["history"] if h["type"] == "eval"]
    assert runs["ddp"][0]["wrapped"] == "DistributedDataParallel"
    # fsdp_resume was killed after step 3 and resumed by a new Trainer from the step-2 checkpoint (sharded
    # optimizer state gathered on save, re-sharded on load): the same losses and adapter as uninterrupted
    assert runs["fsdp_resume"][0]["resumed_from"].endswith("checkpoint-2")
    for kind, (res, state) in runs.items():
        assert res["world_size"] == 2
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{kind}: {m}")
        assert state.keys() == ref_state.keys()
        for n in state:
            torch.testing.assert_close(state[n], ref_state[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind} {n}: {m}")
        assert [e["accuracy"] for e in res["evals"]] == [e["accuracy"] for e in ref_evals]
        # rank 0 wrote the adapter in PEFT format (FSDP: gathered from the shards)
        from safetensors.torch import load_file
        saved = load_file(str(tmp_path / kind / "run" / "adapter" / "adapter_model.safetensors"))
        assert any("lora_A" in k for k in saved) and any("classifier" in k for k in saved)
        assert all(not hasattr(v, "placements") for v in saved.values())
