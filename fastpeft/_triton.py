"""Whether Triton kernels can run here, and the interpreter switch.

Triton runs on CUDA GPUs, and on the CPU through its interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported).  The interpreter is a
testing tool: a ``triton`` backend takes CPU tensors only when it is forced.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> Optional[str]:
    """None if Triton kernels can run in this process, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
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
