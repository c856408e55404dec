"""Mixed-adapter batches: every sequence of a batch with its own LoRA adapter, in one forward
(multi-adapter serving).

* :data:`BASE_ADAPTER` (``"__base__"``, HF PEFT's name) -- a row that runs the base model alone.
* :func:`check_adapter_names` -- the names of a batch checked against the loaded adapters (a clear error
  listing them).
* :func:`mixed_adapters` -- the context in which fastpeft's LoRA layers (and ``modules_to_save`` heads) read
  the per-sequence adapter names; :meth:`fastpeft.PeftModel.forward` / ``generate`` with ``adapter_names=``
  enter it.  The names are per *sequence*: a layer whose input has k·B rows (beam search,
  ``num_return_sequences``) gives each name k consecutive rows.
* :func:`mixed_heads_forward` -- a ``modules_to_save`` head (each adapter's own classifier) on a mixed
  batch: each adapter's head on its rows.  Heads are one small layer per adapter, so this is a loop over
  the adapters present (the LoRA layers of the body are not: they run
  :func:`fastpeft.ops.lora_linear_multi`, see :mod:`fastpeft.ops.lora_linear_multi.layer`).

Adapters can be loaded (``load_adapter``) and deleted (``delete_adapter``) between batches without touching
the base weights; each layer's stacked adapters follow on the next batch.  Loading or deleting while a
forward runs in another thread is not safe: a server serialises them with its forwards (one lock).

Example::

    model = fastpeft.PeftModel.from_pretrained(base, "adapters/sentiment", adapter_name="sentiment")
    model.load_adapter("adapters/topic", adapter_name="topic")
    model.eval()
    out = model(**batch, adapter_names=["sentiment", "topic", "__base__", "topic"])
    gen = model.generate(**prompts, adapter_names=["chat", "sql"], max_new_tokens=32)
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, Optional, Sequence

import torch

BASE_ADAPTER = "__base__"

_NAMES: contextvars.ContextVar = contextvars.ContextVar("fastpeft_mixed_adapter_names", default=None)


def check_adapter_names(adapter_names, loaded: Iterable[str], batch_size: Optional[int] = None) -> list:
    """``adapter_names`` as a list after checking it: a list / tuple of str, each a loaded adapter or
    :data:`BASE_ADAPTER`, one per sequence (``batch_size`` when given).  Errors name the argument and list
    the loaded adapters."""
    loaded = list(loaded)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names: expected a list of adapter names (one per sequence of the batch), "
                        f"got {type(adapter_names).__name__}")
    names = list(adapter_names)
    if not names:
        raise ValueError("adapter_names: expected one adapter name per sequence of the batch, got an empty list")
    bad = sorted({repr(a) for a in names if not isinstance(a, str)})
    if bad:
        raise TypeError(f"adapter_names: expected str names, got {', '.join(bad)}")
    unknown = sorted({a for a in names if a != BASE_ADAPTER and a not in loaded})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; loaded adapters: {loaded} "
                         f"(or {BASE_ADAPTER!r} for the base model alone)")
    if batch_size is not None and len(names) != batch_size:
        raise ValueError(f"adapter_names: got {len(names)} names for a batch of {batch_size} sequences "
                         "(expected one per sequence)")
    return names


@contextlib.contextmanager
def mixed_adapters(adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, fastpeft's LoRA layers and ``modules_to_save`` heads run the batch with
    ``adapter_names[i]`` on sequence i (no autograd: the block runs under ``torch.no_grad()``).  The
    names must have been checked (:func:`check_adapter_names`)."""
    token = _NAMES.set(tuple(adapter_names))
    try:
        with torch.no_grad():
            yield
    finally:
        _NAMES.reset(token)


def current_adapter_names() -> Optional[tuple]:
    """The per-sequence adapter names of the :func:`mixed_adapters` block we are in, or None (always None
    while ``torch.compile`` traces: mixed-adapter batches run eagerly)."""
    if torch.compiler.is_compiling():
        return None
    return _NAMES.get()


def batch_size_of(args: tuple, kwargs: dict) -> Optional[int]:
    """The batch size of a model call: the first dimension of ``input_ids`` / ``inputs_embeds`` / the
    first tensor argument (None if there is none)."""
    for k in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values"):
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    for t in args:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    return None


def mixed_heads_forward(wrapper, names: Sequence[str], args: tuple, kwargs: dict):
    """``wrapper`` (a ``modules_to_save`` wrapper: ``original_module``, ``modules_to_save`` ModuleDict) on a
    mixed batch: rows of adapter a through a's copy of the module (the original for :data:`BASE_ADAPTER`
    and adapters without a copy), each adapter's rows in one call."""
    from .ops.lora_linear_multi.layer import expand_names

    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("adapter_names: a modules_to_save module of a mixed-adapter batch needs a tensor "
                         "with the batch in its first dimension as first argument")
    rows = expand_names(names, x.shape[0])
    groups: dict = {}
    for i, a in enumerate(rows):
        groups.setdefault(a if a in wrapper.modules_to_save else BASE_ADAPTER, []).append(i)

    def module(a):
        return wrapper.original_module if a == BASE_ADAPTER else wrapper.modules_to_save[a]

    if len(groups) == 1:
        return module(next(iter(groups)))(*args, **kwargs)
    out = None
    for a, idx in groups.items():
        sel = torch.tensor(idx, device=x.device)
        y = module(a)(x.index_select(0, sel), *args[1:], **kwargs)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"adapter_names: modules_to_save module {type(module(a)).__name__} returns "
                             f"{type(y).__name__}; mixed-adapter batches need a tensor output")
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, sel, y)
    return out


__all__ = ["BASE_ADAPTER", "check_adapter_names", "mixed_adapters", "current_adapter_names", "batch_size_of",
           "mixed_heads_forward"]
