"""Output of ``fastpeft bench``: terminal table, JSON file, PNG chart of the
ratios, comparison with an older JSON, and a short summary.

``python -m fastpeft.bench.report FILE.json`` prints the table of a saved run
(``--summary`` for the short one, ``--compare OLD.json`` for the change per case).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

from .._optional import import_extra
from ..fileio import atomic_write, atomic_write_bytes

RATIO_LEGEND = ("×floor = median time / the floor variant's (frozen base layer, memory copy of the same bytes, "
                "or frozen model); ×base = / the baseline's (HF PEFT, unfused module, eager FreeLB, torch AMP).")


# -- formatting ---------------------------------------------------------------
def fmt_time(s: Optional[float]) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(b) >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}"


def fmt_throughput(v: dict) -> str:
    parts = []
    if v.get("tokens_per_s") is not None:
        parts.append(f"{v['tokens_per_s']:.4g} tok/s")
    if v.get("tflops") is not None:
        pct = f" ({v['tflops_pct_ceiling']:.0f}%)" if v.get("tflops_pct_ceiling") is not None else ""
        parts.append(f"{v['tflops']:.3g} TFLOP/s{pct}")
    if v.get("gbs") is not None:
        pct = f" ({v['gbs_pct_ceiling']:.0f}%)" if v.get("gbs_pct_ceiling") is not None else ""
        parts.append(f"{v['gbs']:.3g} GB/s{pct}")
    if v.get("launches") is not None:
        parts.append(f"{v['launches']} launches")
    return ", ".join(parts) or "-"


def _target_text(t: dict) -> str:
    if t["passed"] is None:
        return f"n/a {t['label']}"
    spread = f", IQR {t['value_q1']:.2f}-{t['value_q3']:.2f}" if t.get("value_q1") is not None else ""
    noise = " within noise" if t.get("within_noise") else ""
    return f"{'PASS' if t['passed'] else 'FAIL'}{noise} {t['label']} ({t['value']:.2f}{spread})"


def fmt_memory(v: dict) -> str:
    if v.get("peak_total_bytes") is not None:
        return fmt_bytes(v["peak_total_bytes"])
    if v.get("peak_bytes") is not None:
        return fmt_bytes(v["peak_bytes"])
    if v.get("peak_extra_bytes") is not None:
        return "+" + fmt_bytes(v["peak_extra_bytes"])
    return "-"


def _render(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def variant_label(name: str, v: dict) -> str:
    """The variant's name, with the backend that ran it when the note says (``fastpeft[cpu]``)."""
    note = v.get("note") or ""
    i = note.find("(backend: ")
    if i < 0:
        return name
    return f"{name}[{note[i + 10:note.find(')', i)]}]"


def case_rows(c: dict) -> list[list[str]]:
    rows = []
    if c["status"] != "ok" and not c["variants"]:
        return [[c["name"], "-", c["status"].upper(), "", "", "", "", "", c.get("reason") or ""]]
    targets: dict[str, list[str]] = {}
    for t in c.get("targets", []):
        targets.setdefault(t["variant"], []).append(_target_text(t))
    first = True
    for name, v in c["variants"].items():
        label = c["name"] if first else ""
        first = False
        if v["status"] != "ok":
            rows.append([label, name, v["status"].upper(), "", "", "", "", "", v.get("reason") or ""])
            continue
        iqr = f"{fmt_time(v['q1_s'])}-{fmt_time(v['q3_s'])}"
        rows.append([label, variant_label(name, v), fmt_time(v["median_s"]), iqr, fmt_ratio(v.get("ratio_to_floor")),
                     fmt_ratio(v.get("ratio_to_baseline")), fmt_memory(v), fmt_throughput(v),
                     "; ".join(targets.get(name, []))])
    return rows


HEADER = ["case", "variant", "median", "IQR (q1-q3)", "×floor", "×base", "peak mem", "throughput", "targets / reason"]


def format_table(result: dict) -> str:
    rows = [r for c in result["cases"] for r in case_rows(c)]
    head = format_header(result)
    mem = ("peak mem: torch.cuda.max_memory_allocated" if result["device"]["type"] == "cuda"
           else "peak mem: +N = net bytes torch allocated during one call (torch.profiler allocation events)")
    mem += ("; training steps: the variant's own model + optimizer state + the step's peak extra "
            "(other variants' models in the process not counted)")
    return "\n".join([head, "", _render(rows, HEADER), "", RATIO_LEGEND, mem, format_counts(result)])


