"""Run a list of cases and collect every figure into one JSON-able dict.

The result schema (``SCHEMA``), one object per run::

    {"schema": "fastpeft-bench/1", "date": ISO-8601 UTC, "suite", "device": {...},
     "versions": {fastpeft, torch, triton, cuda, transformers, peft, python, git_commit, git_dirty},
     "environment": {FASTPEFT_BACKEND, FASTPEFT_TRITON_AUTOTUNE, TRITON_INTERPRET} (None when unset),
     "settings": {...}, "ceilings": {"tflops", "gbs"} (when measured), "elapsed_s",
     "cases": [{"name", "group", "params", "status": ok|skipped|failed, "reason",
                "floor", "baseline", "flops", "bytes", "tokens",
                "variants": {name: {"status", "reason", "note", "median_s", "q1_s", "q3_s",
                                    "min_s", "max_s", "n", "inner", "samples_s",
                                    "peak_bytes", "peak_extra_bytes", "memory_method",
                                    "resident_bytes", "peak_total_bytes" (training steps),
                                    "ratio_to_floor", "ratio_to_baseline",
                                    "tflops", "tflops_pct_ceiling", "gbs", "gbs_pct_ceiling",
                                    "tokens_per_s", "steps_per_s", "launches", "launch_kind"}},
                "targets": [{"label", "variant", "against", "metric", "limit", "value",
                             "passed": true|false|null, "reason", "source"}],
                "ours": [variant names gated by --fail-if-slower], "elapsed_s"}]}
"""
from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

import torch

from . import timing
from .cases import Case, Skip

SCHEMA = "fastpeft-bench/1"


