"""fastpeft.patch_model / unpatch_model on tiny random-init decoders of every supported family.

Patched vs unpatched: the same loss and the same LoRA gradients (fastpeft PeftModel and HF PEFT, LoRA
dropout 0.1 in training mode, the same seeds), with and without gradient checkpointing; a plain model's
full gradients; logits unchanged without labels and under no_grad; generate() unchanged; the summary;
state_dict keys and saved adapters unchanged, an adapter saved from a patched model loads in HF PEFT with
the same outputs; unpatch restores every forward; bad inputs give clear errors.
"""
from __future__ import annotations

import pytest
import torch

import fastpeft
from fastpeft.patching import SUPPORTED, is_patched
from fastpeft.patching.modules import RopeSwitch

from .models import FAMILIES, batch, tiny_model

pytest.importorskip("transformers")

# per-dtype tolerances (relative to the largest |value|): the fused ops reorder float32 sums
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
FAMS = list(FAMILIES)


def lora(model, kind: str, dropout: float = 0.1):
    """``model`` with LoRA r=4 on every linear layer (B random, so A gets gradients), train mode."""
    target = ["c_attn", "c_proj", "c_fc"] if model.config.model_type == "gpt2" else "all-linear"
    if kind == "fastpeft":
        m = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                               target_modules=target, task_type="CAUSAL_LM",
                                                               init_lora_weights=False))
    elif kind == "peft":
        peft = pytest.importorskip("peft")
        m = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=target,
                                                       task_type="CAUSAL_LM", init_lora_weights=False))
    else:
        m = model
    return m.train()


def step(model, ids, mask, labels, seed=5, **kw):
    """(loss, {name: grad}) of one forward + backward, dropout seeds from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out, grads


def assert_close(got, want, dtype, what):
    big = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * big, rtol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def compare(model, dtype=torch.float32, checkpointing=False, reentrant=False, **kw):
    """Unpatched step vs patched step (optionally with gradient checkpointing on the patched one)."""
    ids, mask, labels = batch()
    out0, g0 = step(model, ids, mask, labels, **kw)
    summary = fastpeft.patch_model(model)
    calls = []
    if checkpointing:
        tm = fastpeft.patching.transformers_model(model)
        tm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # the reentrant checkpoint needs an input that requires grad (frozen embeddings)
            tm.enable_input_require_grads()
        mlp = next(m for m in tm.modules() if type(m).__name__.endswith("MLP"))  # inside the checkpointed layer
        mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out1, g1 = step(model, ids, mask, labels, **kw)
    finally:
        fastpeft.unpatch_model(model)
    assert out1.logits is None, "a labelled training call builds no logits"
    if checkpointing:
        assert len(calls) == 2, f"the MLP of a checkpointed layer ran {len(calls)} time(s), expected forward + recomputation"
    assert_close(out1.loss, out0.loss, dtype, "loss")
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert_close(g1[n], g0[n], dtype, f"grad {n}")
    return summary, g0


# -- numerics -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("kind", ["fastpeft", "peft", "plain"])
def test_same_loss_and_gradients(family, kind):
    model = lora(tiny_model(family), kind)
    summary, grads = compare(model)
    if kind != "plain":
        assert all("lora_" in n for n in grads)
    expected = {"cross_entropy"} if family == "gpt2" else {"rms_norm", "rope", "mlp", "cross_entropy"}
    assert set(summary.patched) == expected, str(summary)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_unpatched_gradients(family, reentrant):
    """Patched + checkpointed (LoRA dropout 0.1: the recomputed forward must draw the same masks) against
    the unpatched, non-checkpointed step; the LoRA layers run fastpeft's fused op."""
    model = lora(tiny_model(family), "fastpeft")
    fastpeft.reset_fusion_report(model)
    compare(model, checkpointing=True, reentrant=reentrant)
    report = fastpeft.fusion_report(model)
    counts = list(report.layers.values())
    assert counts and all(c.get("fused", 0) >= 3 and set(c) == {"fused"} for c in counts), report


