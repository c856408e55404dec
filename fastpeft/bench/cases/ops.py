"""Op-level cases: each fused op against its torch reference, HF PEFT's (or the
unfused module's) equivalent, and the floor.

Every variant is one forward+backward (or one update) on the same inputs.  A
missing op, a missing ``peft`` or a backend that cannot run here turns into a
skipped case or variant with the reason (see :class:`fastpeft.bench.cases.Skip`).

Shapes per suite and device follow issues 3 and 5:

* ``lora_linear``: CPU fp32 M=2048, K=N ∈ {512, 1024}, r ∈ {8, 16, 64}, dropout ∈ {0, 0.1}
  (quick: K=N=1024, r=16); GPU bf16 M ∈ {2048, 8192}, K=N ∈ {1024, 4096}, same r and
  dropout (quick: M=8192, K=N=4096, r=16).  Floor: the frozen ``nn.Linear`` alone,
  forward + backward to x.
* ``bottleneck_adapter``: fused vs torch reference vs an unfused ``nn.Module`` adapter.
* ``grad_tail``: fused vs ``unscale_`` + ``clip_grad_norm_`` (what ``GradScaler`` +
  clipping run) on 500 small tensors and on the LoRA parameters (r=16, all linear
  layers) of a Llama-7B-like model (scaled down on CPU); floor: one ``_foreach_norm``
  read pass.  Kernel launches are counted.
* ``adv_perturb_update``: fused vs the eager FreeLB sequence vs a memory floor moving
  the same bytes (3N, or 5N for per-example L2).
"""
from __future__ import annotations

import importlib
import math

import torch

from . import Built, Case, Skip, Target

