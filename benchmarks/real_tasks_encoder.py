"""Real runs of the encoder tasks: relation extraction (SemEval-2010 Task 8) and extractive QA (SQuAD 2.0
sample), on the bundled MiniLM.

* ``--task re``: a fixed split of ``semeval2010_task8/train.txt`` (seed 0: ``--train-n`` training and
  ``--val-n`` validation sentences, disjoint), then fastpeft (``fastpeft.workflow.finetune`` from
  ``examples/semeval_re_lora.yaml``) and HF PEFT (``peft.get_peft_model`` on the same
  ``EntityStartClassifier``, its own plain loop, same data, batch order, schedule and evaluation points);
  the official macro-F1 (9 types, directed, without Other) on the validation split.
* ``--task qa``: the five articles of ``squad_sample/squad_v2_sample.json`` split by article (the first
  four train, the last is held out), fastpeft from ``examples/squad_qa_lora.yaml``; the held-out article's
  EM / F1 (HasAns and NoAns apart) before training (same seed, untrained LoRA + head) and after. This is a
  smoke run that shows the pipeline learns, not a benchmark (about 1,100 training questions).

    python benchmarks/real_tasks_encoder.py --task re           # ~15 min per library on 1 busy core
    python benchmarks/real_tasks_encoder.py --task re --only hf_peft   # one library (run two in parallel)
    python benchmarks/real_tasks_encoder.py --task qa
    python benchmarks/real_tasks_encoder.py --task re --train-n 200 --val-n 100 --max-steps 5   # smoke

Writes ``benchmarks/results/real_tasks_encoder_<task>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

DATA = os.path.join(ROOT, "..", "shared", "data")


def split_semeval(src: str, out_dir: str, train_n: int, val_n: int, seed: int = 0) -> tuple[str, str]:
    """Write disjoint train / validation files (SemEval format) drawn from ``src`` with a fixed seed."""
    blocks = [b for b in open(src, encoding="utf-8").read().split("\n\n") if b.strip()]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g).tolist()
    if train_n + val_n > len(blocks):
        raise SystemExit(f"--train-n + --val-n = {train_n + val_n} > {len(blocks)} sentences")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, idx in (("train.txt", order[:train_n]), ("val.txt", order[train_n:train_n + val_n])):
        p = os.path.join(out_dir, name)
        with open(p, "w", encoding="utf-8") as f:
            f.write("\n\n".join(blocks[i].strip("\n") for i in sorted(idx)) + "\n\n")
        paths.append(p)
    return paths[0], paths[1]


def split_squad(src: str, out_dir: str, held_out: int = 1) -> tuple[str, str]:
    """The first articles for training, the last ``held_out`` for validation (official JSON layout)."""
    doc = json.load(open(src, encoding="utf-8"))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, arts in (("train.json", doc["data"][:-held_out]), ("val.json", doc["data"][-held_out:])):
        p = os.path.join(out_dir, name)
        with open(p, "w", encoding="utf-8") as f:
            json.dump({"version": doc.get("version", "v2.0"), "data": arts}, f)
        paths.append(p)
    return paths[0], paths[1]


def config(example: str, train: str, val: str, out_dir: str, *, max_steps=None, progress=True, **trainer) -> dict:
    from fastpeft.workflow.config import build_config
    with open(os.path.join(ROOT, "examples", example)) as f:
        y = yaml.safe_load(f)
    y["data"]["train"], y["data"]["validation"] = train, val
    y["output_dir"] = out_dir
    tr = y.setdefault("trainer", {})
    tr["progress"] = progress
    tr.update({k: v for k, v in trainer.items() if v is not None})
    if max_steps:
        tr["max_steps"] = max_steps
    return build_config(y)


def run_fastpeft(cfg: dict) -> dict:
    from fastpeft.workflow import finetune
    t0 = time.perf_counter()
    r = finetune(cfg)
    metric = r["metric"]
    return {"library": "fastpeft", "backend": r.get("backend"), "metric": metric,
            "value": r["final_metrics"][metric], "final_metrics": r["final_metrics"], "steps": r["steps"],
            "best_step": r["best_step"], "train_seconds": r["train_seconds"],
            "evals": [h for h in r.get("history", []) if "step" in h and metric in h],
            "wall_seconds": time.perf_counter() - t0}


def prepare(cfg: dict):
    """(task, tokenizer, model path, train dataset, validation dataset), as fastpeft's finetune prepares them."""
    from fastpeft.workflow import get_task, load_tokenizer, resolve_model_path
    from fastpeft.workflow.pipeline import load_split
    data = cfg["data"]
    task = get_task(cfg["task"])
    path = resolve_model_path(cfg["model"])
    tok = load_tokenizer(path)
    tr = load_split(task, data, "train", data.get("train_limit"), data.get("train_subset_seed"))
    task.fit_labels(tr)
    va = load_split(task, data, "validation", data.get("validation_limit"))
    return task, tok, path, task.encode(tr, tok, data["max_length"]), task.encode(va, tok, data["max_length"])