def format_header(result: dict) -> str:
    d, v = result["device"], result["versions"]
    ceil = result.get("ceilings") or {}
    c = ""
    if ceil:
        c = "  ceilings: " + ", ".join(x for x in (
            f"{ceil['tflops']:.3g} TFLOP/s" if ceil.get("tflops") else "",
            f"{ceil['gbs']:.3g} GB/s" if ceil.get("gbs") else "") if x)
    commit = (v.get("git_commit") or "?")[:10] + ("+dirty" if v.get("git_dirty") else "")
    return busy_warning(result) + (f"fastpeft bench ({result['suite']} suite) on {d['type']}: {d.get('name')}  [{result['date']}]\n"
            f"fastpeft {v['fastpeft']} ({commit})  torch {v['torch']}  triton {v.get('triton') or '-'}  "
            f"CUDA {v.get('cuda') or '-'}  peft {v.get('peft') or '-'}{c}{_env_note(result)}")


def _env_note(result: dict) -> str:
    """The fastpeft / Triton switches set for the run (older results have none)."""
    env = {k: v for k, v in (result.get("environment") or {}).items() if v}
    return ("\n" + "  ".join(f"{k}={v}" for k, v in env.items())) if env else ""


OTHERS_LOAD_LIMIT = 0.25      # cores kept busy by other processes during a CPU run before it is flagged


def busy_warning(result: dict) -> str:
    """A line warning that other work competed with a CPU run: other processes kept more than
    ``OTHERS_LOAD_LIMIT`` cores busy on average during it (``device.others_load``, measured from
    /proc/stat minus this process's CPU time). Where that was not measured (runs recorded before it
    existed, or no /proc/stat), the 1-minute load average at start and end above half the cores flags the
    run; it also counts the benchmark's own threads, so it flags every multi-threaded run."""
    d = result.get("device", {})
    if d.get("type") != "cpu":
        return ""
    n = d.get("cpu_count") or 1
    others = d.get("others_load")
    if others is not None:
        if others > OTHERS_LOAD_LIMIT:
            return (f"WARNING: other processes kept {others:.2f} of {n} cores busy during the run: "
                    "CPU timings are not representative\n")
        return ""
    loads = [x[0] for x in (d.get("loadavg_start"), d.get("loadavg_end")) if x]
    if loads and max(loads) > 0.5 * n + 0.5:
        return (f"WARNING: the machine was busy (load average {max(loads):.1f} on {n} cores): "
                "CPU timings are not representative\n")
    return ""


def format_counts(result: dict) -> str:
    st = [c["status"] for c in result["cases"]]
    tg = [t["passed"] for c in result["cases"] for t in c.get("targets", [])]
    return (f"{len(st)} cases: {st.count('ok')} ok, {st.count('skipped')} skipped, {st.count('failed')} failed; "
            f"targets: {tg.count(True)} pass, {tg.count(False)} fail, {tg.count(None)} not measured; "
            f"{result.get('elapsed_s', 0):.0f} s")


def format_summary(result: dict) -> str:
    """One row per case: fastpeft's time, its ratios, and the targets."""
    rows = []
    for c in result["cases"]:
        ours = [n for n in c.get("ours", []) if n in c["variants"]]
        v = c["variants"].get(ours[0]) if ours else None
        if c["status"] != "ok" or v is None or v["status"] != "ok":
            why = c.get("reason") or (v or {}).get("reason") or ""
            st = c["status"] if c["status"] != "ok" else (v or {}).get("status", "ok")
            if c["group"] == "ceiling" and c["status"] == "ok":
                vv = next(iter(c["variants"].values()))
                rows.append([c["name"], fmt_time(vv.get("median_s")), "", "", fmt_throughput(vv), ""])
                continue
            rows.append([c["name"], st.upper(), "", "", "", why[:100]])
            continue
        rows.append([c["name"], fmt_time(v["median_s"]), fmt_ratio(v.get("ratio_to_floor")),
                     fmt_ratio(v.get("ratio_to_baseline")), fmt_throughput(v),
                     "; ".join(_target_text(t) for t in c.get("targets", []))])
    return "\n".join([format_header(result), "", _render(rows, ["case", "fastpeft", "×floor", "×base", "throughput",
                                                                 "targets / reason"]), "", format_counts(result)])


