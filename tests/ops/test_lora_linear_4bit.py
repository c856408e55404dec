"""lora_linear_4bit against a float64 oracle on every backend.

The oracle is ``lora_linear_plain`` (plain PyTorch, HF PEFT's LoRA math, the shared Philox mask) in
float64 on the weight that bitsandbytes itself dequantises (``bitsandbytes.functional.dequantize_4bit``),
rounded to the activation dtype as the kernels round it; so forward, dX, dA, dB and db of each backend
are checked against bitsandbytes' decoding, for nf4 / fp4, nested (double-quantised) or not, several
blocksizes, odd shapes, and every dtype of the backend.
"""
import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import lora_linear_4bit
from fastpeft.ops.lora_linear import lora_linear_plain
from fastpeft.ops.lora_linear_4bit import Quant4bit, dequantize_4bit_torch, quant_state_args, quantize_4bit_torch

from ..helpers import check_scaled as check
from ..helpers import run_cpp_unit_test, runnable_backends

BACKENDS = runnable_backends("lora_linear_4bit")


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def dtypes_of(backend):
    if backend == "triton":
        return [torch.float32, torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]
    if backend == "cpu":
        return [torch.float64, torch.float32, torch.bfloat16]
    return [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def quantised(N, K, quant_type="nf4", blocksize=64, nested=False, device="cpu"):
    """(packed weight, bitsandbytes QuantState, bitsandbytes' own dequantised fp32 weight)."""
    F = bnb_functional()
    w = torch.randn(N, K) / K ** 0.5
    q, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return q.to(device), qs, F.dequantize_4bit(q, qs)


def make(lead, K, N, r, dtype, device, bias=True, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, K, dtype=torch.float64).to(device, dtype).requires_grad_()
    b = torch.randn(N, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    a = (torch.randn(r, K, dtype=torch.float64) / K ** 0.5).to(device, lora_dtype).requires_grad_()
    bb = (torch.randn(N, r, dtype=torch.float64) / r ** 0.5).to(device, lora_dtype).requires_grad_()
    return x, b, a, bb


def check_all(backend, x, q, qs, W, b, a, bb, scale, p, seed, dtype):
    with fastpeft.use_backend(backend, op="lora_linear_4bit"):
        y = lora_linear_4bit(x, q, qs, b, a, bb, scale, p, seed)
    N = W.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    dy = torch.randn_like(y)
    y.backward(dy)
    args = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, b, a, bb)]
    w64 = W.to(dtype).double()  # the kernels round the decoded weight to the activation dtype
    y64 = lora_linear_plain(args[0], w64, args[1], args[2], args[3], scale, p, seed)
    y64.backward(dy.detach().cpu().double())
    check(y, y64.detach(), dtype, "y")
    for name, t, t64 in zip(("dx", "dbias", "dlora_A", "dlora_B"), (x, b, a, bb), args):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        check(t.grad, t64.grad, dtype, name)


