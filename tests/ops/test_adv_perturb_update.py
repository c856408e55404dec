"""adv_perturb_update / adv_perturb_init against their float64 reference on every backend."""
import math

import pytest
import torch
from torch.library import opcheck

import fastpeft
from fastpeft.backends import BackendError
from fastpeft.ops import adv_perturb_init, adv_perturb_update
from fastpeft.ops.adv_perturb_update.reference import adv_perturb_update_value, freelb_eager_update

from ..helpers import TOL, assert_close, runnable_backends

UPDATE_BACKENDS = runnable_backends("adv_perturb_update")
INIT_BACKENDS = runnable_backends("adv_perturb_init")
NORMS = ["linf", "l2_token", "l2_example"]
SHAPES = [(1, 1, 1), (3, 5, 7), (2, 13, 67), (4, 3, 130), (0, 3, 5), (2, 0, 5), (2, 3, 0)]
TRITON_SHAPES = [(3, 5, 7), (4, 3, 130), (0, 3, 5)]


def _mask(B, L, dtype=torch.float32):
    """Random attention mask with right padding; example 1 (if any) is all padding."""
    lengths = torch.randint(1, L + 1, (B,)) if L > 0 else torch.zeros(B, dtype=torch.long)
    m = (torch.arange(L)[None, :] < lengths[:, None]).to(dtype)
    if B > 1:
        m[1] = 0
    return m


