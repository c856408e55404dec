"""fastpeft LoRA vs HF PEFT: same state_dict keys, outputs and gradients for the same
config and weights (LoRA, rsLoRA, DoRA, patterns) on BERT, GPT-2 (Conv1D), Llama, ViT,
the pretrained MiniLM, Embedding and Conv2d; merge/unmerge; bad input."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from .lora_models import (FusedCallCounter, assert_same_forward_backward, builder, hf_and_fast, inputs_for,
                          peft, run)

import fastpeft
from fastpeft.tuners import lora as flora

CASES = [
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True)),
    ("bert", dict(r=3, lora_alpha=5, target_modules=["query", "dense"], use_dora=True)),
    ("bert", dict(r=2, lora_alpha=4, target_modules=["word_embeddings", "key"])),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("llama", dict(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|down_proj)")),
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
    ("llama", dict(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"], layers_to_transform=[1])),
    ("llama", dict(r=2, lora_alpha=8, target_modules="all-linear", exclude_modules=["k_proj", "up_proj"])),
    ("vit", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"])),
    ("minilm", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    ("cnn", dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "pw", "fc"])),
]


def _id(case):
    kind, kw = case
    extra = [k for k in ("use_rslora", "use_dora", "rank_pattern", "layers_to_transform", "exclude_modules")
             if kw.get(k)]
    t = kw["target_modules"]
    return f"{kind}-{'-'.join(t) if isinstance(t, list) else t[:10]}-{'-'.join(extra)}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_hf_peft(case):
    kind, kw = case
    base, hf, fp = hf_and_fast(kind, kw)
    assert list(fp.state_dict()) == list(hf.state_dict())
    assert [n for n, p in fp.named_parameters() if p.requires_grad] == \
        [n for n, p in hf.named_parameters() if p.requires_grad]
    assert fp.base_model.targeted_module_names == hf.base_model.targeted_module_names
    atol = 1e-4 if kind == "minilm" else 1e-5
    assert_same_forward_backward(hf, fp, inputs_for(kind), atol=atol)
    # train mode (dropout 0 in these configs; the model's own dropout is off via config? use eval-equal)
    assert fp.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()


def test_fused_op_runs_for_single_adapter(monkeypatch):
    _, hf, fp = hf_and_fast("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    c = FusedCallCounter(monkeypatch)
    run(fp, inputs_for("gpt2"))
    n_layers = sum(isinstance(m, flora.Linear) for m in fp.modules())
    assert n_layers == 6 and c.n == n_layers
    # DoRA takes the plain path
    _, _, fpd = hf_and_fast("bert", dict(r=2, target_modules=["query"], use_dora=True))
    c.n = 0
    run(fpd, inputs_for("bert"))
    assert c.n == 0


def test_dropout_training_uses_fused_dropout(monkeypatch):
    base = builder("bert")()
    fp = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, target_modules=["query"], lora_dropout=0.5,
                                                           init_lora_weights=False))
    fp.train()
    x = inputs_for("bert")
    torch.manual_seed(0)
    a = run(fp, x)
    torch.manual_seed(0)
    b = run(fp, x)
    torch.manual_seed(1)
    c = run(fp, x)
    torch.testing.assert_close(a, b)  # seed drawn from torch's RNG: reproducible
    assert not torch.allclose(a, c)
    fp.eval()
    e1, e2 = run(fp, x), run(fp, x)
    torch.testing.assert_close(e1, e2)


@pytest.mark.parametrize("kind,kw", [
    ("bert", dict(r=4, target_modules=["query", "value", "word_embeddings"])),
    ("bert", dict(r=4, target_modules=["query", "value"], use_dora=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    ("cnn", dict(r=2, target_modules=["conv1", "conv2", "pw"])),
])
def test_merge_unmerge_matches_and_restores(kind, kw):
    base, hf, fp = hf_and_fast(kind, kw)
    x = inputs_for(kind)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    with torch.no_grad():
        ref = run(fp, x)
        fp.merge_adapter()
        merged = run(fp, x)
        hf.merge_adapter()
        hf_merged = {k: v for k, v in hf.state_dict().items() if "base_layer" in k}
    for k, v in hf_merged.items():
        torch.testing.assert_close(fp.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-4)
    fp.unmerge_adapter()
    for k, v in fp.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_dora_norm_cache_reused_until_weights_change():
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query"], use_dora=True))
    layer = fp.base_model.model.bert.encoder.layer[0].attention.self.query
    x = inputs_for("bert")
    fp.train()
    run(fp, x).sum().backward()
    first = layer._dora_norm_cache["default"][1]
    run(fp, x)
    assert layer._dora_norm_cache["default"][1] is first          # unchanged A/B/W: cached
    opt = torch.optim.SGD([p for p in fp.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    out = run(fp, x)
    assert layer._dora_norm_cache["default"][1] is not first      # A or B changed: rebuilt
    hf.load_state_dict(fp.state_dict())
    hf.eval(), fp.eval()  # (BERT's own dropout off)
    torch.testing.assert_close(run(fp, x), run(hf, x), atol=1e-5, rtol=1e-4)


def test_bert_word_embedding_and_conv_targets_have_hf_keys():
    _, hf, fp = hf_and_fast("cnn", dict(r=2, target_modules=["conv1"]))
    assert "base_model.model.conv1.lora_A.default.weight" in fp.state_dict()
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["word_embeddings"]))
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A.default" in fp.state_dict()


# -- bad input ---------------------------------------------------------------------------------
def test_unknown_target_lists_candidates_and_leaves_model_unchanged():
    base = builder("bert")()
    keys = list(base.state_dict())
    with pytest.raises(ValueError, match=r"matched no module.*candidates.*query"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["q_proj"]))
    assert list(base.state_dict()) == keys
    with pytest.raises(ValueError, match="candidates"):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=r".*nothing.*"))


def test_no_target_modules_is_an_error():
    with pytest.raises(ValueError, match="target"):
        fastpeft.get_peft_model(builder("bert")(), fastpeft.LoraConfig())


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match="LayerNorm"):
        fastpeft.get_peft_model(builder("bert")(), fastpeft.LoraConfig(target_modules=["LayerNorm"]))


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError, match="r: the LoRA rank must be a positive int"):
        fastpeft.LoraConfig(r=r, target_modules=["query"])
    with pytest.raises(ValueError, match="rank"):
        fastpeft.LoraConfig(r=2, target_modules=["query"], rank_pattern={"query": r})


def test_other_bad_config_values():
    with pytest.raises(TypeError, match="r:"):
        fastpeft.LoraConfig(r=2.5, target_modules=["query"])
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.LoraConfig(target_modules=["query"], lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        fastpeft.LoraConfig(target_modules=["query"], bias="some")
    with pytest.raises(ValueError, match="DoRA"):
        fastpeft.get_peft_model(builder("cnn")(), fastpeft.LoraConfig(target_modules=["conv1"], use_dora=True))


def test_failure_half_way_leaves_model_unchanged():
    base = builder("cnn")()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    # fc is fine, conv1 fails (DoRA on Conv2d): fc must be swapped back
    with pytest.raises(ValueError):
        fastpeft.get_peft_model(base, fastpeft.LoraConfig(target_modules=["fc", "pw"], use_dora=True))
    assert [type(m) for m in base.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def _llama_fused_like_hf_in_bf16(monkeypatch, hf, fp, grad_dtype=None):
    """Both q/v LoRA layers of each of the two blocks take the fused path (4 calls); outputs and every
    gradient agree with HF PEFT to bf16 rounding; ``grad_dtype``: the dtype both models' grads must have."""
    c = FusedCallCounter(monkeypatch)
    x = inputs_for("llama")
    o1, o2 = run(hf, x), run(fp, x)
    assert c.n == 4
    torch.testing.assert_close(o2.float(), o1.float(), atol=5e-2, rtol=5e-2)
    (o1.float() ** 2).mean().backward()
    (o2.float() ** 2).mean().backward()
    for (n1, p1), (n2, p2) in zip(hf.named_parameters(), fp.named_parameters()):
        if p1.grad is not None:
            if grad_dtype is not None:
                assert p2.grad.dtype == p1.grad.dtype == grad_dtype, n1
            torch.testing.assert_close(p2.grad.float(), p1.grad.float(), atol=5e-2, rtol=1e-1,
                                       msg=lambda m: f"{n1}: {m}")