@dataclass
class Settings:
    warmup: int
    repeats: int
    min_sample_s: float
    budget_s: float            # per case, timed part
    max_minutes: Optional[float] = None   # whole run; later cases are skipped past it
    memory: bool = True

    @classmethod
    def for_suite(cls, suite: str, device: torch.device, repeats: Optional[int] = None,
                  max_minutes: Optional[float] = None) -> "Settings":
        gpu = device.type == "cuda"
        table = {
            "smoke": (1, 3, 0.001, 2.0),
            "quick": (3, 15, 0.005, 3.0) if gpu else (2, 7, 0.02, 5.0),
            "full": (3, 25, 0.005, 4.0) if gpu else (2, 11, 0.02, 10.0),
        }
        w, r, m, b = table[suite]
        return cls(w, repeats if repeats else r, m, b, max_minutes)


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout fastpeft is imported from, or (None, None).

    ``FASTPEFT_GIT_COMMIT`` overrides it (dirty then None): a working tree copied to a remote machine without
    its current ``.git`` (as the GPU lease tool does) would otherwise record a stale commit."""
    override = os.environ.get("FASTPEFT_GIT_COMMIT", "").strip()
    if override:
        return override, None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit is None:
            return None, None
        dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    from .. import __version__

    commit, dirty = git_commit()
    dev = {"type": device.type, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        prop = torch.cuda.get_device_properties(idx)
        dev.update(name=prop.name, capability=f"{prop.major}.{prop.minor}", memory_bytes=prop.total_memory)
    else:
        dev["name"] = dev["cpu"]
    versions = {"fastpeft": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                "triton": _version("triton"), "transformers": _version("transformers"), "peft": _version("peft"),
                "python": platform.python_version(), "git_commit": commit, "git_dirty": dirty}
    env = {k: os.environ.get(k) for k in ("FASTPEFT_BACKEND", "FASTPEFT_TRITON_AUTOTUNE", "TRITON_INTERPRET")}
    return {"device": dev, "versions": versions, "environment": env}


def device_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available in this process (torch.cuda.is_available() is False)"
    if device.type not in ("cpu", "cuda"):
        return f"unsupported device type {device.type!r}"
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, settings: Settings, ceilings: dict) -> dict:
    t0 = time.perf_counter()
    res = {"name": case.name, "group": case.group, "params": dict(case.params), "status": "ok", "reason": None,
           "floor": None, "baseline": None, "flops": None, "bytes": None, "tokens": None, "variants": {},
           "targets": [], "ours": list(case.ours)}
    reason = device_reason(device)
    if reason:
        res.update(status="skipped", reason=reason)
        return _finish(res, case, t0)
    try:
        built = case.build(device)
    except Skip as e:
        res.update(status="skipped", reason=str(e))
        return _finish(res, case, t0)
    except Exception as e:  # noqa: BLE001 - a broken case is reported, the rest runs
        res.update(status="failed", reason=f"build: {timing.describe_error(e)}")
        _free(device)
        return _finish(res, case, t0)
    res.update(floor=built.floor, baseline=built.baseline, flops=built.flops, bytes=built.bytes,
               tokens=built.tokens, extra=built.extra)
    try:
        stats = timing.measure(built.variants, device, warmup=case.warmup if case.warmup is not None else settings.warmup,
                               repeats=settings.repeats, min_sample_s=settings.min_sample_s,
                               budget_s=case.budget_s or settings.budget_s)
        for name in list(built.variants) + list(built.skipped):
            v = {"status": "ok", "reason": None, "note": built.notes.get(name)}
            if name in built.skipped:
                v.update(status="skipped", reason=built.skipped[name])
            elif isinstance(stats[name], timing.Failure):
                v.update(status="failed", reason=stats[name].reason)
            else:
                v.update(stats[name].as_dict())
                if settings.memory:
                    try:
                        v.update(timing.peak_memory(built.variants[name], device))
                        if name in built.resident_bytes:
                            v["resident_bytes"] = int(built.resident_bytes[name]())
                            v["peak_total_bytes"] = v["resident_bytes"] + v["peak_extra_bytes"]
                    except Exception as e:  # noqa: BLE001
                        v["memory_error"] = timing.describe_error(e)
                if built.launches:
                    try:
                        v.update(timing.count_launches(built.variants[name], device))
                    except Exception as e:  # noqa: BLE001
                        v["launches_error"] = timing.describe_error(e)
            res["variants"][name] = v
        _derive(res, ceilings)
    finally:
        del built
        _free(device)
    res["targets"] = [t.evaluate(res["variants"]) for t in case.targets]
    ok = [v for v in res["variants"].values() if v["status"] == "ok"]
    if not ok:
        bad = [f"{n}: {v['reason']}" for n, v in res["variants"].items() if v["reason"]]
        res.update(status="failed", reason="; ".join(bad)[:500] or "no variant ran")
    return _finish(res, case, t0)


def _finish(res: dict, case: Case, t0: float) -> dict:
    res["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if not res["targets"] and case.targets:
        res["targets"] = [t.evaluate(res["variants"]) for t in case.targets]
    return res


def _derive(res: dict, ceilings: dict) -> None:
    vs = res["variants"]

    def med(name):
        v = vs.get(name) if name else None
        return v["median_s"] if v and v["status"] == "ok" else None

    floor, base = med(res["floor"]), med(res["baseline"])
    for v in vs.values():
        if v["status"] != "ok":
            continue
        t = v["median_s"]
        v["ratio_to_floor"] = t / floor if floor else None
        v["ratio_to_baseline"] = t / base if base else None
        if res["flops"]:
            v["tflops"] = res["flops"] / t / 1e12
            if ceilings.get("tflops"):
                v["tflops_pct_ceiling"] = 100.0 * v["tflops"] / ceilings["tflops"]
        if res["bytes"]:
            v["gbs"] = res["bytes"] / t / 1e9
            if ceilings.get("gbs"):
                v["gbs_pct_ceiling"] = 100.0 * v["gbs"] / ceilings["gbs"]
        if res["tokens"]:
            v["tokens_per_s"] = res["tokens"] / t
            v["steps_per_s"] = 1.0 / t


def run(cases: Iterable[Case], device: torch.device, settings: Settings, suite: str,
        on_case: Optional[Callable[[dict], None]] = None, progress: Optional[Callable] = None) -> dict:
    """Run ``cases`` in order and return the result dict (see module doc).

    ``on_case(result)`` is called after each case; ``progress(iterable)`` wraps the
    iteration (e.g. ``tqdm``)."""
    device = torch.device(device)
    start = time.perf_counter()
    out = {"schema": SCHEMA, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "suite": suite}
    out.update(environment(device))
    out["settings"] = {k: getattr(settings, k) for k in Settings.__dataclass_fields__}
    out["device"]["loadavg_start"] = _loadavg()
    cpu_start = _cpu_seconds()
    out["ceilings"] = {}
    out["cases"] = []
    cases = list(cases)
    it = progress(cases) if progress else cases
    for case in it:
        if hasattr(it, "set_description"):
            it.set_description(case.name[:40])
        if settings.max_minutes is not None and time.perf_counter() - start > 60 * settings.max_minutes:
            res = {"name": case.name, "group": case.group, "params": dict(case.params), "status": "skipped",
                   "reason": f"run time cap of {settings.max_minutes:g} min reached (--max-minutes)",
                   "variants": {}, "targets": [], "ours": list(case.ours), "elapsed_s": 0.0}
        else:
            res = run_case(case, device, settings, out["ceilings"])
        if case.group == "ceiling" and res["status"] == "ok":
            for v in res["variants"].values():
                if v.get("tflops"):
                    out["ceilings"]["tflops"] = v["tflops"]
                    out["ceilings"]["tflops_case"] = case.name
                if v.get("gbs"):
                    out["ceilings"]["gbs"] = v["gbs"]
                    out["ceilings"]["gbs_case"] = case.name
        out["cases"].append(res)
        if on_case:
            on_case(res)
    out["elapsed_s"] = round(time.perf_counter() - start, 3)
    out["device"]["loadavg_end"] = _loadavg()
    out["device"]["others_load"] = _others_load(cpu_start, _cpu_seconds(), out["elapsed_s"])
    return out


def _cpu_seconds() -> Optional[tuple[float, float]]:
    """(CPU seconds all processes spent busy since boot, CPU seconds of this process) on Linux, else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system irq softirq steal (guest time is already inside user; idle and iowait are not
        # busy). Steal (the hypervisor ran someone else on our vCPU) counts as other work too.
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _others_load(start, end, elapsed: float) -> Optional[float]:
    """Average number of cores other processes (or, in a VM, the hypervisor's steal) kept busy during the
    run: the machine's busy CPU time minus this process's, over the wall time. Unlike the load average after the run, it does not count
    the benchmark's own threads (which make every multi-threaded CPU run look 'busy')."""
    if start is None or end is None or elapsed <= 0:
        return None
    return round(max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / elapsed, 3)


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages: other work on the machine skews CPU timings
    (OpenMP regions stall when their threads are descheduled), so runs record it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
