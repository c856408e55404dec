"""Measured effect of fastpeft.augment on real data (SST-2, bundled MiniLM), low-data regimes.

Part 1 -- on-the-fly augmentation with LoRA: ``--train-size`` (500) SST-2 training examples (a fixed random
subset per seed), MiniLM + LoRA r=8 (alpha 16, dropout 0.1) on query/value + the classifier head, fastpeft's
Trainer (AdamW, lr 3e-3, linear schedule with 10% warm-up, batch 16, 2 epochs, seeds 0-2, one thread),
accuracy on the whole dev split after the last step (no model selection on dev; length-bucketed batches).
Methods, each with the same subset / init / batch order per seed: ``none``; ``embedding_substitution`` (p=0.5, rate=0.15, k=8);
``neftune`` (alpha=5, uniform); ``mixup`` (embedding mixup, alpha=0.4).

Part 2 -- GAN feature augmentation in few-shot: ``--shots`` (8) examples per class (stratified, per seed)
from SST-2 train, frozen MiniLM mean-pooled features; a logistic-regression head on the real features
alone vs. on real + ``--synthetic`` (64) GAN-synthesised features per class (``FeatureGAN``, 1000 steps);
accuracy on dev.

    python benchmarks/augment_effect.py              # full run (about 10 CPU-minutes; 3 LoRA seeds, 5 GAN seeds)
    python benchmarks/augment_effect.py --quick      # smoke run (tiny sizes; writes augment_effect_quick.json)

Writes ``benchmarks/results/augment_effect.json`` (setup, per-seed numbers, means / std, date). Wall
times are from a shared machine: indicative only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

METHODS = {
    "none": [],
    "embedding_substitution": [{"name": "embedding_substitution", "p": 0.5, "rate": 0.15, "k": 8}],
    "neftune": [{"name": "neftune", "alpha": 5.0}],
    "mixup": [{"name": "mixup", "alpha": 0.4}],
}


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def run_lora(args, data_dir: str) -> dict:
    from fastpeft.augment import callbacks_from_config
    from fastpeft.workflow import Trainer, TrainerConfig, get_task, load_tokenizer
    from fastpeft.workflow.data import take
    from fastpeft.workflow.models import resolve_model_path
    from fastpeft.workflow.pipeline import apply_method

    model_path = resolve_model_path("minilm")
    tok = load_tokenizer(model_path)
    task = get_task("sequence_classification")
    train_all = task.read(os.path.join(data_dir, "sst2", "train.tsv"), {"text_column": "sentence"})
    dev = task.read(os.path.join(data_dir, "sst2", "dev.tsv"), {"text_column": "content"},
                    limit=args.dev_limit)
    task.fit_labels(train_all)
    dev_ds = task.encode(dev, tok, args.max_length)
    per_seed = {m: [] for m in args.methods}
    seconds = {m: [] for m in args.methods}
    for seed in args.seeds:
        train_ds = task.encode(take(train_all, args.train_size, seed=1000 + seed), tok, args.max_length)
        for m in args.methods:
            torch.manual_seed(seed)
            model = apply_method(task.build_model(model_path),
                                 {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                  "target_modules": ["query", "value"]}, task)
            cbs, loss_fn = callbacks_from_config(METHODS[m], model=model, tokenizer=tok, task=task, seed=seed)
            cfg = TrainerConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                                warmup_ratio=0.1, seed=seed, progress=False, plot=False, eval_batch_size=128,
                                bucket_size=4)
            t0 = time.perf_counter()
            trainer = Trainer(model, task, train_ds, None, cfg, tokenizer=tok, callbacks=cbs, loss_fn=loss_fn)
            r = trainer.train()
            acc = trainer.evaluate(dev_ds)["accuracy"]
            seconds[m].append(time.perf_counter() - t0)
            per_seed[m].append(acc)
            print(f"[lora] seed {seed} {m:24s} dev acc {acc:.4f}  ({r['steps']} steps, "
                  f"{seconds[m][-1]:.0f} s)", flush=True)
    base = per_seed.get("none")
    out = {"per_seed": per_seed, "summary": {m: _summary(v) for m, v in per_seed.items()},
           "wall_seconds_per_run": {m: statistics.fmean(v) for m, v in seconds.items()}}
    if base:
        out["paired_delta_vs_none"] = {m: _summary([a - b for a, b in zip(v, base)])
                                       for m, v in per_seed.items() if m != "none"}
    return out


def _kshot(records, shots: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for lab in sorted({r["label"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["label"] == lab]
        if len(idx) < shots:
            raise ValueError(f"shots: class {lab!r} has only {len(idx)} examples, fewer than {shots}")
        out += [records[idx[j]] for j in torch.randperm(len(idx), generator=g)[:shots].tolist()]
    return out


def run_gan(args, data_dir: str) -> dict:
    from transformers import AutoModel

    from fastpeft.augment import FeatureGAN, extract_features, train_head_with_synthetic, train_linear_head
    from fastpeft.workflow import get_task, load_tokenizer
    from fastpeft.workflow.models import resolve_model_path

    model_path = resolve_model_path("minilm")
    tok = load_tokenizer(model_path)
    enc = AutoModel.from_pretrained(model_path, local_files_only=True)
    task = get_task("sequence_classification")
    train_all = task.read(os.path.join(data_dir, "sst2", "train.tsv"), {"text_column": "sentence"})
    dev = task.read(os.path.join(data_dir, "sst2", "dev.tsv"), {"text_column": "content"},
                    limit=args.dev_limit)
    labels = task.fit_labels(train_all)
    l2i = {l: i for i, l in enumerate(labels)}
    t0 = time.perf_counter()
    dev_x = extract_features(enc, tok, [r["text"] for r in dev], max_length=args.max_length)
    dev_y = torch.tensor([l2i[r["label"]] for r in dev])
    res = {"real_only": [], "real_plus_gan": [], "synthetic_acc_by_real_head": []}
    for seed in args.gan_seeds:
        shot = _kshot(train_all, args.shots, seed)
        x = extract_features(enc, tok, [r["text"] for r in shot], max_length=args.max_length)
        y = torch.tensor([l2i[r["label"]] for r in shot])
        head = train_linear_head(x, y, num_classes=len(labels), seed=seed)
        a_real = float((head.predict(dev_x) == dev_y).float().mean())
        gan = FeatureGAN(x.shape[1], len(labels), seed=seed).fit(x, y, steps=args.gan_steps)
        head2, info = train_head_with_synthetic(x, y, num_classes=len(labels), gan=gan,
                                                n_synthetic_per_class=args.synthetic, seed=seed)
        a_gan = float((head2.predict(dev_x) == dev_y).float().mean())
        syn = float((head.predict(info["synthetic_features"]) == info["synthetic_labels"]).float().mean())
        res["real_only"].append(a_real)
        res["real_plus_gan"].append(a_gan)
        res["synthetic_acc_by_real_head"].append(syn)
        print(f"[gan] seed {seed}: head on real {a_real:.4f}  real+GAN {a_gan:.4f}  "
              f"(synthetic classified as their class by the real head: {syn:.2f})", flush=True)
    return {"per_seed": res, "summary": {k: _summary(v) for k, v in res.items()},
            "paired_delta_gan_minus_real": _summary([b - a for a, b in zip(res["real_only"], res["real_plus_gan"])]),
            "wall_seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dev-limit", type=int, default=None, help="first N dev examples (default: all 872)")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--gan-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--gan-steps", type=int, default=1000)
    p.add_argument("--synthetic", type=int, default=64, help="GAN samples per class")
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--skip-gan", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine extra threads mostly spin-wait)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_size, args.seeds, args.max_steps, args.dev_limit = 64, [0], 2, 64
        args.gan_seeds, args.gan_steps = [0], 20
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results",
                                        "augment_effect_quick.json" if args.quick else "augment_effect.json")
    data_dir = os.path.normpath(args.data_dir)
    if not os.path.isfile(os.path.join(data_dir, "sst2", "train.tsv")):
        p.error(f"--data-dir: {data_dir} has no sst2/train.tsv")
    t0 = time.perf_counter()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "setup": {
            "data": "SST-2 (GLUE) train.tsv subsets; evaluation on dev.tsv"
                    + (f" (first {args.dev_limit})" if args.dev_limit else " (all 872)"),
            "lora": {"model": "bundled all-MiniLM-L6-v2", "adapter": "LoRA r=8 alpha=16 dropout=0.1 on query/value "
                     "+ classifier head", "train_size": args.train_size, "subset": "random, seed 1000+seed",
                     "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
                     "warmup_ratio": 0.1, "bucket_size": 4, "max_length": args.max_length, "seeds": args.seeds,
                     "selection": "none (accuracy after the last step)",
                     "methods": {m: METHODS[m] for m in args.methods}},
            "gan": {"features": "frozen MiniLM, mean-pooled last hidden state", "shots_per_class": args.shots,
                    "seeds": args.gan_seeds, "gan": f"FeatureGAN defaults (R1 penalty 1.0), {args.gan_steps} steps",
                    "synthetic_per_class": args.synthetic,
                    "head": "logistic regression (L-BFGS, l2 1e-2) on standardised features"},
        },
        "note": "wall times measured on a shared 2-core machine while other jobs ran: indicative only",
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if not args.skip_lora:
        result["lora"] = run_lora(args, data_dir)
    if not args.skip_gan:
        result["gan"] = run_gan(args, data_dir)
    result["total_wall_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
