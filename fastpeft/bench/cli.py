"""Benchmark fastpeft's fused ops, LoRA training steps and mixed-adapter serving forwards against PyTorch,
HF PEFT and the floor.

With no arguments: the quick suite (< 3 min on a 2-core CPU, < 2 min on a GPU) on the
best available device, bundled defaults only (random-init model configs, the packaged
MiniLM; nothing is downloaded).  Prints a table (progress bar while running) and
writes OUT/bench-<device>-<suite>-<date>.json with every figure (plus device,
versions, git commit) and a PNG chart of the time ratios next to it.

Method: warm-up, then interleaved (round-robin) repeats of all variants of a case,
median and IQR per call; CUDA events on GPU; peak memory per variant; ratios to the
floor (frozen base layer / memory copy of the same bytes / frozen model) and to the
baseline (HF PEFT, unfused module, eager reference); on GPU, TFLOP/s and GB/s against
a matmul and a copy ceiling measured in the same run.  See fastpeft/bench/timing.py.

A case that cannot run (no such device, op or backend missing, peft not installed)
is reported as skipped with the reason, a case that raises as failed; the rest runs.
Targets from the issues are reported as PASS/FAIL, never asserted.

Exit status: 0; 1 when --fail-if-slower trips; 2 on bad arguments; 3 with --strict
when a case failed.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

DEFAULT_OUT = "bench-results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=["quick", "full", "smoke"], default="quick",
                   help="quick (default): the headline cases; full: every shape of the issues; "
                        "smoke: tiny shapes, only checks that every case runs (timings meaningless)")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--only", metavar="PATTERN",
                   help="run only cases whose name contains PATTERN (or matches it as a glob with * ?); "
                        "comma-separated alternatives; the device ceilings always run")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case against an earlier run")
    p.add_argument("--fail-if-slower", metavar="FACTOR", type=float,
                   help="with --compare: exit 1 if a fastpeft variant's median grew by more than FACTOR (e.g. 1.1)")
    p.add_argument("--repeats", type=int, help="timed rounds per case (default depends on the suite)")
    p.add_argument("--max-minutes", type=float, help="skip the remaining cases once the run took this long")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--strict", action="store_true", help="exit 3 if any case failed")
    p.add_argument("--list", action="store_true", help="list the cases of the suite and exit")


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {spec!r} ({e})") from None


def _err(msg: str) -> int:
    print(f"fastpeft bench: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    from . import report
    from .cases import all_cases

    if args.fail_if_slower is not None and not args.compare:
        return _err("--fail-if-slower needs --compare OLD.json (the run to compare against)")
    if args.fail_if_slower is not None and args.fail_if_slower <= 0:
        return _err(f"--fail-if-slower: expected a factor > 0, got {args.fail_if_slower}")
    if args.repeats is not None and args.repeats < 1:
        return _err(f"--repeats: expected >= 1, got {args.repeats}")
    old = None
    if args.compare:
        try:
            old = report.load_json(args.compare)
        except (OSError, ValueError) as e:
            return _err(f"--compare: {e}")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        return _err(str(e))
    import warnings

    # deprecation chatter from transformers/peft internals would break up the table
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    cases = all_cases(args.suite, device)
    selected = [c for c in cases if c.group == "ceiling" or c.matches(args.only)]
    if args.only and all(c.group == "ceiling" for c in selected):
        names = "\n  ".join(c.name for c in cases)
        return _err(f"--only {args.only!r} matches no case of the {args.suite} suite on {device.type}; cases:\n  {names}")
    if args.list:
        for c in selected:
            print(c.name)
        return 0
    return execute(selected, device, args, old)


def execute(cases, device, args, old=None) -> int:
    """Run ``cases`` and write the outputs as ``args`` says (split out so tests can
    pass their own cases)."""
    from . import report, runner

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with fastpeft[train]; a bar is not worth failing for
        tqdm = None

    settings = runner.Settings.for_suite(args.suite, device, args.repeats, args.max_minutes)
    settings.memory = not getattr(args, "no_memory", False)

    def progress(items):
        return tqdm(items, unit="case", file=sys.stderr, dynamic_ncols=True, disable=None) if tqdm else items

    def on_case(res):
        line = f"{res['status']:>7}  {res['name']}" + (f"  ({res['reason']})" if res.get("reason") else "")
        (tqdm.write if tqdm else print)(line, file=sys.stderr)

    result = runner.run(cases, device, settings, args.suite, on_case=on_case, progress=progress)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(args.out, f"bench-{device.type}-{args.suite}-{stamp}")
    rows = report.compare(result, old) if old is not None else None
    if rows is not None:
        result["compare"] = {"against": os.path.abspath(args.compare), "against_date": old.get("date"), "rows": rows}
    report.write_json(result, base + ".json")
    print(report.format_table(result))
    print(f"\nwrote {base}.json")
    if not args.no_plot:
        try:
            if report.write_chart(result, base + ".png"):
                print(f"wrote {base}.png")
        except Exception as e:  # noqa: BLE001 - a chart problem must not lose the run
            print(f"chart not written: {type(e).__name__}: {e}", file=sys.stderr)
    code = 0
    if rows is not None:
        print()
        print(report.format_compare(rows, args.compare))
        if args.fail_if_slower is not None:
            bad = report.slower_than(rows, args.fail_if_slower)
            if bad:
                print(f"\nFAIL: {len(bad)} fastpeft variant(s) slower than {args.fail_if_slower:g}× the old run: "
                      + ", ".join(f"{r['case']} [{r['variant']}] {r['change']:.2f}×" for r in bad), file=sys.stderr)
                code = 1
    if args.strict and any(c["status"] == "failed" for c in result["cases"]):
        print("\nFAIL (--strict): some cases failed: " + ", ".join(
            c["name"] for c in result["cases"] if c["status"] == "failed"), file=sys.stderr)
        code = code or 3
    return code
