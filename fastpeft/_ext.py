"""Loading the compiled extension ``fastpeft._C`` safely.

The build writes ``_C_meta.json`` next to the shared library (torch version,
CUDA version, archs, compiler).  Before loading, the metadata is compared with
the running torch: a library built for another torch would fail to link or,
worse, crash, so it is not loaded; a one-line warning says why and the
``cpu``/``cuda`` backends report themselves unavailable.  Loading never
initialises CUDA.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Optional

_STATE: dict = {}


def _meta_path() -> Path:
    return Path(__file__).with_name("_C_meta.json")


def metadata() -> Optional[dict]:
    """Build metadata of the installed extension, or None."""
    try:
        return json.loads(_meta_path().read_text())
    except (OSError, ValueError):
        return None


def _load() -> tuple[Optional[object], Optional[str]]:
    if os.environ.get("FASTPEFT_NO_EXT", "") not in ("", "0"):
        return None, "disabled by FASTPEFT_NO_EXT"
    if importlib.util.find_spec("fastpeft._C") is None:
        return None, ("extension fastpeft._C is not built (installed with FASTPEFT_NO_EXT=1, "
                      "without a compiler, or with build isolation); pure-PyTorch fallback")
    import torch

    meta = metadata()
    if meta is None:
        return None, "fastpeft._C has no readable _C_meta.json beside it; not loaded (rebuild the extension)"
    built, running = meta.get("torch_version"), torch.__version__
    if built != running:
        msg = (f"fastpeft._C was built for torch {built} but torch {running} is running; "
               "not loaded, using fallbacks (rebuild: pip install --no-build-isolation -e .)")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None, msg
    try:
        mod = importlib.import_module("fastpeft._C")
    except (ImportError, OSError) as e:
        msg = f"fastpeft._C failed to load ({type(e).__name__}: {e}); using fallbacks"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None, msg
    return mod, None


def load() -> Optional[object]:
    """The extension module, loading it once; None when unavailable."""
    if "mod" not in _STATE:
        _STATE["mod"], _STATE["reason"] = _load()
    return _STATE["mod"]


def unavailable_reason() -> Optional[str]:
    """None if the extension is loaded, else why not."""
    load()
    return _STATE["reason"]


def has_cuda_kernels() -> bool:
    meta = metadata() or {}
    return load() is not None and bool(meta.get("with_cuda"))


def cpu_available() -> Optional[str]:
    """Availability probe for ``cpu`` backends."""
    return unavailable_reason()


def cuda_available() -> Optional[str]:
    """Availability probe for ``cuda`` backends (never initialises a CUDA context)."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if not has_cuda_kernels():
        return "fastpeft._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None
