"""grad_tail (fused unscale + clip + overflow check) against a float64 oracle and
against PyTorch's ``GradScaler.unscale_`` + ``clip_grad_norm_`` on every backend."""
import math

import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import grad_tail, grad_tail_, grad_tail_apply_

from ..helpers import TOL, assert_close, runnable_backends

EXAMPLE = ([torch.zeros(3)], torch.ones(()), 1.0, 2.0, 1e-6)
# The Triton interpreter is slow: the broad tests run the compiled and torch backends, and
# the triton backend gets its own small-shape tests below (on a GPU it runs everywhere).
BACKENDS = [b for b in runnable_backends("grad_tail") if b.id != "triton" or torch.cuda.is_available()]
TRITON = [b for b in runnable_backends("grad_tail") if b.id == "triton"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# total norm / multiplier: fp32 accumulation over <= ~1e5 elements (vs float64)
NORM_RTOL = 2e-5


def make_grads(n, *, seed=0, scale=1.0, dtypes=DTYPES, max_numel=97, big=(), device="cpu"):
    """n gradients of random odd shapes (1-D to 3-D, some empty), dtypes cycling through
    ``dtypes``, values ~ N(0, 1) * scale; ``big`` adds tensors of those numels (chunk crossings)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        numel = int(torch.randint(0, max_numel + 1, (), generator=g)) if i % 11 != 5 else 0
        if numel and i % 3 == 1:
            shape = (numel // 7 + 1, 7)[: 2]
        elif numel and i % 3 == 2:
            shape = (1, numel // 3 + 1, 3)
        else:
            shape = (numel,)
        dt = dtypes[i % len(dtypes)]
        out.append((torch.randn(shape, generator=g) * scale).to(dt))
    for j, numel in enumerate(big):
        out.append((torch.randn(numel, generator=g) * scale).to(dtypes[j % len(dtypes)]))
    return [t.to(device) for t in out]


def oracle(grads, inv_scale, max_norm, eps=1e-6):
    """float64: (multiplier, total_norm) of unscale + clip_grad_norm_."""
    sq = sum((g.double() * inv_scale).square().sum().item() for g in grads)
    norm = math.sqrt(sq)
    clip = 1.0 if max_norm is None else min(1.0, max_norm / (norm + eps))
    return inv_scale * clip, norm


def check_against_oracle(grads, stats, inv_scale, max_norm, device=None):
    """Stats within NORM_RTOL of the float64 oracle; returns the kernel's multiplier (as a
    float) so the apply pass can be checked against exactly the factor it used."""
    mult, norm = oracle(grads, inv_scale, max_norm)
    device = device or (grads[0].device if grads else torch.device("cpu"))
    for t in stats:
        assert t.dtype == torch.float32 and t.shape == () and t.device == device
    assert stats.found_inf.item() == 0.0
    assert stats.total_norm.item() == pytest.approx(norm, rel=NORM_RTOL, abs=1e-30)
    assert stats.multiplier.item() == pytest.approx(mult, rel=NORM_RTOL, abs=1e-30)
    return stats.multiplier.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 37, 500])
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6], ids=["noclip", "clip", "noclipneeded"])
def test_stats_and_apply_match_float64(backend, n, max_norm):
    scale = 1024.0
    grads = make_grads(n, seed=n, scale=scale, big=(40_000, 70_001) if n == 37 else ())
    before = [g.clone() for g in grads]
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=1.0 / scale, max_norm=max_norm)
    mult = check_against_oracle(before, stats, 1.0 / scale, max_norm)
    for i, (g, g0) in enumerate(zip(grads, before)):
        assert g.dtype == g0.dtype and g.shape == g0.shape
        assert_close(g, g0.double() * mult, g0.dtype, f"grads[{i}] ({g0.dtype})", scale=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_gradscaler_unscale_and_clip(backend):
    """Step for step what torch.amp.GradScaler.unscale_ + clip_grad_norm_ produce (fp32 grads)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 5))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(17, 13)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    torch_scaler.scale(model(x).square().mean()).backward()
    for p, q in zip(model.parameters(), twin):
        q.grad = p.grad.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_scaler.unscale_(opt)
    ref_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    with fastpeft.use_backend(backend):
        stats = grad_tail_(twin, inv_scale=1.0 / 2 ** 10, max_norm=0.05)
    assert stats.total_norm.item() == pytest.approx(ref_norm.item(), rel=NORM_RTOL)
    assert stats.found_inf.item() == 0.0
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 61, 500])
@pytest.mark.parametrize("dtypes", [(torch.float32,), DTYPES], ids=["fp32", "mixed"])
def test_matches_torch_unscale_and_clip_on_random_parameter_sets(backend, n, dtypes):
    """The ops GradScaler.unscale_ runs (``_amp_foreach_non_finite_check_and_unscale_``) followed by
    ``clip_grad_norm_``, on n random parameters.  torch rounds the per-tensor norms of half
    grads to their dtype, hence the looser norm tolerance for mixed sets."""
    scale = 256.0
    grads = make_grads(n, seed=100 + n, scale=scale, dtypes=dtypes)
    params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    found = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, torch.tensor(1 / scale))
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=torch.tensor(1 / scale), max_norm=0.3)
    assert stats.found_inf.item() == found.item() == 0.0
    rel = NORM_RTOL if dtypes == (torch.float32,) else 1e-2
    assert stats.total_norm.item() == pytest.approx(ref_norm.item(), rel=rel)
    # torch's clip coefficient inherits its norm error (rel), so the grads may differ by that much too
    for i, (g, p) in enumerate(zip(grads, params)):
        atol, rtol = TOL[g.dtype]
        torch.testing.assert_close(g.double(), p.grad.double(), atol=atol * 1e-2, rtol=max(rtol, 2 * rel),
                                   msg=lambda m: f"grads[{i}] vs torch ({g.dtype}): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_empty_grads_give_no_nan(backend):
    grads = [torch.zeros(5), torch.zeros(0, 3, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.float16)]
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=0.25, max_norm=1.0)
        empty = grad_tail([], inv_scale=0.5, max_norm=1.0)
    assert stats.total_norm.item() == 0.0 and stats.found_inf.item() == 0.0
    assert stats.multiplier.item() == 0.25
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)
    assert empty.total_norm.item() == 0.0 and empty.multiplier.item() == 0.5 and empty.found_inf.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["fp32", "fp16", "bf16"])
