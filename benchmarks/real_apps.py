"""Real applications: SST-2 sentiment and CoNLL-2003 NER on the bundled MiniLM, fastpeft vs HF PEFT.

For each application this trains
  * fastpeft: ``fastpeft.workflow.finetune`` from ``examples/<app>.yaml`` (fastpeft's LoRA patching, its
    trainer: validation every N steps, early stopping, best adapter restored), and
  * HF PEFT: ``peft.get_peft_model`` with its own plain PyTorch loop and the same settings (same data
    encoding and batch order, AdamW, linear warm-up/decay, clipping, validation at the same steps,
    best-so-far kept),
and prints / writes (``benchmarks/results/real_apps.json``) the validation metric and wall time of each.

    python benchmarks/real_apps.py                       # both apps, full settings (~10+ min each per library on 2 cores)
    python benchmarks/real_apps.py --app sst2 --skip-hf  # only fastpeft on SST-2
    python benchmarks/real_apps.py --train-limit 200 --max-steps 5 --validation-limit 100   # smoke run

Settings (the issue's): SST-2 -- LoRA r=8 (alpha 16) on query/value, dropout 0.1, classifier trained,
lr 1e-3, batch 32, max length 64, one epoch over a fixed 20,000-example subset of train.tsv (seed 0),
accuracy on dev.tsv (target >= 0.85). CoNLL-2003 -- LoRA r=8 on all linear layers + token-classification
head, one epoch over train.txt, entity micro-F1 on valid.txt (target >= 0.80).
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

APPS = {"sst2": "sst2_lora.yaml", "conll": "conll_ner_lora.yaml"}
TARGET = {"sst2": ("accuracy", 0.85), "conll": ("f1", 0.80)}


def app_config(app: str, data_dir: str, out_dir: str, *, train_limit=None, validation_limit=None, max_steps=None,
               eval_every=None, progress=True) -> dict:
    from fastpeft.workflow.config import build_config
    with open(os.path.join(ROOT, "examples", APPS[app])) as f:
        y = yaml.safe_load(f)
    d = y["data"]
    sub = "sst2" if app == "sst2" else "conll2003"
    for split in ("train", "validation"):
        v = d[split]
        name = os.path.basename(v["path"] if isinstance(v, dict) else v)
        path = os.path.join(data_dir, sub, name)
        d[split] = dict(v, path=path) if isinstance(v, dict) else path
    if train_limit:
        d["train_limit"] = train_limit
    if validation_limit:
        d["validation_limit"] = validation_limit
    y["output_dir"] = out_dir
    tr = y.setdefault("trainer", {})
    tr["progress"] = progress
    if max_steps:
        tr["max_steps"] = max_steps
    if eval_every:
        tr["eval_every"] = tr["save_every"] = eval_every
    return build_config(y)


def run_fastpeft(cfg: dict) -> dict:
    from fastpeft.workflow import finetune
    t0 = time.perf_counter()
    r = finetune(cfg)
    wall = time.perf_counter() - t0
    metric = r["metric"]
    return {"library": "fastpeft", "backend": r.get("backend"), "metric": metric,
            "value": r["final_metrics"][metric], "final_metrics": r["final_metrics"], "steps": r["steps"],
            "best_step": r["best_step"], "early_stopped": r["early_stopped"], "train_seconds": r["train_seconds"],
            "wall_seconds": wall}


def run_hf_peft(cfg: dict) -> dict:
    """HF PEFT with a plain loop, same data / batches / schedule / evaluation points."""
    from peft import LoraConfig, TaskType, get_peft_model

    from fastpeft.workflow import get_task, load_tokenizer, resolve_model_path
    from fastpeft.workflow.data import PaddingCollator, make_loader
    from fastpeft.workflow.pipeline import load_split
    from fastpeft.workflow.trainer import Schedule

    t0 = time.perf_counter()
    tc, data, method = cfg["trainer"], cfg["data"], dict(cfg["method"])
    task = get_task(cfg["task"])
    path = resolve_model_path(cfg["model"])
    tok = load_tokenizer(path)
    tr_recs = load_split(task, data, "train", data.get("train_limit"), data.get("train_subset_seed"))
    task.fit_labels(tr_recs)
    va_recs = load_split(task, data, "validation", data.get("validation_limit"))
    tr_ds = task.encode(tr_recs, tok, data["max_length"])
    va_ds = task.encode(va_recs, tok, data["max_length"])
    torch.manual_seed(tc.seed)
    model = get_peft_model(task.build_model(path), LoraConfig(
        task_type=TaskType.SEQ_CLS if task.name == "sequence_classification" else TaskType.TOKEN_CLS,
        r=method["r"], lora_alpha=method["lora_alpha"], lora_dropout=method["lora_dropout"],
        target_modules=method["target_modules"], modules_to_save=method.get("modules_to_save")))
    collate = PaddingCollator(tok.pad_token_id)
    loader = make_loader(tr_ds, collate, tc.batch_size, shuffle=True, seed=tc.seed, bucket_size=tc.bucket_size)
    eval_loader = make_loader(va_ds, collate, tc.eval_batch_size, shuffle=False)
    n_batches = len(loader)
    total = tc.max_steps or tc.epochs * n_batches
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(tc.scheduler, warmup, total))
    metric = tc.metric or task.default_metric
    best, best_state, step, evals = None, None, 0, []
    t_train = time.perf_counter()
    done = False
    for epoch in range(tc.epochs if not tc.max_steps else 10 ** 6):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            model.train()
            out = model(**{k: v for k, v in batch.items() if not k.startswith("_")})
            out.loss.backward()
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


def run_resume_check(app: str, data_dir: str, out_dir: str, *, train_limit: int = 640, steps: int = 12,
                     kill_at: int = 5) -> dict:
    """Uninterrupted run vs (killed at ``kill_at`` + resumed) on a real model: same losses and metric."""
    import shutil

    from fastpeft.workflow import finetune

    class Kill(Exception):
        pass

    class KillAt:
        def on_step_end(self, trainer, step, loss):
            if step == kill_at:
                raise Kill()

    def cfg(sub, **tr):
        c = app_config(app, data_dir, os.path.join(out_dir, sub), train_limit=train_limit, validation_limit=200,
                       max_steps=steps, eval_every=kill_at, progress=False)
        for k, v in tr.items():
            setattr(c["trainer"], k, v)
        return c

    shutil.rmtree(out_dir, ignore_errors=True)
    ref = finetune(cfg("ref"))
    try:
        finetune(cfg("resumed"), callbacks=[KillAt()])
    except Kill:
        pass
    res = finetune(cfg("resumed", resume_from="latest"))
    diff = max(abs(a - b) for a, b in zip(ref["losses"], res["losses"]))
    return {"app": app, "steps": steps, "killed_at": kill_at, "max_loss_diff": diff,
            "n_losses": (len(ref["losses"]), len(res["losses"])), "resumed_from": res["resumed_from"],
            "metric_ref": ref["final_metrics"], "metric_resumed": res["final_metrics"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", choices=["sst2", "conll", "all"], default="all")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "real_apps.json"))
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "benchmarks", "results", "runs"))
    ap.add_argument("--train-limit", type=int, help="smoke runs: fewer training examples")
    ap.add_argument("--validation-limit", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-fastpeft", action="store_true")
    ap.add_argument("--resume-check", action="store_true", help="also run the kill/resume check (small subset)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    apps = ["sst2", "conll"] if args.app == "all" else [args.app]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "smoke": bool(args.train_limit or args.max_steps), "apps": {}}
    for app in apps:
        kw = dict(train_limit=args.train_limit, validation_limit=args.validation_limit, max_steps=args.max_steps,
                  eval_every=args.eval_every, progress=not args.no_progress)
        entry = {"target": {"metric": TARGET[app][0], "min": TARGET[app][1]}}
        if not args.skip_fastpeft:
            entry["fastpeft"] = run_fastpeft(app_config(app, args.data_dir, os.path.join(args.runs_dir, app), **kw))
        if not args.skip_hf:
            entry["hf_peft"] = run_hf_peft(app_config(app, args.data_dir, os.path.join(args.runs_dir, app + "_hf"), **kw))
        if args.resume_check:
            entry["resume_check"] = run_resume_check(app, args.data_dir, os.path.join(args.runs_dir, app + "_resume"))
        report["apps"][app] = entry
        for lib in ("fastpeft", "hf_peft"):
            if lib in entry:
                e = entry[lib]
                print(f"{app:6s} {lib:9s} {e['metric']}={e['value']:.4f}  train {e['train_seconds']:.1f}s  "
                      f"wall {e['wall_seconds']:.1f}s  steps {e['steps']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
