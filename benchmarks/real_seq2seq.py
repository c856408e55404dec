"""Real-data seq2seq transfer on Multi30k (CPU): pretrain a small T5 from scratch on English->French, adapt
it to English->German with LoRA (fastpeft, and HF PEFT with the same recipe), with full fine-tuning and
with training from scratch (references), at the same number of steps; BLEU / chrF (sacrebleu) on ``val``.

    python benchmarks/real_seq2seq.py                      # ~45 min on 2 shared CPU cores (18 min pretraining, 4 min per adaptation)
    python benchmarks/real_seq2seq.py --pretrain-seconds 20 --adapt-steps 5 --val-limit 20   # smoke run

Writes ``benchmarks/results/seq2seq_multi30k.json`` (after every phase, so a killed run keeps what it
measured). No pretrained model is used: the tokenizer (BPE, 4000 pieces) is trained on the en/fr/de
training text, which includes the German side of the adaptation data (the tokenizer sees German text
before the model does; the val files are never seen).  The data path is
``$FASTPEFT_DATA/multi30k`` (default ``/work/shared/data/multi30k``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastpeft.workflow import Trainer, TrainerConfig, get_task, load_tokenizer  # noqa: E402
from fastpeft.workflow.pipeline import apply_method  # noqa: E402
from fastpeft.workflow.tasks.seq2seq_base import make_seq2seq_base, train_tokenizer  # noqa: E402

DATA = os.path.join(os.environ.get("FASTPEFT_DATA", "/work/shared/data"), "multi30k")


def lines(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return f.read().splitlines()


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TimeUp(Exception):
    pass


class StopAfter:
    """Trainer callback: raises :class:`TimeUp` once ``seconds`` of training have passed; keeps the loss."""

    def __init__(self, seconds):
        self.seconds, self.t0, self.step, self.loss = seconds, time.time(), 0, None

    def on_step_end(self, trainer, step, loss):
        self.step, self.loss = step, float(loss)
        if step % 20 == 0:
            print(f"  step {step} loss {self.loss:.3f} ({time.time() - self.t0:.0f} s)", flush=True)
        if self.seconds is not None and time.time() - self.t0 > self.seconds:
            raise TimeUp()


class Runner:
    def __init__(self, args):
        self.args = args
        self.task = get_task("seq2seq")
        self.results = {"conditions": {}, "runs": {}}

    def save(self):
        os.makedirs(os.path.dirname(self.args.out), exist_ok=True)
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.args.out)

    def data(self, tgt, tok):
        cfg = {"source_lang": "en", "target_lang": tgt, "num_beams": self.args.num_beams,
               "max_target_length": 48}
        tr = self.task.read(os.path.join(DATA, "train"), cfg, limit=self.args.train_limit)
        va = self.task.read(os.path.join(DATA, "val"), cfg, limit=self.args.val_limit)
        return self.task.encode(tr, tok, 64), self.task.encode(va, tok, 64)

    def train(self, name, model, tok, train_ds, val_ds, steps, lr, extra=None, seconds=None):
        """Train ``steps`` steps (linear decay), or, with ``seconds``, until that wall time has passed
        (constant rate after warm-up; ``steps`` is then the most it may take)."""
        a = self.args
        cfg = TrainerConfig(lr=lr, max_steps=steps, batch_size=a.batch_size, eval_batch_size=128,
                            warmup_steps=max(1, steps // 20) if seconds is None else 30,
                            scheduler="linear" if seconds is None else "constant", weight_decay=0.0,
                            bucket_size=8, eval_every=10 ** 9, progress=False, plot=False, seed=0,
                            restore_best=False)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {steps} steps, lr {lr}, "
              f"{trainable(model):,} trainable", flush=True)
        timer = StopAfter(seconds)
        t = Trainer(model, self.task, train_ds, val_ds, cfg, tokenizer=tok, callbacks=[timer])
        t0 = time.time()
        try:
            r = t.train()
        except TimeUp:
            r = {"steps": timer.step}
        steps = r.get("steps", steps)
        train_s = time.time() - t0
        t0 = time.time()
        m = t.evaluate()
        eval_s = time.time() - t0
        rec = {"steps": steps, "lr": lr, "trainable_params": trainable(model),
               "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
               "last_train_loss": timer.loss, **{k: m[k] for k in ("bleu", "chrf", "loss")},
               **(extra or {})}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(rec)}", flush=True)
        self.results["runs"][name] = rec
        self.save()
        return t, steps, train_s

    def run(self):
        a = self.args
        torch.set_num_threads(a.threads)
        work = a.workdir
        os.makedirs(work, exist_ok=True)
        cond = self.results["conditions"]
        cond.update(device="cpu", threads=a.threads, cpu=platform.processor() or platform.machine(),
                    torch=torch.__version__, load_avg_at_start=os.getloadavg(),
                    note="2 CPU cores shared with ~8 other sessions: seconds are not benchmarks",
                    base="T5 (random init): d_model %d, %d+%d layers, %d heads, d_ff %d, dropout 0.1"
                         % (a.d_model, a.layers, a.layers, a.heads, 4 * a.d_model),
                    tokenizer="BPE %d pieces trained on train.en+train.fr+train.de" % a.vocab,
                    batch_size=a.batch_size, max_length=64, num_beams=a.num_beams,
                    pretrain_seconds=a.pretrain_seconds, adapt_seconds=a.adapt_seconds,
                    train_limit=a.train_limit, val_examples=a.val_limit or 1014,
                    optimizer="AdamW, linear decay, 5% warm-up, grad-norm clip 1.0",
                    lora="r %d, alpha %d, dropout 0, all-linear (q,k,v,o,wi,wo of encoder and decoder, "
                         "self- and cross-attention), lm_head/embeddings frozen" % (a.r, 2 * a.r))
        t0 = time.time()
        tok = train_tokenizer(lines("train.en") + lines("train.fr") + lines("train.de"), a.vocab)
        cond["tokenizer_seconds"] = round(time.time() - t0, 1)
        size = dict(d_model=a.d_model, layers=a.layers, heads=a.heads, ffn=4 * a.d_model, dropout=0.1)
        init_dir = make_seq2seq_base(os.path.join(work, "init"), tokenizer=tok, arch="t5", seed=0, **size)
        tok = load_tokenizer(init_dir)
        self.save()

        # 1. pretrain en->fr from scratch
        fr_train, fr_val = self.data("fr", tok)
        base = self.task.build_model(init_dir)
        t, done, secs = self.train("pretrain_en_fr", base, tok, fr_train, fr_val, 10 ** 6, a.pretrain_lr,
                                   extra={"note": "BLEU/chrF on val.fr (en->fr); wall-time budget "
                                                  f"{a.pretrain_seconds} s, constant lr after 30 warm-up steps"},
                                   seconds=a.pretrain_seconds)
        # every adaptation gets the same number of steps: what ~adapt_seconds bought in pretraining
        steps = a.adapt_steps or max(10, int(done * a.adapt_seconds / max(secs, 1)))
        cond["adapt_steps"] = steps
        base_dir = os.path.join(work, "base_en_fr")
        t.module.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        del t, base

        # 2. adapt to en->de
        de_train, de_val = self.data("de", tok)
        zero = self.task.build_model(base_dir).eval()
        t0 = time.time()
        from fastpeft.workflow.data import make_loader
        m = self.task.evaluate(zero, make_loader(de_val, self.task.collator(tok), 128, shuffle=False), de_val)
        self.results["runs"]["en_fr_base_on_en_de_no_training"] = {
            "bleu": m["bleu"], "chrf": m["chrf"], "loss": m["loss"], "eval_seconds": round(time.time() - t0, 1)}
        self.save()
        del zero
        lora = {"name": "lora", "r": a.r, "lora_alpha": 2 * a.r, "lora_dropout": 0.0,
                                      "target_modules": "all-linear"}
        for name in a.runs:
            torch.manual_seed(0)
            if name == "lora_fastpeft":
                model = apply_method(self.task.build_model(base_dir), dict(lora, backend="fastpeft"), self.task)
                self.train(name, model, tok, de_train, de_val, steps, a.lora_lr, {"from": "en->fr base"})
            elif name == "lora_hf_peft":
                model = apply_method(self.task.build_model(base_dir), dict(lora, backend="peft"), self.task)
                self.train(name, model, tok, de_train, de_val, steps, a.lora_lr,
                           {"from": "en->fr base", "peft": __import__("peft").__version__})
            elif name == "full_finetune":
                self.train(name, self.task.build_model(base_dir), tok, de_train, de_val, steps, a.full_lr,
                           {"from": "en->fr base"})
            elif name == "scratch":
                self.train(name, self.task.build_model(init_dir), tok, de_train, de_val, steps, a.pretrain_lr,
                           {"from": "random init (same init as the en->fr base)"})
            else:
                raise SystemExit(f"--runs: unknown run {name!r}")
        self.results["conditions"]["total_seconds"] = round(time.time() - self.t_start, 1)
        self.results["conditions"]["load_avg_at_end"] = os.getloadavg()
        self.save()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "seq2seq_multi30k.json"))
    p.add_argument("--workdir", default="/tmp/fastpeft_seq2seq_multi30k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pretrain-seconds", type=float, default=900, help="wall-time budget of pretraining")
    p.add_argument("--adapt-seconds", type=float, default=200,
                   help="each adaptation gets the steps pretraining made in this time")
    p.add_argument("--adapt-steps", type=int, default=None, help="fixed adaptation steps instead")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy (CPU budget)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--runs", nargs="+", default=["lora_fastpeft", "lora_hf_peft", "full_finetune", "scratch"])
    args = p.parse_args(argv)
    r = Runner(args)
    r.t_start = time.time()
    r.run()


if __name__ == "__main__":
    main()
