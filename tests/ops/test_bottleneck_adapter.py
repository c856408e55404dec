"""bottleneck_adapter against its float64 reference on every backend.

Covers forward and every gradient (dX, dW_down, db_down, dW_up, db_up), each
activation, residual on/off, odd/prime shapes, 3-D and strided x, empty batches,
None biases, dtypes and mixed precision; dropout statistics and mask identity
(forward vs backward, across backends, across seeds); what is saved for
backward; opcheck of every registered op; torch.compile(fullgraph=True); errors.
"""
import math

import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import bottleneck_adapter
from fastpeft.ops.bottleneck_adapter import adapter_keep_mask, bottleneck_adapter_reference

from ..helpers import TOL, assert_close, run_cpp_unit_test, runnable_backends

f32 = torch.float32
BACKENDS = runnable_backends("bottleneck_adapter")
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]
NAMES = ("x", "W_down", "b_down", "W_up", "b_up")


def make_params(H, Bn, dtype=f32, bias=True, separated=False):
    """W_down [Bn, H], b_down, W_up [H, Bn], b_up, all leaf tensors requiring grad.

    ``separated``: |h| stays >= ~0.4 (small W_down, biases of magnitude 0.5..1.5 with
    random signs), so low-precision rounding of h cannot flip relu'(h) against the
    float64 oracle.
    """
    w_std = 0.1 / math.sqrt(H) if separated else 1.0 / math.sqrt(H)
    W_down = torch.randn(Bn, H) * w_std
    if separated:
        b_down = torch.empty(Bn).uniform_(0.5, 1.5) * (torch.randint(0, 2, (Bn,)) * 2 - 1)
    else:
        b_down = torch.randn(Bn) * 0.5
    W_up = torch.randn(H, Bn) / math.sqrt(Bn)
    b_up = torch.randn(H) * 0.5
    out = [W_down, b_down if bias else None, W_up, b_up if bias else None]
    return [None if t is None else t.to(dtype).requires_grad_() for t in out]