def test_non_finite_is_flagged(backend, bad, where):
    grads = make_grads(9, seed=3, big=(40_000, 40_000, 40_000))
    target = grads[9 + where]  # the big tensors: fp32, fp16, bf16; hit the last element of a CPU chunk
    target[32767] = bad
    with fastpeft.use_backend(backend):
        stats = grad_tail(grads, inv_scale=0.5, max_norm=1.0)
    assert stats.found_inf.item() == 1.0
    assert stats.multiplier.item() == 0.0
    assert not math.isfinite(stats.total_norm.item())
    if bad != bad:
        assert math.isnan(stats.total_norm.item())


def test_fp16_overflow_of_scaled_values_is_flagged():
    """A finite fp32 loss scaled into fp16 that overflows shows up as inf in the grads."""
    g = (torch.tensor([60000.0, 1.0]) * 2).to(torch.float16)  # 120000 -> inf in fp16
    stats = grad_tail([g], inv_scale=0.5)
    assert stats.found_inf.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_grads(backend):
    base = torch.randn(9, 14)
    grads = [base[:, ::2], torch.randn(7, 9, dtype=torch.bfloat16).t(), torch.randn(5)]
    before = [g.clone() for g in grads]
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=0.5, max_norm=0.3)
    mult = check_against_oracle(before, stats, 0.5, 0.3)
    for g, g0 in zip(grads, before):
        assert_close(g, g0.double() * mult, g0.dtype, "strided grad", scale=1e-3)
    assert_close(base[:, 1::2], before[0].double() * 0 + base[:, 1::2].double(), torch.float32, "untouched columns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_are_taken_through_their_grad(backend):
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.full((4, 3), 2.0)
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    with fastpeft.use_backend(backend):
        stats = grad_tail([p, frozen, None], inv_scale=1.0)
    assert stats.total_norm.item() == pytest.approx(math.sqrt(12 * 4.0), rel=1e-6)


def test_inv_scale_tensor_and_multiplier_one_writes_nothing():
    g = [torch.randn(100), torch.randn(3, dtype=torch.bfloat16)]
    before = [t.clone() for t in g]
    stats = grad_tail_(g, inv_scale=torch.ones(1), max_norm=1e9)
    assert stats.multiplier.item() == 1.0
    for a, b in zip(g, before):
        assert torch.equal(a, b)


def test_norm_type_other_than_2_runs_on_torch_and_matches():
    grads = make_grads(12, seed=5)
    stats = grad_tail(grads, inv_scale=0.5, max_norm=0.1, norm_type=math.inf)
    ref = max(g.double().abs().max().item() * 0.5 for g in grads if g.numel())
    assert stats.total_norm.item() == pytest.approx(ref, rel=1e-6)
    stats1 = grad_tail(grads, norm_type=1.0)
    assert stats1.total_norm.item() == pytest.approx(sum(g.double().abs().sum().item() for g in grads), rel=1e-5)
    if fastpeft.backends.get_op("grad_tail").why_not("cpu", *EXAMPLE) is None:
        with fastpeft.use_backend("cpu"), pytest.raises(BackendError, match="2-norm"):
            grad_tail(grads, norm_type=math.inf)


def test_cpu_reduction_is_deterministic_across_thread_counts():
    if fastpeft.backends.get_op("grad_tail").why_not("cpu", *EXAMPLE):
        pytest.skip("cpu backend unavailable")
    grads = make_grads(20, seed=9, big=(300_000,))
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with fastpeft.use_backend("cpu"):
                results.append(grad_tail(grads, inv_scale=0.3, max_norm=1.0))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0].total_norm, results[1].total_norm)
    assert torch.equal(results[0].multiplier, results[1].multiplier)


