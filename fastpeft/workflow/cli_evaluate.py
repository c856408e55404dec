"""Evaluate base model + adapter (from ``fastpeft finetune`` or the Python ``Trainer``) on a labelled file;
prints metrics as JSON. Columns default to the ones the adapter was trained with.

examples:
  fastpeft evaluate --adapter runs/sst2/adapter --data dev.tsv --text-column content
  fastpeft evaluate --adapter runs/conll/adapter --data valid.txt --output metrics.json
"""
from __future__ import annotations

import argparse
import json
import sys


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter directory written by fastpeft finetune")
    p.add_argument("--data", required=True, help="data file (same format as training unless --format)")
    p.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    p.add_argument("--format", help="tsv | csv | jsonl | conll | semeval (SQuAD JSON for question_answering)")
    p.add_argument("--text-column", help="text column (default: as in training, then as in validation)")
    p.add_argument("--label-column", help="label column (default: as in training, then as in validation)")
    p.add_argument("--max-length", type=int, help="default: as in training")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--limit", type=int, help="only the first N examples (N >= 1)")
    p.add_argument("--output", help="also write the result to this file (JSON / JSONL)")


def _epilog(p) -> None:
    p.epilog = __doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    _epilog(p)
    add_common(p)


def columns(args) -> dict:
    return {"format": args.format, "text_column": args.text_column, "label_column": args.label_column}


def run(args) -> int:
    from .data import DataError
    from .pipeline import run_on_file
    try:
        metrics = run_on_file(args.adapter, args.data, mode="evaluate", model=args.model,
                              batch_size=args.batch_size, columns=columns(args), limit=args.limit,
                              max_length=args.max_length)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"fastpeft evaluate: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.output:
        from .checkpointing import atomic_write
        with atomic_write(args.output) as f:
            f.write(text + "\n")
    return 0