def untrained(cfg: dict) -> dict:
    """Validation metrics of the model before any step (same seed: the LoRA and head fine-tuning starts from)."""
    from fastpeft.workflow.data import make_loader
    from fastpeft.workflow.pipeline import apply_method
    task, tok, path, _, va = prepare(cfg)
    torch.manual_seed(cfg["trainer"].seed)
    model = apply_method(task.build_model(path), cfg["method"], task).eval()
    return task.evaluate(model, make_loader(va, task.collator(tok), 64, shuffle=False), va)


def run_hf_peft(cfg: dict) -> dict:
    """HF PEFT with a plain loop: same model class, data, batches, schedule and evaluation points."""
    import peft
    from fastpeft.workflow.data import make_loader
    from fastpeft.workflow.trainer import Schedule

    t0 = time.perf_counter()
    tc, method = cfg["trainer"], dict(cfg["method"])
    task, tok, path, tr_ds, va_ds = prepare(cfg)
    torch.manual_seed(tc.seed)
    kw = {}
    if task.peft_task_type:
        kw["task_type"] = task.peft_task_type
    model = peft.get_peft_model(task.build_model(path), peft.LoraConfig(
        r=method["r"], lora_alpha=method["lora_alpha"], lora_dropout=method["lora_dropout"],
        target_modules=method["target_modules"], modules_to_save=method.get("modules_to_save") or task.head_modules,
        **kw))
    collate = task.collator(tok)
    loader = make_loader(tr_ds, collate, tc.batch_size, shuffle=True, seed=tc.seed, bucket_size=tc.bucket_size)
    eval_loader = make_loader(va_ds, collate, tc.eval_batch_size, shuffle=False)
    total = tc.max_steps or tc.epochs * len(loader)
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(tc.scheduler, warmup, total))
    metric = tc.metric or task.default_metric
    best, best_state, step, evals, done = None, None, 0, [], False
    t_train = time.perf_counter()
    for epoch in range(tc.epochs if not tc.max_steps else 10 ** 6):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            model.train()
            loss, _ = task.forward(model, batch)
            loss.backward()
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if (tc.eval_every and step % tc.eval_every == 0) or step == total:
                model.eval()
                m = task.evaluate(model, eval_loader, va_ds)
                evals.append({"step": step, **m})
                if best is None or m[metric] > best:
                    best = m[metric]
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            if step >= total:
                done = True
                break
        if done:
            break
    train_seconds = time.perf_counter() - t_train
    with torch.no_grad():
        for n, p in model.named_parameters():
            if best_state and n in best_state:
                p.copy_(best_state[n])
    model.eval()
    final = task.evaluate(model, eval_loader, va_ds)
    return {"library": "hf_peft", "metric": metric, "value": final[metric], "final_metrics": final, "steps": step,
            "evals": evals, "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["re", "qa"], required=True)
    ap.add_argument("--data-dir", default=DATA)
    ap.add_argument("--out", help="default benchmarks/results/real_tasks_encoder_<task>.json")
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "results", "runs"))
    ap.add_argument("--train-n", type=int, default=3000, help="re: training sentences (default 3000)")
    ap.add_argument("--val-n", type=int, default=1000, help="re: validation sentences (default 1000)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (data.x=..)")
    ap.add_argument("--only", choices=["fastpeft", "hf_peft"], help="re: run one library (two processes in parallel)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "task": args.task, "smoke": bool(args.max_steps)}
    runs = args.runs_dir
    if args.task == "re":
        tr, va = split_semeval(os.path.join(args.data_dir, "semeval2010_task8", "train.txt"),
                               os.path.join(runs, "semeval_split"), args.train_n, args.val_n)
        example, report["split"] = "semeval_re_lora.yaml", {"train": args.train_n, "validation": args.val_n, "seed": 0}
    else:
        tr, va = split_squad(os.path.join(args.data_dir, "squad_sample", "squad_v2_sample.json"),
                             os.path.join(runs, "squad_split"))
        example, report["split"] = "squad_qa_lora.yaml", {"train": "articles 1-4", "validation": "article 5"}
    from fastpeft.workflow.config import parse_override, set_dotted

    def cfg(sub):
        c = config(example, tr, va, os.path.join(runs, sub), max_steps=args.max_steps, progress=not args.no_progress,
                   epochs=args.epochs, lr=args.lr)
        for s in args.set:
            k, v = parse_override(s)
            set_dotted(c, k, v)
        return c

    c = cfg(args.task)
    report["settings"] = {"method": c["method"], "data": {k: v for k, v in c["data"].items()
                                                          if k not in ("train", "validation")},
                          "trainer": {k: getattr(c["trainer"], k) for k in ("lr", "epochs", "max_steps", "batch_size",
                                                                           "warmup_ratio", "eval_every", "seed")}}
    if args.task == "qa":
        report["untrained"] = untrained(c)
        print("untrained:", json.dumps(report["untrained"]), flush=True)
    if args.only != "hf_peft":
        report["fastpeft"] = run_fastpeft(c)
        print("fastpeft:", json.dumps(report["fastpeft"]["final_metrics"]), flush=True)
    if args.task == "re" and args.only != "fastpeft":
        report["hf_peft"] = run_hf_peft(cfg(args.task + "_hf"))
        print("hf_peft:", json.dumps(report["hf_peft"]["final_metrics"]), flush=True)
    suffix = f"_{args.only}" if args.only else ""
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"real_tasks_encoder_{args.task}{suffix}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
