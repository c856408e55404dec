"""No silent downgrade (issue 21): every field of HF PEFT's ``LoraConfig`` is honoured by fastpeft or
refused with an error naming it; the initialisations users use (pissa, pissa_niter_N, olora, orthogonal,
gaussian, loftq) give HF PEFT's adapter and base weights, and adapters saved with them load both ways."""
import copy
import dataclasses
import warnings

import pytest
import torch

from .lora_models import bert_cls, gpt2_lm, inputs_for, llama_lm, peft, run

import fastpeft

# HF LoraConfig fields fastpeft implements under the same name (every other one must be refused when set)
HONOURED = {f.name for f in dataclasses.fields(fastpeft.LoraConfig)}
BOOKKEEPING = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}
# a non-default value of every HF field fastpeft does not implement
REFUSED = {"megatron_config": {"tensor_model_parallel_size": 2}, "eva_config": {"rho": 2.0},
           "corda_config": {"cache_file": "x"}, "lora_ga_config": {"batch_size": 2}, "velora_config": {"rank": 2},
           "alora_invocation_tokens": [1, 2], "use_qalora": True, "monteclora_config": {"n": 1},
           "layer_replication": [[0, 1]], "lora_bias": True, "use_bdlora": {"a": 1}, "arrow_config": {"top_k": 2},
           "kasa_config": {"x": 1}, "ensure_weight_tying": True}


def test_every_hf_lora_field_is_honoured_or_refused():
    hf_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unaccounted = hf_fields - HONOURED - BOOKKEEPING - set(REFUSED)
    assert not unaccounted, f"HF LoraConfig fields fastpeft neither implements nor refuses: {unaccounted}"


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unimplemented_field_is_refused_by_name(field):
    d = {"peft_type": "LORA", "r": 2, "target_modules": ["query"], field: REFUSED[field]}
    with pytest.raises(ValueError, match=field):
        fastpeft.LoraConfig.from_dict(d)


@pytest.mark.parametrize("value", ["eva", "corda", "lora_ga", "mica", "pissa_niter_x", "unknown"])
def test_unimplemented_init_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"init_lora_weights='{value}'"):
        fastpeft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=value)


def test_hf_defaults_of_unimplemented_fields_are_fine():
    d = peft.LoraConfig(r=2, target_modules=["query"]).to_dict()
    c = fastpeft.LoraConfig.from_dict({k: getattr(v, "value", v) for k, v in d.items()})
    assert c.r == 2
    fastpeft.get_peft_model(bert_cls(), peft.LoraConfig(r=2, target_modules=["query"]))  # HF config object


def _pair(build, init, seed=0, **kw):
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=init, **kw)
    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        torch.manual_seed(seed)
        fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    return base, hf, fp


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "orthogonal", "gaussian", True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_initialisation_matches_hf(init, kind, tmp_path):
    """init_lora_weights='pissa' / 'olora' / 'orthogonal' trained with the default init without a word."""
    build, tm = (llama_lm, ["q_proj", "v_proj"]) if kind == "llama" else (gpt2_lm, ["c_attn"])
    base, hf, fp = _pair(build, init, target_modules=tm)
    a, b = hf.state_dict(), fp.state_dict()
    if kind == "gpt2" and init == "olora":  # HF PEFT's OLoRA ignores fan_in_fan_out: its A / B get the wrong shapes
        a = {k: v for k, v in a.items() if "lora_" not in k and "c_attn.base_layer.weight" not in k}
        b = {k: v for k, v in b.items() if "lora_" not in k and "c_attn.base_layer.weight" not in k}
    assert sorted(a) == sorted(b)
    for k in a:  # adapter weights and (pissa / olora) the residual base weights
        tol = dict(atol=2e-4, rtol=1e-3) if "niter" in str(init) else dict(atol=1e-5, rtol=1e-4)
        if "niter" in str(init) and ("lora_" in k or "base_layer" in k):
            continue  # randomised SVD: checked through its reconstruction below
        torch.testing.assert_close(b[k], a[k], **tol, msg=lambda m: f"{k}: {m}")
    x = inputs_for(kind)
    with torch.no_grad():  # the initial adapter leaves the model's function unchanged
        torch.testing.assert_close(run(fp.eval(), x), run(base.eval(), x), atol=1e-4, rtol=1e-4)
    if init in ("pissa", "pissa_niter_4", "olora"):
        b = fp.state_dict()
        changed = [k for k in b if "base_layer.weight" in k and not torch.equal(b[k], base.state_dict()[
            k.replace("base_model.model.", "").replace(".base_layer", "")])]
        assert changed, "the base weight holds the residual"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_with_base_rewriting_init_load_both_ways(init, tmp_path):
    """Loading re-runs the initialisation on the fresh base model (HF PEFT does), then loads A and B."""
    base, hf, fp = _pair(llama_lm, init, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # "train" both the same way
        for m in (hf, fp):
            torch.manual_seed(5)
            for n, p in sorted(m.named_parameters()):
                if "lora_" in n:
                    p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    fp.save_pretrained(tmp_path / "fp")
    assert fastpeft.PeftConfig.from_pretrained(str(tmp_path / "fp")).init_lora_weights == init
    x = inputs_for("llama")
    with torch.no_grad():
        ref = run(hf.eval(), x)
        torch.testing.assert_close(run(fp.eval(), x), ref, atol=1e-5, rtol=1e-4)
        for path in ("hf", "fp"):
            for lib in (fastpeft, peft):
                m = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / path))
                torch.testing.assert_close(run(m.eval(), x), ref, atol=1e-5, rtol=1e-4,
                                           msg=lambda msg: f"{lib.__name__} loading {path}: {msg}")


def test_pissa_converted_to_plain_lora(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...): a rank-2r LoRA on the unchanged base."""
    base, hf, fp = _pair(llama_lm, "pissa", target_modules=["q_proj"])
    fp.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for n, p in fp.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    fp.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    cfg = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "lora"))
    assert (cfg.init_lora_weights, cfg.r, cfg.lora_alpha) == (True, 8, 16)
    x = inputs_for("llama")
    with torch.no_grad():
        ref = run(fp.eval(), x)
        for lib in (fastpeft, peft):
            m = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
            torch.testing.assert_close(run(m.eval(), x), ref, atol=1e-5, rtol=1e-4)


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ValueError, match="even rank"):
        fastpeft.get_peft_model(llama_lm(), fastpeft.LoraConfig(r=3, target_modules=["q_proj"],
                                                                init_lora_weights="orthogonal"))


def test_loftq_config_is_checked():
    with pytest.raises(ValueError, match="loftq_config"):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_config is set"):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], loftq_config={"loftq_bits": 4})


def _bnb_quantizes_here() -> bool:
    try:
        import bitsandbytes.functional as F
        q, s = F.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4", compress_statistics=False)
        F.dequantize_4bit(q, s)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_fits_the_quantisation_residual(bits):
    if not _bnb_quantizes_here():
        pytest.skip("bitsandbytes cannot quantise on this machine")
    base = llama_lm()
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": 2}))
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    Wq = layer.base_layer.weight.detach()
    approx = Wq + layer.get_delta_weight("default")
    assert not torch.equal(Wq, W)  # the base holds the dequantised weight
    assert (approx - W).norm() < (Wq - W).norm()  # and B A fits part of the residual
