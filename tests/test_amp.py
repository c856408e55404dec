"""fastpeft.amp: GradScaler step for step like torch.amp.GradScaler (+ clip_grad_norm_),
bf16 mode, master weights, checkpoints, autocast."""
import math

import pytest
import torch

import fastpeft
from fastpeft import amp


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return x, y


def loss_fn(model, step):
    x, y = batch(step)
    return torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def poison(model, step, overflow_steps):
    """Synthetic overflow: an inf in the first gradient at the given steps."""
    if step in overflow_steps:
        next(model.parameters()).grad[0, 0] = math.inf


@pytest.mark.parametrize("grad_tail", ["fused", "torch"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_fp16_scaler_matches_torch_gradscaler_step_for_step(opt_name, max_norm, grad_tail):
    overflow = {2, 7, 8}
    ours_model, ref_model = tiny_model(), tiny_model()
    make_opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
                "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2)}[opt_name]
    ours_opt, ref_opt = make_opt(ours_model.parameters()), make_opt(ref_model.parameters())
    kw = dict(init_scale=2.0 ** 12, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    ours, ref = amp.GradScaler(precision="fp16", grad_tail=grad_tail, **kw), torch.amp.GradScaler("cpu", **kw)
    scales, skipped = [], 0
    for step in range(12):
        ours.scale(loss_fn(ours_model, step)).backward()
        ref.scale(loss_fn(ref_model, step)).backward()
        poison(ours_model, step, overflow)
        poison(ref_model, step, overflow)

        stepped = ours.step(ours_opt, max_norm=max_norm)
        ours.update()
        ref.unscale_(ref_opt)
        if max_norm is not None:
            ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
            if step not in overflow:
                assert ours.last_grad_norm.item() == pytest.approx(ref_norm.item(), rel=2e-5)
        ref.step(ref_opt)
        ref.update()

        assert stepped == (step not in overflow), step
        skipped += step in overflow
        assert ours.get_scale() == ref.get_scale(), step
        assert ours._get_growth_tracker() == ref._get_growth_tracker(), step
        scales.append(ours.get_scale())
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        ours_opt.zero_grad()
        ref_opt.zero_grad()
    assert ours.num_skipped_steps == skipped == 3
    # backoff at 2, 7, 8; growth after 3 clean steps (3,4,5 -> x2 at 5; 9,10,11 -> x2 at 11)
    assert scales[2] == 2.0 ** 11 and scales[5] == 2.0 ** 12 and scales[8] == 2.0 ** 10 and scales[11] == 2.0 ** 11


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_fused_optimizer_path_matches_unfused(max_norm):
    """AdamW(fused=True) gets grad_scale/found_inf (no apply pass) and ends where the two-pass path does."""
    overflow = {1, 4}
    models = [tiny_model(), tiny_model()]
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2)]
    scalers = [amp.GradScaler("fp16", init_scale=2.0 ** 10, growth_interval=2) for _ in range(2)]
    for step in range(7):
        stepped = []
        for model, opt, scaler in zip(models, opts, scalers):
            scaler.scale(loss_fn(model, step)).backward()
            poison(model, step, overflow)
            if opt is opts[0]:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    stepped.append(scaler.step(opt, max_norm=max_norm))
                names = [e.name for e in prof.events() if e.name.startswith("fastpeft::")]
                assert "fastpeft::grad_tail_apply_" not in names
            else:
                stepped.append(scaler.step(opt, max_norm=max_norm))
            scaler.update()
            opt.zero_grad()
        assert stepped == [step not in overflow] * 2
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    assert opts[0].state[next(models[0].parameters())]["step"].item() == 5


def test_step_skips_and_leaves_params_on_overflow():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = amp.GradScaler("fp16", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss_fn(model, 0)).backward()
    list(model.parameters())[2].grad[1] = math.nan
    assert scaler.step(opt, max_norm=1.0) is False
    scaler.update()
    assert scaler.get_scale() == 512.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_bf16_mode_trains_without_scaling_and_skips_non_finite():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    scaler = amp.GradScaler(precision="bf16")
    losses = []
    for step in range(30):
        with amp.autocast("cpu", "bf16"):
            loss = loss_fn(model, step % 3)
        assert scaler.scale(loss) is loss
        loss.backward()
        if step == 10:
            list(model.parameters())[0].grad[0, 0] = math.inf
            before = [p.detach().clone() for p in model.parameters()]
        stepped = scaler.step(opt, max_norm=1.0)
        scaler.update()
        assert stepped == (step != 10)
        if step == 10:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert scaler.get_scale() == 1.0
        opt.zero_grad()
        losses.append(loss.item())
    assert scaler.num_skipped_steps == 1
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_clip_grad_norm_then_step_equals_step_with_max_norm():
    results = []
    for split in (True, False):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        scaler = amp.GradScaler("fp16", init_scale=256.0)
        scaler.scale(loss_fn(model, 1)).backward()
        if split:
            norm = scaler.clip_grad_norm_(opt, 0.1)
            assert norm.shape == () and norm.item() > 0.1
            assert scaler.step(opt)
        else:
            assert scaler.step(opt, max_norm=0.1)
        scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_master_weights_keep_fp32_updates_and_copy_back():
    model = tiny_model(dtype=torch.bfloat16)
    model[0].bias.requires_grad_(False)
    master = amp.MasterWeights(model)
    assert len(master.parameters()) == 3 and all(m.dtype == torch.float32 for m in master.parameters())
    ref = [m.detach().clone() for m in master.parameters()]
    opt = torch.optim.SGD(master.parameters(), lr=1e-4)  # updates far below bf16 resolution of the weights
    scaler = amp.GradScaler("bf16")
    for step in range(3):
        loss = loss_fn(model, step)
        loss.backward()
        grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads))
        clip = min(1.0, 1.0 / (norm + 1e-6))
        assert scaler.step(opt, max_norm=1.0, master_weights=master)
        scaler.update()
        ref = [r - 1e-4 * clip * g for r, g in zip(ref, grads)]
        for m, r in zip(master.parameters(), ref):
            torch.testing.assert_close(m.detach(), r, rtol=1e-5, atol=1e-7)
        for p, m in zip([p for p in model.parameters() if p.requires_grad], master.parameters()):
            assert p.grad is None and torch.equal(p.detach(), m.detach().to(torch.bfloat16))
        opt.zero_grad()
    assert any((m.detach() != p.detach().float()).any() for m, p in
               zip(master.parameters(), [p for p in model.parameters() if p.requires_grad]))
    sd = master.state_dict()
    other = amp.MasterWeights(tiny_model(seed=5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="with 4 tensors, got list of length 3"):
        other.load_state_dict(sd)


def test_state_dict_round_trip_and_torch_compatibility():
    scaler = amp.GradScaler("fp16", init_scale=128.0, growth_interval=5)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        scaler.scale(loss_fn(model, step)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    sd = scaler.state_dict()
    assert sd["scale"] == 128.0 and sd["_growth_tracker"] == 2 and sd["precision"] == "fp16"
    fresh = amp.GradScaler("fp16")
    fresh.load_state_dict(sd)
    assert fresh.get_scale() == 128.0 and fresh._get_growth_tracker() == 2 and fresh.get_growth_interval() == 5
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.load_state_dict(sd)
    assert torch_scaler.get_scale() == 128.0
    back = amp.GradScaler("fp16")
    back.load_state_dict(torch_scaler.state_dict())
    assert back.get_scale() == 128.0 and back._get_growth_tracker() == 2
    with pytest.raises(ValueError, match="precision"):
        amp.GradScaler("bf16").load_state_dict(sd)


def test_misuse_raises_clear_errors():
    with pytest.raises(ValueError, match="precision"):
        amp.GradScaler("fp8")
    with pytest.raises(ValueError, match="growth_interval"):
        amp.GradScaler(growth_interval=0)
    with pytest.raises(ValueError, match="grad_tail"):
        amp.GradScaler(grad_tail="foreach")
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = amp.GradScaler("fp16")
    scaler.scale(loss_fn(model, 0)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="max_norm"):
        scaler.step(opt, max_norm=1.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    scaler.update()


def test_fp16_model_grads_need_master_weights():
    model = tiny_model(dtype=torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = amp.GradScaler("fp16", init_scale=64.0)
    scaler.scale(model(torch.randn(2, 6, dtype=torch.float16)).float().sum()).backward()
    with pytest.raises(ValueError, match="MasterWeights"):
        scaler.step(opt)
    master = amp.MasterWeights(model)
    opt = torch.optim.SGD(master.parameters(), lr=0.1)
    scaler = amp.GradScaler("fp16", init_scale=64.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(2, 6, dtype=torch.float16)).float().sum()).backward()
    assert scaler.step(opt, master_weights=master)
    scaler.update()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_disabled_scaler_passes_through_and_always_steps():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = amp.GradScaler("fp16", enabled=False)
    loss = loss_fn(model, 0)
    assert scaler.scale(loss) is loss and not scaler.is_enabled() and scaler.state_dict() == {}
    loss.backward()
    assert scaler.step(opt)
    scaler.update()


def test_autocast_names():
    lin = torch.nn.Linear(4, 4)
    with amp.autocast("cpu", "bf16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with amp.autocast("cpu", "fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    assert amp.normalize_precision(torch.float16) == "fp16"


def test_scaler_step_uses_constant_number_of_fastpeft_ops():
    """The whole unscale/clip of a step is two fastpeft ops, whatever the number of params."""
    if fastpeft.backends.get_op("grad_tail").why_not("cpu", [torch.zeros(2)], torch.ones(()), 1.0, 2.0, 1e-6):
        pytest.skip("cpu backend unavailable")
    for n in (5, 120):
        params = [torch.nn.Parameter(torch.randn(7)) for _ in range(n)]
        opt = torch.optim.SGD(params, lr=0.1)
        scaler = amp.GradScaler("fp16", init_scale=8.0)
        scaler.scale(sum(p.sum() for p in params)).backward()
        with fastpeft.use_backend("cpu"), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            scaler.unscale_(opt, max_norm=1.0)
        names = [e.name for e in prof.events() if e.name.startswith("fastpeft::")]
        assert sorted(names) == ["fastpeft::grad_tail_apply_", "fastpeft::grad_tail_stats"], names


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_grad_tail_runs_no_fastpeft_op_and_matches_fused(precision):
    """``grad_tail="torch"`` (the FSDP mode): torch's ops only, never the fused optimizer hand-off, and the
    same stats, clipping and skipped steps as the fused tail, also for an optimizer with a fused kernel."""
    overflow = {1}
    models = [tiny_model(), tiny_model()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    scalers = [amp.GradScaler(precision, init_scale=2.0 ** 10, grad_tail=t) for t in ("fused", "torch")]
    for step in range(4):
        for i, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
            scaler.scale(loss_fn(model, step)).backward()
            poison(model, step, overflow)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                stepped = scaler.step(opt, max_norm=0.05)
            assert stepped == (step not in overflow)
            if i == 1:
                assert not [e.name for e in prof.events() if e.name.startswith("fastpeft::")]
            scaler.update()
            opt.zero_grad()
        a, b = (s.last_stats for s in scalers)
        assert a.found_inf.item() == b.found_inf.item()
        if step not in overflow:
            torch.testing.assert_close(b.total_norm, a.total_norm, rtol=2e-5, atol=0)
            torch.testing.assert_close(b.multiplier, a.multiplier, rtol=2e-5, atol=0)
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    assert scalers[1].num_skipped_steps == 1
