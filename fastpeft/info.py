"""Report versions, devices and, for every op, which backends are available and which would run."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform

import torch

from . import _ext, _triton, backends
from ._version import __version__


def _version(pkg: str):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(device: str | None = None) -> dict:
    """Everything ``fastpeft info`` prints, as a dict."""
    import fastpeft.ops  # noqa: F401  (registers the ops)

    cuda = torch.cuda.is_available()
    device = device or ("cuda" if cuda else "cpu")
    report = {
        "fastpeft": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "extension": {"loaded": _ext.load() is not None, "reason": _ext.unavailable_reason(),
                      "build": _ext.metadata()},
        "triton_interpreter": _triton.interpreter_on(),
        "triton_autotune": _autotune_level(),
        "forced": os.environ.get("FASTPEFT_BACKEND") or None,
        "device": device,
        "ops": {},
    }
    for name, op in sorted(backends.all_ops().items()):
        args = op.example_inputs(device)  # small inputs, to ask each backend whether it would take them
        entry = {"backends": {}, "selected": None}
        for b in backends.BACKENDS:
            if b not in op.impls:
                continue
            entry["backends"][b] = op.why_not(b, *args) if args is not None else op.why_not(b)
        try:
            entry["selected"] = op.select(*args).backend if args is not None else None
        except backends.BackendError as e:
            entry["error"] = str(e)
        report["ops"][name] = entry
    return report


def _autotune_level() -> str:
    try:
        return _triton.autotune_level()
    except ValueError as e:  # info must not fail: show what is wrong instead
        return f"invalid ({e})"


def format_report(r: dict) -> str:
    ext = r["extension"]
    lines = [
        f"fastpeft {r['fastpeft']}  python {r['python']}  torch {r['torch']}"
        f"{' (CUDA ' + r['torch_cuda'] + ')' if r['torch_cuda'] else ' (CPU build)'}",
        f"triton {r['triton'] or 'not installed'}{'  [interpreter: TRITON_INTERPRET=1]' if r['triton_interpreter'] else ''}"
        f"  transformers {r['transformers'] or '-'}  peft {r['peft'] or '-'}",
        f"CUDA devices: {', '.join(r['cuda_devices']) or 'none'}",
        "extension fastpeft._C: " + ("loaded" + (f" (built for torch {ext['build']['torch_version']}, "
                                                  f"CUDA kernels: {'archs ' + ','.join(ext['build']['cuda_archs']) if ext['build']['with_cuda'] else 'no'})"
                                                  if ext["build"] else "") if ext["loaded"] else f"not loaded: {ext['reason']}"),
        f"forced backend (FASTPEFT_BACKEND): {r['forced'] or 'none'}"
        f"  Triton autotune (FASTPEFT_TRITON_AUTOTUNE): {r['triton_autotune']}",
        "",
        f"ops (for {r['device']} inputs; first available backend in order cuda, triton, cpu, torch wins):",
    ]
    for name, e in r["ops"].items():
        lines.append(f"  {name}: uses {e['selected'] or 'NONE'}" + (f"  -- {e['error']}" if e.get("error") else ""))
        for b, why in e["backends"].items():
            lines.append(f"      {'+' if why is None else '-'} {b:<7}{'' if why is None else why}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device of the example inputs (default: cuda if present)")


def run(args) -> int:
    r = collect(args.device)
    print(json.dumps(r, indent=1, default=str) if args.json else format_report(r))
    return 0