def test_dropout_masks_differ_between_seeds():
    """The comparison above can fail: another seed (other dropout masks) gives other gradients."""
    model = lora(tiny_model("llama"), "fastpeft")
    ids, mask, labels = batch()
    _, g0 = step(model, ids, mask, labels, seed=5)
    _, g1 = step(model, ids, mask, labels, seed=6)
    assert any((g0[n] - g1[n]).abs().max() > 1e-4 for n in g0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_bfloat16(family):
    compare(lora(tiny_model(family, torch.bfloat16), "fastpeft"), torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_autocast_loss_in_the_autocast_dtype(family, monkeypatch):
    """A float32 model under CPU bf16 autocast: the fused loss takes bf16 hidden states and LM head (as
    the unpatched lm_head's F.linear computes under autocast), and gives the unpatched loss and gradients
    within bf16 tolerance."""
    import fastpeft.patching.loss as loss_mod

    seen = []
    real = loss_mod.linear_cross_entropy
    monkeypatch.setattr(loss_mod, "linear_cross_entropy",
                        lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or real(h, w, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare(lora(tiny_model(family), "fastpeft"), torch.bfloat16)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_num_items_in_batch_and_shift_labels(family):
    """transformers' loss kwargs: a sum divided by num_items_in_batch (the Trainer's gradient accumulation)."""
    model = lora(tiny_model(family), "fastpeft")
    compare(model, num_items_in_batch=torch.tensor(7))


@pytest.mark.parametrize("family", FAMS)
def test_logits_without_labels_and_under_no_grad(family):
    model = tiny_model(family).eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels)
        fastpeft.patch_model(model)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
        got_nolabels = model(input_ids=ids, attention_mask=mask)
    fastpeft.unpatch_model(model)
    assert got.logits is not None and got_nolabels.logits is not None
    assert_close(got.logits, want.logits, torch.float32, "logits (labels, no_grad)")
    assert_close(got_nolabels.logits, want.logits, torch.float32, "logits (no labels)")
    assert_close(got.loss, want.loss, torch.float32, "loss (no_grad)")


@pytest.mark.parametrize("family", FAMS)
def test_generate_unchanged(family):
    model = lora(tiny_model(family), "fastpeft").eval()
    ids, _, _ = batch(S=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    fastpeft.patch_model(model)
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    fastpeft.unpatch_model(model)
    assert torch.equal(got, want)


# -- what patching changes and does not --------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_state_dict_and_saved_adapter_unchanged_and_loadable_in_hf_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model = lora(tiny_model(family), "fastpeft")
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    model.save_pretrained(tmp_path / "before")
    fastpeft.patch_model(model)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == names
    model.save_pretrained(tmp_path / "after")
    a, b = load_file(tmp_path / "before" / "adapter_model.safetensors"), load_file(tmp_path / "after" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    loaded = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "after")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    fastpeft.unpatch_model(model)
    assert_close(got, want, torch.float32, "HF PEFT logits of the adapter saved from a patched model")


@pytest.mark.parametrize("family", FAMS)
def test_unpatch_restores_every_forward(family):
    import sys

    model = lora(tiny_model(family), "fastpeft")
    tm = fastpeft.patching.transformers_model(model)
    rope_module = sys.modules[type(tm).__module__]
    orig_rope = getattr(rope_module, "apply_rotary_pos_emb", None)
    fastpeft.patch_model(model)
    assert is_patched(model) and is_patched(tm)
    assert any("forward" in m.__dict__ for m in tm.modules())
    assert fastpeft.unpatch_model(model) is True
    assert not any("forward" in m.__dict__ for m in tm.modules())
    assert getattr(rope_module, "apply_rotary_pos_emb", None) is orig_rope
    assert fastpeft.unpatch_model(model) is False


def test_patching_twice_and_partial_flags():
    model = tiny_model("llama")
    module = type(model.model.layers[0].self_attn).__module__
    before = RopeSwitch._installed.get(module, (None, 0))[1]  # other live patched models of the process
    s = fastpeft.patch_model(model, rope=False, cross_entropy=False)
    assert set(s.patched) == {"rms_norm", "mlp"} and s.skipped == {"rope": "not asked for",
                                                                  "cross_entropy": "not asked for"}
    s = fastpeft.patch_model(model)  # re-patch: the earlier patch is undone first
    assert set(s.patched) == {"rms_norm", "rope", "mlp", "cross_entropy"}
    assert RopeSwitch._installed[module][1] == before + 2  # 2 layers, once each
    fastpeft.unpatch_model(model)
    assert RopeSwitch._installed.get(module, (None, 0))[1] == before


def test_unpatched_model_in_the_same_process_keeps_transformers_rope(monkeypatch):
    """Only the patched instance's attention uses the fused rope."""
    calls = []
    import fastpeft.patching.modules as pm

    patched, other = tiny_model("llama"), tiny_model("llama")
    fastpeft.patch_model(patched)
    monkeypatch.setattr(pm, "rope", lambda *a: calls.append(1) or __import__("fastpeft").ops.rope(*a))
    ids, mask, _ = batch()
    with torch.no_grad():
        other(input_ids=ids)
        assert not calls
        patched(input_ids=ids)
        assert len(calls) == 2
    fastpeft.unpatch_model(patched)


def test_summary_says_why_gpt2_is_partly_patched():
    s = fastpeft.patch_model(tiny_model("gpt2"))
    text = str(s)
    assert s.patched == {"cross_entropy": 1}
    assert "LayerNorm" in s.skipped["rms_norm"] and "rotary" in s.skipped["rope"] and "gated" in s.skipped["mlp"]
    assert "cross_entropy: 1 module(s) patched" in text and "not patched" in text


def test_bare_decoder_gets_no_loss_patch():
    from transformers import AutoModel

    from .models import config

    m = AutoModel.from_config(config("llama"))
    s = fastpeft.patch_model(m)
    assert "cross_entropy" not in s.patched and "no LM head" in s.skipped["cross_entropy"]
    fastpeft.unpatch_model(m)


def test_trainable_lm_head_wrapped_keeps_the_unfused_loss():
    model = fastpeft.get_peft_model(tiny_model("llama"), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    s = fastpeft.patch_model(model)
    assert "cross_entropy" in s.skipped and "not a plain nn.Linear" in s.skipped["cross_entropy"]
    fastpeft.unpatch_model(model)


# -- errors -----------------------------------------------------------------------------------------
def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)
    with pytest.raises(ValueError, match=r"unsupported architecture \(config.model_type = 'opt'\); supported: "
                                         + ", ".join(SUPPORTED)):
        fastpeft.patch_model(AutoModelForCausalLM.from_config(cfg))


def test_bad_inputs():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fastpeft.patch_model("llama")
    with pytest.raises(TypeError, match="model: expected a transformers model"):
        fastpeft.patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="rope: expected a bool"):
        fastpeft.patch_model(tiny_model("llama"), rope="yes")


def test_label_out_of_range_is_a_clear_error():
    model = tiny_model("llama")
    fastpeft.patch_model(model)
    ids, mask, labels = batch()
    labels[1, 3] = 500
    with pytest.raises(ValueError, match=r"labels: 500 at position .* outside \[0, 97\)"):
        model(input_ids=ids, labels=labels)
    fastpeft.unpatch_model(model)


# -- GPU (-m gpu): the Triton kernels inside a patched bf16 model ------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_gpu_bfloat16_patched_matches_unpatched(family):
    model = lora(tiny_model(family, torch.bfloat16).cuda(), "fastpeft")
    ids, mask, labels = (t.cuda() for t in batch())
    out0, g0 = step(model, ids, mask, labels)
    fastpeft.patch_model(model)
    out1, g1 = step(model, ids, mask, labels)
    fastpeft.unpatch_model(model)
    assert out1.logits is None
    assert_close(out1.loss, out0.loss, torch.bfloat16, "loss")
    for n in g0:
        assert_close(g1[n], g0[n], torch.bfloat16, f"grad {n}")
