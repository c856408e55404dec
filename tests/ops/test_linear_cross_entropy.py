"""linear_cross_entropy against its float64 reference (F.cross_entropy of F.linear) on every backend.

Covers the loss and every gradient (hidden, weight, bias) for the three reductions, label smoothing,
Gemma-2 soft-capping, ignored labels, chunk sizes that do / do not divide the tokens, odd shapes
(prime, 3-D, strided, empty, all ignored), every dtype; gradients only where asked; no [N, V] tensor
saved for backward; opcheck; torch.compile(fullgraph=True); errors (labels out of range); the C++ unit
test; GPU cases (``-m gpu``).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError, get_op
from fastpeft.ops import linear_cross_entropy
from fastpeft.ops.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy_reference,
)

from ..helpers import check_scaled, run_cpp_unit_test, runnable_backends
from .decoder_op_checks import compiled_ops, dtype_skip

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = runnable_backends("linear_cross_entropy")
IDS = lambda d: str(d).replace("torch.", "")
OP = "linear_cross_entropy"


def make(N, H, V, dtype=f32, bias=True, ignore_every=5, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_(weight_grad) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y, b


def oracle(h, w, y, b, gl, **kw):
    """float64 (loss, dh, dw, db) of the reference on float64 copies."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    loss = linear_cross_entropy_reference(h64.reshape(-1, h.shape[-1]), w64, y.reshape(-1), b64, kw.get("ignore_index", -100),
                                          kw.get("label_smoothing", 0.0), kw.get("logit_softcap") or 0.0,
                                          kw.get("reduction", "mean"), 0)
    loss = loss.reshape(y.shape) if kw.get("reduction") == "none" else loss
    leaves = [h64, w64] + ([b64] if b is not None else [])
    grads = torch.autograd.grad(loss, leaves, gl.double()) if loss.requires_grad else [torch.zeros_like(t) for t in leaves]
    return loss.detach(), grads


def check(backend, h, w, y, b=None, tol=None, scale=4.0, **kw):
    tol = tol or h.dtype
    with fastpeft.use_backend(backend, op=OP):
        loss = linear_cross_entropy(h, w, y, b, **kw)
    assert loss.dtype == (f64 if h.dtype == f64 else f32)
    assert loss.shape == (y.shape if kw.get("reduction") == "none" else ())
    gl = torch.randn(loss.shape, dtype=loss.dtype) + 1.0
    loss64, grads64 = oracle(h, w, y, b, gl, **kw)
    if loss64.isnan().all():
        assert loss.isnan().all()
    else:
        check_scaled(loss, loss64, f32 if tol == f64 and h.dtype != f64 else tol, f"{backend} loss", scale=scale)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    if not leaves:
        return
    grads = torch.autograd.grad(loss, leaves, gl)
    want = dict(zip(("h", "w", "b"), grads64))
    for name, t, got in zip(("h", "w", "b"), [t for t in (h, w, b) if t is not None and t.requires_grad], grads):
        name = {id(h): "h", id(w): "w", id(b): "b"}[id(t)]
        assert got.dtype == t.dtype and got.shape == t.shape
        check_scaled(got, want[name], tol, f"{backend} d{name}", scale=scale)