def test_bad_input_names_the_argument():
    g = [torch.randn(3)]
    with pytest.raises(TypeError, match=r"grads\[1\]: expected dtype"):
        grad_tail([torch.randn(2), torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"grads\[0\]: expected a torch.Tensor"):
        grad_tail([[1.0]])
    with pytest.raises(ValueError, match="max_norm"):
        grad_tail(g, max_norm=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        grad_tail(g, max_norm=math.inf)
    with pytest.raises(ValueError, match="inv_scale: expected a finite"):
        grad_tail(g, inv_scale=math.inf)
    with pytest.raises(TypeError, match="inv_scale"):
        grad_tail(g, inv_scale=torch.ones(2))
    with pytest.raises(ValueError, match="norm_type"):
        grad_tail(g, norm_type=0)
    with pytest.raises(TypeError, match="multiplier"):
        grad_tail_apply_(g, 0.5)
    with pytest.raises(TypeError, match="dense"):
        grad_tail([torch.randn(3, 3).to_sparse()])


def _count_ops(fn, prefix=None):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return len(names) if prefix is None else sum(n.startswith(prefix) for n in names), names


def test_launch_count_is_independent_of_tensor_count():
    """The fused path issues the same ops for 10 or 300 tensors; PyTorch's sequence grows with n."""
    if fastpeft.backends.get_op("grad_tail").why_not("cpu", *EXAMPLE):
        pytest.skip("cpu backend unavailable")
    counts, fastpeft_ops, torch_counts = {}, {}, {}
    for n in (10, 300):
        grads = [torch.randn(16) for _ in range(n)]
        with fastpeft.use_backend("cpu"):
            grad_tail_(grads, inv_scale=0.5, max_norm=0.1)  # warm-up
            counts[n], names = _count_ops(lambda: grad_tail_(grads, inv_scale=0.5, max_norm=0.1))
        fastpeft_ops[n] = sorted(x for x in names if x.startswith("fastpeft::"))
        params = [torch.nn.Parameter(torch.zeros(16)) for _ in range(n)]
        for p, g in zip(params, grads):
            p.grad = g.clone()

        def torch_sequence():
            found = torch.zeros(1)
            torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, torch.full((), 0.5))
            torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=False)

        torch_counts[n], _ = _count_ops(torch_sequence)
    assert fastpeft_ops[10] == fastpeft_ops[300] == ["fastpeft::grad_tail_apply_", "fastpeft::grad_tail_stats"]
    assert counts[10] == counts[300], (counts, fastpeft_ops)
    assert torch_counts[300] > torch_counts[10] + 500  # per-tensor norm and mul ops


