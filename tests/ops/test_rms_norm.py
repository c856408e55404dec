"""rms_norm against its float64 reference on every backend, and against transformers' RMSNorm modules.

Covers forward, dx and dweight for both weight orders (cast_before_weight) and offsets 0 / 1 (Gemma),
every dtype and mixed weight dtypes (output dtype rule), odd/prime/1-D/3-D/strided/expanded/empty x,
threaded sizes; gradients only where asked; what is saved for backward; the bits of transformers'
LlamaRMSNorm / GemmaRMSNorm / Olmo2RMSNorm through a drop-in forward; opcheck;
torch.compile(fullgraph=True); errors; the C++ unit test; GPU cases (``-m gpu``).
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError, get_op
from fastpeft.ops import rms_norm
from fastpeft.ops.rms_norm import MAX_TRITON_H, rms_norm_reference
from fastpeft.ops.rms_norm.reference import out_dtype

from ..helpers import assert_close, check_scaled, run_cpp_unit_test, runnable_backends
from .decoder_op_checks import agreement_with, bit_exact_skip, compiled_ops, dtype_skip

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = runnable_backends("rms_norm")
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def oracle(x, weight, eps, offset, cast, gy):
    """float64 (y, dx, dweight) by the reference on float64 copies."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    y = rms_norm_reference(x64, w64, eps, offset, cast)
    return (y.detach(), *torch.autograd.grad(y, [x64, w64], gy.double()))


def run(backend, x, weight, eps, offset, cast, gy):
    with fastpeft.use_backend(backend, op="rms_norm"):
        y = rms_norm(x, weight, eps, offset, cast)
    leaves = [t for t in (x, weight) if t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, gy)) if leaves else iter(())
    return y, [next(grads) if t.requires_grad else None for t in (x, weight)]


def check(backend, x, weight, eps=1e-5, offset=0.0, cast=False, tol_dtype=None, scale=2.0):
    tol_dtype = tol_dtype or x.dtype
    want_dtype = out_dtype(x.dtype, weight.dtype, cast)
    gy = torch.randn(x.shape, dtype=want_dtype, device=x.device)
    y, (dx, dw) = run(backend, x, weight, eps, offset, cast, gy)
    y64, dx64, dw64 = oracle(x, weight, eps, offset, cast, gy)
    assert y.shape == x.shape and y.dtype == want_dtype
    assert y.is_contiguous() or backend == "torch"  # the reference follows PyTorch's layout rules
    check_scaled(y, y64, tol_dtype, f"{backend} y", scale=scale)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    check_scaled(dx, dx64, tol_dtype, f"{backend} dx", scale=scale)
    assert dw.dtype == weight.dtype and dw.shape == weight.shape
    check_scaled(dw, dw64, tol_dtype, f"{backend} dweight", scale=scale)


def leaf(t, dtype=f32):
    return t.to(dtype).requires_grad_()


# -- numerics ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [f32, bf16, f16, f64], ids=IDS)
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_float64_every_dtype_and_order(backend, dtype, cast, offset):
    dtype_skip(backend, dtype)
    x = leaf(torch.randn(3, 5, 37) * 3, dtype)
    w = leaf(torch.randn(37) * 0.5 + (0.0 if offset else 1.0), dtype)
    check(backend, x, w, 1e-5, offset, cast)


