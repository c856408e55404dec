"""QLoRA: fastpeft's LoRA over bitsandbytes 4-bit / 8-bit base layers against HF PEFT on the same base.

A 2-layer random BERT (hidden 64, intermediate 128: multiples of every blocksize used, so bitsandbytes'
own CPU path accepts it) is saved once and loaded with ``BitsAndBytesConfig`` on CPU, the classifier and
pooler kept unquantised (``llm_int8_skip_modules``).  Models run in train mode with dropout 0 (bitsandbytes
repacks 4-bit weights for its CPU kernel in eval mode without grad, which computes differently).
"""
import sys
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastpeft  # noqa: E402
from fastpeft.tuners.lora_quant import Linear4bit, Linear8bitLt  # noqa: E402

VOCAB = 64
TARGETS = ["query", "key", "value", "intermediate.dense"]  # 8 quantised layers


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, num_labels=3, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(d)
    return str(d)


def load(bert_dir, bits=4, quant_type="nf4", double=False, compute=torch.float32, quantised=True):
    from transformers import BertForSequenceClassification, BitsAndBytesConfig
    if not quantised:
        return BertForSequenceClassification.from_pretrained(bert_dir).train()
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                               bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=["classifier", "pooler"])
    else:
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier", "pooler"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BertForSequenceClassification.from_pretrained(bert_dir, quantization_config=q, device_map="cpu").train()


def lora_kwargs(dropout=0.0):
    return dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout, task_type="SEQ_CLS")


def hf_model(bert_dir, seed=1, dropout=0.0, **load_kw):
    torch.manual_seed(seed)
    m = peft.get_peft_model(load(bert_dir, **load_kw), peft.LoraConfig(**lora_kwargs(dropout), init_lora_weights=False))
    return m


def fast_model(bert_dir, dropout=0.0, **load_kw):
    return fastpeft.get_peft_model(load(bert_dir, **load_kw), fastpeft.LoraConfig(**lora_kwargs(dropout)))


def copy_adapter(src, dst):
    """Every LoRA weight (and the trainable classifier) of HF PEFT model ``src`` into ``dst``."""
    fastpeft.set_peft_model_state_dict(dst, peft.get_peft_model_state_dict(src))


def batch(n=4, seq=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g), torch.randint(0, 3, (n,), generator=g)


QUANTS = [("nf4", False, torch.float32), ("nf4", True, torch.float32), ("fp4", True, torch.float32),
          ("fp4", False, torch.bfloat16), ("nf4", True, torch.bfloat16)]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q[0]}{'-dq' if q[1] else ''}-{str(q[2])[6:]}")
def test_fused_4bit_model_matches_hf_peft(bert_dir, quant):
    qt, double, compute = quant
    hf = hf_model(bert_dir, quant_type=qt, double=double, compute=compute)
    fp = fast_model(bert_dir, quant_type=qt, double=double, compute=compute)
    layers = [m for m in fp.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 8 and all(m.lora_A["default"].weight.shape == (8, m.in_features) for m in layers)
    copy_adapter(hf, fp)
    ids, labels = batch()
    fastpeft.reset_fusion_report(fp)
    out_hf, out_fp = hf(input_ids=ids, labels=labels), fp(input_ids=ids, labels=labels)
    report = fastpeft.fusion_report(fp)
    assert report.fused_calls == 8 and report.fallback_calls == 0, str(report)
    tol = dict(atol=2e-5, rtol=1e-4) if compute == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_fp.logits, out_hf.logits, **tol)
    out_hf.loss.backward()
    out_fp.loss.backward()
    g_hf = {k: p.grad for k, p in hf.named_parameters() if p.requires_grad}
    g_fp = {k: p.grad for k, p in fp.named_parameters() if p.requires_grad}
    assert sorted(g_hf) == sorted(g_fp)
    for k in g_hf:
        torch.testing.assert_close(g_fp[k], g_hf[k], **(dict(atol=1e-4, rtol=1e-3) if compute == torch.float32
                                                         else dict(atol=5e-2, rtol=5e-2)), msg=k)


def test_accelerate_switches_hf_peft_4bit_layers(bert_dir):
    hf = hf_model(bert_dir, quant_type="nf4", double=True)
    ids, labels = batch()
    ref = hf(input_ids=ids).logits.detach()
    summary = fastpeft.accelerate(hf)
    assert summary.patched == 8 and summary.accelerated == 8, str(summary)
    # what still falls back is said: a 4-bit layer under autocast takes PEFT's forward
    assert "on a 4-bit base: torch.autocast" in str(summary), str(summary)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fastpeft.reset_fusion_report(hf)
        hf(input_ids=ids)
        report = fastpeft.fusion_report(hf)
    assert report.fused_calls == 0 and "torch.autocast" in str(report.fallbacks()), str(report)
    fastpeft.reset_fusion_report(hf)
    out = hf(input_ids=ids).logits
    assert fastpeft.fusion_report(hf).fused_calls == 8
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert "lora.Linear4bit" in repr(hf) and "Fastpeft" not in repr(hf)  # PEFT's class name is kept
    assert fastpeft.restore(hf).restored == 8
    torch.testing.assert_close(hf(input_ids=ids).logits, ref, atol=0, rtol=0)