# -- numerics ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [f32, bf16, f16, f64], ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_every_dtype_and_reduction(backend, dtype, reduction):
    dtype_skip(backend, dtype)
    h, w, y, b = make(23, 17, 41, dtype, weight_grad=reduction != "none")
    check(backend, h, w, y, b, reduction=reduction, chunk_size=6, scale=8.0 if dtype in (bf16, f16) else 4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("softcap", [None, 2.5, 30.0])
def test_label_smoothing_and_softcap(backend, smoothing, softcap):
    h, w, y, b = make(19, 13, 29)
    with torch.no_grad():
        w.mul_(4)  # logits large enough that a softcap of 2.5 saturates some of them
    check(backend, h, w, y, b, label_smoothing=smoothing, logit_softcap=softcap, chunk_size=7)


CASES = {
    # name: (hidden builder (N, H) -> tensor with leading shape, V)
    "prime": (lambda: torch.randn(31, 13), 37),
    "3d": (lambda: torch.randn(2, 7, 12), 23),
    "row_slice": (lambda: torch.randn(9, 20)[:, 3:17], 19),          # row stride 20
    "column_stride_2": (lambda: torch.randn(6, 22)[:, ::2], 17),       # column stride 2
    "transposed_3d": (lambda: torch.randn(5, 3, 8).transpose(0, 1), 11),
    "vocab_1": (lambda: torch.randn(5, 8), 1),
    "vocab_above_block": (lambda: torch.randn(3, 8), 4099),           # Triton: more than one BLOCK per row
    "one_token": (lambda: torch.randn(1, 8), 7),
    "empty": (lambda: torch.randn(0, 8), 7),
    "many_rows_threaded": (lambda: torch.randn(300, 16), 130),       # C++: C * V above the OpenMP threshold
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_shapes_strides_and_chunks(backend, case, chunk):
    build, V = CASES[case]
    h = build().requires_grad_()
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(V, h.shape[-1], generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, h.shape[:-1], generator=g)
    if y.numel() > 2:
        y.view(-1)[1] = -100
    if h.shape[0] == 0:
        check(backend, h, w, y, None, chunk_size=chunk)  # mean of nothing: NaN, gradients 0
    else:
        check(backend, h, w, y, None, chunk_size=chunk, reduction="sum" if case == "vocab_1" else "mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_behaves_as_torch(backend, reduction):
    """Every label ignored: mean NaN (0 / 0), sum 0, none zeros; every gradient 0 (torch's behaviour)."""
    h, w, y, b = make(6, 8, 11, weight_grad=reduction != "none")
    y[:] = -100
    with fastpeft.use_backend(backend, op=OP):
        loss = linear_cross_entropy(h, w, y, b, reduction=reduction, chunk_size=4)
    want = F.cross_entropy(F.linear(h, w, b), y, reduction=reduction)
    torch.testing.assert_close(loss, want, equal_nan=True)
    leaves = [t for t in (h, w, b) if t.requires_grad]
    for got in torch.autograd.grad(loss.sum(), leaves):
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels(backend):
    """Labels that are a strided view (every other element of a longer tensor)."""
    h, w, _, b = make(9, 8, 13)
    y = torch.randint(0, 13, (18,))[::2]
    y[4] = -100
    check(backend, h, w, y, b, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_other_than_default(backend):
    h, w, y, b = make(10, 8, 13, ignore_every=0)
    y[2] = 5
    check(backend, h, w, y, b, ignore_index=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    """A LoRA run: the LM head frozen; no weight gradient is made, the hidden one is right."""
    h, w, y, _ = make(12, 8, 21, weight_grad=False)
    with fastpeft.use_backend(backend, op=OP):
        linear_cross_entropy(h, w, y).backward()
    assert h.grad is not None and w.grad is None
    h2, w2, y2, b2 = make(12, 8, 21)
    h2.requires_grad_(False)
    with fastpeft.use_backend(backend, op=OP):
        linear_cross_entropy(h2, w2, y2, b2).backward()
    assert w2.grad is not None and b2.grad is not None
    with torch.no_grad(), fastpeft.use_backend(backend, op=OP):
        loss = linear_cross_entropy(*make(12, 8, 21)[:3])
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "torch"])
def test_saves_no_logits(backend):
    """Nothing of [N, V] is saved for backward: only the gradients [N, H] (and [V, H] / [V] when asked)."""
    N, H, V = 64, 8, 257
    h, w, y, _ = make(N, H, V, weight_grad=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastpeft.use_backend(backend, op=OP):
            loss = linear_cross_entropy(h, w, y, chunk_size=16)
    loss.backward()
    assert all(t.numel() <= N * H for t in saved), [tuple(t.shape) for t in saved]


def test_default_chunk_size():
    assert default_chunk_size(1024, 32000, torch.device("cpu")) == 128
    assert default_chunk_size(5, 32000, torch.device("cpu")) == 5
    assert default_chunk_size(0, 32000, torch.device("cpu")) == 1
    assert default_chunk_size(10 ** 6, 256000, torch.device("cuda")) == 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_op(backend):
    """The op computes in its inputs' dtype: float32 inputs under bf16 autocast give exactly the float32
    loss and gradients (autocast used to cast the forward's logits GEMM, and only that one)."""
    h, w, y, b = make(40, 16, 97)
    with fastpeft.use_backend(backend, op=OP):
        want = linear_cross_entropy(h, w, y, b, chunk_size=16)
        gwant = torch.autograd.grad(want, [h, w, b])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_cross_entropy(h, w, y, b, chunk_size=16)
        ggot = torch.autograd.grad(got, [h, w, b])
    assert got.dtype == f32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for g1, g0 in zip(ggot, gwant):
        torch.testing.assert_close(g1, g0, atol=0, rtol=0)


# -- registration: opcheck, torch.compile ---------------------------------------------
@pytest.mark.parametrize("name", ["linear_cross_entropy_fwd", "linear_cross_entropy_triton_fwd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(name, reduction):
    (fwd,) = compiled_ops(name)
    h, w, y, b = make(7, 8, 13, weight_grad=reduction != "none")
    grads = reduction != "none"
    opcheck(fwd.default, (h, w, y, b, -100, 0.1, 0.0, reduction, 3, True, grads, grads))
    opcheck(fwd.default, (h.detach(), w.detach(), y, None, -100, 0.0, 5.0, reduction, 4, False, False, False))
    opcheck(fwd.default, (h.detach().bfloat16(), w.detach().bfloat16(), y, None, -100, 0.0, 0.0, reduction, 2,
                          True, False, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    h, w, y, b = make(10, 8, 19)
    with fastpeft.use_backend(backend, op=OP):
        linear_cross_entropy(h, w, y, b, chunk_size=4)  # availability probes run eagerly first
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op=OP):
        f = torch.compile(lambda h, w, y, b: linear_cross_entropy(h, w, y, b, label_smoothing=0.1, chunk_size=4) * 2,
                          fullgraph=True)
        loss = f(h, w, y, b)
    grads = torch.autograd.grad(loss, [h, w, b])
    loss64, grads64 = oracle(h, w, y, b, torch.tensor(2.0), label_smoothing=0.1)
    check_scaled(loss, loss64 * 2, f32, "compiled loss", scale=4)
    for name, g, r in zip(("dh", "dw", "db"), grads, grads64):
        check_scaled(g, r, f32, f"compiled {name}", scale=4)


# -- errors ---------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    h, w, y = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, 8\]"):
        linear_cross_entropy(h, torch.randn(11, 9), y)
    with pytest.raises(TypeError, match="weight: expected hidden's dtype"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\)"):
        linear_cross_entropy(h, w, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="labels: expected dtype"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match=r"bias: expected shape \[11\]"):
        linear_cross_entropy(h, w, y, torch.randn(10))
    with pytest.raises(TypeError, match="bias: expected hidden's dtype"):
        linear_cross_entropy(h, w, y, torch.randn(11).double())
    with pytest.raises(ValueError, match="labels: expected a tensor on cpu"):
        linear_cross_entropy(h, w, y.to("meta"))
    with pytest.raises(TypeError, match="hidden: expected dtype"):
        linear_cross_entropy(h.long(), w, y)
    with pytest.raises(ValueError, match="label_smoothing: expected <= 1.0"):
        linear_cross_entropy(h, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="logit_softcap: expected None or a finite number > 0"):
        linear_cross_entropy(h, w, y, logit_softcap=0.0)
    with pytest.raises(ValueError, match="reduction: expected one of"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size: expected None or an int >= 1"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        linear_cross_entropy(h, w, y, ignore_index=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [11, -1, 1000])
def test_label_out_of_range_raises_naming_it(backend, bad):
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    y = torch.tensor([1, -100, bad, 3])
    with fastpeft.use_backend(backend, op=OP), pytest.raises(ValueError, match=rf"labels: {bad} at position 2"):
        linear_cross_entropy(h, w, y)


def test_cpu_kernel_raises_on_bad_label_past_the_python_check():
    """Traced code skips the eager check; the C++ op itself refuses the label."""
    (fwd,) = compiled_ops("linear_cross_entropy_fwd")
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 11 is outside \[0, 11\)"):
        fwd(h, w, torch.tensor([1, -100, 11, 3]), None, -100, 0.0, 0.0, "mean", 2, False, False, False)


def test_fused_backends_decline_weight_grad_with_reduction_none():
    h, w, y, b = make(5, 8, 11)
    reason = get_op(OP).why_not("cpu", h, w, y, b, -100, 0.0, 0.0, "none", 2)
    assert reason and "reduction mean or sum" in reason
    with fastpeft.use_backend("cpu", op=OP), pytest.raises(BackendError, match="reduction mean or sum"):
        linear_cross_entropy(h, w, y, b, reduction="none")
    check("torch", h, w, y, b, reduction="none")  # dispatch without forcing picks the torch backend: fine


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forced_backend_that_cannot_take_the_inputs_raises(backend):
    dtype = f16 if backend == "cpu" else f64
    with fastpeft.use_backend(backend, op=OP), pytest.raises(BackendError, match=backend):
        linear_cross_entropy(torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype), torch.tensor([1, 2, 3]))


def test_cpp_kernel_unit_test(tmp_path):
    run_cpp_unit_test("linear_cross_entropy", tmp_path)


# -- GPU (the Triton kernel for real; -m gpu) ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=IDS)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("shape", [(37, 67, 1013), (2048, 2048, 32000)], ids=["prime", "llama_1b"])
def test_gpu_triton_matches_float64(dtype, softcap, shape):
    N, H, V = shape
    h, w, y, b = make(N, H, V, f32, bias=False, weight_grad=True)
    h = h.detach().cuda().to(dtype).requires_grad_()
    w = w.detach().cuda().to(dtype).requires_grad_()
    y = y.cuda()
    with fastpeft.use_backend("triton", op=OP):
        loss = linear_cross_entropy(h, w, y, logit_softcap=softcap, label_smoothing=0.1)
    dh, dw = torch.autograd.grad(loss, [h, w])
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_cross_entropy_reference(h64, w64, y, None, -100, 0.1, softcap or 0.0, "mean", 0)
    dh64, dw64 = torch.autograd.grad(ref, [h64, w64])
    check_scaled(loss, ref, dtype if dtype != f32 else f32, "loss", scale=4)
    check_scaled(dh, dh64, dtype, "dh", scale=4)
    check_scaled(dw, dw64, dtype, "dw", scale=4)
