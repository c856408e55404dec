"""Device ceilings measured in the same run: a large matmul (FLOP/s) and a large
device copy (bytes/s).  Achieved TFLOP/s and GB/s of the other cases are shown
as a fraction of these."""
from __future__ import annotations

import torch

from . import Built, Case

GROUP = "ceiling"


def _matmul(n: int, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        return Built({"matmul": lambda: torch.mm(a, b, out=out)}, flops=2.0 * n ** 3,
                     notes={"matmul": f"{n}x{n} @ {n}x{n} {str(dtype).replace('torch.', '')}"})
    return build


def _copy(numel: int, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        src = torch.randn(numel, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        return Built({"copy": lambda: dst.copy_(src)}, bytes=2.0 * numel * src.element_size(),
                     notes={"copy": f"{numel * src.element_size() / 2**20:.0f} MiB device copy (read + write)"})
    return build


def cases(suite: str, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        n, numel, dt = (8192, 2 ** 29, torch.bfloat16) if suite != "smoke" else (1024, 2 ** 22, torch.bfloat16)
    else:
        n, numel, dt = (1024, 2 ** 24, torch.float32) if suite != "smoke" else (128, 2 ** 16, torch.float32)
    return [Case(f"{GROUP}/matmul_{n}", GROUP, _matmul(n, dt), {"n": n, "dtype": str(dt)}, ours=()),
            Case(f"{GROUP}/copy_{numel}", GROUP, _copy(numel, dt), {"numel": numel, "dtype": str(dt)}, ours=())]