@pytest.mark.parametrize("name", ["grad_tail_stats", "grad_tail_apply_"])
def test_opcheck(name):
    op = getattr(torch.ops.fastpeft, name, None)
    if op is None:
        pytest.skip(f"torch.ops.fastpeft.{name} is not registered here (extension not built)")
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16), torch.randn(0), torch.randn(4, dtype=torch.float16)]
    if name == "grad_tail_stats":
        opcheck(op.default, (grads, torch.tensor(0.5), 1.0, 1e-6))
        opcheck(op.default, (grads, torch.tensor(0.5), None, 1e-6))
    else:
        opcheck(op.default, (grads, torch.tensor(0.5)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    grads = make_grads(6, seed=1, scale=8.0)
    before = [g.clone() for g in grads]
    torch._dynamo.reset()

    def tail(gs, inv):
        stats = grad_tail_(gs, inv_scale=inv, max_norm=0.7)
        return stats.multiplier, stats.total_norm, stats.found_inf

    with fastpeft.use_backend(backend):
        mult, norm, found = torch.compile(tail, fullgraph=True)(grads, torch.tensor(0.125))
    m, n = oracle(before, 0.125, 0.7)
    assert norm.item() == pytest.approx(n, rel=NORM_RTOL) and mult.item() == pytest.approx(m, rel=NORM_RTOL)
    assert found.item() == 0.0
    for g, g0 in zip(grads, before):
        assert_close(g, g0.double() * m, g0.dtype, "compiled apply", scale=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n", [1, 37, 500])
def test_cuda_matches_float64_and_cpu(backend, n):
    dtypes = DTYPES + ((torch.float64,) if backend == "cuda" else ())
    grads = make_grads(n, seed=n, scale=512.0, big=(70_001, 200_000), dtypes=dtypes, device="cuda")
    grads.append(torch.randn(9, 6, device="cuda")[:, ::2])  # strided
    before = [g.clone() for g in grads]
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=torch.tensor(1 / 512.0, device="cuda"), max_norm=0.5)
    torch.cuda.synchronize()
    mult = check_against_oracle([g.cpu() for g in before], stats, 1 / 512.0, 0.5, device=grads[0].device)
    for i, (g, g0) in enumerate(zip(grads, before)):
        assert_close(g.cpu(), g0.cpu().double() * mult, g0.dtype, f"grads[{i}]", scale=1e-3)
    bad = [g.clone() for g in before]
    bad[-2][-1] = math.nan
    with fastpeft.use_backend(backend):
        assert grad_tail(bad, inv_scale=1.0).found_inf.item() == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_launches_are_independent_of_tensor_count(backend):
    kernels = {}
    for n in (10, 400):
        grads = [torch.randn(1000 + i, device="cuda") for i in range(n)]
        with fastpeft.use_backend(backend):
            grad_tail_(grads, inv_scale=0.5, max_norm=0.1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof, \
                fastpeft.use_backend(backend):
            grad_tail_(grads, inv_scale=0.5, max_norm=0.1)
            torch.cuda.synchronize()
        kernels[n] = sorted(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    assert kernels[10] == kernels[400], kernels
    assert len(kernels[10]) <= 6, kernels


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("n", [1, 23])
@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["noclip", "clip"])
def test_triton_matches_float64(backend, n, max_norm):
    grads = make_grads(n, seed=n, scale=64.0, max_numel=40, big=(20_000,) if n > 1 else ())
    grads.append(torch.randn(9, 6)[:, ::2])  # strided
    before = [g.clone() for g in grads]
    with fastpeft.use_backend(backend):
        stats = grad_tail_(grads, inv_scale=1 / 64.0, max_norm=max_norm)
    mult = check_against_oracle(before, stats, 1 / 64.0, max_norm)
    for i, (g, g0) in enumerate(zip(grads, before)):
        assert_close(g, g0.double() * mult, g0.dtype, f"grads[{i}] ({g0.dtype})", scale=1e-3)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_non_finite_zero_and_empty(backend):
    grads = make_grads(6, seed=2, max_numel=30)
    grads[4][0] = math.inf
    with fastpeft.use_backend(backend):
        bad = grad_tail(grads, inv_scale=0.5, max_norm=1.0)
        zero = grad_tail([torch.zeros(7, dtype=torch.bfloat16), torch.zeros(0)], inv_scale=0.25, max_norm=1.0)
        empty = grad_tail([], inv_scale=0.5)
    assert bad.found_inf.item() == 1.0 and bad.multiplier.item() == 0.0
    assert zero.total_norm.item() == 0.0 and zero.multiplier.item() == 0.25 and zero.found_inf.item() == 0.0
    assert empty.total_norm.item() == 0.0 and empty.multiplier.item() == 0.5
    with fastpeft.use_backend(backend), pytest.raises(BackendError, match="float64"):
        grad_tail([torch.randn(3, dtype=torch.float64)])


@pytest.mark.parametrize("name", ["grad_tail_stats_triton", "grad_tail_apply_triton_"])
def test_opcheck_triton(name):
    if not TRITON or TRITON[0].marks:
        pytest.skip("triton backend not runnable here")
    op = getattr(torch.ops.fastpeft, name)
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16), torch.randn(0)]
    if name == "grad_tail_stats_triton":
        opcheck(op.default, (grads, torch.tensor(0.5), 1.0, 1e-6))
    else:
        opcheck(op.default, (grads, torch.tensor(0.5)))
