"""CNN transfer learning on real data: scikit-learn's 8x8 handwritten digits (offline, 1,797 images).

1. Pretrain LeNet-5 (full training from random init) on digits 0-4.
2. Adapt the pretrained base to digits 5-9 with each method, all for the same number of epochs, through
   ``fastpeft.workflow.finetune`` (task ``image_classification``): full fine-tuning, linear probe (head only),
   LoRA (r=4 on every Conv2d and Linear of the backbone), BitFit, bottleneck adapters (after every LeNet
   layer, bottleneck 8), and LoRA through HF PEFT (``method.backend: peft``, same recipe; HF PEFT has no
   BitFit and no bottleneck adapters). Training from scratch on 5-9 is the no-transfer reference.
3. Report accuracy on a fixed held-out test split (30 % of each digit group, seed 0, never used for
   training or model selection), trainable parameters and training time.

The learning rate of each method is picked from ``--lrs`` on a validation split carved out of the training
part (20 %), then the chosen run's best adapter is scored on the test split through ``fastpeft evaluate``'s
code path (``run_on_file``: the adapter reloaded onto the base).

    python benchmarks/real_digits.py                  # -> benchmarks/results/digits_transfer.json (minutes on CPU)
    python benchmarks/real_digits.py --epochs 3 --lrs 0.01 --out /tmp/x.json    # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

METHODS = {
    "full": {"name": "full"},
    "linear_probe": {"name": "linear_probe"},
    "lora": {"name": "lora", "r": 4, "lora_alpha": 8},
    "bitfit": {"name": "bitfit"},
    "adapter": {"name": "adapter", "bottleneck_size": 8},
    "lora_hf_peft": {"name": "lora", "r": 4, "lora_alpha": 8, "backend": "peft"},
    "scratch": {"name": "full"},  # from a random-init LeNet: the no-transfer reference
}


def split_digits(out_dir: str, seed: int = 0) -> dict:
    """Write the .npz splits: {group}_{train,val,test}.npz for group 04 (digits 0-4) and 59 (5-9)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # 0..16 -> 0..1
    y = d.target
    g = np.random.default_rng(seed)
    paths = {}
    for group, digits in (("04", range(0, 5)), ("59", range(5, 10))):
        idx = np.flatnonzero(np.isin(y, list(digits)))
        idx = idx[g.permutation(len(idx))]
        n_test = int(round(0.3 * len(idx)))
        n_val = int(round(0.2 * (len(idx) - n_test)))
        parts = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}
        for name, ii in parts.items():
            p = os.path.join(out_dir, f"digits{group}_{name}.npz")
            np.savez(p, images=x[ii], labels=y[ii])
            paths[f"{group}_{name}"] = (p, int(len(ii)))
    return paths


def _train(model, train, val, method, out, epochs, lr, seed=0):
    from fastpeft.workflow import build_config, finetune
    cfg = build_config({"model": model, "task": "image_classification", "output_dir": out,
                        "data": {"train": train, "validation": val}, "method": dict(method),
                        "trainer": {"lr": lr, "epochs": epochs, "batch_size": 32, "seed": seed, "progress": False,
                                    "plot": False, "keep_checkpoints": 1}})
    torch.manual_seed(seed)
    res = finetune(cfg)
    module = res["trainer"].module
    return res, module, sum(p.numel() for p in module.parameters() if p.requires_grad)


def run(work: str, methods=None, epochs: int = 10, lrs=(3e-3, 1e-2), pretrain_epochs: int = 15, log=print,
        on_method=None) -> dict:
    """Pretrain, adapt with each of ``methods`` (default all), score; ``on_method(result so far)`` after each."""
    from fastpeft.workflow import run_on_file
    from fastpeft.workflow.tasks.image_models import save_image_model
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(work, exist_ok=True)
    paths = split_digits(work)
    p = {k: v[0] for k, v in paths.items()}
    t0 = time.perf_counter()
    res, base_model, n_params = _train("lenet5", p["04_train"], p["04_val"], {"name": "full"},
                                       os.path.join(work, "pretrain"), pretrain_epochs, 3e-3)
    base_dir = os.path.join(work, "lenet5_digits04")
    save_image_model(base_model, base_dir, labels=[str(i) for i in range(5)])
    pre_test = run_on_file(os.path.join(work, "pretrain", "adapter"), p["04_test"], mode="evaluate")
    out = {"pretrain": {"digits": "0-4", "epochs": pretrain_epochs, "lr": 3e-3, "params": n_params,
                        "accuracy": pre_test["accuracy"], "train_seconds": round(res["train_seconds"], 2)},
           "splits": {k: v[1] for k, v in paths.items()}, "methods": {}}
    log(f"pretrained LeNet-5 on 0-4: test accuracy {pre_test['accuracy']:.4f} ({time.perf_counter() - t0:.0f} s)")
    for name in methods or list(METHODS):
        best = None
        for lr in lrs:
            run_dir = os.path.join(work, f"{name}_lr{lr:g}")
            model = "lenet5" if name == "scratch" else base_dir
            res, module, trainable = _train(model, p["59_train"], p["59_val"], METHODS[name], run_dir, epochs, lr)
            val = res["best_metric"]
            log(f"  {name:13s} lr {lr:g}: val accuracy {val:.4f}, {trainable} trainable, "
                f"{res['train_seconds']:.1f} s")
            if best is None or val > best["val_accuracy"]:
                best = {"lr": lr, "val_accuracy": val, "trainable_params": trainable,
                        "train_seconds": round(res["train_seconds"], 2), "dir": run_dir}
        test = run_on_file(os.path.join(best.pop("dir"), "adapter"), p["59_test"], mode="evaluate")
        best.update(accuracy=test["accuracy"], macro_f1=test["macro_f1"],
                    trainable_fraction=round(best["trainable_params"] / n_params, 4), method=METHODS[name])
        out["methods"][name] = best
        log(f"{name:13s}: test accuracy {test['accuracy']:.4f} (lr {best['lr']:g})")
        if on_method is not None:
            on_method(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="adaptation epochs, every method (default 10)")
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2], help="learning rates tried per method")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_transfer.json"))
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="digits_")
    t0 = time.perf_counter()
    from fastpeft.fileio import atomic_write_text

    def conditions(res):
        res["conditions"] = {
            "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs, "lrs": args.lrs, "batch_size": 32,
            "optimizer": "adamw, linear decay, no warm-up, clip 1.0",
            "selection": "lr and best epoch on the validation split; accuracy on the test split",
            "model": "LeNet-5 (relu, max-pool) on 8x8 digits resized to 32x32",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "total_seconds": round(time.perf_counter() - t0, 1),
            "note": "times on a shared, loaded CPU machine: indicative only"}
        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")  # after every method: partial results

    res = run(work, args.methods, args.epochs, tuple(args.lrs), args.pretrain_epochs, on_method=conditions)
    conditions(res)
    print(json.dumps({k: {m: v[m] for m in ("accuracy", "trainable_params", "train_seconds", "lr")}
                      for k, v in res["methods"].items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
