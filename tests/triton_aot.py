"""Ahead-of-time compilation of every fastpeft Triton kernel for real NVIDIA GPUs, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic on CPU but not the GPU compiler:
it accepts code that ``triton.compile`` rejects (dtype mixes in ``tl.dot``, precision options, layouts)
and it never sees the autotune configs used on a GPU (the modules pick small tiles under the
interpreter). This script closes that gap without a GPU:

1. With ``TRITON_INTERPRET`` unset, ``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders,
   and each op's real Triton launcher (``fastpeft/ops/*/triton_kernel.py``) is called on CPU tensors
   for every dtype and variant it supports: nothing runs, every launch is recorded (kernel, argument
   types, constexprs, and for autotuned kernels every config left after the kernel's own pruning).
2. Each distinct launch is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))`` to a cubin, and its shared memory is checked against the architecture's per-block
   limit. An autotuned launch passes when every config compiles and at least one fits; a plain
   launch must fit.

Usage (a subprocess of tests/ops/test_triton_aot.py; runnable by hand)::

    env -u TRITON_INTERPRET python tests/triton_aot.py --arch 90 --arch 80 [--all-configs] [--json out.json]

Exit status 0 when everything compiled; the last line of stdout is a JSON summary.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _type_of(value) -> str | None:
    """Triton signature type of a runtime argument (None: the value is a constexpr)."""
    import torch
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


class Recorder:
    """Replaces the launch paths of Triton; ``launches`` collects one entry per launch."""

    def __init__(self):
        self.launches: list[dict] = []

    def _record(self, fn, args, kwargs, configs):
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        self.launches.append({"fn": fn, "bound": bound, "options": options, "configs": configs})

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        rec = self
        self._saved = (JITFunction.run, Autotuner.run)

        def jit_run(fn, *args, grid, warmup, **kwargs):
            rec._record(fn, args, kwargs, None)

        def tune_run(tuner, *args, **kwargs):
            kwargs.pop("grid", None)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            tuner.nargs = None
            fn = tuner.fn
            while not isinstance(fn, JITFunction):
                fn = fn.fn
            rec._record(fn, args, kwargs, list(configs))

        JITFunction.run, Autotuner.run = jit_run, tune_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        JITFunction.run, Autotuner.run = self._saved


def drive_all_ops() -> list[dict]:
    """Call every op's Triton launcher on CPU tensors for each supported dtype / variant."""
    import torch

    from fastpeft.ops.adv_perturb_update import triton_kernel as adv
    from fastpeft.ops.bottleneck_adapter import triton_kernel as ada
    from fastpeft.ops.grad_tail import triton_kernel as gt
    from fastpeft.ops.lora_linear import triton_kernel as lora
    from fastpeft.ops.scaled_add import triton_kernel as sa

    def t(*shape, dtype):
        return torch.zeros(*shape, dtype=dtype)

    acts = (torch.float32, torch.float16, torch.bfloat16)
    with Recorder() as rec:
        for dt in acts:
            sa.scaled_add_triton(t(37, dtype=dt), t(37, dtype=dt), 0.5)
        M, K, N = 40, 48, 56
        for dt, r, p, bias, pdt in itertools.product(acts, (1, 16, 64, 256), (0.0, 0.1), (False, True),
                                                     ("act", "fp32")):
            par = dt if pdt == "act" else torch.float32
            x, w = t(M, K, dtype=dt), t(N, K, dtype=dt)
            a, b = t(r, K, dtype=par), t(N, r, dtype=par)
            y, u0 = lora.lora_linear_fwd_triton(x, w, t(N, dtype=dt) if bias else None, a, b, 2.0, p, 7)
            lora.lora_linear_bwd_triton(t(M, N, dtype=dt), x, w, a, b, u0, 2.0, p, 7, [True] * 5)
        H, Bn = 48, 16
        for dt, act, p, residual, bias, wdt in itertools.product(acts, ("relu", "gelu", "silu"), (0.0, 0.1),
                                                                 (True, False), (True, False), ("act", "fp32")):
            par = dt if wdt == "act" else torch.float32
            x = t(M, H, dtype=dt)
            wd, wu = t(Bn, H, dtype=par), t(H, Bn, dtype=par)
            bd, bu = (t(Bn, dtype=par), t(H, dtype=par)) if bias else (None, None)
            y, h = ada.adapter_fwd_triton(x, wd, bd, wu, bu, act, p, 7, residual)
            for gh in (None, t(M, Bn, dtype=dt)):
                ada.adapter_bwd_triton(t(M, H, dtype=dt), gh, x, h, wd, bd, wu, bu, act, p, 7, residual,
                                       True, True, True)
        for max_norm in (None, 1.0):
            grads = [t(33, dtype=d) for d in acts]
            mult, _, _ = gt.grad_tail_stats_triton(grads, torch.ones(()), max_norm, 1e-6)
            gt.grad_tail_apply_triton(grads, mult)
        for dt, norm, masked in itertools.product(acts, tuple(adv.MODES), (False, True)):
            d, g = t(2, 5, 24, dtype=dt), t(2, 5, 24, dtype=dt)
            mask = torch.ones(2, 5) if masked else None
            adv.update_triton(d, g, mask, norm, 0.1, 1.0)
            for kind in ("uniform", "normal"):
                adv.init_triton(d, mask, kind, norm, 1.0, 7, 3)
    return rec.launches