def test_bfloat16_model_fused_path_close_to_hf(monkeypatch):
    _, hf, fp = hf_and_fast("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    hf.to(torch.bfloat16), fp.to(torch.bfloat16)
    _llama_fused_like_hf_in_bf16(monkeypatch, hf, fp)


def test_config_from_hf_file_keeps_its_init_scheme_or_refuses_it():
    """A saved PiSSA adapter stays PiSSA (loading re-runs the init on the base weight, as HF PEFT); a scheme
    fastpeft does not implement is refused by name, never read as plain LoRA."""
    c = fastpeft.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q"],
                                       "init_lora_weights": "pissa", "loftq_config": {}, "eva_config": None})
    assert c.r == 4 and c.init_lora_weights == "pissa"
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        fastpeft.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q"], "init_lora_weights": "eva"})


def test_autocast_takes_the_fused_path(monkeypatch):
    """(tests/peft/test_autocast.py checks it in depth.)"""
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query"]))
    c = FusedCallCounter(monkeypatch)
    x = inputs_for("bert")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o1, o2 = run(hf, x), run(fp, x)
    assert c.n == 2   # one per layer
    torch.testing.assert_close(o2.float(), o1.float(), atol=5e-2, rtol=5e-2)


def test_scaled_embedding_lora_matches_hf():
    class Scaled(nn.Embedding):
        def __init__(self):
            super().__init__(20, 6)
            self.embed_scale = 2.5

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = Scaled()

        def forward(self, x):
            return self.emb(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    fp = fastpeft.get_peft_model(M(), fastpeft.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    fp.load_state_dict(hf.state_dict())
    x = torch.randint(0, 20, (3, 4))
    torch.testing.assert_close(fp(x), hf(x))


def test_half_precision_base_gets_fp32_adapters_and_the_fused_path_like_hf(monkeypatch):
    """A model already in bf16 when wrapped: HF PEFT upcasts the adapter to fp32
    (autocast_adapter_dtype=True), so does fastpeft, and the fused op takes the mixed
    pair (computing in bf16), agreeing with PEFT to bf16 rounding."""
    base = builder("llama")().to(torch.bfloat16)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    fp.load_state_dict(hf.state_dict(), strict=True)
    lora = {n: p.dtype for n, p in fp.named_parameters() if "lora_" in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert {p.dtype for n, p in hf.named_parameters() if "lora_" in n} == {torch.float32}
    _llama_fused_like_hf_in_bf16(monkeypatch, hf, fp, grad_dtype=torch.float32)
    kept = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {torch.bfloat16}
