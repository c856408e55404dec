"""swiglu / geglu against their float64 references on every backend, and against transformers' MLP.

Covers forward, dgate and dup for silu, gelu (tanh) and gelu (erf), every dtype, odd/1-D/3-D/empty
shapes, strided inputs (the two halves of a fused gate_up projection), large |gate| (the tails of
the activations), gradients only where asked, what is saved (no activation), transformers'
``act_fn(gate) * up`` with ACT2FN's activations bit for bit (nearly), opcheck,
torch.compile(fullgraph=True), errors, the C++ unit test, GPU cases (``-m gpu``).
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import geglu, swiglu
from fastpeft.ops.glu import geglu_reference, swiglu_reference

from ..helpers import assert_close, check_scaled, run_cpp_unit_test, runnable_backends
from .decoder_op_checks import agreement_with, assert_nearly_same_bits, bit_exact_skip, compiled_ops, dtype_skip

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731
# name: (public call, reference, registry op, ACT2FN name)
ACTS = {
    "silu": (lambda g, u: swiglu(g, u), swiglu_reference, "swiglu", "silu"),
    "gelu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh"), "geglu",
                  "gelu_pytorch_tanh"),
    "gelu": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none"), "geglu", "gelu"),
}
BACKENDS = runnable_backends("swiglu")
assert [p.id for p in BACKENDS] == [p.id for p in runnable_backends("geglu")]


def run(backend, act, gate, up, gy):
    call, _, op, _ = ACTS[act]
    with fastpeft.use_backend(backend, op=op):
        y = call(gate, up)
    leaves = [t for t in (gate, up) if t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, gy)) if leaves else iter(())
    return y, [next(grads) if t.requires_grad else None for t in (gate, up)]


def check(backend, act, gate, up, scale=2.0):
    gy = torch.randn(gate.shape, device=gate.device).to(gate.dtype)
    y, grads = run(backend, act, gate, up, gy)
    leaves = [t.detach().double().requires_grad_() for t in (gate, up)]
    y64 = ACTS[act][1](*leaves)
    grads64 = torch.autograd.grad(y64, leaves, gy.double())
    assert y.shape == gate.shape and y.dtype == gate.dtype
    assert y.is_contiguous() or backend == "torch"  # the reference follows PyTorch's layout rules
    check_scaled(y, y64, gate.dtype, f"{backend} {act} y", scale=scale)
    for name, g, g64 in zip(("dgate", "dup"), grads, grads64):
        assert g.dtype == gate.dtype and g.shape == gate.shape
        check_scaled(g, g64, gate.dtype, f"{backend} {act} {name}", scale=scale)


def pair(shape, dtype=f32, spread=3.0, device="cpu"):
    gate = (torch.randn(shape, device=device) * spread).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    return gate, up


# -- numerics ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [f32, bf16, f16, f64], ids=IDS)
def test_matches_float64(backend, act, dtype):
    dtype_skip(backend, dtype)
    check(backend, act, *pair((3, 5, 37), dtype))


CASES = {
    "1d": lambda: pair((29,)),
    "one_column": lambda: pair((7, 1)),
    "prime_rows": lambda: pair((13, 31)),
    "empty": lambda: pair((0, 16)),
    "empty_columns": lambda: pair((4, 0)),
    "tails": lambda: pair((6, 50), spread=30.0),          # |gate| up to ~100: exp over/underflow paths
    "wide": lambda: pair((2, 3000)),                       # several Triton column blocks
    "many_rows_threaded": lambda: pair((700, 64)),         # above the C++ OpenMP threshold (16384)
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", list(CASES))
def test_shapes(backend, act, case):
    if case in ("many_rows_threaded", "wide") and backend == "triton" and fastpeft._triton.interpreter_on():
        pytest.skip("sized for the C++ kernels; slow in the Triton interpreter")
    check(backend, act, *CASES[case]())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_fused_gate_up_halves_and_transposed_inputs(backend, act):
    """Phi-3's gate_up_proj(x).chunk(2, -1): row-strided halves read in place; and a transposed pair."""
    gate_up = (torch.randn(4, 6, 2 * 24) * 2).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    check(backend, act, gate, up)
    gate_t = torch.randn(24, 10).t().requires_grad_()
    up_t = torch.randn(10, 2 * 24)[:, ::2].requires_grad_()
    check(backend, act, gate_t, up_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    gate, up = torch.randn(5, 12), torch.randn(5, 12, requires_grad=True)
    with fastpeft.use_backend(backend, op="swiglu"):
        swiglu(gate, up).sum().backward()
    assert gate.grad is None
    torch.testing.assert_close(up.grad, torch.nn.functional.silu(gate), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "torch"])
def test_saves_only_gate_and_up(backend):
    gate, up = pair((16, 40))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastpeft.use_backend(backend, op="geglu"):
            y = geglu(gate, up)
    y.sum().backward()
    assert {t.untyped_storage().data_ptr() for t in saved} <= {gate.untyped_storage().data_ptr(),
                                                                up.untyped_storage().data_ptr()}