def test_fused_8bit_model_matches_hf_peft(bert_dir):
    """Training mode on the CPU: every 8-bit layer runs lora_linear_8bit, with HF PEFT's logits and gradients
    (bitsandbytes computes with the dequantised weight there too)."""
    hf = hf_model(bert_dir, bits=8)
    fp = fast_model(bert_dir, bits=8)
    layers = [m for m in fp.modules() if isinstance(m, Linear8bitLt)]
    assert len(layers) == 8 and all(m.lora_A["default"].weight.shape == (8, m.in_features) for m in layers)
    copy_adapter(hf, fp)
    ids, labels = batch()
    fastpeft.reset_fusion_report(fp)
    out_hf, out_fp = hf(input_ids=ids, labels=labels), fp(input_ids=ids, labels=labels)
    report = fastpeft.fusion_report(fp)
    assert report.fused_calls == 8 and report.fallback_calls == 0, str(report)
    torch.testing.assert_close(out_fp.logits, out_hf.logits, atol=2e-5, rtol=1e-4)
    out_hf.loss.backward()
    out_fp.loss.backward()
    g_hf = {k: p.grad for k, p in hf.named_parameters() if p.requires_grad}
    g_fp = {k: p.grad for k, p in fp.named_parameters() if p.requires_grad}
    assert sorted(g_hf) == sorted(g_fp)
    for k in g_hf:
        torch.testing.assert_close(g_fp[k], g_hf[k], atol=1e-4, rtol=1e-3, msg=k)


def test_8bit_eval_keeps_bitsandbytes_int8_forward(bert_dir):
    """In eval mode bitsandbytes' LLM.int8() quantises the activations: the 8-bit layers take PEFT's forward
    (same outputs as HF PEFT, not the weight-only dequantised ones) and say why."""
    hf = hf_model(bert_dir, bits=8).eval()
    fp = fast_model(bert_dir, bits=8).eval()
    copy_adapter(hf, fp)
    ids, _ = batch()
    fastpeft.reset_fusion_report(fp)
    with torch.no_grad():
        out_fp, out_hf = fp(input_ids=ids).logits, hf(input_ids=ids).logits
    report = fastpeft.fusion_report(fp)
    assert report.fused_calls == 0 and "LLM.int8() forward quantises the activations" in " ".join(report.fallbacks())
    torch.testing.assert_close(out_fp, out_hf, atol=1e-5, rtol=1e-4)
    fp.train()
    fastpeft.reset_fusion_report(fp)
    fp(input_ids=ids)
    assert fastpeft.fusion_report(fp).fused_calls == 8


def test_accelerate_switches_hf_peft_8bit_layers(bert_dir):
    hf = hf_model(bert_dir, bits=8)
    ids, labels = batch()
    ref = hf(input_ids=ids).logits.detach()
    summary = fastpeft.accelerate(hf)
    assert summary.patched == 8 and summary.accelerated == 8, str(summary)
    assert "on an 8-bit base: torch.autocast" in str(summary) and "in eval mode or on CUDA" in str(summary)
    fastpeft.reset_fusion_report(hf)
    out = hf(input_ids=ids).logits
    assert fastpeft.fusion_report(hf).fused_calls == 8
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert "lora.Linear8bitLt" in repr(hf) and "Fastpeft" not in repr(hf)  # PEFT's class name is kept
    assert fastpeft.restore(hf).restored == 8
    torch.testing.assert_close(hf(input_ids=ids).logits, ref, atol=0, rtol=0)


def test_8bit_has_fp16_weights_keeps_peft_forward():
    """A Linear8bitLt with has_fp16_weights=True re-quantises its trainable weight each call: not fused."""
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True).to("cpu").train()
    model = torch.nn.Sequential(layer)
    fp = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"]))
    fastpeft.reset_fusion_report(fp)
    fp(torch.randn(3, 16))
    assert "has_fp16_weights=True" in " ".join(fastpeft.fusion_report(fp).fallbacks())