def oracle(x, params, activation, p, seed, residual, gy):
    """float64 (y, grads of x and params) by the reference on float64 copies."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in [x] + list(params)]
    y = bottleneck_adapter_reference(*leaves, activation, p, seed, residual)
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, gy.double(), allow_unused=True))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def run(backend, x, params, activation, p, seed, residual, gy):
    """Fused output and the gradients of x and every non-None parameter."""
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        y = bottleneck_adapter(x, *params, activation=activation, dropout_p=p, seed=seed, residual=residual)
    leaves = [x] + list(params)
    inputs = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, inputs, gy, allow_unused=True)) if inputs else iter(())
    return y, [next(grads) if (t is not None and t.requires_grad) else None for t in leaves]


def check(backend, x, params, activation, p, seed, residual, dtype, scale=2.0):
    gy = torch.randn(x.shape, dtype=x.dtype)
    y, grads = run(backend, x, params, activation, p, seed, residual, gy)
    y64, grads64 = oracle(x, params, activation, p, seed, residual, gy)
    assert y.shape == x.shape and y.dtype == x.dtype
    mag = lambda t: scale * max(1.0, float(t.abs().max()) if t.numel() else 1.0)  # noqa: E731
    assert_close(y, y64, dtype, f"{backend} y", scale=mag(y64))
    for name, leaf, g, g64 in zip(NAMES, [x] + list(params), grads, grads64):
        if leaf is None:
            continue
        assert g is not None, f"{backend}: no gradient for {name}"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: grad {g.dtype} {g.shape}"
        assert_close(g, g64, dtype, f"{backend} d{name}", scale=mag(g64))


def dtype_skip(backend, dtype):
    if dtype == torch.float16 and backend != "triton":
        pytest.skip("float16 is a GPU dtype (triton here, through the interpreter)")
    if dtype == torch.bfloat16 and backend == "triton":
        pytest.skip("the Triton interpreter has no bfloat16 tl.dot")


# -- numerics -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_every_activation_and_dtype(backend, activation, dtype):
    dtype_skip(backend, dtype)
    H, Bn = 37, 19
    params = make_params(H, Bn, dtype, separated=dtype != f32)
    x = torch.randn(3, 5, H, dtype=dtype, requires_grad=True)
    check(backend, x, params, activation, 0.2, int(torch.randint(0, 2**62, ())), True, dtype)


CASES = {
    # name: (x builder, H, Bn, bias, activation, p, residual)
    "2d_prime_no_residual": (lambda H: torch.randn(13, H), 29, 7, True, "gelu", 0.3, False),
    "no_biases": (lambda H: torch.randn(11, H), 23, 5, False, "silu", 0.1, True),
    "no_dropout": (lambda H: torch.randn(2, 7, H), 31, 17, True, "relu", 0.0, True),
    "bn_1": (lambda H: torch.randn(9, H), 17, 1, True, "gelu_tanh", 0.25, True),
    "bn_wider_than_a_tile": (lambda H: torch.randn(6, H), 20, 67, True, "relu", 0.5, False),
    "strided_2d": (lambda H: torch.randn(10, 2 * H)[:, ::2], 19, 6, True, "silu", 0.2, True),
    "transposed_3d": (lambda H: torch.randn(4, 3, H).transpose(0, 1), 21, 8, True, "gelu", 0.2, True),
    "sliced_3d": (lambda H: torch.randn(3, 9, H + 5)[:, 1:8, 2:H + 2], 13, 3, False, "relu", 0.4, False),
    "empty_batch": (lambda H: torch.randn(0, H), 16, 4, True, "gelu", 0.2, True),
    "empty_3d": (lambda H: torch.randn(2, 0, H), 16, 4, True, "relu", 0.0, False),
    "1d_x": (lambda H: torch.randn(H), 12, 5, True, "silu", 0.3, True),
    # M·Bn and M·H above the C++ kernels' OpenMP threshold (32768): rows split across threads
    "many_rows_threaded": (lambda H: torch.randn(1100, H), 32, 32, True, "gelu", 0.3, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_shapes_strides_and_options(backend, case):
    if case == "many_rows_threaded" and backend == "triton" and fastpeft._triton.interpreter_on():
        pytest.skip("targets the C++ OpenMP row split; too slow for the Triton interpreter")
    build, H, Bn, bias, activation, p, residual = CASES[case]
    x = build(H).requires_grad_()
    check(backend, x, make_params(H, Bn, bias=bias), activation, p, 1234567, residual, f32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_fp32_params(backend, dtype):
    """fp32 adapter parameters with half activations: compute in x.dtype, grads in fp32."""
    dtype_skip(backend, dtype)
    H, Bn = 24, 10
    params = make_params(H, Bn, torch.float32, separated=True)
    x = torch.randn(2, 7, H, dtype=dtype, requires_grad=True)
    check(backend, x, params, "gelu", 0.1, 99, True, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_params_and_frozen_x(backend):
    """Only the gradients asked for are returned (the others stay None)."""
    H, Bn = 16, 4
    W_down, b_down, W_up, b_up = make_params(H, Bn)
    W_down.requires_grad_(False)
    b_up.requires_grad_(False)
    x = torch.randn(5, H)  # no grad
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        y = bottleneck_adapter(x, W_down, b_down, W_up, b_up, "silu", 0.2, 7)
    y.sum().backward()
    assert W_down.grad is None and b_up.grad is None
    _, g64 = oracle(x, [W_down, b_down, W_up, b_up], "silu", 0.2, 7, True, torch.ones(5, H))
    assert_close(b_down.grad, g64[2], f32, "db_down", scale=8)
    assert_close(W_up.grad, g64[3], f32, "dW_up", scale=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_exact_pointwise(backend, activation):
    """W_down = W_up = I, no biases, no residual: y = act(x), dX = act'(x) * dY, elementwise.

    Tight enough to tell gelu from gelu_tanh (they differ by up to ~5e-4), which the
    end-to-end comparisons, with GEMM-sized tolerances, might not.
    """
    n = 24
    x = (torch.linspace(-5, 5, 16 * n).reshape(16, n)).requires_grad_()
    eye = torch.eye(n)
    gy = torch.randn(16, n)
    y, grads = run(backend, x, [eye, None, eye, None], activation, 0.0, 0, False, gy)
    y64, grads64 = oracle(x, [eye, None, eye, None], activation, 0.0, 0, False, gy)
    torch.testing.assert_close(y.double(), y64, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(grads[0].double(), grads64[0], atol=5e-6, rtol=5e-6)


# -- dropout --------------------------------------------------------------------
def mask_probe(backend, M, n, p, seed):
    """(forward mask, backward mask) of the adapter's dropout as seen through the op.

    x = I (M = n rows), W_down > 0, no b_down, relu, W_up = I, residual off:
    h = W_downᵀ > 0, so y = keep * W_downᵀ / (1-p) (forward mask = y != 0) and,
    with dY = 1, dW_downᵀ = dh = keep / (1-p) (backward mask = dW_down != 0).
    """
    x = torch.eye(M, n)
    W_down = torch.empty(n, n).uniform_(0.5, 1.5).requires_grad_()
    W_up = torch.eye(n)
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        y = bottleneck_adapter(x, W_down, None, W_up, None, "relu", p, seed, residual=False)
    y.backward(torch.ones_like(y))
    assert_close(y, W_down.detach().t().double() * (y != 0) / (1 - p), f32, "masked y")
    return y != 0, W_down.grad.t() != 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_identical_in_forward_backward_and_across_backends(backend):
    seed, p, n = 2**40 + 12345, 0.3, 40
    fwd, bwd = mask_probe(backend, n, n, p, seed)
    expected = adapter_keep_mask(seed, n, n, p)
    assert torch.equal(fwd, expected), "forward mask differs from the shared Philox mask (stream 1)"
    assert torch.equal(bwd, expected), "backward regenerated another mask than forward"
    other, _ = mask_probe(backend, n, n, p, seed + 1)
    assert not torch.equal(other, fwd), "different seeds gave the same mask"
    assert not torch.equal(expected, fastpeft.kernels.philox.dropout_keep_mask(seed, n, n, p, stream=0)), \
        "stream 1 must differ from LoRA's stream 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(backend, p):
    """W_down = 0, b_down = 1, W_up = I: y = keep / (1-p) exactly."""
    M, n = 160, 48
    W_down, b_down, W_up = torch.zeros(n, n), torch.ones(n), torch.eye(n)
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        y = bottleneck_adapter(torch.randn(M, n), W_down, b_down, W_up, None, "relu", p, 77, residual=False)
    N = M * n
    kept = int((y != 0).sum())
    sd = math.sqrt(N * p * (1 - p))
    assert abs(kept - N * (1 - p)) < 5 * sd, f"kept {kept} of {N}, expected {N * (1 - p):.0f} ± {5 * sd:.0f}"
    nonzero = y[y != 0]
    torch.testing.assert_close(nonzero, torch.full_like(nonzero, 1 / (1 - p)), atol=1e-6, rtol=1e-6)
    mean_sd = math.sqrt(p / (1 - p) / N)
    assert abs(float(y.mean()) - 1.0) < 5 * mean_sd, "inverted dropout must preserve the mean"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_as_torch_backend(backend):
    H, Bn = 20, 9
    params = make_params(H, Bn)
    x = torch.randn(14, H)
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        y = bottleneck_adapter(x, *params, "gelu", 0.4, 31337)
    with fastpeft.use_backend("torch", op="bottleneck_adapter"):
        y_ref = bottleneck_adapter(x, *params, "gelu", 0.4, 31337)
        y_other = bottleneck_adapter(x, *params, "gelu", 0.4, 31338)
    assert_close(y, y_ref.double(), f32, "same seed", scale=8)
    assert not torch.allclose(y_ref, y_other), "different seeds gave the same output"


def test_seed_none_draws_from_torch_generator():
    H, Bn = 12, 6
    params = make_params(H, Bn)
    x = torch.randn(8, H)
    torch.manual_seed(5)
    y1 = bottleneck_adapter(x, *params, "relu", 0.5)
    y2 = bottleneck_adapter(x, *params, "relu", 0.5)
    torch.manual_seed(5)
    y3 = bottleneck_adapter(x, *params, "relu", 0.5)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


# -- memory: what is saved for backward -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_saved_for_backward(backend, strided):
    """Nothing of M×H besides x itself; fused backends keep only x and h [M, Bn] (plus the parameters)."""
    M, H, Bn = 64, 48, 8
    params = make_params(H, Bn)
    base = torch.randn(M, 2 * H) if strided else torch.randn(M, H)
    x = (base[:, ::2] if strided else base).requires_grad_()
    if strided and backend == "torch":
        pytest.skip("the unfused reference reshapes (copies) a strided x, which nn.Linear then saves")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with fastpeft.use_backend(backend, op="bottleneck_adapter"):
            y = bottleneck_adapter(x, *params, "gelu", 0.1, 3)
    y.sum().backward()
    ptrs = {t.untyped_storage().data_ptr() for t in params if t is not None}
    x_ptr = x.untyped_storage().data_ptr()
    others = [t for t in saved if t.untyped_storage().data_ptr() not in ptrs | {x_ptr}]
    assert not [tuple(t.shape) for t in others if t.numel() >= M * H], "an M×H tensor other than x was saved"
    if backend != "torch":
        assert sum(t.numel() for t in others) <= M * Bn, \
            f"fused backend saved more than h [M, Bn]: {[tuple(t.shape) for t in others]}"
        assert any(t.untyped_storage().data_ptr() == x_ptr for t in saved), "x itself should be saved"


# -- registration: opcheck, torch.compile ------------------------------------------
def _op_inputs(requires_grad=True):
    H, Bn = 12, 5
    params = make_params(H, Bn)
    for t in params:
        t.requires_grad_(requires_grad)
    return torch.randn(2, 3, H, requires_grad=requires_grad), params


@pytest.mark.parametrize("prefix", ["bottleneck_adapter", "bottleneck_adapter_triton"])
def test_opcheck(prefix):
    fwd = getattr(torch.ops.fastpeft, f"{prefix}_fwd", None)
    bwd = getattr(torch.ops.fastpeft, f"{prefix}_bwd", None)
    if fwd is None or bwd is None:
        pytest.skip(f"torch.ops.fastpeft.{prefix}_fwd/_bwd not registered here (extension not built)")
    if "triton" in prefix and fastpeft._triton.available() is not None:
        pytest.skip(fastpeft._triton.available())
    x, params = _op_inputs()
    opcheck(fwd.default, (x, *params, "silu", 0.2, 11, True))
    opcheck(fwd.default, (x, params[0], None, params[2], None, "relu", 0.0, 0, False))
    x, params = _op_inputs(requires_grad=False)
    y, h = fwd(x, *params, "gelu", 0.2, 11, True)
    opcheck(bwd.default, (torch.randn_like(y), None, x, h, *params, "gelu", 0.2, 11, True, True, True, True))
    opcheck(bwd.default, (torch.randn_like(y), torch.randn_like(h), x, h, params[0], None, params[2], None,
                          "relu", 0.0, 0, False, False, True, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, params = _op_inputs()
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        bottleneck_adapter(x, *params, "gelu", 0.25, 1)  # availability probes run eagerly (they take a lock)
    torch._dynamo.reset()
    # The torch backend's pure-PyTorch Philox (10 rounds of int64 ops) takes inductor minutes to
    # fuse on 2 CPU cores; aot_eager still traces the whole graph (fullgraph) and runs its autograd.
    compiler = "aot_eager" if backend == "torch" else "inductor"
    with fastpeft.use_backend(backend, op="bottleneck_adapter"):
        f = torch.compile(lambda x, *ps: bottleneck_adapter(x, *ps, "gelu", 0.25, 4242).square().sum(),
                          fullgraph=True, backend=compiler)
        loss = f(x, *params)
    grads = torch.autograd.grad(loss, [x] + params)
    leaves = [t.detach().double().requires_grad_() for t in [x] + params]
    ref = bottleneck_adapter_reference(*leaves, "gelu", 0.25, 4242, True).square().sum()
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_close(loss, ref.detach(), f32, "loss", scale=100)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, f32, f"compiled d{name}", scale=50)


# -- errors -------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    H, Bn = 8, 4
    x = torch.randn(3, H)
    Wd, bd, Wu, bu = (t.detach() for t in make_params(H, Bn))
    ok = dict(W_down=Wd, b_down=bd, W_up=Wu, b_up=bu)

    def call(**kw):
        args = dict(x=x, **ok)
        args.update(kw)
        return bottleneck_adapter(**args)

    with pytest.raises(ValueError, match="W_down: expected shape"):
        call(W_down=torch.randn(Bn, H + 1))
    with pytest.raises(ValueError, match="W_up: expected shape"):
        call(W_up=torch.randn(Bn, H))
    with pytest.raises(ValueError, match="b_down: expected shape"):
        call(b_down=torch.randn(Bn + 1))
    with pytest.raises(ValueError, match="b_up: expected shape"):
        call(b_up=torch.randn(Bn))
    with pytest.raises(ValueError, match="W_down: expected a tensor with 2 dims"):
        call(W_down=torch.randn(Bn * H))
    with pytest.raises(ValueError, match="activation: expected one of"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="dropout_p: expected < 1.0"):
        call(dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p: expected >= 0.0"):
        call(dropout_p=-0.1)
    with pytest.raises(ValueError, match="seed: expected an int"):
        call(dropout_p=0.1, seed=-1)
    with pytest.raises(TypeError, match="seed: expected an int"):
        call(dropout_p=0.1, seed=1.5)
    with pytest.raises(TypeError, match="residual: expected a bool"):
        call(residual=1)
    with pytest.raises(TypeError, match="x: expected dtype"):
        call(x=torch.ones(3, H, dtype=torch.int64))
    with pytest.raises(TypeError, match="b_up: expected dtype"):
        call(b_up=torch.ones(H, dtype=torch.int32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        call(x=[[1.0] * H])
    with pytest.raises(ValueError, match="W_up: expected a tensor on cpu"):
        call(W_up=torch.randn(H, Bn, device="meta"))
    with pytest.raises(ValueError, match="x: expected a tensor"):
        call(x=torch.randn(3, 0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forced_backend_that_cannot_take_the_inputs_raises(backend):
    H, Bn = 8, 4
    dtype = torch.float16 if backend == "cpu" else torch.float64
    x = torch.randn(3, H, dtype=dtype)
    params = [t.detach().to(dtype) if t is not None else None for t in make_params(H, Bn)]
    with fastpeft.use_backend(backend, op="bottleneck_adapter"), pytest.raises(BackendError, match=backend):
        bottleneck_adapter(x, *params)


# -- on a GPU (``-m gpu``; benchmarks/gpu_run.sh): the Triton kernels on the device -----------------
# The cases above use CPU tensors, so on a GPU machine they skip the Triton backend: this runs it on
# CUDA (one compile per kernel and case, so the list is short).
@pytest.mark.gpu
@pytest.mark.parametrize("activation,residual,p", [("gelu", True, 0.2), ("relu", False, 0.0), ("silu", True, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_on_gpu_matches_float64(activation, residual, p, dtype):
    H, Bn, seed = 67, 19, 4242
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, H, generator=g, dtype=torch.float64)
    params = [torch.randn(Bn, H, generator=g, dtype=torch.float64) * 0.1 / H ** 0.5,
              torch.empty(Bn, dtype=torch.float64).uniform_(0.5, 1.5, generator=g) * (torch.randint(0, 2, (Bn,), generator=g) * 2 - 1),
              torch.randn(H, Bn, generator=g, dtype=torch.float64) / Bn ** 0.5,
              torch.randn(H, generator=g, dtype=torch.float64) * 0.5]
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in [x] + params]
    y64 = bottleneck_adapter_reference(*leaves64, activation, p, seed, residual)
    grads64 = torch.autograd.grad(y64, leaves64, gy)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in [x] + params]
    with fastpeft.use_backend("triton", op="bottleneck_adapter"):
        y = bottleneck_adapter(*leaves, activation=activation, dropout_p=p, seed=seed, residual=residual)
    grads = torch.autograd.grad(y, leaves, gy.to("cuda", dtype))
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("y", "dx", "dW_down", "db_down", "dW_up", "db_up"), (y,) + grads, (y64,) + grads64):
        assert a.dtype == dtype, name
        e = e.detach()
        big = 2.0 * max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.detach().double().cpu(), e, atol=atol * big, rtol=rtol,
                                   msg=lambda m, name=name: f"{name} ({dtype}, {activation}): {m}")


# -- the torch-free C++ kernels ---------------------------------------------------
def test_cpp_kernel_unit_test(tmp_path):
    """Builds and runs csrc/bottleneck_adapter/bottleneck_adapter_test.cpp (torch-free)."""
    run_cpp_unit_test("bottleneck_adapter", tmp_path)
