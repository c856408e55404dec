"""lora_linear_8bit against a float64 oracle on every backend.

The oracle is ``lora_linear_plain`` (plain PyTorch, HF PEFT's LoRA math, the shared Philox mask) in float64
on the int8 weight dequantised as bitsandbytes dequantises it (``CB.to(dtype).mul_(SCB.unsqueeze(1) / 127)``),
rounded to the activation dtype as the kernels round it; so forward, dX, dA, dB and db of each backend are
checked for odd shapes (primes, 3-D, M = 0, several row tiles), with and without dropout, and every dtype of
the backend.
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import lora_linear_8bit
from fastpeft.ops.lora_linear import lora_linear_plain
from fastpeft.ops.lora_linear_8bit import dequantize_8bit_torch, quantize_8bit_torch

from ..helpers import check_scaled as check
from ..helpers import run_cpp_unit_test, runnable_backends

BACKENDS = runnable_backends("lora_linear_8bit")


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def dtypes_of(backend):
    if backend == "triton":
        return [torch.float32, torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
    if backend == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def quantised(N, K, device="cpu"):
    """(int8 weight [N, K], fp32 row scales [N]) of a random weight; one row all zero when N > 2 (scale 0)."""
    w = torch.randn(N, K) / K ** 0.5
    if N > 2:
        w[1] = 0.0
    q, s = quantize_8bit_torch(w)
    return q.to(device), s.to(device)


def bnb_dequantised(q, s, dtype):
    """bitsandbytes' own formula (``MatMul8bitFp``), on the CPU."""
    return q.cpu().to(dtype).mul_(s.cpu().unsqueeze(1).mul(1.0 / 127.0))


def make(lead, K, N, r, dtype, device, bias=True, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, K, dtype=torch.float64).to(device, dtype).requires_grad_()
    b = torch.randn(N, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    a = (torch.randn(r, K, dtype=torch.float64) / K ** 0.5).to(device, lora_dtype).requires_grad_()
    bb = (torch.randn(N, r, dtype=torch.float64) / r ** 0.5).to(device, lora_dtype).requires_grad_()
    return x, b, a, bb


def check_all(backend, x, q, s, b, a, bb, scale, p, seed, dtype):
    with fastpeft.use_backend(backend, op="lora_linear_8bit"):
        y = lora_linear_8bit(x, q, s, b, a, bb, scale, p, seed)
    N = q.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    dy = torch.randn_like(y)
    y.backward(dy)
    args = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, b, a, bb)]
    w64 = bnb_dequantised(q, s, dtype).double()  # the kernels round the decoded weight to the activation dtype
    y64 = lora_linear_plain(args[0], w64, args[1], args[2], args[3], scale, p, seed)
    y64.backward(dy.detach().cpu().double())
    check(y, y64.detach(), dtype, "y")
    for name, t, t64 in zip(("dx", "dbias", "dlora_A", "dlora_B"), (x, b, a, bb), args):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        check(t.grad, t64.grad, dtype, name)


