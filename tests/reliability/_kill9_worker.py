"""A tiny training run that SIGKILLs itself at a named point of a checkpoint or adapter write (used by
test_kill9_resume.py): ``python -m tests.reliability._kill9_worker MODEL TRAIN DEV OUT POINT``.

Points: ``state-tensors:<step>`` (writing checkpoint-<step>'s state.safetensors, inside the temporary
directory), ``rename:<name>`` (the rename that puts <name> -- ``checkpoint-<step>`` or ``adapter`` -- into place in
the output directory),
``prune:<step>`` (while deleting the old checkpoint-<step>: one file gone, then killed)."""
import os
import shutil
import signal
import sys

import torch


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "state-tensors":
        import safetensors.torch as st
        real = st.save_file

        def save_file(tensors, filename, *a, **k):
            if os.path.basename(filename) == "state.safetensors" and f".checkpoint-{arg}." in filename:
                with open(filename, "wb") as f:  # half a file, then the kill
                    f.write(b"\x10" * 64)
                die()
            return real(tensors, filename, *a, **k)
        st.save_file = save_file
    elif kind == "rename":
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            # only the run's own directory (a checkpoint's adapter/ is renamed inside its temporary directory)
            if os.path.basename(str(dst)) == arg and str(src).endswith(".tmp") and \
                    os.path.dirname(os.path.abspath(dst)) == os.path.abspath(sys.argv[4]):
                die()
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    elif kind == "prune":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if os.path.basename(str(path)) == f"checkpoint-{arg}":
                os.unlink(os.path.join(path, "state.json"))
                die()
            return real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown point {point!r}")


def run(model_dir, train, dev, out, resume=False):
    """The run every test compares: 6 steps, LoRA dropout on (the RNG must resume too), checkpoints every 2."""
    from fastpeft.workflow import Trainer, TrainerConfig
    from tests.workflow.conftest import make_cls_setup
    torch.set_num_threads(1)
    model, task, tr, dv, tok = make_cls_setup(model_dir, (train, dev), lora_dropout=0.1)
    cfg = TrainerConfig(lr=5e-3, batch_size=16, max_steps=6, save_every=2, eval_every=3, progress=False, plot=False,
                        seed=0, output_dir=out, resume_from="latest" if resume else None)
    t = Trainer(model, task, tr, dv, cfg, tokenizer=tok)
    return t, t.train()


if __name__ == "__main__":
    model_dir, train, dev, out, point = sys.argv[1:6]
    arm(point)
    run(model_dir, train, dev, out)
    print("finished without being killed")
