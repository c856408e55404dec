"""Whether Triton kernels can run here, and the interpreter switch.

Triton runs on CUDA GPUs, and on the CPU through its interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported).  The interpreter is a
testing tool: a ``triton`` backend takes CPU tensors only when it is forced.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional


NOT_INSTALLED = ("triton is not installed (the GPU kernels need it: pip install 'fastpeft[triton]'; "
                 "torch's CUDA wheels bring it)")
AUTOTUNE_ENV = "FASTPEFT_TRITON_AUTOTUNE"
AUTOTUNE_LEVELS = ("full", "quick", "off")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_level() -> str:
    """How many configs the autotuned kernels try on a GPU (``FASTPEFT_TRITON_AUTOTUNE``, read whenever
    a kernel autotunes for a new shape): ``full`` (default, every config), ``quick`` (the first two of each
    list: the common Hopper/Ampere tiles) or ``off`` (the first only). Each config is compiled on first use
    of a new shape key, a few seconds per GEMM config: ``off`` suits test runs, ``full`` long training.
    Raises ValueError naming the variable for any other value."""
    v = os.environ.get(AUTOTUNE_ENV, "").strip().lower() or "full"
    if v not in AUTOTUNE_LEVELS:
        raise ValueError(f"{AUTOTUNE_ENV}: expected one of {', '.join(AUTOTUNE_LEVELS)}, got "
                         f"{os.environ[AUTOTUNE_ENV]!r}")
    return v


def autotune_configs(configs: list, quick: int = 2) -> list:
    """``configs`` cut to the autotune level (:func:`autotune_level`): all, the first ``quick``, or the first."""
    level = autotune_level()
    return configs if level == "full" else configs[:quick if level == "quick" else 1]


def available() -> Optional[str]:
    """None if Triton kernels can run in this process, else why not."""
    if importlib.util.find_spec("triton") is None:
        return NOT_INSTALLED
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # broken installs must not break dispatch
        return f"triton failed to import ({type(e).__name__}: {e})"
    if interpreter_on():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return None


def supports_device(device, forced: bool) -> Optional[str]:
    """Device rule shared by all Triton backends."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_on():
        return None if forced else "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1) when forced"
    return f"Triton kernels need CUDA tensors, got {device.type}"
