"""rope against its float64 reference on every backend, and bit for bit against transformers.

Covers forward and dq/dk for both head layouts (unsqueeze_dim 1 and 2), transposed (non-contiguous)
q/k, grouped-query head counts, partial rotary, per-batch and broadcast cos/sin, every dtype and the
mixed q/cos dtypes of autocast; odd and empty shapes; outputs keeping q/k's layout; an unused output;
double backward; cos/sin that require grad (torch backend); what is saved; transformers'
``apply_rotary_pos_emb`` (Llama and Phi-3's partial form) through the drop-in; opcheck;
torch.compile(fullgraph=True); errors; the C++ unit test; GPU cases (``-m gpu``).
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError, get_op
from fastpeft.ops import rope
from fastpeft.ops.rope import rope_reference

from ..helpers import assert_close, check_scaled, run_cpp_unit_test, runnable_backends
from .decoder_op_checks import agreement_with, bit_exact_skip, compiled_ops, dtype_skip

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = runnable_backends("rope")
IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def tables(B, S, rd, dtype=f32, per_batch=False, device="cpu"):
    """cos, sin [B or 1, S, rd] as transformers' rotary embeddings build them (frequencies repeated)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2, dtype=f32, device=device) / rd))
    rows = B if per_batch else 1
    pos = torch.arange(S, dtype=f32, device=device)[None, :] + 7.0 * torch.arange(rows, device=device)[:, None]
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk(B, Hq, Hk, S, D, dtype=f32, layout="transposed", device="cpu"):
    """q, k leaf tensors; layout 'transposed': [B, H, S, D] views of [B, S, H, D] memory (as attention
    gets them), 'contiguous': [B, H, S, D] memory, 'seq_first': [B, S, H, D] (unsqueeze_dim=2)."""
    def one(H):
        if layout == "transposed":
            return torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2).requires_grad_()
        shape = (B, S, H, D) if layout == "seq_first" else (B, H, S, D)
        return torch.randn(shape, device=device).to(dtype).requires_grad_()

    return one(Hq), one(Hk)


def oracle(q, k, cos, sin, unsqueeze_dim, gq, gk):
    leaves = [t.detach().double().requires_grad_() for t in (q, k)]
    outs = rope_reference(*leaves, cos.double(), sin.double(), unsqueeze_dim)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, (gq.double(), gk.double())))


def run(backend, q, k, cos, sin, unsqueeze_dim, gq, gk):
    with fastpeft.use_backend(backend, op="rope"):
        outs = rope(q, k, cos, sin, unsqueeze_dim)
    return list(outs) + list(torch.autograd.grad(outs, (q, k), (gq, gk)))


def check(backend, q, k, cos, sin, unsqueeze_dim=1, scale=2.0):
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    gq = torch.randn(q.shape, device=q.device).to(out_dtype)
    gk = torch.randn(k.shape, device=q.device).to(out_dtype)
    got = run(backend, q, k, cos, sin, unsqueeze_dim, gq, gk)
    want = oracle(q, k, cos, sin, unsqueeze_dim, gq, gk)
    tol = bf16 if bf16 in (q.dtype, cos.dtype) else f16 if f16 in (q.dtype, cos.dtype) else q.dtype
    for name, g, w, like, dtype in zip(("q_embed", "k_embed", "dq", "dk"), got, want, (q, k, q, k),
                                       (out_dtype, out_dtype, q.dtype, k.dtype)):
        assert g.shape == like.shape and g.dtype == dtype, f"{name}: {g.shape} {g.dtype}"
        check_scaled(g, w, tol, f"{backend} {name}", scale=scale)
    return got


