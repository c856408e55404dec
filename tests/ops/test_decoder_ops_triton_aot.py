"""The Triton kernels of rms_norm, rope and swiglu/geglu compile for real GPUs, on a machine without one.

Each op's ``triton_kernel.aot_launches()`` calls its launchers on CPU tensors for every dtype and
variant; tests/triton_aot.py's recorder captures the launches instead of running them, and each is
compiled to a cubin with ``triton.compile`` and checked against the shared-memory limit.  (The shared
driver in tests/triton_aot.py does not call these ops yet; once it calls every op's ``aot_launches``,
this file is redundant.)  Normal suite: one launch per kernel and combination of argument dtypes,
sm_90; ``-m slow``: every distinct launch (block sizes, flags) for sm_80 and sm_90.
"""
import json
import textwrap

import pytest

from .test_triton_aot import ROOT, _need_nvidia_backend, _run, _summary

MODULES = ("fastpeft.ops.rms_norm.triton_kernel", "fastpeft.ops.rope.triton_kernel", "fastpeft.ops.glu.triton_kernel")

PROBE = textwrap.dedent('''
    import importlib, json, os, sys
    sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
    import triton_aot
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    mods = [importlib.import_module(m) for m in {modules!r}]
    with triton_aot.Recorder() as rec:
        for m in mods:
            m.aot_launches()
    expected = {{f"{{m.__name__}}.{{n}}" for m in mods for n, o in vars(m).items()
                if isinstance(o, (JITFunction, Autotuner)) and n.endswith("_kernel")}}
    seen, jobs, failures, compiled = set(), [], [], 0
    for e in rec.launches:
        fn = e["fn"]
        name = f"{{fn.__module__}}.{{fn.__name__}}"
        dtypes = tuple(sorted(str(v.dtype) for v in e["bound"].values() if hasattr(v, "dtype")))
        key = (name, dtypes) if {quick!r} else triton_aot._key(fn, e["bound"], e["options"])
        if key not in seen:
            seen.add(key)
            jobs.append((fn, name, e["bound"], e["options"], dtypes))
    for arch in {archs!r}:
        for fn, name, bound, options, dtypes in jobs:
            try:
                shared, _ = triton_aot.compile_launch(fn, bound, options, arch)
            except Exception as exc:
                failures.append(f"sm_{{arch}} {{name}} {{dtypes}}: {{type(exc).__name__}}: {{str(exc)[-300:]}}")
                continue
            compiled += 1
            if shared > triton_aot.SHARED_LIMIT[arch]:
                failures.append(f"sm_{{arch}} {{name}} {{dtypes}}: {{shared}} bytes of shared memory")
    launched = {{f"{{e['fn'].__module__}}.{{e['fn'].__name__}}" for e in rec.launches}}
    failures += [f"{{k}}: never launched by aot_launches()" for k in sorted(expected - launched)]
    print(json.dumps({{"kernels": sorted(launched), "compiled": compiled, "failures": failures}}))
''')


def _compile(quick: bool, archs, timeout):
    _need_nvidia_backend()
    out = _run(["-c", PROBE.format(root=ROOT, modules=MODULES, quick=quick, archs=list(archs))], timeout=timeout)
    s = _summary(out)
    assert out.returncode == 0 and not s["failures"], "\n".join(s["failures"]) + out.stderr[-2000:]
    return s


def test_decoder_op_kernels_compile_for_hopper():
    s = _compile(True, [90], timeout=1800)
    assert s["kernels"] and s["compiled"] >= len(s["kernels"]), json.dumps(s)


@pytest.mark.slow
def test_every_decoder_op_launch_compiles_for_ampere_and_hopper():
    _compile(False, [80, 90], timeout=7200)
