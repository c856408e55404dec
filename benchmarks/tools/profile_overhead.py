"""Where the time of one fused-op call goes (host vs device), for the ops whose GPU timings looked
launch-bound in the first H200 run (lora_linear, bottleneck_adapter): wall time per call with and without
a synchronize, cProfile's top host functions, torch.profiler's CPU/CUDA self times, and the cost of one
bare Triton launch for scale.

    python benchmarks/tools/profile_overhead.py [--device cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, n=50):
    for _ in range(5):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    _sync(dev)
    total = (time.perf_counter() - t) / n
    return host, total


def cases(dev, small=False):
    import fastpeft
    from fastpeft.ops import bottleneck_adapter, lora_linear
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = {}
    shapes = ((64, 32, 32, 4),) if small else ((2048, 1024, 1024, 16), (8192, 4096, 4096, 16))
    for M, K, N, r in shapes:
        x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        A = (torch.randn(r, K, device=dev) / K ** 0.5).requires_grad_()
        B = (torch.randn(N, r, device=dev) / r).requires_grad_()
        gy = torch.randn(M, N, device=dev, dtype=dt)

        def fwd(p=0.1, x=x, w=w, A=A, B=B):
            return lora_linear(x, w, None, A, B, 2.0, dropout_p=p)

        def step(p=0.1, fwd=fwd, gy=gy):
            torch.autograd.backward(fwd(p), gy)

        out[f"lora_linear fwd M{M} K{K} r{r} p0.1"] = lambda f=fwd: f()
        out[f"lora_linear fwd+bwd M{M} K{K} r{r} p0.1"] = step
        out[f"lora_linear fwd+bwd M{M} K{K} r{r} p0"] = lambda s=step: s(0.0)
        out[f"F.linear fwd+bwd M{M} K{K}"] = lambda x=x, w=w, gy=gy: torch.autograd.backward(
            torch.nn.functional.linear(x, w), gy)
    H, b = (32, 8) if small else (1024, 64)
    x = torch.randn(64 if small else 2048, H, device=dev, dtype=dt, requires_grad=True)
    ps = [torch.randn(b, H, device=dev, dtype=dt) * 0.02, torch.zeros(b, device=dev, dtype=dt),
          torch.randn(H, b, device=dev, dtype=dt) * 0.02, torch.zeros(H, device=dev, dtype=dt)]
    ps = [p.requires_grad_() for p in ps]
    gy = torch.randn(x.shape, device=dev, dtype=dt)
    out["bottleneck fwd+bwd M2048 H1024 b64 p0.1"] = lambda: torch.autograd.backward(
        bottleneck_adapter(x, *ps, activation="gelu", dropout_p=0.1), gy)
    return out


def bare_triton(dev):
    if dev.type != "cuda":
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x = torch.zeros(1024, device=dev)
    return lambda: _k[(1,)](x, 1024, BLOCK=1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=".")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU check that the script runs)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    os.makedirs(a.out, exist_ok=True)
    report = []
    cs = cases(dev, a.small)
    bt = bare_triton(dev)
    if bt is not None:
        cs["bare triton launch (1 block)"] = bt
    for name, fn in cs.items():
        host, total = timed(fn, dev)
        report.append(f"{name:45s} host {host * 1e6:9.1f} us/call   with sync {total * 1e6:9.1f} us/call")
        print(report[-1], flush=True)
    for name in [n for n in cs if "fwd+bwd" in n and ("M2048" in n or "M64 " in n)]:
        fn = cs[name]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        _sync(dev)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
        report.append(f"\n==== cProfile (20 calls) {name}\n" + s.getvalue())
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(10):
                fn()
            _sync(dev)
        report.append(f"\n==== torch.profiler (10 calls) {name}\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    text = "\n".join(report)
    with open(os.path.join(a.out, f"profile_overhead_{dev.type}.txt"), "w") as f:
        f.write(text)
    print("wrote", os.path.join(a.out, f"profile_overhead_{dev.type}.txt"))


if __name__ == "__main__":
    sys.exit(main())