# (lead dims of x, K, N, r, dropout_p, bias): primes, 3-D, M = 0, a rank above 32, several row tiles
CASES = {
    "M0": ((0,), 7, 5, 3, 0.25, True),
    "one": ((1,), 1, 1, 1, 0.0, True),
    "prime-p0": ((13,), 17, 11, 4, 0.0, False),
    "3d-odd": ((3, 7), 31, 23, 5, 0.5, True),
    "rank33": ((19,), 40, 21, 33, 0.1, False),
    "tiles": ((37,), 300, 263, 8, 0.1, True),  # several row tiles of W in the cpu kernel
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_forward_backward_match_float64(backend, case, dtype):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{dtype} is not a {backend} dtype here")
    if backend == "triton" and not torch.cuda.is_available() and case not in ("prime-p0", "3d-odd"):
        pytest.skip("the Triton interpreter is slow: two cases on CPU, all of them on a GPU")
    lead, K, N, r, p, bias = CASES[case]
    dev = device_of(backend)
    q, s = quantised(N, K, dev)
    x, b, a, bb = make(lead, K, N, r, dtype, dev, bias)
    check_all(backend, x, q, s, b, a, bb, float(torch.empty(()).uniform_(0.2, 3.0)), p,
              int(torch.randint(0, 2**62, ())), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_fp32_lora_params(backend):
    dtype = torch.bfloat16 if backend != "triton" or torch.cuda.is_available() else torch.float32
    dev = device_of(backend)
    q, s = quantised(24, 33, dev)
    x, b, a, bb = make((2, 9), 33, 24, 4, dtype, dev, lora_dtype=torch.float32)
    check_all(backend, x, q, s, b, a, bb, 2.0, 0.2, 7, dtype)
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_torch_decoding_is_bitsandbytes_decoding(dtype):
    """dequantize_8bit_torch is bit-identical to bitsandbytes' dequantisation of a quantised Int8Params."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    layer = bnb.nn.Linear8bitLt(57, 29, bias=False, has_fp16_weights=False)
    layer.load_state_dict({"weight": torch.randn(29, 57) * 3})
    layer = layer.to("cpu")
    w = layer.weight
    assert w.dtype == torch.int8 and w.SCB is not None
    mine = dequantize_8bit_torch(w.data, w.SCB, dtype)
    torch.testing.assert_close(mine, bnb_dequantised(w.data, w.SCB, dtype), atol=0, rtol=0)


def test_torch_quantiser_round_trips():
    """quantize_8bit_torch (example inputs without bitsandbytes) is within half a step of each row's scale."""
    w = torch.randn(6, 11)
    q, s = quantize_8bit_torch(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and torch.equal(s, w.abs().amax(1))
    err = (dequantize_8bit_torch(q, s) - w).abs()
    assert (err <= s[:, None] / 127 * 0.5 + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_as_lora_linear(backend):
    """Same seed, same dropout mask: the 8-bit op equals lora_linear on the dequantised weight."""
    dev = device_of(backend)
    q, s = quantised(16, 40, dev)
    x, b, a, bb = (t.detach() for t in make((9,), 40, 16, 3, torch.float32, dev))
    with fastpeft.use_backend(backend, op="lora_linear_8bit"):
        y = lora_linear_8bit(x, q, s, b, a, bb, 1.5, 0.5, 31337)
    y_ref = fastpeft.ops.lora_linear(x, dequantize_8bit_torch(q, s), b, a, bb, 1.5, 0.5, 31337)
    check(y, y_ref.double(), torch.float32, "y")


def test_matches_bitsandbytes_training_forward_and_dx():
    """With LoRA off (B = 0), the op is bitsandbytes' CPU training forward of Linear8bitLt (MatMul8bitFp),
    and its dX is bitsandbytes' dX."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    layer = bnb.nn.Linear8bitLt(40, 24, bias=True, has_fp16_weights=False)
    layer.load_state_dict({"weight": torch.randn(24, 40), "bias": torch.randn(24)})
    layer = layer.to("cpu").train()
    x = torch.randn(3, 5, 40, requires_grad=True)
    y_bnb = layer(x)
    dy = torch.randn_like(y_bnb)
    (dx_bnb,) = torch.autograd.grad(y_bnb, x, dy)
    q = layer.state.CB if layer.state.CB is not None else layer.weight.data
    s = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    x2 = x.detach().requires_grad_()
    y = lora_linear_8bit(x2, q, s, layer.bias.detach(), torch.randn(4, 40), torch.zeros(24, 4), 1.0)
    (dx,) = torch.autograd.grad(y, x2, dy)
    torch.testing.assert_close(y, y_bnb.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_bnb, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_argument():
    q, s = quantised(6, 8)
    x, a, bb = torch.randn(3, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(TypeError, match="weight: expected dtype in \\['int8'\\]"):
        lora_linear_8bit(x, q.float(), s, None, a, bb, 1.0)
    with pytest.raises(ValueError, match="weight: expected an int8 \\[N, 9\\]"):
        lora_linear_8bit(torch.randn(3, 9), q, s, None, torch.randn(2, 9), bb, 1.0)
    with pytest.raises(ValueError, match="row_scale: expected shape \\[6\\]"):
        lora_linear_8bit(x, q, s[:5], None, a, bb, 1.0)
    with pytest.raises(TypeError, match="row_scale: expected dtype"):
        lora_linear_8bit(x, q, s.half(), None, a, bb, 1.0)
    with pytest.raises(TypeError, match="weight: expected an int8 tensor"):
        lora_linear_8bit(x, "CB", s, None, a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_B: expected shape \\[6, 2\\]"):
        lora_linear_8bit(x, q, s, None, a, torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="bias: expected shape \\[6\\]"):
        lora_linear_8bit(x, q, s, torch.randn(5), a, bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_8bit(x, q, s, None, a, bb, 1.0, dropout_p=1.0)


def test_forced_unsupported_backend_raises():
    q, s = quantised(6, 8)
    with fastpeft.use_backend("cpu", op="lora_linear_8bit"), pytest.raises(BackendError, match="cpu"):
        lora_linear_8bit(torch.randn(3, 8, dtype=torch.float16), q, s, None, torch.randn(2, 8).half(),
                         torch.randn(6, 2).half(), 1.0)


# -- registration: opcheck, torch.compile ---------------------------------------------
def _op_args(name):
    K, N, r = 16, 12, 3
    q, s = quantised(N, K)
    x, b, a, bb = (t.detach() for t in make((2, 5), K, N, r, torch.float32, "cpu"))
    if name.endswith("_fwd"):
        return (x.requires_grad_(), q, s, b.requires_grad_(), a.requires_grad_(), bb.requires_grad_(), 0.5, 0.25, 42)
    return (torch.randn(2, 5, N), x, q, s, a, bb, torch.randn(10, r), 0.5, 0.25, 42, [True, True, True, True])


@pytest.mark.parametrize("name", ["lora_linear_8bit_fwd", "lora_linear_8bit_bwd", "lora_linear_8bit_triton_fwd",
                                  "lora_linear_8bit_triton_bwd"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    if "triton" in name and fastpeft.backends.get_op("lora_linear_8bit").why_not("triton") is not None:
        pytest.skip("triton cannot run here")
    opcheck(op.default, _op_args(name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dtype, dev = torch.float32, device_of(backend)
    K, N = 16, 8
    q, s = quantised(N, K, dev)
    x, b, a, bb = make((3, 4), K, N, 2, dtype, dev)
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op="lora_linear_8bit"):
        f = torch.compile(lambda x, a, bb: lora_linear_8bit(x, q, s, b, a, bb, 0.5, 0.3, 1234).square().sum(),
                          fullgraph=True)
        loss = f(x, a, bb)
    loss.backward()
    args = [t.detach().cpu().double().requires_grad_() for t in (x, a, bb)]
    ref = lora_linear_plain(args[0], bnb_dequantised(q, s, torch.float64), b.detach().cpu().double(), args[1],
                            args[2], 0.5, 0.3, 1234).square().sum()
    ref.backward()
    check(loss, ref.detach(), dtype, "loss")
    for t, r, name in zip((x, a, bb), args, ("dx", "dlora_A", "dlora_B")):
        check(t.grad, r.grad, dtype, name)


def test_cpp_kernel_unit_test(tmp_path):
    """Build and run csrc/lora_linear_8bit/lora_linear_8bit_test.cpp (no torch)."""
    run_cpp_unit_test("lora_linear_8bit", tmp_path)


# -- on a GPU (``-m gpu``): the Triton dequantise-in-GEMM kernels on the device -------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["3d-odd", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_triton_on_gpu_matches_float64(case, dtype):
    lead, K, N, r, p, bias = CASES[case]
    q, s = quantised(N, K, "cuda")
    x, b, a, bb = make(lead, K, N, r, dtype, "cuda", bias)
    check_all("triton", x, q, s, b, a, bb, 1.7, p, 1234567, dtype)
