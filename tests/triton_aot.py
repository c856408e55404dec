"""Ahead-of-time compilation of every fastpeft Triton kernel for real NVIDIA GPUs, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic on CPU but not the GPU compiler:
it accepts code that ``triton.compile`` rejects (dtype mixes in ``tl.dot``, precision options, layouts)
and it never sees the autotune configs used on a GPU (the modules pick small tiles under the
interpreter). This script closes that gap without a GPU:

1. With ``TRITON_INTERPRET`` unset, ``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders,
   and every op package's ``triton_kernel.aot_launches()`` (``fastpeft/ops/*/triton_kernel.py``) calls
   its real launchers on CPU tensors for every dtype and variant they support: nothing runs, every
   launch is recorded (kernel, argument types, constexprs, and for autotuned kernels every config left
   after the kernel's own pruning). A ``*_kernel`` never launched, or a kernel module without
   ``aot_launches``, is a failure.
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


def triton_modules() -> list:
    """The ``triton_kernel`` module of every op package that has one (imported: needs Triton)."""
    import importlib
    import importlib.util

    from fastpeft.ops import op_packages

    names = [f"fastpeft.ops.{p}.triton_kernel" for p in op_packages()]
    return [importlib.import_module(n) for n in names if importlib.util.find_spec(n) is not None]


def drive_all_ops() -> tuple[list[dict], list[str]]:
    """Call every op's ``triton_kernel.aot_launches()`` (its launchers on CPU tensors, for each
    supported dtype / variant) under the recorder: (launches, modules without ``aot_launches``)."""
    missing = []
    with Recorder() as rec:
        for mod in triton_modules():
            if callable(getattr(mod, "aot_launches", None)):
                mod.aot_launches()
            else:
                missing.append(mod.__name__)
    return rec.launches, missing


def expected_kernels() -> set[str]:
    """Every ``@triton.jit`` function of the op modules that is launched with a grid (name ends in _kernel)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return {f"{mod.__name__}.{name}" for mod in triton_modules() for name, obj in vars(mod).items()
            if isinstance(obj, (JITFunction, Autotuner)) and name.endswith("_kernel")}


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

    launches, no_driver = drive_all_ops()
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
    for m in no_driver:
        failures.append(f"{m}: has no aot_launches() (the launches to compile for GPUs)")
    for m in missing:
        failures.append(f"{m}: never launched (add a call to aot_launches() in its module)")
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