ISSUE3, ISSUE5 = "issue 3", "issue 5"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def require(module: str, attr: str | None = None):
    """Import ``module`` (and get ``attr``) or raise :class:`Skip` saying what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} is not available ({e})") from None
    if attr is None:
        return mod
    if not hasattr(mod, attr):
        raise Skip(f"{module}.{attr} is not available (not implemented yet?)")
    return getattr(mod, attr)


def selected_backend(op_name: str, *args) -> str:
    from ... import backends

    try:
        return backends.get_op(op_name).select(*args).backend
    except Exception as e:  # noqa: BLE001
        return f"? ({type(e).__name__})"


def _zero(*ts):
    for t in ts:
        t.grad = None


def _torch_backend(op: str):
    from ...backends import use_backend

    return use_backend("torch", op=op)


# -- lora_linear ------------------------------------------------------------
def lora_linear_build(M: int, K: int, N: int, r: int, p: float, dtype: torch.dtype, alpha: float | None = None):
    alpha = 2.0 * r if alpha is None else alpha

    def build(device: torch.device) -> Built:
        lora_linear = require("fastpeft.ops", "lora_linear")
        g = torch.Generator(device="cpu").manual_seed(0)
        f32 = dict(dtype=torch.float32)
        x = torch.randn(M, K, generator=g, **f32).to(device, dtype).requires_grad_()
        W = (torch.randn(N, K, generator=g, **f32) / math.sqrt(K)).to(device, dtype)
        b = (torch.randn(N, generator=g, **f32) * 0.1).to(device, dtype)
        A = (torch.randn(r, K, generator=g, **f32) / math.sqrt(K)).to(device, dtype).requires_grad_()
        B = (torch.randn(N, r, generator=g, **f32) * 0.01).to(device, dtype).requires_grad_()
        gy = torch.randn(M, N, generator=g, **f32).to(device, dtype)
        scale = alpha / r

        def fused():
            lora_linear(x, W, b, A, B, scale, p).backward(gy)
            _zero(x, A, B)

        def reference():
            with _torch_backend("lora_linear"):
                lora_linear(x, W, b, A, B, scale, p).backward(gy)
            _zero(x, A, B)

        base = torch.nn.Linear(K, N, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
        base.requires_grad_(False)

        def floor():
            base(x).backward(gy)
            _zero(x)

        variants = {"fastpeft": fused, "torch_ref": reference}
        skipped, notes = {}, {
            "fastpeft": f"fastpeft.ops.lora_linear (backend: {selected_backend('lora_linear', x, W, b, A, B, scale, p, 0)})",
            "torch_ref": "fastpeft.ops.lora_linear under use_backend('torch')",
            "floor": "frozen nn.Linear alone, forward + backward to x",
        }
        try:
            from peft import LoraConfig
            from peft.tuners.lora.layer import Linear as PeftLoraLinear

            hf_base = torch.nn.Linear(K, N, device=device, dtype=dtype)
            with torch.no_grad():
                hf_base.weight.copy_(W)
                hf_base.bias.copy_(b)
            cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
            layer = PeftLoraLinear(hf_base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=p)
            layer.to(device=device, dtype=dtype)
            layer.requires_grad_(False)
            la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                la.copy_(A)
                lb.copy_(B)
            la.requires_grad_(True)
            lb.requires_grad_(True)
            layer.train()

            def hf():
                layer(x).backward(gy)
                _zero(x, la, lb)

            variants["hf_peft"] = hf
            notes["hf_peft"] = "peft.tuners.lora.Linear on the same nn.Linear weights"
        except ImportError as e:
            skipped["hf_peft"] = f"peft is not installed ({e})"
        variants["floor"] = floor
        flops = 4.0 * M * K * N + 6.0 * M * r * (K + N)
        return Built(variants, floor="floor", baseline="hf_peft", flops=flops, skipped=skipped, notes=notes)

    return build


def _lora_targets(device, M, K, N, r, p, dtype) -> list[Target]:
    t = []
    if device.type == "cpu" and (M, K, N, r, dtype) == (2048, 1024, 1024, 16, torch.float32):
        lim = 1.10 if p == 0 else 1.15
        t.append(Target(f"≤{lim:.2f}×floor", "fastpeft", "floor", lim, source=ISSUE3))
        if p > 0:
            t.append(Target("≥1.4× faster than HF", "fastpeft", "hf_peft", 1 / 1.4, source=ISSUE3))
    if device.type == "cuda" and (M, K, N, r, dtype) == (8192, 4096, 4096, 16, torch.bfloat16):
        lim = 1.05 if p == 0 else 1.08
        t.append(Target(f"≤{lim:.2f}×floor", "fastpeft", "floor", lim, source=ISSUE3))
        t.append(Target("mem ≤ floor + M×r", "fastpeft", "floor", 1.0, metric="memory",
                        slack=M * r * torch.finfo(dtype).bits / 8, source=ISSUE3))
    return t


def lora_linear_cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        grid, dtype = [(64, 32, 32, 4)], torch.float32
    elif device.type == "cuda":
        dtype = torch.bfloat16
        grid = [(8192, 4096, 4096, 16)] if suite == "quick" else \
            [(M, K, K, r) for M in (2048, 8192) for K in (1024, 4096) for r in (8, 16, 64)]
    else:
        dtype = torch.float32
        grid = [(2048, 1024, 1024, 16)] if suite == "quick" else \
            [(2048, K, K, r) for K in (512, 1024) for r in (8, 16, 64)]
    out = []
    for M, K, N, r in grid:
        for p in (0.0, 0.1):
            params = {"M": M, "K": K, "N": N, "r": r, "dropout": p, "dtype": _dtype_name(dtype)}
            out.append(Case(f"lora_linear/M{M}_K{K}_N{N}_r{r}_p{p:g}_{_dtype_name(dtype)}", "lora_linear",
                            lora_linear_build(M, K, N, r, p, dtype), params,
                            _lora_targets(device, M, K, N, r, p, dtype)))
    return out


# -- bottleneck_adapter -----------------------------------------------------
def bottleneck_adapter_build(M: int, H: int, Bn: int, act: str, p: float, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        adapter = require("fastpeft.ops", "bottleneck_adapter")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(M, H, generator=g).to(device, dtype).requires_grad_()
        Wd = (torch.randn(Bn, H, generator=g) / math.sqrt(H)).to(device, dtype).requires_grad_()
        bd = torch.zeros(Bn).to(device, dtype).requires_grad_()
        Wu = (torch.randn(H, Bn, generator=g) * 0.01).to(device, dtype).requires_grad_()
        bu = torch.zeros(H).to(device, dtype).requires_grad_()
        gy = torch.randn(M, H, generator=g).to(device, dtype)
        params = (x, Wd, bd, Wu, bu)

        def fused():
            adapter(x, Wd, bd, Wu, bu, act, p, None, True).backward(gy)
            _zero(*params)

        def reference():
            with _torch_backend("bottleneck_adapter"):
                adapter(x, Wd, bd, Wu, bu, act, p, None, True).backward(gy)
            _zero(*params)

        acts = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh"),
                "silu": torch.nn.SiLU()}
        down = torch.nn.Linear(H, Bn, device=device, dtype=dtype)
        up = torch.nn.Linear(Bn, H, device=device, dtype=dtype)
        with torch.no_grad():
            down.weight.copy_(Wd)
            down.bias.copy_(bd)
            up.weight.copy_(Wu)
            up.bias.copy_(bu)
        drop, a = torch.nn.Dropout(p), acts[act]
        mods = (down, up)

        def unfused():
            (x + up(drop(a(down(x))))).backward(gy)
            _zero(x, *[q for m in mods for q in m.parameters()])

        notes = {"fastpeft": "fastpeft.ops.bottleneck_adapter (backend: "
                             f"{selected_backend('bottleneck_adapter', x, Wd, bd, Wu, bu, act, p, 0, True)})",
                 "torch_ref": "fastpeft.ops.bottleneck_adapter under use_backend('torch')",
                 "unfused": "nn.Linear -> activation -> nn.Dropout -> nn.Linear + residual"}
        flops = 2.0 * M * H * Bn * 2 * 3  # two GEMMs, forward + two backward GEMMs each
        return Built({"fastpeft": fused, "torch_ref": reference, "unfused": unfused}, baseline="unfused",
                     flops=flops, notes=notes)

    return build


def bottleneck_adapter_cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        grid, dtype, ps = [(64, 32, 8)], torch.float32, (0.1,)
    elif device.type == "cuda":
        dtype, ps = torch.bfloat16, (0.0, 0.1)
        grid = [(8192, 4096, 64)] if suite == "quick" else [(8192, 4096, 64), (8192, 4096, 256), (2048, 1024, 64)]
    else:
        dtype = torch.float32
        grid, ps = ([(2048, 1024, 64)], (0.1,)) if suite == "quick" else ([(2048, 768, 64), (2048, 1024, 64)], (0.0, 0.1))
    out = []
    for M, H, Bn in grid:
        for p in ps:
            params = {"M": M, "H": H, "bottleneck": Bn, "activation": "gelu", "dropout": p, "dtype": _dtype_name(dtype)}
            out.append(Case(f"bottleneck_adapter/M{M}_H{H}_b{Bn}_gelu_p{p:g}_{_dtype_name(dtype)}", "bottleneck_adapter",
                            bottleneck_adapter_build(M, H, Bn, "gelu", p, dtype), params))
    return out


# -- grad_tail --------------------------------------------------------------
def _llama_lora_shapes(layers: int, hidden: int, inter: int, r: int) -> list[tuple[int, ...]]:
    shapes = []
    for _ in range(layers):
        for k, n in [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]:
            shapes += [(r, k), (n, r)]
    return shapes


def _small_shapes(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(int(s),) for s in torch.randint(16, 8192, (n,), generator=g)]


def grad_tail_build(shapes: list[tuple[int, ...]], dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        fn = require("fastpeft.ops", "grad_tail_")
        g = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=dtype)) for s in shapes]
        for q in params:
            q.grad = (torch.randn(q.shape, generator=g) * 1e-3).to(device, dtype)
        grads = [q.grad for q in params]
        found_inf = torch.zeros(1, device=device)
        inv = torch.ones(1, device=device)
        # Clipping is active (max_norm = half the initial norm): the first call clips to
        # max_norm, later ones multiply by max_norm / (norm + 1e-6), just under 1, so every
        # call reads and writes every gradient and the values stay put over thousands of calls.
        max_norm = 0.5 * float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

        def fused():
            fn(grads, inv_scale=1.0, max_norm=max_norm)

        def torch_amp():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
            torch.nn.utils.clip_grad_norm_(params, max_norm)

        def floor():
            torch._foreach_norm(grads)

        numel = sum(math.prod(s) for s in shapes)
        esize = torch.finfo(dtype).bits // 8
        return Built({"fastpeft": fused, "torch_amp": torch_amp, "floor": floor},
                     floor="floor", baseline="torch_amp", bytes=float(numel * esize), launches=True,
                     notes={"fastpeft": "fastpeft.ops.grad_tail_ (norm + overflow check, then in-place unscale+clip) "
                                        f"(backend: {selected_backend('grad_tail', grads, inv.reshape(()), max_norm, 2.0, 1e-6)})",
                            "torch_amp": "GradScaler.unscale_ (_amp_foreach_non_finite_check_and_unscale_) "
                                         "+ clip_grad_norm_",
                            "floor": "torch._foreach_norm: one read pass (GB/s counts one read of every gradient)"},
                     extra={"tensors": len(shapes), "numel": numel})

    return build


def grad_tail_cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        sets = {"small20": _small_shapes(20)}
    else:
        llama = _llama_lora_shapes(32, 4096, 11008, 16) if device.type == "cuda" else _llama_lora_shapes(8, 1024, 2752, 16)
        sets = {"small500": _small_shapes(500),
                ("llama7b_lora_r16" if device.type == "cuda" else "llama_lora_r16_scaled"): llama}
    out = []
    for name, shapes in sets.items():
        out.append(Case(f"grad_tail/{name}_fp32", "grad_tail", grad_tail_build(shapes, torch.float32),
                        {"set": name, "tensors": len(shapes), "numel": sum(math.prod(s) for s in shapes),
                         "dtype": "float32"}))
    return out


# -- adv_perturb_update -----------------------------------------------------
def adv_perturb_build(B: int, L: int, H: int, norm: str, dtype: torch.dtype):
    def build(device: torch.device) -> Built:
        fn = require("fastpeft.ops", "adv_perturb_update")
        eager = require("fastpeft.ops.adv_perturb_update.reference", "freelb_eager_update")
        g = torch.Generator(device="cpu").manual_seed(0)
        delta = (torch.randn(B, L, H, generator=g) * 1e-3).to(device, dtype)
        grad = torch.randn(B, L, H, generator=g).to(device, dtype)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[B // 2:, (L * 3) // 4:] = 0        # padding at the end of half the examples
        mask = mask.to(device)
        d_fused, d_eager = delta.clone(), delta.clone()
        scratch = torch.empty_like(delta)
        step, eps = 1e-2, 0.1

        def fused():
            fn(d_fused, grad, norm=norm, step_size=step, epsilon=eps, mask=mask)

        def reference():
            eager(d_eager, grad, mask, norm, step, eps)

        if norm == "l2_example":
            def floor():
                torch.linalg.vector_norm(grad.view(B, -1), dim=1)
                torch.linalg.vector_norm(delta.view(B, -1), dim=1)
                torch.add(delta, grad, out=scratch)
            passes, fl_note = 5, "two norm reductions + one add: 5N bytes"
        else:
            def floor():
                torch.add(delta, grad, out=scratch)
            passes, fl_note = 3, "one add (read 2N, write N): 3N bytes"
        esize = torch.finfo(dtype).bits // 8
        return Built({"fastpeft": fused, "eager": reference, "floor": floor}, floor="floor", baseline="eager",
                     bytes=float(passes * B * L * H * esize),
                     notes={"fastpeft": "fastpeft.ops.adv_perturb_update (in place)",
                            "eager": "eager FreeLB sequence (reference.freelb_eager_update)", "floor": fl_note})

    return build


def adv_perturb_cases(suite: str, device: torch.device) -> list[Case]:
    if suite == "smoke":
        shape, dtype, norms = (2, 8, 16), torch.float32, ("l2_example",)
    elif device.type == "cuda":
        shape, dtype = (32, 512, 4096), torch.bfloat16
        norms = ("l2_example", "linf") if suite == "quick" else ("linf", "l2_token", "l2_example")
    else:
        shape, dtype = (16, 128, 768), torch.float32
        norms = ("l2_example", "linf") if suite == "quick" else ("linf", "l2_token", "l2_example")
    B, L, H = shape
    out = []
    for norm in norms:
        targets = [Target("≥3× faster than eager", "fastpeft", "eager", 1 / 3, source=ISSUE5)]
        if device.type == "cuda":
            targets.append(Target("≤1.3×floor", "fastpeft", "floor", 1.3, source=ISSUE5))
        if suite == "smoke":
            targets = []
        out.append(Case(f"adv_perturb_update/{norm}_B{B}_L{L}_H{H}_{_dtype_name(dtype)}", "adv_perturb_update",
                        adv_perturb_build(B, L, H, norm, dtype),
                        {"B": B, "L": L, "H": H, "norm": norm, "dtype": _dtype_name(dtype)}, targets))
    return out


def cases(suite: str, device: torch.device) -> list[Case]:
    return (lora_linear_cases(suite, device) + bottleneck_adapter_cases(suite, device)
            + grad_tail_cases(suite, device) + adv_perturb_cases(suite, device))
