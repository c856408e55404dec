"""Worker for the DDP / FSDP equivalence test: ``torchrun --nproc_per_node 2 _ddp_worker.py OUT MODEL TRAIN DEV
ddp,fsdp,fsdp_resume``. Rank 0 writes the per-step losses and the final trainable parameters to OUT/<kind>/.
``<kind>_resume``: the run is killed after step 3 (checkpoint at step 2) and resumed from ``latest`` by a
new Trainer, as a restarted job would."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from fastpeft.workflow import Trainer, TrainerConfig  # noqa: E402
from tests.workflow.conftest import Kill, KillAt, make_cls_setup  # noqa: E402


def main():
    out, model_dir, train, dev, kinds = sys.argv[1:6]
    torch.set_num_threads(1)
    for kind in kinds.split(","):  # one launch, several runs: saves a torchrun start-up per kind
        dist, resume = kind.split("_")[0], kind.endswith("_resume")

        def trainer(**kw):
            model, task, tr, dv, tok = make_cls_setup(model_dir, (train, dev), lora_dropout=0.0)
            cfg = TrainerConfig(lr=5e-3, batch_size=4, grad_accum=2, max_steps=4, progress=False, plot=False,
                                seed=0, distributed=dist, eval_every=2, output_dir=os.path.join(out, kind, "run"),
                                **kw)
            return Trainer(model, task, tr, dv, cfg, tokenizer=tok)

        if resume:
            try:
                t = trainer(save_every=2)
                t.callbacks.append(KillAt(3))
                t.train()
                raise RuntimeError("the run was not killed")
            except Kill:
                pass
            torch.distributed.barrier()
            t = trainer(resume_from="latest")
        else:
            t = trainer()
        r = t.train()
        state = t.trainable_state()
        if t.info.rank == 0:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, kind, "state.safetensors"))
            with open(os.path.join(out, kind, "result.json"), "w") as f:
                json.dump({"losses": r["losses"], "world_size": t.info.world_size,
                           "resumed_from": r.get("resumed_from"),
                           "wrapped": type(t.wrapped).__name__,
                           "evals": [h for h in r["history"] if h["type"] == "eval"]}, f)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
