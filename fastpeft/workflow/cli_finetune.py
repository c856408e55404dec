"""Fine-tune a base model with a PEFT method (LoRA) on a task, from a YAML config and/or flags.

Writes into the output directory: adapter/ (PEFT format, task head included via modules_to_save, plus
fastpeft_task.json), metrics.jsonl, curves.png, result.json, config.yaml, checkpoint-<step>/.

Precedence: built-in defaults < --config YAML < flags < --set KEY=VALUE. Data paths in a YAML file are
relative to that file; paths given as flags to the working directory.

Exit status: 0 done; 2 bad input (config, data, output directory, checkpoint: one line naming the key or
the file and line); 3 the loss or gradients became non-finite (the run stops, or with --on-nonfinite skip
goes on; the message counts the steps; the adapter is the best finite state evaluated before, or none).

examples:
  fastpeft finetune --config examples/sst2_lora.yaml
  fastpeft finetune --config examples/sst2_lora.yaml --lr 5e-4 --set trainer.patience=2
  fastpeft finetune --model minilm --task sequence_classification --train train.tsv \\
      --validation dev.tsv --output-dir runs/x --r 8 --target-modules query value --epochs 1
  fastpeft finetune --config examples/sst2_lora.yaml --resume-from latest   # continue a killed run
  fastpeft finetune --config examples/sst2_fewshot.yaml      # k-shot study over 5 seeds (fewshot: section)
  fastpeft finetune --config examples/continual_stream.yaml  # a stream of tasks (continual: section)

Augmentation (augment:), few-shot (fewshot:) and continual learning (continual:) are config sections:
see the README section "Beyond one task" and examples/.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

# flag dest -> dotted config key
FLAG_KEYS = {
    "model": "model", "task": "task", "output_dir": "output_dir", "train": "data.train",
    "validation": "data.validation", "format": "data.format", "text_column": "data.text_column",
    "label_column": "data.label_column", "max_length": "data.max_length", "train_limit": "data.train_limit",
    "validation_limit": "data.validation_limit", "method": "method.name", "backend": "method.backend",
    "r": "method.r", "lora_alpha": "method.lora_alpha", "lora_dropout": "method.lora_dropout",
    "target_modules": "method.target_modules", "lr": "trainer.lr", "epochs": "trainer.epochs",
    "max_steps": "trainer.max_steps", "batch_size": "trainer.batch_size", "grad_accum": "trainer.grad_accum",
    "optimizer": "trainer.optimizer", "scheduler": "trainer.scheduler", "warmup_ratio": "trainer.warmup_ratio",
    "weight_decay": "trainer.weight_decay", "precision": "trainer.precision", "eval_every": "trainer.eval_every",
    "metric": "trainer.metric", "patience": "trainer.patience", "seed": "trainer.seed",
    "resume_from": "trainer.resume_from", "save_every": "trainer.save_every", "device": "trainer.device",
    "distributed": "trainer.distributed", "overwrite": "trainer.overwrite", "on_nonfinite": "trainer.on_nonfinite",
    "validation_text_column": "data.validation.text_column",
    "validation_label_column": "data.validation.label_column",
    "load_in_4bit": "quantization.load_in_4bit",
    "load_in_8bit": "quantization.load_in_8bit",
}


def _epilog(p) -> None:
    p.epilog = __doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .tasks import task_names
    _epilog(p)
    p.add_argument("--config", help="YAML config file (see examples/ and the README section 'Using fastpeft')")
    g = p.add_argument_group("model and task")
    g.add_argument("--model", help="base model: a local transformers directory or the bundled name 'minilm'")
    g.add_argument("--task", help=" | ".join(task_names()))
    g.add_argument("--output-dir", help="where adapter, metrics, curves and checkpoints go")
    g = p.add_argument_group("data")
    g.add_argument("--train", help="training file (TSV/CSV/JSONL with a header; CoNLL for token classification; "
                   "chat JSONL for dialogue; .npz or a folder of class folders for image_classification; "
                   "for seq2seq also a prefix of two aligned files with --set data.source_lang=en "
                   "--set data.target_lang=de)")
    g.add_argument("--validation", help="validation file (early stopping, best adapter)")
    g.add_argument("--format", help="tsv | csv | jsonl | conll | semeval (default: from the extension / task; "
                   "SQuAD JSON for question_answering)")
    g.add_argument("--text-column", help="text column (default: sentence; text for causal_lm)")
    g.add_argument("--label-column", help="label column (default: label)")
    g.add_argument("--validation-text-column", help="text column of the validation file when it differs from "
                   "the training file's (= --set data.validation.text_column=NAME; any data key can be set per "
                   "split that way)")
    g.add_argument("--validation-label-column", help="label column of the validation file")
    g.add_argument("--max-length", type=int, help="truncate sequences to this many tokens (default 128)")
    g.add_argument("--train-limit", type=int, help="use only this many training examples")
    g.add_argument("--validation-limit", type=int, help="use only this many validation examples")
    g.add_argument("--load-in-4bit", action="store_true", default=None,
                   help="load the base model in 4-bit (bitsandbytes nf4, double quant; QLoRA), the task head "
                        "unquantised; needs pip install 'fastpeft[bnb]'")
    g.add_argument("--load-in-8bit", action="store_true", default=None,
                   help="load the base model in 8-bit (bitsandbytes LLM.int8), the task head unquantised")
    g = p.add_argument_group("PEFT method")
    g.add_argument("--method", help="PEFT method: lora (default) | ia3 | adapter | bitfit | prefix | prompt, or the "
                   "references full | linear_probe; options other than LoRA's through --set method.KEY=VALUE")
    g.add_argument("--backend", choices=["auto", "fastpeft", "peft"],
                   help="auto: fastpeft's patching when available, else HF peft")
    g.add_argument("--r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0)")
    g.add_argument("--target-modules", nargs="+",
                   help="module names to adapt, or all-linear (default: the task's choice)")
    g = p.add_argument_group("trainer")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--epochs", type=int, help="epochs (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="per-process micro-batch size (default 32)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    g.add_argument("--scheduler", choices=["linear", "cosine", "constant"], help="default linear")
    g.add_argument("--warmup-ratio", type=float, help="fraction of steps for linear warm-up")
    g.add_argument("--weight-decay", type=float, help="on weight matrices only (default 0)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    g.add_argument("--eval-every", type=int, help="validate every N steps (default: each epoch)")
    g.add_argument("--metric", help="metric for early stopping / best adapter (default: the task's)")
    g.add_argument("--patience", type=int, help="stop after N evaluations without improvement")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (also at each evaluation)")
    g.add_argument("--resume-from", help="checkpoint directory, or 'latest' in the output dir (falls back to the "
                   "previous checkpoint when the newest is unreadable); the checkpoint must come from the same "
                   "model, method, data size and batch size")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="start even when the output dir holds another run, deleting that run (without it, "
                   "such a directory is refused)")
    g.add_argument("--on-nonfinite", choices=["stop", "skip"],
                   help="a non-finite loss or gradient: stop the run (default) or skip the step and go on; "
                   "either way the command exits with status 3")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--distributed", choices=["auto", "none", "ddp", "fsdp"],
                   help="under torchrun: auto = DDP (default)")
    g.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    g.add_argument("--no-fuse-base", action="store_true",
                   help="causal_lm: keep the model's own RMSNorm / rope / MLP / loss forwards (default: "
                        "fastpeft.patch_model fuses them; YAML trainer.fuse_base)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set trainer.min_delta=0.001 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")


def overrides_from_args(args) -> dict:
    from .config import parse_override
    over = {}
    for dest, key in FLAG_KEYS.items():
        v = getattr(args, dest, None)
        if v is not None:
            if dest == "target_modules" and v == ["all-linear"]:
                v = "all-linear"
            over[key] = v
    if getattr(args, "no_progress", False):
        over["trainer.progress"] = False
    if getattr(args, "no_fuse_base", False):
        over["trainer.fuse_base"] = False
    for s in args.set:
        k, v = parse_override(s)
        over[k] = v
    return over


def run(args) -> int:
    from .config import ConfigError, build_config, load_yaml, to_yaml
    from .data import DataError
    try:
        cfg = build_config(load_yaml(args.config) if args.config else {}, overrides_from_args(args))
    except ConfigError as e:
        print(f"fastpeft finetune: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    from .pipeline import finetune
    from .trainer import EXIT_DIVERGED
    try:
        with warnings.catch_warnings():  # the divergence is reported below, once
            warnings.filterwarnings("ignore", message="training diverged", category=RuntimeWarning)
            result = finetune(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"fastpeft finetune: error: {e}", file=sys.stderr)
        return 2
    trainer = result.pop("trainer", None)
    if trainer is None:  # a fewshot: / continual: run (single process)
        print(json.dumps(study_summary(cfg, result), indent=1))
        return 0
    if trainer.info.is_main:
        summary = {k: result[k] for k in ("steps", "best_metric", "best_step", "early_stopped", "train_seconds",
                                          "backend", "skipped_steps", "nonfinite_steps", "diverged", "adapter")
                   if k in result}
        if "final_metrics" in result:
            summary["final_metrics"] = result["final_metrics"]
        summary["output_dir"] = cfg["trainer"].output_dir
        print(json.dumps(summary, indent=1))
    if result.get("diverged"):
        print(f"fastpeft finetune: {result['diverged']} Adapter: {result.get('adapter')}.", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def study_summary(cfg: dict, result: dict) -> dict:
    """The printed summary of a few-shot study or a continual stream (the full result is in result.json)."""
    if cfg.get("fewshot") is not None:
        keys = ("method", "k", "metric", "mean", "std")
        out = {k: result[k] for k in keys if k in result}
        out["per_seed"] = [s[result["metric"]] for s in result["per_seed"]]
        out["baselines"] = {n: {k: b[k] for k in ("mean", "std") if k in b}
                            for n, b in (result.get("baselines") or {}).items()}
    else:
        keys = ("strategy", "tasks", "avg_accuracy", "forgetting", "bwt", "matrix")
        out = {k: result[k] for k in keys if k in result}
    out["output_dir"] = cfg.get("output_dir") or cfg["trainer"].output_dir
    return out