# -- transformers: act_fn(gate) * up with ACT2FN ----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [bf16, f16, f32], ids=IDS)
def test_drop_in_gives_transformers_numbers(backend, act, dtype):
    """The activation rounded to the input dtype before the product, as the unfused MLP does, with
    PyTorch's formulas: bf16/fp16 results are transformers' bits except where the float32 activations'
    last bits (libm approximations differ) straddle a rounding boundary."""
    dtype_skip(backend, dtype)
    bit_exact_skip(backend, dtype)
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    call, reference, op, hf_name = ACTS[act]
    gate, up = pair((64, 256), dtype, spread=1.0)
    want = ACT2FN[hf_name](gate) * up
    with fastpeft.use_backend(backend, op=op):
        got = call(gate, up)
    g = torch.randn(want.shape).to(dtype)
    for name, a, b in zip(("y", "dgate", "dup"), [got, *torch.autograd.grad(got, (gate, up), g)],
                          [want, *torch.autograd.grad(want, (gate, up), g)]):
        # a one-ulp difference in the rounded activation is |up| ulps of the activation in y: ulps=4
        assert_nearly_same_bits(a, b, f"{backend} {act} {name}", min_same=0.99 if dtype != f32 else 0.0, ulps=4)
    if dtype != f32:  # the test can fail: rounding once (no rounded activation) agrees measurably less
        once = reference(gate.detach().float(), up.detach().float()).to(dtype)
        assert agreement_with(once, want)[0] < agreement_with(got, want)[0] - 0.01


# -- registration: opcheck, torch.compile -----------------------------------------------
@pytest.mark.parametrize("prefix", ["glu", "glu_triton"])
@pytest.mark.parametrize("act", list(ACTS))
def test_opcheck(prefix, act):
    fwd, bwd = compiled_ops(f"{prefix}_fwd", f"{prefix}_bwd")
    gate, up = pair((3, 2, 9))
    opcheck(fwd.default, (gate, up, act))
    opcheck(fwd.default, (gate.detach()[:, 0], up.detach()[:, 1], act))
    opcheck(bwd.default, (torch.randn(3, 2, 9), gate.detach(), up.detach(), act))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTS))
def test_torch_compile_fullgraph(backend, act):
    call, ref, op, _ = ACTS[act]
    gate, up = pair((4, 33))
    with fastpeft.use_backend(backend, op=op):
        call(gate, up)  # availability probes run eagerly first
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op=op):
        loss = torch.compile(lambda g, u: call(g, u).square().sum(), fullgraph=True)(gate, up)
    grads = torch.autograd.grad(loss, (gate, up))
    leaves = [t.detach().double().requires_grad_() for t in (gate, up)]
    want = ref(*leaves).square().sum()
    for name, g, w in zip(("dgate", "dup"), grads, torch.autograd.grad(want, leaves)):
        assert_close(g, w, f32, f"compiled {name}", scale=20)


# -- errors -----------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"up: expected shape \(3, 8\)"):
        swiglu(gate, torch.randn(3, 9))
    with pytest.raises(TypeError, match="up: expected dtype"):
        swiglu(gate, up.double())
    with pytest.raises(TypeError, match="gate: expected dtype"):
        geglu(gate.long(), up.long())
    with pytest.raises(TypeError, match="up: expected a torch.Tensor"):
        swiglu(gate, 1.0)
    with pytest.raises(ValueError, match="gate: expected a tensor"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="up: expected a tensor on cpu"):
        geglu(gate, torch.randn(3, 8, device="meta"))
    with pytest.raises(ValueError, match="approximate: expected 'tanh' or 'none'"):
        geglu(gate, up, approximate="erf")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forced_backend_that_cannot_take_the_inputs_raises(backend):
    dtype = f16 if backend == "cpu" else f64
    gate, up = torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype)
    with fastpeft.use_backend(backend, op="swiglu"), pytest.raises(BackendError, match=backend):
        swiglu(gate, up)


def test_cpp_kernel_unit_test(tmp_path):
    run_cpp_unit_test("glu", tmp_path)


# -- GPU (the Triton kernels for real; -m gpu) -------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=IDS)
@pytest.mark.parametrize("shape", [(3, 37, 67), (2048, 8192)], ids=["prime", "llama_mlp"])
def test_gpu_triton_matches_float64(act, dtype, shape):
    check("triton", act, *pair(shape, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [f16, bf16], ids=IDS)
def test_gpu_drop_in_gives_transformers_numbers(act, dtype):
    from transformers.activations import ACT2FN

    call, _, op, hf_name = ACTS[act]
    gate, up = pair((512, 2048), dtype, spread=1.0, device="cuda")
    with torch.no_grad(), fastpeft.use_backend("triton", op=op):
        assert_nearly_same_bits(call(gate, up), ACT2FN[hf_name](gate) * up, f"{act} y", min_same=0.999, ulps=4)
