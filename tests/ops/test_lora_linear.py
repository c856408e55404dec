"""lora_linear against a float64 oracle (plain PyTorch, HF PEFT's LoRA math) on every backend.

The oracle, ``lora_linear_plain`` in float64, uses the shared Philox mask of the
same seed, so comparing a backend's forward *and* gradients with it also checks
that the backend drops the same elements in forward and backward.
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.kernels.philox import dropout_keep_mask
from fastpeft.ops import lora_linear
from fastpeft.ops.lora_linear import lora_linear_plain

from ..helpers import check_scaled as check
from ..helpers import run_cpp_unit_test, runnable_backends


BACKENDS = runnable_backends("lora_linear")


def device_of(backend):
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def dtypes_of(backend):
    if backend in ("triton", "cuda"):
        if torch.cuda.is_available():
            return [torch.float32, torch.float16, torch.bfloat16]
        return [torch.float32, torch.float16]  # the interpreter has no bf16 tl.dot
    return [torch.float64, torch.float32, torch.bfloat16]


def make(lead, K, N, r, dtype, device="cpu", bias=True, lora_dtype=None, weight_grad=False):
    """Fresh random inputs scaled so y, dX, dA, dB are O(1)."""
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, K, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(N, K, dtype=torch.float64) / max(K, 1) ** 0.5).to(device, dtype).requires_grad_(weight_grad)
    b = torch.randn(N, dtype=torch.float64).to(device, dtype).requires_grad_(weight_grad) if bias else None
    a = (torch.randn(r, K, dtype=torch.float64) / max(K, 1) ** 0.5).to(device, lora_dtype).requires_grad_()
    bb = (torch.randn(N, r, dtype=torch.float64) / r ** 0.5).to(device, lora_dtype).requires_grad_()
    return x, w, b, a, bb


def oracle(x, w, b, a, bb, scale, p, seed, dy):
    """float64 forward and gradients (x, weight, bias, lora_A, lora_B) of plain PyTorch."""
    args = [t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None
            for t in (x, w, b, a, bb)]
    y = lora_linear_plain(*args, scale, p, seed)
    y.backward(dy.detach().cpu().double())
    return y.detach(), [t.grad if t is not None else None for t in args]


def run(backend, x, w, b, a, bb, scale, p, seed):
    with fastpeft.use_backend(backend, op="lora_linear"):
        return lora_linear(x, w, b, a, bb, scale, p, seed)


def check_all(backend, inputs, scale, p, seed, dtype):
    x, w, b, a, bb = inputs
    y = run(backend, x, w, b, a, bb, scale, p, seed)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, grads64 = oracle(x, w, b, a, bb, scale, p, seed, dy)
    check(y, y64, dtype, "y")
    for name, t, g64 in zip(("dx", "dweight", "dbias", "dlora_A", "dlora_B"), (x, w, b, a, bb), grads64):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None, f"{name} was computed for a frozen tensor"
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        check(t.grad, g64, dtype, name)


# (lead dims of x, K, N, r, dropout_p, bias): primes, odd sizes, 3-D, M = 0, ranks 1 and odd.
CASES = {
    "M0": ((0,), 7, 5, 3, 0.25, True),
    "one": ((1,), 1, 1, 1, 0.0, True),
    "prime-p0": ((13,), 17, 11, 4, 0.0, False),
    "prime-r1": ((13,), 17, 11, 1, 0.25, True),
    "3d-nobias": ((3, 7), 31, 23, 5, 0.5, False),
    "rank33": ((19,), 40, 21, 33, 0.1, True),
    "tall": ((300,), 9, 5, 2, 0.3, True),  # several row splits in the triton dA reduction
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_forward_backward_match_float64(backend, case, dtype):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{dtype} is not a {backend} dtype here")
    lead, K, N, r, p, bias = CASES[case]
    inputs = make(lead, K, N, r, dtype, device_of(backend), bias=bias)
    check_all(backend, inputs, float(torch.empty(()).uniform_(0.2, 3.0)), p, int(torch.randint(0, 2**62, ())), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_weight_and_bias_get_gradients(backend):
    dtype = torch.float32
    inputs = make((2, 5), 19, 13, 3, dtype, device_of(backend), weight_grad=True)
    check_all(backend, inputs, 0.7, 0.2, 99, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend):
    x, w, b, a, bb = make((6,), 9, 7, 2, torch.float32, device_of(backend))
    run(backend, x, w, b, a, bb, 1.0, 0.3, 5).sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_compiled_backward_ops_skip_frozen_gradients():
    """The bwd ops themselves do not compute dW/db (or anything) unless asked."""
    ops = [n for n in ("lora_linear_bwd", "lora_linear_triton_bwd") if hasattr(torch.ops.fastpeft, n)]
    if not ops:
        pytest.skip("no compiled backward op registered")
    x, w, _, a, bb = make((8,), 9, 7, 2, torch.float32)
    u0 = torch.randn(8, 2)
    for name in ops:
        if name == "lora_linear_triton_bwd" and "triton" not in [p.values[0] for p in BACKENDS if not p.marks]:
            continue
        dx, dw, db, da, dbb = getattr(torch.ops.fastpeft, name)(torch.randn(8, 7), x.detach(), w.detach(), a.detach(),
                                                             bb.detach(), u0, 1.0, 0.2, 3,
                                                             [True, False, False, True, False])
        assert dx.shape == x.shape and da.shape == a.shape, name
        assert dw.numel() == 0 and db.numel() == 0 and dbb.numel() == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_fp32_lora_params(backend):
    act = torch.bfloat16 if device_of(backend) == "cuda" or backend not in ("triton",) else torch.float16
    x, w, b, a, bb = make((2, 9), 33, 17, 4, act, device_of(backend), lora_dtype=torch.float32)
    y = run(backend, x, w, b, a, bb, 2.0, 0.2, 7)
    assert y.dtype == act
    dy = torch.randn_like(y)
    y.backward(dy)
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32 and x.grad.dtype == act
    y64, (dx64, _, _, da64, db64) = oracle(x, w, b, a, bb, 2.0, 0.2, 7, dy)
    check(y, y64, act, "y")
    check(x.grad, dx64, act, "dx")
    check(a.grad, da64, act, "dlora_A")
    check(bb.grad, db64, act, "dlora_B")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """x as a transposed view and a 3-D slice, weight as Conv1D's weight.t(), lora params transposed views."""
    dev, dtype = device_of(backend), torch.float32
    K, N, r, M = 23, 13, 3, 11
    x = torch.randn(K, M, device=dev).t().requires_grad_()  # [M, K], strides (1, M)
    w = torch.randn(K, N, device=dev).div_(K ** 0.5).t()  # [N, K] view of a Conv1D [K, N] weight
    a = torch.randn(K, r, device=dev).div_(K ** 0.5).t().requires_grad_()
    bb = torch.randn(r, N, device=dev).t().requires_grad_()
    b = torch.randn(2 * N, device=dev)[::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    check_all(backend, (x, w, b, a, bb), 1.5, 0.3, 11, dtype)
    x3 = torch.randn(3, 2 * M, K, device=dev)[:, ::2, :].requires_grad_()
    a.grad = bb.grad = None
    check_all(backend, (x3, w, b, a, bb), 0.5, 0.3, 12, dtype)


# -- dropout ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction_and_mean(backend, p):
    """x = 1, A = 1, B = 1, W = 0: y[m, n] = (kept in row m) / (1 - p), so y reveals the mask counts."""
    dev = device_of(backend)
    M, K = 64, 96
    x = torch.ones(M, K, device=dev)
    w = torch.zeros(3, K, device=dev)
    y = run(backend, x, w, None, torch.ones(1, K, device=dev), torch.ones(3, 1, device=dev), 1.0, p, 2024)
    kept = (y[:, 0].double() * (1 - p)).sum().item()
    n = M * K
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(kept - n * (1 - p)) < 5 * sd, f"kept {kept} of {n}, expected {n * (1 - p)} +- {5 * sd}"
    assert abs(y[:, 0].double().mean().item() / K - 1.0) < 5 * sd / n / (1 - p)
    assert torch.allclose(y[:, 0].double() * (1 - p),
                          dropout_keep_mask(2024, M, K, p).sum(1).double().to(dev), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_controls_the_mask(backend):
    dev = device_of(backend)
    x, w, b, a, bb = (t.detach() for t in make((16,), 32, 8, 4, torch.float32, dev))
    y1 = run(backend, x, w, b, a, bb, 1.0, 0.5, 1)
    assert torch.equal(y1, run(backend, x, w, b, a, bb, 1.0, 0.5, 1)), "same seed, different output"
    assert (y1 - run(backend, x, w, b, a, bb, 1.0, 0.5, 2)).abs().max() > 1e-2, "different seeds, same mask"
    # p = 0 ignores the seed; seed=None draws from torch's generator (deterministic under manual_seed)
    assert torch.equal(run(backend, x, w, b, a, bb, 1.0, 0.0, 1), run(backend, x, w, b, a, bb, 1.0, 0.0, 2))
    torch.manual_seed(3)
    y3 = run(backend, x, w, b, a, bb, 1.0, 0.5, None)
    torch.manual_seed(3)
    assert torch.equal(y3, run(backend, x, w, b, a, bb, 1.0, 0.5, None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_dropped_inf_and_nan_give_zero(backend, special):
    """A dropped element is 0 whatever its value (the reference's torch.where): inf / NaN at every dropped
    position leave the LoRA branch (dA, dB) finite and equal to the reference's; a multiply by the 0/1 mask
    would make them NaN."""
    dev = device_of(backend)
    dtype = torch.float32
    M, K, N, r, p, seed = 33, 40, 24, 4, 0.3, 11
    x, w, b, a, bb = (t.detach() for t in make((M,), K, N, r, dtype, dev))
    keep = dropout_keep_mask(seed, M, K, p, device=dev)
    assert (~keep).any() and keep.any()
    x[~keep] = special
    gy = torch.randn(M, N, dtype=dtype, device=dev)
    got, want = [], []
    for fn, out in ((lambda *t: run(backend, *t, 2.0, p, seed), got), (lambda *t: lora_linear_plain(*t, 2.0, p, seed), want)):
        a1, b1 = a.clone().requires_grad_(), bb.clone().requires_grad_()
        fn(x, w, b, a1, b1).backward(gy)
        out += [a1.grad, b1.grad]
    for g, e, name in zip(got, want, ("dA", "dB")):
        assert torch.isfinite(g).all(), f"{backend} {name}: a dropped {special} leaked into the LoRA gradient"
        check(g, e, dtype, f"{backend} {name}")


def test_same_seed_same_result_on_every_backend():
    names = [p.values[0] for p in BACKENDS if not p.marks]
    x, w, b, a, bb = (t.detach() for t in make((5, 6), 37, 12, 3, torch.float32))
    outs = {n: run(n, *(t.to(device_of(n)) for t in (x, w, b, a, bb)), 1.0, 0.5, 77).cpu() for n in names}
    for n, y in outs.items():
        torch.testing.assert_close(y, outs["torch"], atol=1e-5, rtol=1e-5, msg=lambda m: f"{n} vs torch: {m}")


# -- memory discipline -----------------------------------------------------------
def saved_big_tensors(fn, x, M, K, N):
    """Tensors of M*K or M*N elements saved for backward by fn(), other than x itself."""
    bad = []

    def pack(t):
        if t.numel() in (M * K, M * N) and not (t.data_ptr() == x.data_ptr() and t.shape == x.shape):
            bad.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.sum().backward()
    return bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_x_and_the_small_product(backend):
    M, K, N, r = 13, 17, 11, 3
    x, w, b, a, bb = make((M,), K, N, r, torch.float32, device_of(backend))
    assert saved_big_tensors(lambda: run(backend, x, w, b, a, bb, 1.0, 0.3, 1), x, M, K, N) == []
    x3, *_ = make((1, M), K, N, r, torch.float32, device_of(backend))
    assert saved_big_tensors(lambda: run(backend, x3, w, b, a, bb, 1.0, 0.3, 1), x3, M, K, N) == []


def test_saved_tensor_probe_catches_a_saved_dropout_copy():
    """The probe above can fail: plain PyTorch (like HF PEFT) saves drop(x), an M x K tensor."""
    M, K, N, r = 13, 17, 11, 3
    x, w, b, a, bb = make((M,), K, N, r, torch.float32)
    assert saved_big_tensors(lambda: lora_linear_plain(x, w, b, a, bb, 1.0, 0.3, 1), x, M, K, N)


# -- errors ----------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x, w, b, a, bb = (t.detach() for t in make((4,), 8, 6, 2, torch.float32))
    cases = [
        ((x, w[:, :5], b, a, bb), ValueError, "weight: expected shape"),
        ((x, w, b[:3], a, bb), ValueError, "bias: expected shape"),
        ((x, w, b, a[:, :7], bb), ValueError, "lora_A: expected shape"),
        ((x, w, b, a, bb[:, :1]), ValueError, "lora_B: expected shape"),
        ((x, w.double(), b, a, bb), TypeError, "weight: expected dtype"),
        ((x, w, b.double(), a, bb), TypeError, "bias: expected dtype"),
        ((x.bfloat16(), w.bfloat16(), b.bfloat16(), a.double(), bb.double()), TypeError, "lora_A: expected dtype"),
        ((x, w, b, a, bb.double()), TypeError, "lora_B: expected dtype"),
        ((x, w, b, a.to("meta"), bb), ValueError, "lora_A: expected a tensor on cpu"),
        ((x.int(), w, b, a, bb), TypeError, "x: expected dtype"),
        (([1.0], w, b, a, bb), TypeError, "x: expected a torch.Tensor"),
        ((x, None, b, a, bb), TypeError, "weight: expected a tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            lora_linear(*args, 1.0)
    with pytest.raises(ValueError, match="dropout_p: expected < 1"):
        lora_linear(x, w, b, a, bb, 1.0, 1.0)
    with pytest.raises(ValueError, match="dropout_p: expected >= 0"):
        lora_linear(x, w, b, a, bb, 1.0, -0.1)
    with pytest.raises(TypeError, match="scale: expected a number"):
        lora_linear(x, w, b, a, bb, "1")
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, b, a, bb, 1.0, 0.1, -5)


def test_forced_unsupported_backend_raises():
    x, w, b, a, bb = (t.detach() for t in make((4,), 8, 6, 2, torch.float64))
    with fastpeft.use_backend("cuda", op="lora_linear"), pytest.raises(BackendError, match="cuda"):
        lora_linear(x, w, b, a, bb, 1.0)


# -- registration: opcheck, torch.compile ---------------------------------------------
def _op_args(name):
    x, w, b, a, bb = (t.detach() for t in make((2, 5), 16, 12, 3, torch.float32))
    if name == "lora_linear_keep_mask":
        return (x.reshape(10, 16), 42, 0.25)
    if name.endswith("_fwd"):
        return (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), 0.5, 0.25, 42)
    u0 = torch.randn(10, 3)
    return (torch.randn(2, 5, 12), x, w, a, bb, u0, 0.5, 0.25, 42, [True, True, True, True, True])


@pytest.mark.parametrize("name", ["lora_linear_fwd", "lora_linear_bwd", "lora_linear_triton_fwd",
                                  "lora_linear_triton_bwd", "lora_linear_keep_mask"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    if "triton" in name and fastpeft.backends.get_op("lora_linear").why_not("triton") is not None:
        pytest.skip("triton cannot run here")
    opcheck(op.default, _op_args(name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dtype = torch.float32
    x, w, b, a, bb = make((3, 4), 16, 8, 2, dtype, device_of(backend))
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op="lora_linear"):
        f = torch.compile(lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.5, 0.3, 1234).square().sum(),
                          fullgraph=True)
        loss = f(x, a, bb)
    loss.backward()
    args = [t.detach().cpu().double().requires_grad_() for t in (x, a, bb)]
    ref = lora_linear_plain(args[0], w.cpu().double(), b.cpu().double(), args[1], args[2], 0.5, 0.3,
                            1234).square().sum()
    ref.backward()
    check(loss, ref.detach(), dtype, "loss")
    for t, r, name in zip((x, a, bb), args, ("dx", "dlora_A", "dlora_B")):
        check(t.grad, r.grad, dtype, name)


# -- on a GPU (``-m gpu``; benchmarks/gpu_run.sh): the Triton kernels on the device -----------------
# The cases above use CPU tensors, so on a GPU machine they skip the Triton backend: these run it on
# CUDA. Every case is one new compile per kernel (FASTPEFT_TRITON_AUTOTUNE=off there), so the list is
# short: fp32 / fp16 / bf16, odd (prime) and 3-D shapes, dropout on and off, ranks that pad to 16 and
# to 64, a size with many tiles, and fp32 LoRA parameters with bf16 activations.
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (lead dims, K, N, r, dropout_p, bias)
GPU_CASES = {
    "prime-3d-r5": ((3, 37), 67, 45, 5, 0.1, True),
    "tiles-r64": ((1031,), 512, 384, 64, 0.1, False),
    "no-dropout-r16": ((257,), 128, 256, 16, 0.0, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_on_gpu_matches_float64(case, dtype):
    lead, K, N, r, p, bias = GPU_CASES[case]
    inputs = make(lead, K, N, r, dtype, "cuda", bias=bias)
    check_all("triton", inputs, 1.7, p, 1234567, dtype)


@pytest.mark.gpu
def test_triton_on_gpu_fp32_params_with_bf16_activations():
    inputs = make((5, 29), 96, 80, 8, torch.bfloat16, "cuda", lora_dtype=torch.float32)
    check_all("triton", inputs, 2.0, 0.1, 99, torch.bfloat16)


@pytest.mark.gpu
def test_triton_on_gpu_mask_is_the_shared_philox_mask():
    """x = 1, W = 0, A = 1, B = 1, r = 1: y[m, n] = sum_k keep[m, k] / (1 - p), the torch mask's row sums."""
    M, K, p, seed = 70, 300, 0.3, 2024
    x = torch.ones(M, K, device="cuda")
    with fastpeft.use_backend("triton", op="lora_linear"):
        y = lora_linear(x, torch.zeros(2, K, device="cuda"), None, torch.ones(1, K, device="cuda"),
                        torch.ones(2, 1, device="cuda"), 1.0, p, seed)
    keep = dropout_keep_mask(seed, M, K, p, stream=0).double()
    torch.testing.assert_close(y[:, 0].double().cpu(), keep.sum(1) / (1 - p), atol=1e-3, rtol=1e-5)


# -- the torch-free C++ kernels ---------------------------------------------------------
def test_cpp_kernel_unit_test(tmp_path):
    """Build and run csrc/lora_linear/lora_linear_test.cpp (no torch) when a C++ compiler is there."""
    run_cpp_unit_test("lora_linear", tmp_path)