# -- files ----------------------------------------------------------------------
def _clean(x):
    """JSON-safe: NaN/inf become null (strict JSON)."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict, path: str) -> None:
    data = json.dumps(_clean(result), indent=1, allow_nan=False, default=str).encode()
    atomic_write_bytes(path, data + b"\n")


def load_json(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("schema", "").split("/")[0] != "fastpeft-bench" or "cases" not in data:
        raise ValueError(f"{path}: not a fastpeft bench result (expected a JSON object with schema "
                         f"'fastpeft-bench/N' and 'cases')")
    return data


def chart_bars(result: dict) -> list[tuple[str, str, float, str]]:
    """(case, variant, ratio, against) for every measured variant with a floor or baseline."""
    bars = []
    for c in result["cases"]:
        for name, v in c["variants"].items():
            if v["status"] != "ok":
                continue
            if v.get("ratio_to_floor") is not None:
                bars.append((c["name"], name, v["ratio_to_floor"], "floor"))
            elif v.get("ratio_to_baseline") is not None:
                bars.append((c["name"], name, v["ratio_to_baseline"], "base"))
    return bars


def write_chart(result: dict, path: str) -> bool:
    """PNG of every variant's time ratio (to the floor, else to the baseline).
    Returns False (and writes nothing) when there is nothing to draw; raises
    :class:`fastpeft._optional.MissingExtra` without matplotlib."""
    import_extra("matplotlib", "fastpeft bench's chart (--no-plot skips it)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = chart_bars(result)
    if not bars:
        return False
    colors = {"fastpeft": "#1f77b4", "torch_ref": "#7f7f7f", "hf_peft": "#ff7f0e", "floor": "#2ca02c",
              "unfused": "#ff7f0e", "eager": "#ff7f0e", "torch_amp": "#ff7f0e", "fastpeft_accelerate": "#17becf"}
    fig = Figure(figsize=(10, 1.2 + 0.22 * len(bars)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(bars)))[::-1]
    ax.barh(ys, [b[2] for b in bars], color=[colors.get(b[1], "#9467bd") for b in bars])
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{b[0]}  [{b[1]} ×{b[3]}]" for b in bars], fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("median time ratio (lower is better; 1 = the floor, or the baseline when the case has no floor)")
    d = result["device"]
    ax.set_title(f"fastpeft bench ({result['suite']}) on {d.get('name')} - {result['date']}", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return True


# -- compare ---------------------------------------------------------------------
def compare(new: dict, old: dict) -> list[dict]:
    """Change per (case, variant) measured in both runs: ``change = new / old`` median."""
    old_idx = {(c["name"], n): v for c in old["cases"] for n, v in c.get("variants", {}).items()}
    rows = []
    for c in new["cases"]:
        for n, v in c.get("variants", {}).items():
            o = old_idx.get((c["name"], n))
            if not o or v.get("status") != "ok" or o.get("status") != "ok" or not o.get("median_s"):
                continue
            rows.append({"case": c["name"], "variant": n, "old_s": o["median_s"], "new_s": v["median_s"],
                         "change": v["median_s"] / o["median_s"], "ours": n in c.get("ours", [])})
    return rows


def format_compare(rows: list[dict], old_label: str) -> str:
    if not rows:
        return f"compare with {old_label}: no case measured in both runs"
    table = [[r["case"], r["variant"], fmt_time(r["old_s"]), fmt_time(r["new_s"]), f"{r['change']:.2f}×",
              f"{(r['change'] - 1) * 100:+.1f}%"] for r in rows]
    return f"compare with {old_label} (change = new / old median; > 1 is slower):\n" + _render(
        table, ["case", "variant", "old", "new", "change", ""])


def slower_than(rows: list[dict], factor: float) -> list[dict]:
    """fastpeft's own variants whose time grew by more than ``factor``."""
    return [r for r in rows if r["ours"] and r["change"] > factor]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpeft.bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="a JSON written by fastpeft bench")
    p.add_argument("--summary", action="store_true", help="one row per case")
    p.add_argument("--compare", metavar="OLD.json", help="print the change per case against an older run")
    a = p.parse_args(argv)
    res = load_json(a.result)
    print(format_summary(res) if a.summary else format_table(res))
    if a.compare:
        print()
        print(format_compare(compare(res, load_json(a.compare)), a.compare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