# -- numerics --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [f32, bf16, f16, f64], ids=IDS)
@pytest.mark.parametrize("layout", ["transposed", "contiguous", "seq_first"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
def test_matches_float64(backend, dtype, layout, rotary):
    dtype_skip(backend, dtype)
    B, Hq, Hk, S, D = 2, 6, 2, 5, 16
    rd = D if rotary == "full" else 10
    q, k = make_qk(B, Hq, Hk, S, D, dtype, layout)
    cos, sin = tables(B, S, rd, dtype, per_batch=True)
    check(backend, q, k, cos, sin, 2 if layout == "seq_first" else 1)


CASES = {
    # name: (B, Hq, Hk, S, D, rd, per_batch cos, layout)
    "rd_2": (1, 2, 1, 3, 2, 2, False, "contiguous"),
    "one_position_one_head": (3, 1, 1, 1, 8, 8, True, "transposed"),
    "odd_dims_partial": (2, 5, 3, 7, 14, 6, False, "transposed"),
    "mqa_one_kv_head": (2, 8, 1, 4, 12, 12, False, "seq_first"),
    "no_positions": (2, 4, 2, 0, 8, 8, False, "transposed"),
    "no_batch": (0, 4, 2, 3, 8, 8, False, "contiguous"),
    "head_dim_128": (1, 3, 3, 5, 128, 128, True, "contiguous"),
    # B * S * H * D above the C++ kernel's OpenMP threshold (32768)
    "many_rows_threaded": (2, 16, 4, 33, 64, 64, False, "transposed"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_shapes(backend, case):
    if case == "many_rows_threaded" and backend == "triton" and fastpeft._triton.interpreter_on():
        pytest.skip("sized for the C++ kernel; slow in the Triton interpreter")
    B, Hq, Hk, S, D, rd, per_batch, layout = CASES[case]
    q, k = make_qk(B, Hq, Hk, S, D, f32, layout)
    cos, sin = tables(B, S, rd, per_batch=per_batch)
    check(backend, q, k, cos, sin, 2 if layout == "seq_first" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_dim_not_contiguous_and_strided_tables(backend):
    B, H, S, D = 2, 3, 4, 8
    q = torch.randn(B, H, D, S).transpose(-1, -2).requires_grad_()   # stride(-1) = S
    k = torch.randn(B, H, S, 2 * D)[..., ::2].requires_grad_()       # stride(-1) = 2
    cos, sin = tables(B, S, D, per_batch=True)
    check(backend, q, k, cos.transpose(0, 1).contiguous().transpose(0, 1), sin[:, :, :])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_dtype,cos_dtype", [(bf16, f32), (f16, f32), (f32, bf16)], ids=IDS)
def test_mixed_q_and_cos_dtypes_promote_like_transformers(backend, q_dtype, cos_dtype):
    """Under autocast q/k come from a bf16 linear while cos/sin stay float32: q * cos is float32."""
    dtype_skip(backend, q_dtype)
    q, k = make_qk(2, 4, 2, 6, 16, q_dtype)
    cos, sin = tables(2, 6, 16, cos_dtype)
    if backend == "cpu" and get_op("rope").why_not("cpu", q, k, cos, sin, 1):
        pytest.skip("the C++ kernel has no such (q, output) dtype pair; dispatch takes the torch backend")
    check(backend, q, k, cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_the_input_layout(backend):
    q, k = make_qk(2, 4, 2, 5, 8, f32, "transposed")
    cos, sin = tables(2, 5, 8)
    with fastpeft.use_backend(backend, op="rope"):
        qe, ke = rope(q, k, cos, sin)
    if backend != "torch":  # the reference follows TensorIterator's layout rules
        assert qe.stride() == q.stride() and ke.stride() == k.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_output_used(backend):
    q, k = make_qk(1, 4, 2, 3, 8)
    cos, sin = tables(1, 3, 8)
    with fastpeft.use_backend(backend, op="rope"):
        qe, _ = rope(q, k, cos, sin)
    dq, dk = torch.autograd.grad(qe.square().sum(), (q, k), allow_unused=True)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(rope_reference(q64, k.double(), cos.double(), sin.double())[0].square().sum(), q64)
    assert_close(dq, want, f32, "dq", scale=4)
    assert dk is None or not dk.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_double_backward(backend):
    if backend == "triton":
        pytest.skip("gradcheck needs float64, which Triton does not take")
    q, k = make_qk(1, 2, 1, 3, 6, f64)
    cos, sin = tables(1, 3, 4, f64)

    def f(q, k):
        with fastpeft.use_backend(backend, op="rope"):
            return rope(q, k, cos, sin)

    assert torch.autograd.gradcheck(f, (q, k))
    assert torch.autograd.gradgradcheck(f, (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_differentiable_in_float32(backend):
    """Double backward on every backend, Triton included (gradgradcheck above needs float64): the
    backward is linear in the incoming gradient, with the forward rotation as its derivative."""
    q, k = make_qk(1, 4, 2, 3, 8)
    cos, sin = tables(1, 3, 6)
    gq, gk = torch.randn(q.shape, requires_grad=True), torch.randn(k.shape, requires_grad=True)
    vq, vk = torch.randn(q.shape), torch.randn(k.shape)
    with fastpeft.use_backend(backend, op="rope"):
        dq, dk = torch.autograd.grad(rope(q, k, cos, sin), (q, k), (gq, gk), create_graph=True)
        got = torch.autograd.grad((dq * vq).sum() + (dk * vk).sum(), (gq, gk))
    want = rope_reference(vq.double(), vk.double(), cos.double(), sin.double())
    for name, g, w in zip(("q", "k"), got, want):
        assert_close(g, w, f32, f"d(d{name})/d(g{name})", scale=4)


def test_tables_requiring_grad_take_the_torch_backend():
    q, k = make_qk(1, 2, 2, 3, 8)
    cos, sin = (t.requires_grad_() for t in tables(1, 3, 8))
    reason = get_op("rope").why_not("cpu", q, k, cos, sin, 1)
    assert reason is None or "cos/sin" in reason or "built without" in reason
    qe, ke = rope(q, k, cos, sin)  # dispatch falls back to torch, which differentiates cos/sin
    dcos, dsin = torch.autograd.grad((qe.sum() + ke.sum()), (cos, sin))
    assert dcos.abs().sum() > 0 and dsin.abs().sum() > 0
    if get_op("rope").why_not("cpu") is None:
        with fastpeft.use_backend("cpu", op="rope"), pytest.raises(BackendError, match="cos/sin"):
            rope(q, k, cos, sin)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "torch"])
def test_saves_only_cos_and_sin(backend):
    q, k = make_qk(2, 4, 2, 5, 8)
    cos, sin = tables(2, 5, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastpeft.use_backend(backend, op="rope"):
            qe, ke = rope(q, k, cos, sin)
    (qe.sum() + ke.sum()).backward()
    assert {t.untyped_storage().data_ptr() for t in saved} <= {cos.untyped_storage().data_ptr(),
                                                                sin.untyped_storage().data_ptr()}


# -- transformers' apply_rotary_pos_emb: same bits, forward and backward -----------------------------
def _transformers_rope(model):
    pytest.importorskip("transformers")
    if model == "llama":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    else:
        from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb
    return getattr(apply_rotary_pos_emb, "forward", apply_rotary_pos_emb)  # hub-kernel wrapper or function


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [bf16, f16, f32], ids=IDS)
@pytest.mark.parametrize("model", ["llama", "phi3"])
def test_same_bits_as_transformers(backend, dtype, model):
    dtype_skip(backend, dtype)
    bit_exact_skip(backend, dtype)
    apply = _transformers_rope(model)
    B, Hq, Hk, S, D = 2, 8, 2, 9, 32
    rd = D if model == "llama" else 16
    q, k = make_qk(B, Hq, Hk, S, D, dtype)
    cos, sin = tables(B, S, rd, dtype, per_batch=True)
    want = apply(q, k, cos, sin)
    with fastpeft.use_backend(backend, op="rope"):
        got = rope(q, k, cos, sin)
    g = [torch.randn(t.shape).to(dtype) for t in want]
    for name, a, b in zip(("q_embed", "k_embed", "dq", "dk"),
                          list(got) + list(torch.autograd.grad(got, (q, k), g)),
                          list(want) + list(torch.autograd.grad(want, (q, k), g))):
        same, ulps = agreement_with(a, b)
        assert same == 1.0, f"{name}: {same:.4f} identical, up to {ulps} ulp apart"


# -- registration: opcheck, torch.compile -----------------------------------------------
@pytest.mark.parametrize("name", ["rope", "rope_triton"])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_opcheck(name, unsqueeze_dim):
    (op,) = compiled_ops(name)
    q, k = make_qk(2, 4, 2, 3, 8, layout="transposed" if unsqueeze_dim == 1 else "seq_first")
    cos, sin = tables(2, 3, 6, per_batch=True)
    for transpose in (False, True):
        opcheck(op.default, (q, k, cos, sin, unsqueeze_dim, transpose))
    opcheck(op.default, (q.detach().bfloat16(), k.detach().bfloat16(), cos, sin, unsqueeze_dim, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k = make_qk(2, 4, 2, 5, 8)
    cos, sin = tables(2, 5, 8)
    with fastpeft.use_backend(backend, op="rope"):
        rope(q, k, cos, sin)  # availability probes run eagerly first
    torch._dynamo.reset()

    def loss(q, k):
        a, b = rope(q, k, cos, sin)
        return a.square().sum() + (b * b.detach()).sum()

    with fastpeft.use_backend(backend, op="rope"):
        out = torch.compile(loss, fullgraph=True)(q, k)
    grads = torch.autograd.grad(out, (q, k))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    a, b = rope_reference(q64, k64, cos.double(), sin.double())
    ref = a.square().sum() + (b * b.detach()).sum()
    for name, g, r in zip(("dq", "dk"), grads, torch.autograd.grad(ref, (q64, k64))):
        assert_close(g, r, f32, f"compiled {name}", scale=20)


# -- errors -----------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    q, k = make_qk(2, 4, 2, 3, 8)
    cos, sin = tables(2, 3, 8)
    with pytest.raises(ValueError, match="q: expected a tensor with 4 dims"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k: expected"):
        rope(q, k[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="cos: expected"):
        rope(q, k, cos[..., :5], sin[..., :5])  # odd rotary dims
    with pytest.raises(ValueError, match="cos: expected"):
        rope(q, k, torch.ones(1, 3, 10), torch.ones(1, 3, 10))  # rd > D
    with pytest.raises(ValueError, match="cos: expected"):
        rope(q, k, torch.ones(3, 3, 8), torch.ones(3, 3, 8))  # batch 3 vs 2
    with pytest.raises(ValueError, match="sin: expected the shape of cos"):
        rope(q, k, cos, sin[:, :, :4])
    with pytest.raises(ValueError, match="cos: expected a tensor with 3 dims"):
        rope(q, k, cos[0], sin[0])
    with pytest.raises(TypeError, match="k: expected dtype"):
        rope(q, k.detach().double(), cos, sin)
    with pytest.raises(TypeError, match="sin: expected dtype"):
        rope(q, k, cos, sin.double())
    with pytest.raises(ValueError, match="unsqueeze_dim: expected 1"):
        rope(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match="sin: expected a tensor on cpu"):
        rope(q, k, cos, torch.ones(1, 3, 8, device="meta"))
    with pytest.raises(TypeError, match="q: expected dtype"):
        rope(q.detach().long(), k, cos, sin)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forced_backend_that_cannot_take_the_inputs_raises(backend):
    dtype = f16 if backend == "cpu" else f64
    q, k = make_qk(1, 2, 2, 3, 8, dtype)
    cos, sin = tables(1, 3, 8, dtype)
    with fastpeft.use_backend(backend, op="rope"), pytest.raises(BackendError, match=backend):
        rope(q, k, cos, sin)


def test_cpp_kernel_unit_test(tmp_path):
    run_cpp_unit_test("rope", tmp_path)


# -- GPU (the Triton kernel for real; -m gpu) -------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=IDS)
@pytest.mark.parametrize("shape", [(2, 6, 2, 37, 16, 10), (4, 32, 8, 2048, 64, 64)], ids=["prime_partial", "llama_1b"])
def test_gpu_triton_matches_float64(dtype, shape):
    B, Hq, Hk, S, D, rd = shape
    q, k = make_qk(B, Hq, Hk, S, D, dtype, device="cuda")
    cos, sin = tables(B, S, rd, dtype, device="cuda")
    check("triton", q, k, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f16, bf16, f32], ids=IDS)
@pytest.mark.parametrize("model", ["llama", "phi3"])
def test_gpu_same_bits_as_transformers(dtype, model):
    apply = _transformers_rope(model)
    q, k = make_qk(2, 32, 8, 128, 64, dtype, device="cuda")
    cos, sin = tables(2, 128, 64 if model == "llama" else 32, dtype, per_batch=True, device="cuda")
    want = apply(q, k, cos, sin)
    with fastpeft.use_backend("triton", op="rope"):
        got = rope(q, k, cos, sin)
    g = [torch.randn_like(t) for t in want]
    for name, a, b in zip(("q_embed", "k_embed", "dq", "dk"),
                          list(got) + list(torch.autograd.grad(got, (q, k), g)),
                          list(want) + list(torch.autograd.grad(want, (q, k), g))):
        same, ulps = agreement_with(a, b)
        assert same == 1.0, f"{name}: {same:.4f} identical, up to {ulps} ulp apart"
