"""The ``fastpeft`` command line.

Each subcommand lives in its own module that provides ``add_arguments(parser)``
and ``run(args) -> int``; the module is imported only when its subcommand runs,
so ``fastpeft --help`` stays fast and a broken optional part cannot break the rest.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ._optional import MissingExtra

# name -> (module, one-line help)
SUBCOMMANDS = {
    "info": ("fastpeft.info", "versions, devices, and which backend each op uses (and why)"),
    "bench": ("fastpeft.bench.cli", "benchmark fused ops and training steps vs PyTorch and HF PEFT"),
    "finetune": ("fastpeft.workflow.cli_finetune", "fine-tune a base model with a PEFT method"),
    "evaluate": ("fastpeft.workflow.cli_evaluate", "evaluate base model + adapter on a data file"),
    "predict": ("fastpeft.workflow.cli_predict", "run base model + adapter on a data file"),
    "serve": ("fastpeft.serve.cli", "serve a base model and its adapters over HTTP (batched, mixed adapters)"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastpeft", description=(
        "fastpeft: kernel-backed parameter-efficient fine-tuning for PyTorch."))
    parser.add_argument("--version", action="version", version=f"fastpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _stdout_closed() -> int:
    """The reader of stdout went away (``fastpeft predict ... | head``): stop quietly. Python would print a
    traceback when it flushes stdout at exit, so stdout is pointed at /dev/null first."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return 0


def main(argv=None) -> int:
    """Run one subcommand; returns its exit status: 0 success, 2 bad input (config, data, files: one line on
    stderr naming the key or file and line, no traceback; ``FASTPEFT_TRACEBACK=1`` shows it), 3 a training
    run whose loss became non-finite (``fastpeft finetune``), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MissingExtra as e:  # an optional package the command needs: one line naming the extra
        print(f"fastpeft {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print(f"fastpeft {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # bad input the command did not name itself
        if os.environ.get("FASTPEFT_TRACEBACK"):
            raise
        print(f"fastpeft {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