CASES = {
    # name: (x builder, H)
    "1d": (lambda H: torch.randn(H), 17),
    "h_1": (lambda H: torch.randn(7, H), 1),
    "prime_rows": (lambda H: torch.randn(13, H), 31),
    "row_slice": (lambda H: torch.randn(6, H + 7)[:, 3:H + 3], 29),       # unit column stride, row stride > H
    "column_stride_2": (lambda H: torch.randn(5, 2 * H)[:, ::2], 19),
    "transposed_3d": (lambda H: torch.randn(4, 3, H).transpose(0, 1), 23),
    "expanded_rows": (lambda H: torch.randn(1, H).expand(6, H), 11),       # row stride 0
    "empty": (lambda H: torch.randn(0, H), 16),
    "empty_3d": (lambda H: torch.randn(2, 0, H), 8),
    "wide_row": (lambda H: torch.randn(3, H), 4099),
    # M * H above the C++ kernels' OpenMP threshold (32768): rows (and dweight partials) over threads
    "many_rows_threaded": (lambda H: torch.randn(1100, H), 64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
def test_shapes_and_strides(backend, case, cast):
    if case in ("many_rows_threaded", "wide_row") and backend == "triton" and fastpeft._triton.interpreter_on():
        pytest.skip("sized for the C++ kernels; slow in the Triton interpreter")
    build, H = CASES[case]
    x = build(H).requires_grad_()
    check(backend, x, leaf(torch.randn(H) + 1.0), 1e-6, 0.5, cast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(bf16, f32), (f16, f32), (f32, bf16), (bf16, f16), (f64, f32)],
                         ids=IDS)
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
def test_mixed_weight_dtype_gives_transformers_output_dtype(backend, x_dtype, w_dtype, cast):
    """Output dtype: x's, or with cast_before_weight promote(x, weight) (LlamaRMSNorm's weight * n.to(x))."""
    dtype_skip(backend, x_dtype)
    if backend == "cpu" and get_op("rms_norm").why_not("cpu", torch.zeros(1, 4, dtype=x_dtype),
                                                              torch.zeros(4, dtype=w_dtype), 1e-6, 0.0, cast):
        pytest.skip("the C++ kernels have no such (x, output) dtype pair; dispatch takes the torch backend")
    x = leaf(torch.randn(4, 7, 40), x_dtype)
    w = leaf(torch.randn(40) + 1, w_dtype)
    tol = bf16 if bf16 in (x_dtype, w_dtype) else f16 if f16 in (x_dtype, w_dtype) else f32
    check(backend, x, w, 1e-6, 0.0, cast, tol_dtype=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    x = torch.randn(6, 24)
    w = leaf(torch.randn(24))
    with fastpeft.use_backend(backend, op="rms_norm"):
        rms_norm(x, w, 1e-6, 1.0, True).square().sum().backward()
    assert w.grad is not None and x.grad is None
    x.requires_grad_()
    w_frozen = w.detach()
    with fastpeft.use_backend(backend, op="rms_norm"):
        y = rms_norm(x, w_frozen, 1e-6)
    (dx,) = torch.autograd.grad(y.sum(), [x])
    _, dx64, _ = oracle(x, w_frozen, 1e-6, 0.0, False, torch.ones_like(y))
    assert_close(dx, dx64, f32, "dx with frozen weight", scale=4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "torch"])
def test_saves_only_x_weight_and_rstd(backend):
    M, H = 32, 48
    x = leaf(torch.randn(M, H))
    w = leaf(torch.randn(H))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastpeft.use_backend(backend, op="rms_norm"):
            y = rms_norm(x, w, 1e-6, 0.0, True)
    y.sum().backward()
    ptrs = {x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    others = [t for t in saved if t.untyped_storage().data_ptr() not in ptrs]
    assert [tuple(t.shape) for t in others] == [(M,)], f"expected only rstd [M] besides x and weight: {others}"
    assert others[0].dtype == f32


# -- transformers' modules: the same numbers through a drop-in forward ------------------------
def _modules():
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    def llama_like(m, h):
        return rms_norm(h, m.weight, m.variance_epsilon, cast_before_weight=True)

    return {
        "llama": (LlamaRMSNorm, llama_like),
        "qwen3": (Qwen3RMSNorm, llama_like),
        "gemma": (GemmaRMSNorm, lambda m, h: rms_norm(h, m.weight, m.eps, offset=1.0)),
        "olmo2": (Olmo2RMSNorm, lambda m, h: rms_norm(h, m.weight, m.variance_epsilon)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [bf16, f16, f32], ids=IDS)
@pytest.mark.parametrize("model", ["llama", "qwen3", "gemma", "olmo2"])
def test_drop_in_forward_gives_transformers_numbers(backend, dtype, model):
    """The module's own output, bit for bit up to the float32 sum of squares (bf16/fp16: nearly all
    elements identical, none more than one ulp off); the other weight order (what an unfaithful patch
    would do) agrees measurably less, so this test can fail."""
    dtype_skip(backend, dtype)
    bit_exact_skip(backend, dtype)
    cls, forward = _modules()[model]
    torch.manual_seed(0)
    H = 256
    m = cls(H, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(torch.randn(H) * 0.3 + (0.0 if model == "gemma" else 1.0))
    m = m.to(dtype)
    h = torch.randn(64, H, dtype=dtype) * 4
    with torch.no_grad(), fastpeft.use_backend(backend, op="rms_norm"):
        want = m(h)
        got = forward(m, h)
        other = rms_norm(h, m.weight, 1e-6, 1.0 if model == "gemma" else 0.0,
                         cast_before_weight=model not in ("llama", "qwen3"))
    assert got.dtype == want.dtype and got.shape == want.shape
    same, max_ulps = agreement_with(got, want)
    if dtype == f32:  # the float32 sum of squares in another order: a few ulp
        assert max_ulps <= 16, f"{same:.4f} equal, {max_ulps} ulp"
    else:
        assert max_ulps <= 1 and same >= 0.99, f"{same:.4f} equal, {max_ulps} ulp"
        other_same = agreement_with(other, want)[0]
        assert other_same < same - 0.05, f"the other weight order agrees as well ({other_same:.3f} vs {same:.3f})"


# -- registration: opcheck, torch.compile ---------------------------------------------
@pytest.mark.parametrize("prefix", ["rms_norm", "rms_norm_triton"])
@pytest.mark.parametrize("cast", [False, True])
def test_opcheck(prefix, cast):
    fwd, bwd = compiled_ops(f"{prefix}_fwd", f"{prefix}_bwd")
    x, w = torch.randn(2, 3, 12, requires_grad=True), torch.randn(12, requires_grad=True)
    opcheck(fwd.default, (x, w, 1e-6, 1.0, cast))
    opcheck(fwd.default, (x.detach().bfloat16(), w.detach(), 1e-6, 0.0, cast))
    y, rstd = fwd(x.detach(), w.detach(), 1e-6, 1.0, cast)
    opcheck(bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd, 1.0, cast, True, True))
    opcheck(bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd, 1.0, cast, False, True))
    opcheck(bwd.default, (torch.randn_like(y), x.detach(), w.detach(), rstd, 1.0, cast, True, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w = leaf(torch.randn(2, 5, 24)), leaf(torch.randn(24))
    with fastpeft.use_backend(backend, op="rms_norm"):
        rms_norm(x, w)  # availability probes run eagerly first
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op="rms_norm"):
        f = torch.compile(lambda x, w: rms_norm(x, w, 1e-5, 1.0, True).square().sum(), fullgraph=True)
        loss = f(x, w)
    grads = torch.autograd.grad(loss, [x, w])
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = rms_norm_reference(x64, w64, 1e-5, 1.0, True).square().sum()
    for name, g, r in zip(("dx", "dweight"), grads, torch.autograd.grad(ref, [x64, w64])):
        assert_close(g, r, f32, f"compiled {name}", scale=50)
    assert_close(loss, ref.detach(), f32, "loss", scale=100)


# -- errors ---------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"weight: expected shape \[8\]"):
        rms_norm(x, torch.randn(9))
    with pytest.raises(ValueError, match="weight: expected a tensor with 1 dims"):
        rms_norm(x, torch.randn(1, 8))
    with pytest.raises(ValueError, match="x: expected a tensor"):
        rms_norm(torch.randn(3, 0), torch.randn(0))
    with pytest.raises(TypeError, match="x: expected dtype"):
        rms_norm(torch.ones(3, 8, dtype=torch.int64), w)
    with pytest.raises(TypeError, match="weight: float64 needs float64 x"):
        rms_norm(x, w.double())
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        rms_norm([[1.0] * 8], w)
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        rms_norm(x, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="eps: expected >= 0.0"):
        rms_norm(x, w, -1e-6)
    with pytest.raises(TypeError, match="offset: expected a number"):
        rms_norm(x, w, 1e-6, "1")
    with pytest.raises(TypeError, match="cast_before_weight: expected a bool"):
        rms_norm(x, w, 1e-6, 0.0, 1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forced_backend_that_cannot_take_the_inputs_raises(backend):
    dtype = f16 if backend == "cpu" else f64
    with fastpeft.use_backend(backend, op="rms_norm"), pytest.raises(BackendError, match=backend):
        rms_norm(torch.randn(3, 8, dtype=dtype), torch.randn(8, dtype=dtype))


def test_triton_declines_rows_longer_than_its_block():
    if fastpeft._triton.available() is not None:
        pytest.skip(fastpeft._triton.available())
    H = MAX_TRITON_H + 1
    reason = get_op("rms_norm").why_not("triton", torch.zeros(1, H), torch.ones(H), 1e-6, 0.0, False)
    assert reason and f"up to {H - 1}" in reason


def test_cpp_kernel_unit_test(tmp_path):
    run_cpp_unit_test("rms_norm", tmp_path)


# -- GPU (the Triton kernels for real; -m gpu) ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=IDS)
@pytest.mark.parametrize("cast", [False, True], ids=["gemma_order", "llama_order"])
@pytest.mark.parametrize("shape", [(3, 37, 67), (4096, 2048)], ids=["prime", "llama_1b"])
def test_gpu_triton_matches_float64(dtype, cast, shape):
    x = leaf(torch.randn(shape, device="cuda") * 2, dtype)
    w = leaf(torch.randn(shape[-1], device="cuda") * 0.3, dtype)
    check("triton", x, w, 1e-6, 1.0, cast, scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f16, bf16], ids=IDS)
@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_gpu_drop_in_forward_gives_transformers_numbers(dtype, model):
    cls, forward = _modules()[model]
    m = cls(2048, eps=1e-6).to("cuda", dtype)
    with torch.no_grad():
        m.weight.normal_(0.0 if model == "gemma" else 1.0, 0.3)
    h = torch.randn(512, 2048, device="cuda", dtype=dtype) * 4
    with torch.no_grad(), fastpeft.use_backend("triton", op="rms_norm"):
        same, max_ulps = agreement_with(forward(m, h), m(h))
    assert max_ulps <= 1 and same >= 0.99, f"{same:.4f} equal, {max_ulps} ulp"
