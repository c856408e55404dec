"""Op-level cases: each fused op against its torch reference, the usual PyTorch / HF PEFT
equivalent (the baseline) and the floor.

One module per op package, named like it (``fastpeft/bench/cases/ops/<package>.py``), found
through :func:`fastpeft.ops.op_packages`; each defines ``VARIANTS`` (the variant names its cases
may have) and ``cases(suite, device)``, and documents its shapes, variants and floor.  Every
variant is one forward+backward (or one update) on the same inputs.  A missing op, a missing
``peft`` or a backend that cannot run here turns into a skipped case or variant with the reason
(see :class:`fastpeft.bench.cases.Skip`).  ``benchmarks/bench_<package>.py`` runs the same cases
under pytest-benchmark.

This module holds what the op modules share.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from .. import Case, Skip


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def require(module: str, attr: str | None = None):
    """Import ``module`` (and get ``attr``) or raise :class:`Skip` saying what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} is not available ({e})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Skip(f"{module}.{attr} is not available (not implemented yet?)")
    return getattr(mod, attr)


def selected_backend(op_name: str, *args) -> str:
    from ....backends import get_op

    try:
        return get_op(op_name).select(*args).backend
    except Exception as e:  # noqa: BLE001
        return f"? ({type(e).__name__})"


def zero_grads(*ts) -> None:
    for t in ts:
        t.grad = None


def torch_backend(op: str):
    """``with torch_backend(op):`` runs ``op`` on the pure-PyTorch reference."""
    from ....backends import use_backend

    return use_backend("torch", op=op)


def case_module(package: str) -> ModuleType | None:
    """The case module of op package ``package``, or None if it has none."""
    name = f"{__name__}.{package}"
    return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None


def cases(suite: str, device: torch.device) -> list[Case]:
    """The cases of every op package's module, in package order."""
    from ....ops import op_packages

    out: list[Case] = []
    for package in op_packages():
        mod = case_module(package)
        if mod is not None:
            out.extend(mod.cases(suite, device))
    return out
