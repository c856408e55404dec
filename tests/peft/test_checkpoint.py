"""HF PEFT checkpoint format: round trips fastpeft <-> HF PEFT, config files, and the
errors for corrupt, truncated, mismatched and pickle adapter files."""
import copy
import json
import os
import warnings

import pytest
import torch

from .lora_models import builder, hf_and_fast, inputs_for, peft, run

import fastpeft
from fastpeft.checkpoint import load_safetensors, save_safetensors

ST = "adapter_model.safetensors"


@pytest.mark.parametrize("kind,kw", [
    ("bert", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("bert", dict(r=2, target_modules=["query", "word_embeddings"], lora_alpha=4, use_rslora=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    ("cnn", dict(r=2, target_modules=["conv1", "fc"])),
])
def test_round_trip_both_ways(kind, kw, tmp_path):
    base, hf, fp = hf_and_fast(kind, kw)
    x = inputs_for(kind)
    hf.eval(), fp.eval()
    with torch.no_grad():
        ref = run(hf, x)
        hf.save_pretrained(tmp_path / "hf")
        fp.save_pretrained(tmp_path / "fp")
        a = load_safetensors(str(tmp_path / "hf" / ST))
        b = load_safetensors(str(tmp_path / "fp" / ST))
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp"))
        fp2 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"))
        fp3 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fp"))
        for m in (hf2, fp2, fp3):
            torch.testing.assert_close(run(m.eval(), x), ref, atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in fp2.parameters())  # is_trainable=False
    fp4 = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"), is_trainable=True)
    assert fp4.get_nb_trainable_parameters()[0] == hf.get_nb_trainable_parameters()[0]


def test_config_files_interchange(tmp_path):
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                              use_rslora=True, rank_pattern={"v_proj": 2}, modules_to_save=["score"])
    cfg.save_pretrained(tmp_path / "fp")
    hcfg = peft.LoraConfig.from_pretrained(str(tmp_path / "fp"))
    assert (hcfg.r, hcfg.lora_alpha, set(hcfg.target_modules), hcfg.rank_pattern, hcfg.use_rslora) == \
        (4, 16, {"q_proj", "v_proj"}, {"v_proj": 2}, True)
    hcfg.save_pretrained(str(tmp_path / "hf"))
    back = fastpeft.PeftConfig.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(back, fastpeft.LoraConfig)
    assert (back.r, back.lora_alpha, sorted(back.target_modules), back.lora_dropout, back.modules_to_save) == \
        (4, 16, ["q_proj", "v_proj"], 0.1, ["score"])


def _saved(tmp_path, kind="bert", **kw):
    kw = kw or dict(r=4, target_modules=["query", "value"])
    _, hf, fp = hf_and_fast(kind, kw)
    fp.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _lora_free(model):
    return not any("lora" in k for k in model.state_dict())


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path):
    d = _saved(tmp_path)
    data = (d / ST).read_bytes()
    (d / ST).write_bytes(data[:-10])
    base = builder("bert")()
    with pytest.raises(ValueError, match="truncated"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    assert _lora_free(base)
    (d / ST).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupt"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    (d / ST).write_bytes(b"abc")
    with pytest.raises(ValueError, match="safetensors"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    (d / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        fastpeft.PeftModel.from_pretrained(base, str(d))


def test_mismatched_adapter_names_key_and_shape_and_leaves_model_unchanged(tmp_path):
    d = _saved(tmp_path)
    sd = load_safetensors(str(d / ST))
    k = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    bad = dict(sd)
    bad[k] = torch.zeros(3, 16)
    save_safetensors(bad, str(d / ST))
    base = builder("bert")()
    before = list(base.state_dict())
    with pytest.raises(ValueError, match=r"query\.lora_A\.weight: checkpoint \(3, 16\) vs model \(4, 16\)"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    assert list(base.state_dict()) == before
    missing = dict(sd)
    del missing[k]
    save_safetensors(missing, str(d / ST))
    with pytest.raises(ValueError, match=r"missing keys .*query\.lora_A\.weight"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    extra = dict(sd)
    extra["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 16)
    save_safetensors(extra, str(d / ST))
    with pytest.raises(ValueError, match=r"unexpected keys .*pooler\.dense"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    assert list(base.state_dict()) == before
    # an adapter for another architecture
    g = _saved(tmp_path / "g", "gpt2", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ValueError, match="c_attn"):
        fastpeft.PeftModel.from_pretrained(base, str(g))
    assert list(base.state_dict()) == before


def test_pickle_adapter_refused_unless_allowed(tmp_path):
    d = _saved(tmp_path)
    sd = load_safetensors(str(d / ST))
    os.remove(d / ST)
    torch.save(sd, d / "adapter_model.bin")
    base = builder("bert")()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        fastpeft.PeftModel.from_pretrained(base, str(d))
    assert _lora_free(base)
    m = fastpeft.PeftModel.from_pretrained(base, str(d), allow_pickle=True)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight" in m.state_dict()


def test_missing_files_and_bad_save_args(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.PeftModel.from_pretrained(builder("bert")(), str(tmp_path))
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="safetensors only"):
        fp.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match="unknown adapter"):
        fp.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_writes_are_atomic_no_temp_files_left(tmp_path):
    d = _saved(tmp_path)
    assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", ST]  # README.md: the model card
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary or parked directory next to it
    json.loads((d / "adapter_config.json").read_text())


def test_multiple_adapters_saved_in_hf_layout(tmp_path):
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query"]))
    fp.add_adapter("second", fastpeft.LoraConfig(r=3, target_modules=["value"]))
    hf.add_adapter("second", peft.LoraConfig(r=3, target_modules=["value"]))
    hf.load_state_dict(fp.state_dict())
    fp.save_pretrained(tmp_path / "fp")
    hf.save_pretrained(tmp_path / "hf")
    for sub in ("", "second"):
        a = load_safetensors(str(tmp_path / "hf" / sub / ST))
        b = load_safetensors(str(tmp_path / "fp" / sub / ST))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
