"""Run base model + adapter (from ``fastpeft finetune``) on a file; writes one JSON line per example.

Labels in the file are not needed. Sequence classification: {"text", "prediction"} (with --scores also
{"scores": {label: probability}}); token classification: {"tokens", "tags"}; causal LM: {"text",
"continuation"}; dialogue: {"line", "user", "reply"} (the reply generated after the last non-assistant
message); image classification: {"image", "prediction", "probability"}; seq2seq (translation,
summarisation): {"source", "generated"}, by beam search (data.num_beams of training, default 4); relation
extraction: {"id", "text", "e1", "e2", "relation", "reading"} (the relation with the entity texts); question
answering: {"id", "question", "answer", "start", "end", "no_answer", ...} (the answer's characters in the
context). Columns
default to those the adapter was trained with (the training file's, then the validation file's when the
file lacks them). Piping into `head` is fine: the output stops quietly.

examples:
  fastpeft predict --adapter runs/sst2/adapter --data dev.tsv --text-column content --output preds.jsonl
  fastpeft predict --adapter runs/conll/adapter --data valid.txt --limit 5
  fastpeft predict --adapter runs/sst2/adapter --data dev.tsv --scores | head -3
  fastpeft predict --adapter runs/multi30k_en_de_lora/adapter --data test.en   # one sentence a line
"""
from __future__ import annotations

import json
import sys

from .cli_evaluate import add_common, columns


def _epilog(p) -> None:
    p.epilog = __doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None


def add_arguments(p) -> None:
    _epilog(p)
    add_common(p)
    p.add_argument("--scores", action="store_true",
                   help="also write each label's probability (sequence classification: \"scores\": {label: p})")


def run(args) -> int:
    from .data import DataError
    from .pipeline import run_on_file
    try:
        preds = run_on_file(args.adapter, args.data, mode="predict", model=args.model,
                            batch_size=args.batch_size, columns=columns(args), limit=args.limit,
                            max_length=args.max_length, scores=args.scores)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"fastpeft predict: error: {e}", file=sys.stderr)
        return 2
    lines = [json.dumps(p) for p in preds]
    if args.output:
        from .checkpointing import atomic_write
        with atomic_write(args.output) as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} predictions to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0