def _ball_norm(d, norm):
    d = d.double()
    if norm == "linf":
        return d.abs().amax(dim=(1, 2)) if d.numel() else d.new_zeros(d.shape[0])
    if norm == "l2_token":
        return d.norm(dim=-1).flatten()
    return d.flatten(1).norm(dim=1)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_matches_float64(backend, norm, shape, dtype):
    if backend == "triton" and shape not in TRITON_SHAPES:
        pytest.skip("Triton runs in the slow interpreter here: a subset of the shapes")
    B, L, H = shape
    delta = (0.05 * torch.randn(shape)).to(dtype)
    grad = torch.randn(shape).to(dtype)
    mask = _mask(B, L)
    step, eps = float(torch.empty(()).uniform_(0.01, 0.5)), float(torch.empty(()).uniform_(0.1, 1.0))
    expected = adv_perturb_update_value(delta.double(), grad.double(), mask, norm, step, eps)
    out = delta.clone()
    with fastpeft.use_backend(backend):
        ret = adv_perturb_update(out, grad, norm=norm, step_size=step, epsilon=eps, mask=mask)
    assert ret is out and out.dtype == dtype
    assert_close(out, expected, dtype, f"{norm} delta", scale=4)
    assert (out[mask == 0] == 0).all(), "padding positions must be exactly zero"
    assert (_ball_norm(out, norm) <= eps * (1 + TOL[dtype][1]) + 1e-6).all()


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_update_float64_and_no_mask_and_no_projection(backend, norm):
    if backend in ("cuda", "triton"):
        pytest.skip("float64 is CPU-only")
    delta, grad = 0.1 * torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    for eps in (None, 0.0, 0.3):
        out = delta.clone()
        with fastpeft.use_backend(backend):
            adv_perturb_update(out, grad, norm=norm, step_size=0.2, epsilon=eps)
        expected = adv_perturb_update_value(delta, grad, None, norm, 0.2, eps or 0.0)
        assert_close(out, expected, torch.float64, f"{norm} eps={eps}")
    # without projection the step has exactly the requested size (per token / example / element)
    out = torch.zeros_like(delta)
    with fastpeft.use_backend(backend):
        adv_perturb_update(out, grad, norm=norm, step_size=0.2)
    torch.testing.assert_close(_ball_norm(out, norm), torch.full_like(_ball_norm(out, norm), 0.2))


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_and_partly_zero_gradients_give_no_nan(backend, norm):
    delta = 0.1 * torch.randn(2, 6, 8)
    grad = torch.zeros(2, 6, 8)
    grad[1, 2] = torch.randn(8)  # example 1 has one nonzero token, example 0 none
    mask = torch.ones(2, 6)
    out = delta.clone()
    with fastpeft.use_backend(backend):
        adv_perturb_update(out, grad, norm=norm, step_size=0.5, epsilon=10.0, mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], delta[0])  # zero gradient: zero step
    expected = adv_perturb_update_value(delta.double(), grad.double(), mask, norm, 0.5, 10.0)
    assert_close(out, expected, torch.float32, norm)
    # all-padding batch: everything zero, nothing NaN
    out = delta.clone()
    with fastpeft.use_backend(backend):
        adv_perturb_update(out, torch.randn_like(delta), norm=norm, step_size=0.5, epsilon=0.1,
                           mask=torch.zeros(2, 6, dtype=torch.bool))
    assert (out == 0).all()


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_eps_ball_holds_after_every_step_and_mask_dtypes(backend, norm):
    if backend == "triton" and norm != "linf":
        pytest.skip("slow in the Triton interpreter; the ball is also checked in test_update_matches_float64")
    B, L, H = 3, 7, 11
    mask = _mask(B, L, torch.long)
    delta = torch.zeros(B, L, H)
    eps = 0.4
    n_steps = 6
    with fastpeft.use_backend(backend):
        for _ in range(n_steps):
            adv_perturb_update(delta, torch.randn(B, L, H), norm=norm, step_size=0.25, epsilon=eps, mask=mask)
            assert (_ball_norm(delta, norm) <= eps * (1 + 1e-5)).all()
            assert (delta[mask == 0] == 0).all()
    # after enough steps of a constant gradient the L2 modes sit on the sphere
    if norm != "linf":
        g = torch.randn(B, L, H)
        with fastpeft.use_backend(backend):
            for _ in range(n_steps + 2):
                adv_perturb_update(delta, g, norm=norm, step_size=0.25, epsilon=eps, mask=mask.bool())
        n = _ball_norm(delta, norm)
        active = n > 0
        torch.testing.assert_close(n[active], torch.full_like(n[active], eps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_strided_delta_and_grad(backend):
    base = torch.randn(3, 8, 10)
    delta = base[:, ::2, :]            # non-contiguous, updated in place through the view
    grad = torch.randn(3, 10, 4).transpose(1, 2)
    expected = adv_perturb_update_value(delta.double(), grad.double(), None, "l2_example", 0.1, 0.2)
    with fastpeft.use_backend(backend):
        adv_perturb_update(delta, grad, norm="l2_example", step_size=0.1, epsilon=0.2)
    assert_close(base[:, ::2, :], expected, torch.float32, "strided")


@pytest.mark.parametrize("norm", NORMS)
def test_matches_eager_freelb_sequence(norm):
    """The fused step equals the FreeLB code's eager sequence (benchmark baseline)."""
    delta, grad = 0.05 * torch.randn(4, 9, 16), torch.randn(4, 9, 16)
    mask = torch.ones(4, 9)
    mask[0, 5:] = 0
    delta = delta * mask[..., None]
    expected = freelb_eager_update(delta, grad, mask, norm, 0.1, 0.3) * mask[..., None]
    out = delta.clone()
    adv_perturb_update(out, grad, norm=norm, step_size=0.1, epsilon=0.3, mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_leaf_requiring_grad_is_updated_under_no_grad():
    delta = torch.zeros(2, 3, 4, requires_grad=True)
    adv_perturb_update(delta, torch.ones(2, 3, 4), norm="linf", step_size=0.1, epsilon=1.0)
    assert delta.requires_grad and torch.allclose(delta.detach(), torch.full((2, 3, 4), 0.1))


def test_bad_input_names_the_argument():
    d = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="delta: expected a tensor with 3 dims"):
        adv_perturb_update(torch.zeros(3, 4), torch.zeros(3, 4), norm="linf", step_size=0.1)
    with pytest.raises(ValueError, match="grad: expected shape"):
        adv_perturb_update(d, torch.zeros(2, 3, 5), norm="linf", step_size=0.1)
    with pytest.raises(TypeError, match="grad: expected dtype"):
        adv_perturb_update(d, torch.zeros(2, 3, 4, dtype=torch.float64), norm="linf", step_size=0.1)
    with pytest.raises(ValueError, match="mask: expected shape"):
        adv_perturb_update(d, d, norm="linf", step_size=0.1, mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="norm: expected one of"):
        adv_perturb_update(d, d, norm="l3", step_size=0.1)
    with pytest.raises(TypeError, match="step_size: expected a number"):
        adv_perturb_update(d, d, norm="linf", step_size="0.1")
    with pytest.raises(ValueError, match="kind: expected one of"):
        adv_perturb_init(d, kind="cauchy")
    with pytest.raises(ValueError, match="like: expected a"):
        adv_perturb_init((2, 3))
    with pytest.raises(ValueError, match="seed must be in"):
        adv_perturb_init(d, seed=-1)


def test_forced_unsupported_backend_raises():
    d = torch.zeros(2, 3, 4)
    with fastpeft.use_backend("cuda"), pytest.raises(BackendError, match="cuda"):
        adv_perturb_update(d, d, norm="linf", step_size=0.1)


# -- init ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "normal"])
@pytest.mark.parametrize("norm", NORMS)
def test_init_same_seed_same_values_on_every_backend(kind, norm):
    B, L, H = 3, 6, 13
    mask = _mask(B, L)
    outs = {}
    for p in INIT_BACKENDS:
        backend = p.values[0]
        if p.marks or (backend == "triton" and norm != "l2_example"):  # the interpreter is slow
            continue
        with fastpeft.use_backend(backend):
            outs[backend] = adv_perturb_init((B, L, H), kind=kind, scale=0.7, norm=norm, mask=mask, seed=1234)
            again = adv_perturb_init((B, L, H), kind=kind, scale=0.7, norm=norm, mask=mask, seed=1234)
            other = adv_perturb_init((B, L, H), kind=kind, scale=0.7, norm=norm, mask=mask, seed=1235)
        assert torch.equal(outs[backend], again)
        assert not torch.equal(outs[backend], other)
        assert (outs[backend][mask == 0] == 0).all()
    ref = outs["torch"]
    for backend, out in outs.items():
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("backend", [p for p in INIT_BACKENDS if p.values[0] != "triton"])
def test_init_statistics(backend):
    """(Triton's init equals the torch reference's, checked above; its interpreter is too slow here.)"""
    B, L, H = 4, 32, 64
    with fastpeft.use_backend(backend):
        u = adv_perturb_init((B, L, H), kind="uniform", scale=0.5, seed=7)
        z = adv_perturb_init((B, L, H), kind="normal", scale=2.0, seed=7)
        z16 = adv_perturb_init((B, L, H), kind="normal", scale=2.0, seed=7, dtype=torch.bfloat16)
    n = u.numel()
    assert u.min() >= -0.5 and u.max() < 0.5
    assert abs(u.mean()) < 4 * 0.5 / math.sqrt(3 * n)
    assert abs(u.var() - 0.25 / 3) < 0.01
    assert abs(z.mean()) < 4 * 2.0 / math.sqrt(n)
    assert abs(z.std() - 2.0) < 0.05
    assert abs((z / 2).pow(4).mean() - 3.0) < 0.3  # Gaussian kurtosis
    torch.testing.assert_close(z16.float(), z, atol=0.02, rtol=0.01)


def test_init_freelb_scaling():
    """FreeLB: uniform(-1, 1) * mask * adv_init_mag / sqrt(L_i * H)."""
    B, L, H = 3, 10, 16
    mask = torch.ones(B, L)
    mask[0, 4:] = 0
    d = adv_perturb_init((B, L, H), kind="uniform", scale=0.3, norm="l2_example", mask=mask, seed=3)
    unit = adv_perturb_init((B, L, H), kind="uniform", scale=1.0, norm="linf", seed=3)
    lengths = mask.sum(1)
    expected = unit * mask[..., None] * (0.3 / torch.sqrt(lengths * H)).view(-1, 1, 1)
    torch.testing.assert_close(d, expected)
    tok = adv_perturb_init((B, L, H), kind="uniform", scale=0.3, norm="l2_token", seed=3)
    torch.testing.assert_close(tok, unit * 0.3 / math.sqrt(H))


def test_init_seed_none_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = adv_perturb_init((2, 3, 4))
    torch.manual_seed(11)
    b = adv_perturb_init((2, 3, 4))
    assert torch.equal(a, b)


# -- registration ----------------------------------------------------------------
def test_opcheck_update_and_init():
    if not hasattr(torch.ops.fastpeft, "adv_perturb_update"):
        pytest.skip("torch.ops.fastpeft.adv_perturb_update is not registered (extension not built)")
    for norm in NORMS:
        for mask in (None, _mask(3, 5)):
            opcheck(torch.ops.fastpeft.adv_perturb_update.default,
                    (0.1 * torch.randn(3, 5, 6), torch.randn(3, 5, 6), mask, norm, 0.1, 0.2))
    opcheck(torch.ops.fastpeft.adv_perturb_init.default, (torch.empty(3, 5, 6), _mask(3, 5), "normal",
                                                           "l2_example", 0.5, 9))


def test_opcheck_triton_custom_ops():
    """The Triton custom ops (run here through the interpreter; tiny shapes)."""
    if _triton_reason() is not None:
        pytest.skip(_triton_reason())
    opcheck(torch.ops.fastpeft.adv_perturb_update_triton.default,
            (0.1 * torch.randn(2, 3, 4), torch.randn(2, 3, 4), _mask(2, 3), "l2_example", 0.1, 0.2))
    opcheck(torch.ops.fastpeft.adv_perturb_init_triton.default, (torch.empty(2, 3, 4), None, "uniform", "linf", 0.5, 9))


def _triton_reason():
    from fastpeft import _triton

    return _triton.available()


@pytest.mark.parametrize("backend", [pytest.param(*p.values, marks=list(p.marks) + (
    [pytest.mark.slow] if p.values[0] == "triton" else []), id=p.id) for p in UPDATE_BACKENDS])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    delta, grad, mask = 0.1 * torch.randn(2, 5, 6), torch.randn(2, 5, 6), _mask(2, 5)
    expected = adv_perturb_update_value(delta.double(), grad.double(), mask, "l2_example", 0.1, 0.2)

    def f(d, g, m):
        adv_perturb_update(d, g, norm="l2_example", step_size=0.1, epsilon=0.2, mask=m)
        return d * 2

    with fastpeft.use_backend(backend):
        out = torch.compile(f, fullgraph=True)(delta, grad, mask)
    assert_close(out, 2 * expected, torch.float32, "compiled")
    assert_close(delta, expected, torch.float32, "mutated input")


# -- GPU ----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H", [4096, 4099, 1])  # 16-byte vector path, scalar path
def test_cuda_update_and_init_match_reference(norm, dtype, H):
    shape = (3, 37, H)
    mask = _mask(3, 37).cuda()
    delta = (0.05 * torch.randn(shape)).to(dtype).cuda()
    grad = torch.randn(shape).to(dtype).cuda()
    expected = adv_perturb_update_value(delta.double(), grad.double(), mask, norm, 0.2, 0.5)
    with fastpeft.use_backend("cuda"):
        adv_perturb_update(delta, grad, norm=norm, step_size=0.2, epsilon=0.5, mask=mask)
        torch.cuda.synchronize()
        init = adv_perturb_init((3, 37, H), kind="normal", scale=0.3, norm=norm, mask=mask, seed=5,
                                dtype=dtype, device="cuda")
    assert_close(delta, expected, dtype, norm, scale=4)
    assert (delta[mask == 0] == 0).all()
    with fastpeft.use_backend("torch"):
        ref_init = adv_perturb_init((3, 37, H), kind="normal", scale=0.3, norm=norm, mask=mask.cpu(), seed=5,
                                    dtype=dtype)
    assert_close(init.cpu(), ref_init.double(), dtype, "init")


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_non_finite_values_at_padding_do_not_leak(backend, norm):
    """Garbage (inf/nan) in padded positions of grad or delta never reaches real tokens."""
    delta, grad = 0.1 * torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.ones(2, 4)
    mask[0, 2:] = 0
    delta[0, 3], grad[0, 2], grad[0, 3, 1] = float("nan"), float("inf"), float("nan")
    expected = adv_perturb_update_value(delta.double(), grad.double(), mask, norm, 0.1, 0.3)
    with fastpeft.use_backend(backend):
        adv_perturb_update(delta, grad, norm=norm, step_size=0.1, epsilon=0.3, mask=mask)
    assert torch.isfinite(expected).all() and torch.isfinite(delta).all()
    assert_close(delta, expected, torch.float32, norm)