# (lead dims of x, K, N, r, dropout_p, bias): primes, odd K (rows start in a low nibble), 3-D, M = 0
CASES = {
    "M0": ((0,), 7, 5, 3, 0.25, True),
    "one": ((1,), 1, 1, 1, 0.0, True),
    "prime-p0": ((13,), 17, 11, 4, 0.0, False),
    "3d-odd": ((3, 7), 31, 23, 5, 0.5, True),
    "rank33": ((19,), 40, 21, 33, 0.1, False),
    "tiles": ((37,), 300, 263, 8, 0.1, True),  # several row tiles of W in the cpu kernel
}
QUANT = [("nf4", 64, False), ("nf4", 32, True), ("fp4", 128, False), ("fp4", 256, True), ("nf4", 4096, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("quant", QUANT, ids=lambda q: f"{q[0]}-bs{q[1]}{'-nested' if q[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_forward_backward_match_float64(backend, case, quant, dtype):
    if dtype not in dtypes_of(backend):
        pytest.skip(f"{dtype} is not a {backend} dtype here")
    if backend == "triton" and not torch.cuda.is_available() and (case not in ("prime-p0", "3d-odd")
                                                                    or quant != QUANT[1]):
        pytest.skip("the Triton interpreter is slow: two cases on CPU, all of them on a GPU")
    lead, K, N, r, p, bias = CASES[case]
    qt, bs, nested = quant
    dev = device_of(backend)
    q, qs, W = quantised(N, K, qt, bs, nested)
    q = q.to(dev)
    qs.to(dev)
    x, b, a, bb = make(lead, K, N, r, dtype, dev, bias)
    check_all(backend, x, q, qs, W, b, a, bb, float(torch.empty(()).uniform_(0.2, 3.0)), p,
              int(torch.randint(0, 2**62, ())), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_fp32_lora_params(backend):
    dtype = torch.bfloat16 if backend != "triton" or torch.cuda.is_available() else torch.float32
    dev = device_of(backend)
    q, qs, W = quantised(24, 33, "nf4", 64, True)
    x, b, a, bb = make((2, 9), 33, 24, 4, dtype, dev, lora_dtype=torch.float32)
    check_all(backend, x, q.to(dev), qs, W, b, a, bb, 2.0, 0.2, 7, dtype)
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_torch_decoding_is_bitsandbytes_decoding(quant_type, blocksize, nested):
    F = bnb_functional()
    w = torch.randn(29, 57) * 3
    for storage in (torch.uint8, torch.bfloat16):
        if storage != torch.uint8:
            w = w[:28, :]  # an even number of packed bytes (bitsandbytes views them as the storage dtype)
        N, K = w.shape
        q, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                                quant_storage=storage)
        args = quant_state_args(qs)
        from fastpeft.ops.lora_linear_4bit import packed_bytes
        mine = dequantize_4bit_torch(packed_bytes(q), args.absmax, args.code, N, K, blocksize)
        torch.testing.assert_close(mine, F.dequantize_4bit(q, qs), atol=0, rtol=0)


def test_torch_quantiser_round_trips_exact_codes():
    """quantize_4bit_torch (example inputs without bitsandbytes) inverts the decoding on code values."""
    from fastpeft.ops.lora_linear_4bit.reference import NF4_CODE
    code = torch.tensor(NF4_CODE)
    w = code[torch.randint(0, 16, (6, 11))] * 2.5
    w.view(-1)[::64] = 2.5  # every 64-block holds 2.5: its absmax
    q, absmax, c = quantize_4bit_torch(w, 64, "nf4")
    torch.testing.assert_close(dequantize_4bit_torch(q, absmax, c, 6, 11, 64), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_as_lora_linear(backend):
    """Same seed, same dropout mask: the 4-bit op equals lora_linear on the dequantised weight."""
    dev = device_of(backend)
    q, qs, W = quantised(16, 40, "nf4", 64)
    x, b, a, bb = (t.detach().to(dev) for t in make((9,), 40, 16, 3, torch.float32, dev))
    with fastpeft.use_backend(backend, op="lora_linear_4bit"):
        y = lora_linear_4bit(x, q.to(dev), qs, b, a, bb, 1.5, 0.5, 31337)
    y_ref = fastpeft.ops.lora_linear(x, W.to(dev), b, a, bb, 1.5, 0.5, 31337)
    check(y, y_ref.double(), torch.float32, "y")


def test_inf_in_a_dropped_element_gives_no_nan():
    """A dropped inf contributes 0 to the LoRA branch (select, not a multiply by a 0 mask) on every backend."""
    q, qs, W = quantised(6, 8, "nf4", 64)
    x = torch.randn(4, 8)
    x[:, 3] = float("inf")
    a, bb = torch.randn(2, 8), torch.randn(6, 2)
    from fastpeft.kernels.philox import dropout_keep_mask
    keep = dropout_keep_mask(5, 4, 8, 0.5, stream=0)
    for backend in ("torch", "cpu"):
        if fastpeft.backends.get_op("lora_linear_4bit").why_not(backend, *fastpeft.ops.example_inputs()["lora_linear_4bit"]):
            continue
        with fastpeft.use_backend(backend, op="lora_linear_4bit"):
            u = lora_linear_4bit(x, q, qs, None, a, torch.eye(6, 2), 1.0, 0.5, 5)
        # column 0 of the LoRA branch is U0[:, 0]; rows whose inf was dropped have a finite U0
        ref = lora_linear_plain(x, W, None, a, torch.eye(6, 2), 1.0, 0.5, 5)
        dropped = ~keep[:, 3]
        assert torch.equal(torch.isnan(u[dropped]), torch.isnan(ref[dropped])), backend


def test_bad_input_names_the_argument():
    q, qs, W = quantised(6, 8, "nf4", 64)
    x, a, bb = torch.randn(3, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="quant_state: .*no quantisation state"):
        lora_linear_4bit(x, q, None, None, a, bb, 1.0)
    with pytest.raises(ValueError, match="quant_state.shape"):
        lora_linear_4bit(torch.randn(3, 9), q, qs, None, torch.randn(2, 9), bb, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear_4bit(x, q, qs, None, a, torch.randn(5, 2), 1.0)
    with pytest.raises(ValueError, match="qweight"):
        lora_linear_4bit(x, q[:10], qs, None, a, bb, 1.0)
    with pytest.raises(ValueError, match="blocksize"):
        lora_linear_4bit(x, q, Quant4bit(torch.ones(1), torch.zeros(16), 48, (6, 8)), None, a, bb, 1.0)
    with pytest.raises(ValueError, match="absmax"):
        lora_linear_4bit(x, q, Quant4bit(torch.ones(0), torch.zeros(16), 64, (6, 8)), None, a, bb, 1.0)

    class OtherType:  # a quant state of a type fastpeft does not decode
        quant_type, absmax, code, blocksize, shape, nested = "int4", torch.ones(1), torch.zeros(16), 64, (6, 8), False
    with pytest.raises(ValueError, match="quant_state.quant_type: .*'nf4' and 'fp4', got 'int4'"):
        lora_linear_4bit(x, q, OtherType(), None, a, bb, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_4bit(x, q, qs, None, a, bb, 1.0, dropout_p=1.0)


def test_forced_unsupported_backend_raises():
    q, qs, W = quantised(6, 8, "nf4", 64)
    with fastpeft.use_backend("cpu", op="lora_linear_4bit"), pytest.raises(BackendError, match="cpu"):
        lora_linear_4bit(torch.randn(3, 8, dtype=torch.float16), q, qs, None, torch.randn(2, 8).half(),
                         torch.randn(6, 2).half(), 1.0)


# -- registration: opcheck, torch.compile ---------------------------------------------
def _op_args(name):
    K, N, r = 16, 12, 3
    q, absmax, code = quantize_4bit_torch(torch.randn(N, K), 32, "nf4")
    q = q.reshape(-1)
    x, b, a, bb = (t.detach() for t in make((2, 5), K, N, r, torch.float32, "cpu"))
    if name.endswith("_fwd"):
        return (x.requires_grad_(), q, absmax, code, N, 32, b.requires_grad_(), a.requires_grad_(),
                bb.requires_grad_(), 0.5, 0.25, 42)
    return (torch.randn(2, 5, N), x, q, absmax, code, N, 32, a, bb, torch.randn(10, r), 0.5, 0.25, 42,
            [True, True, True, True])


@pytest.mark.parametrize("name", ["lora_linear_4bit_fwd", "lora_linear_4bit_bwd", "lora_linear_4bit_triton_fwd",
                                  "lora_linear_4bit_triton_bwd"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    if "triton" in name and fastpeft.backends.get_op("lora_linear_4bit").why_not("triton") is not None:
        pytest.skip("triton cannot run here")
    opcheck(op.default, _op_args(name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dtype, dev = torch.float32, device_of(backend)
    K, N = 16, 8
    W0 = torch.randn(N, K)
    q, absmax, code = quantize_4bit_torch(W0, 64, "fp4")
    qs = Quant4bit(absmax.to(dev), code.to(dev), 64, (N, K))
    W = dequantize_4bit_torch(q, absmax, code, N, K, 64)
    x, b, a, bb = make((3, 4), K, N, 2, dtype, dev)
    q = q.to(dev)
    torch._dynamo.reset()
    with fastpeft.use_backend(backend, op="lora_linear_4bit"):
        f = torch.compile(lambda x, a, bb: lora_linear_4bit(x, q, qs, b, a, bb, 0.5, 0.3, 1234).square().sum(),
                          fullgraph=True)
        loss = f(x, a, bb)
    loss.backward()
    args = [t.detach().cpu().double().requires_grad_() for t in (x, a, bb)]
    ref = lora_linear_plain(args[0], W.double(), b.detach().double(), args[1], args[2], 0.5, 0.3,
                            1234).square().sum()
    ref.backward()
    check(loss, ref.detach(), dtype, "loss")
    for t, r, name in zip((x, a, bb), args, ("dx", "dlora_A", "dlora_B")):
        check(t.grad, r.grad, dtype, name)


# -- on a GPU (``-m gpu``): the Triton dequantise-in-GEMM kernels on the device -------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["3d-odd", "tiles"])
@pytest.mark.parametrize("quant", [QUANT[0], QUANT[3]], ids=lambda q: f"{q[0]}-bs{q[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_triton_on_gpu_matches_float64(case, quant, dtype):
    lead, K, N, r, p, bias = CASES[case]
    q, qs, W = quantised(N, K, *quant)
    qs.to("cuda")
    x, b, a, bb = make(lead, K, N, r, dtype, "cuda", bias)
    check_all("triton", x, q.to("cuda"), qs, W, b, a, bb, 1.7, p, 1234567, dtype)


def test_cpp_kernel_unit_test(tmp_path):
    """Build and run csrc/lora_linear_4bit/lora_linear_4bit_test.cpp (no torch)."""
    run_cpp_unit_test("lora_linear_4bit", tmp_path)
