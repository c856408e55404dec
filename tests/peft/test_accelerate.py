"""fastpeft.accelerate / restore on models made by HF PEFT: same keys and saved bytes,
PEFT's outputs and gradients, the fused op where the layer state allows it and PEFT's
forward otherwise (merged, disabled, several adapters, mixed batch, DoRA)."""
import copy
import warnings

import pytest
import torch

from .lora_models import FusedCallCounter, builder, grads, inputs_for, peft, run

import fastpeft
from fastpeft.accelerate import AccelerateSummary, is_accelerated


def _hf(kind, **kw):
    base = builder(kind)()
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False)
    cfg.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        return base, peft.get_peft_model(base, peft.LoraConfig(**cfg)).eval()


def _fwd_bwd(model, inputs):
    model.zero_grad(set_to_none=True)
    out = run(model, inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    return out.detach(), grads(model)


def _assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-4)
    assert sorted(a[1]) == sorted(b[1])
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("kind,kw", [
    ("bert", dict(target_modules=["query", "value", "dense"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    ("llama", dict(target_modules="all-linear", use_rslora=True)),
])
def test_accelerate_same_results_keys_and_files(kind, kw, monkeypatch, tmp_path):
    _, hf = _hf(kind, **kw)
    x = inputs_for(kind)
    keys = list(hf.state_dict())
    ref = _fwd_bwd(hf, x)
    hf.save_pretrained(tmp_path / "before")
    summary = fastpeft.accelerate(hf)
    n = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in hf.modules())
    assert isinstance(summary, AccelerateSummary)
    assert summary.accelerated == summary.patched > 0 and not summary.skipped and n == 0
    assert "fused path" in str(summary)
    c = FusedCallCounter(monkeypatch)
    got = _fwd_bwd(hf, x)
    assert c.n == summary.accelerated
    _assert_same(got, ref)
    assert list(hf.state_dict()) == keys
    hf.save_pretrained(tmp_path / "after")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / f).read_bytes() == (tmp_path / "after" / f).read_bytes()
    r = fastpeft.restore(hf)
    assert r.restored == summary.patched
    assert not any(is_accelerated(m) for m in hf.modules())
    c.n = 0
    _assert_same(_fwd_bwd(hf, x), ref)
    assert c.n == 0


def test_fallbacks_give_peft_results(monkeypatch):
    base, hf = _hf("bert", target_modules=["query", "value"])
    x = inputs_for("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        hf.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    hf.eval()
    twin = copy.deepcopy(hf)  # un-accelerated reference
    fastpeft.accelerate(hf)
    c = FusedCallCounter(monkeypatch)

    def check(fn, expect_fused):
        c.n = 0
        fn(hf), fn(twin)
        _assert_same(_fwd_bwd(hf, x), _fwd_bwd(twin, x))
        assert (c.n > 0) == expect_fused, (fn, c.n)

    check(lambda m: None, True)
    check(lambda m: m.base_model.set_adapter(["default", "other"]), False)  # several active adapters
    check(lambda m: m.base_model.set_adapter("other"), True)
    check(lambda m: m.set_adapter("default"), True)
    with hf.disable_adapter(), twin.disable_adapter():
        c.n = 0
        with torch.no_grad():
            torch.testing.assert_close(run(hf, x), run(twin, x))
        assert c.n == 0
    with torch.no_grad():
        hf.merge_adapter(), twin.merge_adapter()
        c.n = 0
        torch.testing.assert_close(run(hf, x), run(twin, x), atol=1e-5, rtol=1e-4)
        assert c.n == 0
        hf.unmerge_adapter(), twin.unmerge_adapter()
        # mixed-adapter batch
        c.n = 0
        names = ["default", "other"]
        torch.testing.assert_close(hf(**x, adapter_names=names).logits, twin(**x, adapter_names=names).logits)
        assert c.n == 0
    summary = fastpeft.accelerate(hf)  # re-run reports the state
    assert summary.patched > 0


def test_dora_and_merged_layers_are_reported_and_fall_back(monkeypatch):
    _, hf = _hf("bert", target_modules=["query"], use_dora=True)
    x = inputs_for("bert")
    twin = copy.deepcopy(hf)
    s = fastpeft.accelerate(hf)
    assert s.accelerated == 0 and sum(s.skipped.values()) == 2
    assert any("DoRA" in k for k in s.skipped)
    c = FusedCallCounter(monkeypatch)
    _assert_same(_fwd_bwd(hf, x), _fwd_bwd(twin, x))
    assert c.n == 0
    _, hf2 = _hf("bert", target_modules=["query"])
    hf2.merge_adapter()
    s2 = fastpeft.accelerate(hf2)
    assert s2.accelerated == 0 and any("merged" in k for k in s2.skipped)
    assert "merged" in str(s2)


def test_accelerate_torch_compile_runs():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up = torch.nn.Linear(12, 20)
            self.down = torch.nn.Linear(20, 5)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["up", "down"],
                                                        init_lora_weights=False))
    x = torch.randn(3, 12)
    ref = hf(x)
    assert fastpeft.accelerate(hf).accelerated == 2
    out = torch.compile(hf, backend="eager")(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert hf.base_model.model.up.lora_A["default"].weight.grad is not None


def test_accelerate_fastpeft_model_is_a_noop():
    fp = fastpeft.get_peft_model(builder("bert")(), fastpeft.LoraConfig(r=2, target_modules=["query"]))
    s = fastpeft.accelerate(fp)
    assert s.patched == 0 and "already a fastpeft model" in str(s)
    assert fastpeft.restore(fp).restored == 0


def test_accelerate_rejects_non_peft_models():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        fastpeft.accelerate(builder("bert")())
    with pytest.raises(TypeError, match="peft_model"):
        fastpeft.accelerate("model")


def test_accelerate_model_loaded_with_peft_from_pretrained(tmp_path, monkeypatch):
    base, hf = _hf("gpt2", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    hf.save_pretrained(tmp_path)
    x = inputs_for("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(builder("gpt2")(), str(tmp_path)).eval()
    with torch.no_grad():
        ref = run(loaded, x)
        s = fastpeft.accelerate(loaded)
        assert s.accelerated == 6, str(s)  # c_attn, attn.c_proj, mlp.c_proj x 2 blocks
        c = FusedCallCounter(monkeypatch)
        torch.testing.assert_close(run(loaded, x), ref, atol=1e-5, rtol=1e-4)
        assert c.n == 6


def test_quantised_or_custom_base_layer_is_skipped(monkeypatch):
    class QuantLinear(torch.nn.Linear):  # stands in for a quantised base layer class
        pass

    _, hf = _hf("bert", target_modules=["query", "value"])
    q = hf.base_model.model.bert.encoder.layer[0].attention.self.query
    q.base_layer.__class__ = QuantLinear
    x = inputs_for("bert")
    twin = copy.deepcopy(hf)
    s = fastpeft.accelerate(hf)
    assert s.accelerated == s.patched == 3
    assert s.skipped == {"unsupported or quantised base layer (QuantLinear)": 1}
    assert not is_accelerated(q)
    c = FusedCallCounter(monkeypatch)
    _assert_same(_fwd_bwd(hf, x), _fwd_bwd(twin, x))
    assert c.n == 3


def test_accelerate_fuses_fp32_adapters_on_a_bf16_model():
    """HF PEFT on a bf16 model keeps the adapter in fp32 by default; accelerate fuses those
    layers too (the op computes in bf16) and agrees with PEFT to bf16 rounding."""
    import copy

    base = builder("llama")().to(torch.bfloat16)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    x = inputs_for("llama")
    ref = run(hf, x).float()
    summary = fastpeft.accelerate(hf)
    try:
        assert summary.accelerated == 4, str(summary)
        torch.testing.assert_close(run(hf, x).float(), ref, atol=5e-2, rtol=5e-2)
    finally:
        fastpeft.restore(hf)
