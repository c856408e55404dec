"""The case registry of ``fastpeft bench``.

A :class:`Case` is one benchmark configuration (an op at one shape, or one
training step).  Its ``build(device)`` returns a :class:`Built`: the variants to
time (zero-argument callables doing one forward+backward or one step), which
variant is the floor and which the baseline (HF PEFT or the unfused module),
the work per call (FLOPs, bytes, tokens) and the variants that cannot run here
with the reason.  ``build`` raises :class:`Skip` when the whole case cannot run
(the op is not there, no such device, ...); any other exception marks the case
failed.  Both are reported, never fatal.

Case modules: :mod:`.ops` (one module per op package, ``ops/<package>.py``),
:mod:`fastpeft.bench.e2e` (training steps), :mod:`fastpeft.bench.mixed` (mixed-adapter
serving forwards) and :mod:`.ceilings` (device ceilings).  :func:`all_cases` collects them per suite and device.
"""
from __future__ import annotations

import fnmatch
import importlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

SUITES = ("smoke", "quick", "full")


class Skip(Exception):
    """The case (or a variant) cannot run here; the message says why."""


@dataclass
class Target:
    """A performance goal, checked (reported, not asserted) on one case.

    ``metric`` is ``"time"`` (median seconds) or ``"memory"`` (peak bytes);
    the check is ``metric(variant) <= limit * metric(against) + slack``.  A speed-up goal
    "≥ 1.4× faster than HF PEFT" is written ``limit = 1/1.4`` against ``hf_peft``.
    """

    label: str
    variant: str
    against: str
    limit: float
    metric: str = "time"
    source: str = ""
    slack: float = 0.0    # absolute allowance added to limit * against (bytes for memory)
    mem_key: str = "peak_extra_bytes"   # memory figure compared: peak_extra_bytes or peak_total_bytes

    def evaluate(self, variants: dict) -> dict:
        out = {"label": self.label, "variant": self.variant, "against": self.against, "metric": self.metric,
               "limit": self.limit, "source": self.source, "value": None, "passed": None, "reason": None}
        a, b = variants.get(self.variant, {}), variants.get(self.against, {})
        key = "median_s" if self.metric == "time" else self.mem_key

        def val(v):
            return v.get(key)

        if a.get("status") != "ok" or b.get("status") != "ok" or not val(a) or not val(b):
            out["reason"] = (f"needs '{self.variant}' and '{self.against}' measured "
                             f"({a.get('status', 'absent')}/{b.get('status', 'absent')})")
            return out
        out["value"] = val(a) / val(b)
        out["passed"] = bool(val(a) <= self.limit * val(b) + self.slack)
        sa, sb = a.get("samples_s") or [], b.get("samples_s") or []
        if self.metric == "time" and self.slack == 0 and len(sa) == len(sb) >= 3 and all(sb):
            # Paired ratios: sample i of both variants comes from the same interleaved round, so their
            # ratio cancels the machine's drift. The verdict uses the paired median; when the limit lies
            # inside the ratios' interquartile range the verdict is flagged as within the noise.
            ratios = sorted(x / y for x, y in zip(sa, sb))
            med, q1, q3 = statistics.median(ratios), _quantile(ratios, 0.25), _quantile(ratios, 0.75)
            out.update(value=med, value_q1=q1, value_q3=q3, passed=bool(med <= self.limit),
                       within_noise=bool(q1 <= self.limit <= q3), paired=True)
        return out


def _quantile(sorted_values: list, q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Built:
    """What a case's ``build(device)`` returns."""

    variants: dict[str, Callable[[], object]]
    floor: Optional[str] = None          # ratios "×floor" are against this variant
    baseline: Optional[str] = None       # ratios "×HF" are against this variant (HF PEFT / unfused module)
    flops: Optional[float] = None        # useful FLOPs per call (the same for every variant)
    bytes: Optional[float] = None        # minimal bytes moved per call (memory-bound cases)
    tokens: Optional[int] = None         # tokens per call (training steps)
    skipped: dict[str, str] = field(default_factory=dict)   # variant -> why it cannot run
    notes: dict[str, str] = field(default_factory=dict)     # variant -> what it is
    launches: bool = False               # also count kernel launches per variant
    # variant -> bytes it keeps between calls (its model's parameters, buffers and optimizer
    # state); with it a variant reports peak_total_bytes = resident + peak_extra_bytes, which
    # does not count the other variants' models living in the same process.
    resident_bytes: dict[str, Callable[[], int]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    name: str                                  # "group/params", unique
    group: str
    build: Callable[[torch.device], Built]
    params: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    ours: tuple[str, ...] = ("fastpeft",)      # variants that are fastpeft's own (gated by --fail-if-slower)
    budget_s: Optional[float] = None           # timed-part budget; None: the suite's default
    warmup: Optional[int] = None               # warm-up calls per variant; None: the suite's default

    def matches(self, pattern: Optional[str]) -> bool:
        """``--only``: a glob (``*``, ``?``) or, without wildcards, a substring of the name."""
        if not pattern:
            return True
        pats = [p.strip() for p in pattern.split(",") if p.strip()]
        return any(fnmatch.fnmatchcase(self.name, p) if any(c in p for c in "*?[") else p in self.name
                   for p in pats)


PROVIDERS = ("fastpeft.bench.cases.ceilings", "fastpeft.bench.cases.ops", "fastpeft.bench.e2e",
             "fastpeft.bench.mixed")


def run_order(cases: list[Case], quick: set[str]) -> list[Case]:
    """The ceilings, then the cases that carry targets (headline ones first), then the other headline
    (quick-suite) cases, then the rest; stable within each tier.  On the first GPU run a 3.4-minute cap cut
    the end-to-end target case, which came last."""
    def tier(c: Case) -> int:
        if c.group == "ceiling":
            return 0
        return (1 if c.name in quick else 2) if c.targets else (3 if c.name in quick else 4)
    return sorted(cases, key=tier)


def all_cases(suite: str, device: torch.device) -> list[Case]:
    """Every case of ``suite`` for ``device``, in run order."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
    out: list[Case] = []
    for mod in PROVIDERS:
        out.extend(importlib.import_module(mod).cases(suite, torch.device(device)))
    if suite == "full":  # so that a time cap (--max-minutes) cuts the least informative cases
        out = run_order(out, {c.name for mod in PROVIDERS
                              for c in importlib.import_module(mod).cases("quick", torch.device(device))})
    names = [c.name for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"duplicate case names: {sorted(dup)}")
    return out
