"""What the cases of the decoder-LLM ops (``rms_norm.py``, ``rope.py``, ``glu.py``) share.

Each case times one forward + backward (``torch.autograd.backward`` of the output(s) with fixed
gradients) in four variants on the same inputs:

* ``fused``    -- the fastpeft op on the backend it picks here (cpu / triton);
* ``eager``    -- the op under ``use_backend("torch")``: transformers' unfused PyTorch composition,
  eager (the baseline);
* ``compiled`` -- ``torch.compile(dynamic=False)`` of that composition (inductor; compiled in the
  warm-up call);
* ``liger``    -- Liger-Kernel's Triton kernel for the same job, on CUDA only; skipped, with the
  reason, when ``liger_kernel`` is not importable, has no such function, or the call fails (another
  version's signature).

There is no floor: the ops are memory-bound and report their minimal bytes per call instead.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence

import torch

from .. import Built
from . import selected_backend, torch_backend, zero_grads

VARIANTS = ("fused", "eager", "compiled", "liger")
OURS = ("fused",)


def fwd_bwd(forward: Callable, inputs: Sequence[torch.Tensor], grads: tuple) -> Callable[[], None]:
    """A zero-argument callable: ``forward(*inputs)``, then backward of its output(s) with ``grads``."""
    def step():
        zero_grads(*inputs)
        out = forward(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return step


def _liger_step(device: torch.device, liger: tuple, inputs, grads) -> tuple[Optional[Callable], str]:
    """(the Liger-Kernel step, note) or (None, why it cannot run here).  ``liger`` is (module under
    ``liger_kernel``, attribute, ``call(fn, *inputs)``)."""
    module, name, call = liger
    what = f"liger_kernel.{module}.{name}"
    if device.type != "cuda":
        return None, "Liger-Kernel runs on CUDA only"
    try:
        fn = getattr(importlib.import_module(f"liger_kernel.{module}"), name)
    except Exception as e:  # noqa: BLE001 - not installed, or another version without it
        return None, f"{what} not available: {type(e).__name__}: {e}"
    step = fwd_bwd(lambda *a: call(fn, *a), inputs, grads)
    try:
        step()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - another Liger-Kernel version may take other arguments
        return None, f"{what} call failed (another version's signature?): {type(e).__name__}: {e}"
    return step, what


def decoder_built(device: torch.device, op: str, *, fused: Callable, reference: Callable,
                  inputs: Sequence[torch.Tensor], grads: tuple, op_args: tuple, liger: tuple,
                  nbytes: float, eager_note: str) -> Built:
    """The :class:`Built` of one case: ``fused(*inputs)`` calls the fastpeft op (``op_args``: that call's
    arguments to the registry, for the note saying which backend runs), ``reference(*inputs)`` the
    unfused composition; ``inputs`` are made leaves that require grad."""
    inputs = [t.detach().requires_grad_() for t in inputs]

    def eager(*a):
        with torch_backend(op):
            return fused(*a)

    variants = {"fused": fwd_bwd(fused, inputs, grads), "eager": fwd_bwd(eager, inputs, grads),
                "compiled": fwd_bwd(torch.compile(reference, dynamic=False), inputs, grads)}
    notes = {"fused": f"fastpeft.ops.{op} (backend: {selected_backend(op, *op_args)})",
             "eager": eager_note, "compiled": "torch.compile of the eager composition (inductor)"}
    skipped = {}
    step, note = _liger_step(device, liger, inputs, grads)
    if step is None:
        skipped["liger"] = note
    else:
        variants["liger"], notes["liger"] = step, note
    return Built(variants, baseline="eager", bytes=float(nbytes), skipped=skipped, notes=notes)
