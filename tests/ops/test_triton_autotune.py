"""Every autotuned Triton kernel that adds into one of its outputs in place (loads a pointer argument and
stores through it) restores that argument around the autotuner's timed runs (``restore_value``).

On a GPU with ``FASTPEFT_TRITON_AUTOTUNE`` at ``full`` (the default) or ``quick``, Triton's autotuner runs
every remaining config many times on the caller's own arguments the first time a shape key is seen; a
kernel computing ``c += a·b`` in place would then return ``c`` plus that product once per timed run.  The
CPU interpreter keeps one config and never benchmarks, so only a GPU run (with autotuning on) would show it;
this test reads the kernels' source instead.
"""
import ast
import importlib
import inspect
import textwrap

import pytest

pytest.importorskip("triton")

from fastpeft.ops import op_packages  # noqa: E402


def autotuned_kernels():
    from triton.runtime.autotuner import Autotuner
    out = []
    for pkg in op_packages():
        try:
            mod = importlib.import_module(f"fastpeft.ops.{pkg}.triton_kernel")
        except ModuleNotFoundError:
            continue
        out += [(f"{pkg}.{name}", obj) for name, obj in vars(mod).items() if isinstance(obj, Autotuner)]
    return out


def pointers_loaded_and_stored(src: str, params: list) -> set:
    """Pointer parameters (``*_ptr``) that the kernel both loads from and stores through, following local
    names assigned from expressions that mention them (``ptrs = c_ptr + ...; tl.load(ptrs); tl.store(ptrs)``)."""
    tree = ast.parse(textwrap.dedent(src))
    derived = {p: {p} for p in params if p.endswith("_ptr")}

    def mentions(node) -> set:
        found = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in derived:
                found |= derived[n.id]
        return found

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            ptrs = mentions(node.value)
            for t in node.targets:
                if isinstance(t, ast.Name) and ptrs:
                    derived[t.id] = derived.get(t.id, set()) | ptrs
    loaded, stored = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr == "load":
                loaded |= mentions(node.args[0])
            elif node.func.attr in ("store", "atomic_add"):
                stored |= mentions(node.args[0])
    return loaded & stored


def test_there_are_autotuned_kernels():
    names = [n for n, _ in autotuned_kernels()]
    assert "lora_linear._dx_lora_kernel" in names and len(names) >= 6, names


@pytest.mark.parametrize("name,kernel", autotuned_kernels(), ids=lambda v: v if isinstance(v, str) else "")
def test_in_place_outputs_are_restored_between_timed_runs(name, kernel):
    src = getattr(kernel.fn, "src", None) or inspect.getsource(kernel.fn.fn)  # JITFunction / interpreter's
    in_place = pointers_loaded_and_stored(src, list(kernel.arg_names))
    restored = set(kernel.restore_value or ())
    assert in_place <= restored, (f"{name} adds into {sorted(in_place)} in place but its @triton.autotune "
                                  f"restores only {sorted(restored)}: pass restore_value={sorted(in_place)}")


def test_the_check_sees_an_in_place_accumulation():
    src = '''
def k(a_ptr, c_ptr, n):
    ptrs = c_ptr + n
    c = tl.load(ptrs)
    tl.store(ptrs, c + tl.load(a_ptr))
'''
    assert pointers_loaded_and_stored(src, ["a_ptr", "c_ptr", "n"]) == {"c_ptr"}


# -- on a GPU (``-m gpu``): the first call of a new shape, with autotuning on, gives the right gradients ------
def _ops_on_cuda(op):
    import torch
    import fastpeft.ops as ops
    from fastpeft.ops.lora_linear_4bit import quantize_4bit_torch, Quant4bit
    from fastpeft.ops.lora_linear_8bit import quantize_8bit_torch
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 777, 333, 211, 7  # a shape key no other test uses: the autotuner benchmarks on this call
    x = torch.randn(M, K, generator=g).cuda().requires_grad_()
    A = (torch.randn(r, K, generator=g) / K ** 0.5).cuda().requires_grad_()
    B = (torch.randn(N, r, generator=g) / r ** 0.5).cuda().requires_grad_()
    W = torch.randn(N, K, generator=g) / K ** 0.5
    if op == "lora_linear":
        return (x, A, B), lambda: ops.lora_linear(x, W.cuda(), None, A, B, 2.0, 0.1, 99)
    if op == "lora_linear_4bit":
        q, absmax, code = quantize_4bit_torch(W, 64, "nf4")
        qs = Quant4bit(absmax.cuda(), code.cuda(), 64, (N, K))
        return (x, A, B), lambda: ops.lora_linear_4bit(x, q.cuda(), qs, None, A, B, 2.0, 0.1, 99)
    q8, s8 = quantize_8bit_torch(W)
    return (x, A, B), lambda: ops.lora_linear_8bit(x, q8.cuda(), s8.cuda(), None, A, B, 2.0, 0.1, 99)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_4bit", "lora_linear_8bit"])
def test_first_autotuned_call_matches_the_torch_backend(op, monkeypatch):
    import torch
    import fastpeft
    monkeypatch.setenv("FASTPEFT_TRITON_AUTOTUNE", "quick")  # 2 configs: the autotuner times both on this call
    leaves, call = _ops_on_cuda(op)
    results = {}
    for backend in ("triton", "torch"):
        with fastpeft.use_backend(backend, op=op):
            y = call()
        y.backward(torch.ones_like(y))
        results[backend] = [y.detach().clone()] + [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
    for name, got, want in zip(("y", "dx", "dA", "dB"), results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, atol=5e-2 * float(want.abs().max()), rtol=5e-2, msg=f"{op} {name}")
