"""How ``fastpeft bench`` measures: warm-up, interleaved repeats, robust statistics, peak memory.

Method (the same for every case):

1. **Warm-up**: every variant runs ``warmup`` times (at least once; this also
   triggers Triton autotuning / lazy init and tells whether the variant runs at all).
2. **Calibration**: a variant whose single call is shorter than ``min_sample_s``
   is timed over ``inner`` back-to-back calls per sample (the same ``inner`` for
   the whole run of that variant), so timer resolution and launch jitter do not
   dominate.
3. **Interleaved repeats**: ``repeats`` rounds; in each round every variant takes
   one sample, in an order rotated by one each round (round-robin), so slow drift
   of the machine (thermal, other processes) hits all variants alike.
4. **Statistics**: median, quartiles (IQR), min and max of the per-call times.
   On CUDA a sample is timed with CUDA events around the ``inner`` calls after a
   synchronise; on CPU with ``time.perf_counter``.

Peak memory (:func:`peak_memory`), measured in one extra call after timing:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (absolute ``peak_bytes``, and ``peak_extra_bytes`` above what was allocated
  before the call);
* CPU: tracemalloc does not see torch's allocator, so the call runs under
  ``torch.profiler`` with ``profile_memory=True`` and the allocation events
  (sizes, +alloc / -free) are summed in time order: ``peak_extra_bytes`` is the
  highest net amount torch allocated during the call (weights and inputs that
  existed before are not counted).  There is no absolute figure on CPU.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Stats:
    """Per-call times (seconds) of one variant."""

    samples: list[float] = field(default_factory=list)
    inner: int = 1

    @property
    def n(self) -> int:
        return len(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        if not s:
            return math.nan
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def as_dict(self) -> dict:
        return {
            "median_s": self.median, "q1_s": self.quantile(0.25), "q3_s": self.quantile(0.75),
            "min_s": min(self.samples) if self.samples else math.nan,
            "max_s": max(self.samples) if self.samples else math.nan,
            "n": self.n, "inner": self.inner, "samples_s": list(self.samples),
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


@dataclass
class Failure:
    """A variant that raised: the one-line reason."""

    reason: str


def describe_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def measure(variants: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2,
            repeats: int = 10, min_repeats: int = 3, min_sample_s: float = 0.01,
            budget_s: Optional[float] = None, max_inner: int = 1000) -> dict[str, "Stats | Failure"]:
    """Time every variant with the method of this module.

    Returns ``{name: Stats}``, or ``{name: Failure}`` for a variant that raised (in
    warm-up or later); the others still run.  ``budget_s`` caps the timed part:
    the number of rounds shrinks (never below ``min_repeats``) so the estimated
    total stays within it.
    """
    device = torch.device(device)
    out: dict[str, Stats | Failure] = {}
    inner: dict[str, int] = {}
    est: dict[str, float] = {}
    for name, fn in variants.items():
        try:
            for _ in range(max(1, warmup)):
                fn()
            one = time_calls(fn, 1, device)
            n = 1 if one >= min_sample_s else min(max_inner, max(1, math.ceil(min_sample_s / max(one, 1e-9))))
            if n > 1:  # re-estimate with the chosen inner count (first calls are noisy)
                one = time_calls(fn, n, device)
                n = 1 if one >= min_sample_s else min(max_inner, max(1, math.ceil(min_sample_s / max(one, 1e-9))))
            inner[name], est[name] = n, one * n
            out[name] = Stats(inner=n)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest runs
            out[name] = Failure(describe_error(e))
    live = [n for n in variants if isinstance(out[n], Stats)]
    rounds = max(1, repeats)
    if budget_s is not None and live:
        per_round = sum(est[n] for n in live)
        rounds = max(min(min_repeats, rounds), min(rounds, int(budget_s / max(per_round, 1e-9))))
    for r in range(rounds):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for name in order:
            if not isinstance(out[name], Stats):
                continue
            try:
                out[name].samples.append(time_calls(variants[name], inner[name], device))
            except Exception as e:  # noqa: BLE001
                out[name] = Failure(describe_error(e))
    return out


@contextlib.contextmanager
def quiet_profiler():
    """Silence the C-level 'profiler_start/stop' lines kineto writes to fd 2 on
    every profile (they would flood the table); Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    peak = cur = 0
    for _, size in sorted(events):
        cur += size
        peak = max(peak, cur)
    return int(peak)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """``{"peak_bytes", "peak_extra_bytes", "memory_method"}`` of one call (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "peak_extra_bytes": int(peak - before),
                "memory_method": "torch.cuda.max_memory_allocated"}
    return {"peak_bytes": None, "peak_extra_bytes": _cpu_peak_extra_bytes(fn),
            "memory_method": "torch.profiler allocation events (net peak during the call)"}


def count_launches(fn: Callable[[], object], device: torch.device) -> dict:
    """How many kernels one call launches: CUDA kernels on a GPU; on CPU the
    top-level ATen ops dispatched (each one a pass over its operands)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with quiet_profiler(), profile(activities=acts) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        n = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        return {"launches": n, "launch_kind": "CUDA kernels"}
    n = sum(1 for e in events if e.cpu_parent is None and e.name.startswith(("aten::", "fastpeft::")))
    return {"launches": n, "launch_kind": "top-level ATen/fastpeft ops"}