def test_adapter_round_trips(bert_dir, tmp_path):
    """fastpeft (4-bit) -> HF PEFT on the 4-bit and on the unquantised base; HF PEFT (4-bit) -> fastpeft."""
    hf = hf_model(bert_dir, quant_type="nf4", double=True)
    fp = fast_model(bert_dir, quant_type="nf4", double=True)
    copy_adapter(hf, fp)
    ids, _ = batch()
    ref = fp(input_ids=ids).logits.detach()
    fp.save_pretrained(tmp_path / "fast")
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file
    saved_fast = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    saved_hf = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    assert sorted(saved_fast) == sorted(saved_hf)
    for k in saved_hf:
        assert saved_fast[k].shape == saved_hf[k].shape and saved_fast[k].dtype == saved_hf[k].dtype, k
    # fastpeft's adapter in HF PEFT, 4-bit base: same outputs
    hf2 = peft.PeftModel.from_pretrained(load(bert_dir, quant_type="nf4", double=True), tmp_path / "fast").train()
    torch.testing.assert_close(hf2(input_ids=ids).logits, ref, atol=2e-5, rtol=1e-4)
    # ... and on the unquantised base: loads, every LoRA weight in place
    hf3 = peft.PeftModel.from_pretrained(load(bert_dir, quantised=False), tmp_path / "fast")
    sd3 = peft.get_peft_model_state_dict(hf3)
    for k, v in peft.get_peft_model_state_dict(hf2).items():
        torch.testing.assert_close(sd3[k], v, atol=0, rtol=0, msg=k)
    # HF PEFT's adapter in fastpeft on the 4-bit base
    fp2 = fastpeft.PeftModel.from_pretrained(load(bert_dir, quant_type="nf4", double=True), tmp_path / "hf").train()
    torch.testing.assert_close(fp2(input_ids=ids).logits, hf(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_short_training_run_loss_matches_hf_peft(bert_dir, bits):
    hf = hf_model(bert_dir, bits=bits, quant_type="nf4", double=True)
    fp = fast_model(bert_dir, bits=bits, quant_type="nf4", double=True)
    copy_adapter(hf, fp)
    losses = {}
    for name, model in (("hf", hf), ("fp", fp)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for step in range(6):
            ids, labels = batch(8, 12, seed=100 + step)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fp"]), torch.tensor(losses["hf"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_training_with_dropout_runs_fused(bert_dir, bits):
    fp = fast_model(bert_dir, dropout=0.1, bits=bits, quant_type="nf4")
    ids, labels = batch()
    fastpeft.reset_fusion_report(fp)
    fp(input_ids=ids, labels=labels).loss.backward()
    assert fastpeft.fusion_report(fp).fused_calls == 8
    assert all(p.grad is not None for n, p in fp.named_parameters() if "lora_" in n)


def test_merge_and_unmerge_warn_and_match_hf_peft(bert_dir):
    hf = hf_model(bert_dir, quant_type="nf4")
    fp = fast_model(bert_dir, quant_type="nf4")
    copy_adapter(hf, fp)
    ids, _ = batch()
    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear may get different generations"):
        fp.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.merge_adapter()
    torch.testing.assert_close(fp(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="Unmerge lora module to 4-bit linear"):
        fp.unmerge_adapter()


def test_prepare_model_for_kbit_training_as_hf_peft(bert_dir):
    from peft import prepare_model_for_kbit_training as hf_prepare
    a = fastpeft.prepare_model_for_kbit_training(load(bert_dir, quant_type="nf4"))
    b = hf_prepare(load(bert_dir, quant_type="nf4"))
    sa = {n: (p.dtype, p.requires_grad) for n, p in a.named_parameters()}
    sb = {n: (p.dtype, p.requires_grad) for n, p in b.named_parameters()}
    assert sa == sb
    assert a.is_gradient_checkpointing == b.is_gradient_checkpointing is True
    with pytest.raises(TypeError, match="model"):
        fastpeft.prepare_model_for_kbit_training("not a model")


# -- bad inputs -----------------------------------------------------------------------------------
def test_missing_bitsandbytes_is_one_clear_line(monkeypatch):
    from fastpeft._optional import MissingExtra, bnb_linear_classes, require_bnb
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import bitsandbytes -> ModuleNotFoundError
    with pytest.raises(MissingExtra, match=r"merging needs bitsandbytes: pip install 'fastpeft\[bnb\]'"):
        require_bnb("merging")
    assert bnb_linear_classes() == ()


def test_import_fastpeft_does_not_import_bitsandbytes():
    import subprocess
    code = "import sys, fastpeft; fastpeft.get_peft_model; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("False"), out.stderr[-2000:]


def test_unsupported_quant_type_and_missing_quant_state_are_clear_errors():
    lin = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    model = torch.nn.Sequential(lin)  # never moved to a device: the weight was never quantised
    with pytest.raises(ValueError, match="0 is a bitsandbytes Linear4bit whose weight has no quant_state"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"]))
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32).to("cpu"))
    model[0].weight.quant_state.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'int4'; fastpeft's 4-bit LoRA supports 'nf4' and 'fp4'"):
        fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=2, target_modules=["0"]))


def test_dora_and_pissa_on_4bit_are_refused(bert_dir):
    with pytest.raises(ValueError, match="use_dora"):
        fastpeft.get_peft_model(load(bert_dir), fastpeft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        fastpeft.get_peft_model(load(bert_dir), fastpeft.LoraConfig(r=2, target_modules=["query"],
                                                                    init_lora_weights="pissa"))