def expected_kernels() -> set[str]:
    """Every ``@triton.jit`` function of the op modules that is launched with a grid (name ends in _kernel)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import glob
    import importlib

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastpeft", "ops")
    ops = sorted(os.path.basename(os.path.dirname(f)) for f in glob.glob(os.path.join(root, "*", "triton_kernel.py")))
    out = set()
    for op in ops:
        mod = importlib.import_module(f"fastpeft.ops.{op}.triton_kernel")
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, Autotuner)) and name.endswith("_kernel"):
                out.add(f"{mod.__name__}.{name}")
    return out


def _value(fn, p, bound):
    if p.name in bound:
        return bound[p.name]
    if p.has_default:
        return p.default
    raise TypeError(f"{fn.__name__}: no value for argument {p.name!r}")


def _key(fn, bound, options):
    """What makes two launches compile to different binaries: argument types, constexprs, options."""
    sig = []
    for p in fn.params:
        v = _value(fn, p, bound)
        sig.append((p.name, repr(v) if p.is_constexpr or v is None else _type_of(v)))
    return (fn.__module__, fn.__name__, tuple(sig), tuple(sorted(options.items())))


def compile_launch(fn, bound, options, arch):
    """Compile one launch for sm_<arch>; returns (shared bytes, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        v = _value(fn, p, bound)
        ty = None if p.is_constexpr else _type_of(v)
        if ty is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = v
        else:
            signature[p.name] = ty
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    if "cubin" not in kernel.asm:
        raise RuntimeError("no cubin produced")
    return int(kernel.metadata.shared), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every autotune config of every launch (default: every config of the first "
                         "launch of each autotuned kernel, the first config of the others)")
    ap.add_argument("--quick", action="store_true",
                    help="one launch per kernel and combination of argument dtypes, first config only "
                         "(what the normal test suite runs)")
    ap.add_argument("--json", help="write the per-launch results here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler this script checks")
    archs = args.arch or [90]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        ap.error(f"--arch: expected one of {sorted(SHARED_LIMIT)}, got {unknown}")

    launches = drive_all_ops()
    seen_kernels = {f"{e['fn'].__module__}.{e['fn'].__name__}" for e in launches}
    missing = sorted(expected_kernels() - seen_kernels)

    jobs, seen, swept, dtype_combos = [], set(), set(), set()
    for e in launches:
        fn = e["fn"]
        configs = e["configs"] or [None]
        name = f"{fn.__module__}.{fn.__name__}"
        if args.quick:
            combo = (name, tuple(sorted(str(v.dtype) for v in e["bound"].values() if hasattr(v, "dtype"))))
            if combo in dtype_combos:
                continue
            dtype_combos.add(combo)
            configs = configs[:1]
        elif e["configs"] and not args.all_configs and name in swept:
            configs = configs[:1]
        swept.add(name)
        group = []
        for c in configs:
            bound, options = dict(e["bound"]), dict(e["options"])
            if c is not None:
                bound.update(c.kwargs)
                options.update(num_warps=c.num_warps, num_stages=c.num_stages)
            k = _key(fn, bound, options)
            if k not in seen:
                seen.add(k)
                group.append((bound, options))
        if group:
            jobs.append((fn, name, e["configs"] is not None, group))

    results, failures = [], []
    t_start = time.perf_counter()
    for arch in archs:
        limit = SHARED_LIMIT[arch]
        for fn, name, tuned, group in jobs:
            fits = 0
            for bound, options in group:
                label = {k: v for k, v in bound.items() if not hasattr(v, "dtype")}
                dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in bound.items() if hasattr(v, "dtype")}
                try:
                    shared, secs = compile_launch(fn, bound, options, arch)
                except Exception as exc:  # noqa: BLE001 - reported and counted as a failure
                    failures.append(f"sm_{arch} {name} {options} {label} {dtypes}: "
                                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
                    continue
                ok = shared <= limit
                fits += ok
                results.append({"arch": arch, "kernel": name, "options": options, "shared": shared,
                                "fits": ok, "seconds": round(secs, 2),
                                "constexprs": {k: v for k, v in label.items() if isinstance(v, (bool, int, float, str))
                                               and k.isupper()},
                                "dtypes": sorted(set(dtypes.values()))})
                if not ok and not tuned:
                    failures.append(f"sm_{arch} {name} {options}: {shared} bytes of shared memory > {limit}")
            if tuned and group and not fits:
                failures.append(f"sm_{arch} {name}: no autotune config fits in {limit} bytes of shared memory")
    for m in missing:
        failures.append(f"{m}: never launched by the driver (add a case to drive_all_ops)")
    summary = {"archs": archs, "launches_recorded": len(launches), "compiled": len(results),
               "kernels": sorted(seen_kernels), "failures": failures,
               "seconds": round(time.perf_counter() - t_start, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)
    for f in failures:
        print("FAIL", f)
    print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
