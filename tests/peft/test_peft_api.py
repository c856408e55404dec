"""HF PEFT's API on fastpeft models (issue 21): the state-dict functions (fastpeft's and peft's own),
``inject_adapter_in_model``, the task classes, ``get_peft_model`` / ``from_pretrained`` arguments,
``get_layer_status`` / ``get_model_status``, ``add_weighted_adapter`` -- each against HF PEFT 0.21."""
import copy
import dataclasses
import warnings

import pytest
import torch

from .lora_models import bert_cls, hf_and_fast, inputs_for, llama_lm, peft, run

import fastpeft

HEAD = dict(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}")


# -- get / set_peft_model_state_dict ---------------------------------------------------------------------
def test_peft_state_dict_functions_see_fastpeft_models():
    """peft.get_peft_model_state_dict(fastpeft_model) returned {} and set_peft_model_state_dict loaded nothing."""
    _, hf, fp = hf_and_fast("bert", HEAD)
    ref = peft.get_peft_model_state_dict(hf)
    assert len(ref) == 10  # 2 layers x (query, value) x (A, B) + classifier weight, bias
    _same(peft.get_peft_model_state_dict(fp), ref)
    _same(fastpeft.get_peft_model_state_dict(fp), ref)
    _same(fastpeft.get_peft_model_state_dict(fp, state_dict=fp.state_dict()), ref)
    x = inputs_for("bert")
    for setter in (peft.set_peft_model_state_dict, fastpeft.set_peft_model_state_dict):
        fresh = fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(**HEAD))
        result = setter(fresh, ref)
        assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        assert not result.unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(run(fresh.eval(), x), run(hf.eval(), x))


def test_set_peft_model_state_dict_reports_and_refuses():
    _, hf, fp = hf_and_fast("bert", HEAD)
    sd = peft.get_peft_model_state_dict(hf)
    part = {k: v for k, v in sd.items() if "layer.0." not in k}
    res = fastpeft.set_peft_model_state_dict(fp, {**part, "base_model.model.nope.weight": torch.zeros(1)})
    assert len(res.missing_keys) == 4 and all(".default." in k for k in res.missing_keys)
    assert res.unexpected_keys == ["base_model.model.nope.weight"]
    bad = dict(sd)
    k = next(k for k in bad if "lora_A" in k)
    bad[k] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shape mismatches"):
        fastpeft.set_peft_model_state_dict(fp, bad)
    with pytest.warns(UserWarning, match="another shape"):
        fastpeft.set_peft_model_state_dict(fp, bad, ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match="floating point"):
        fastpeft.set_peft_model_state_dict(fp, {k: torch.zeros(2, 16, dtype=torch.int32)})


def test_inject_adapter_in_model_like_hf():
    base = bert_cls()
    cfg = dict(r=2, target_modules=["query"], init_lora_weights=False)
    torch.manual_seed(0)
    hf = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), copy.deepcopy(base))
    fp = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(**cfg), copy.deepcopy(base))
    assert type(fp) is type(base) and set(fp.peft_config) == {"default"}
    assert sorted(fp.state_dict()) == sorted(hf.state_dict())
    sd = peft.get_peft_model_state_dict(hf)
    assert sorted(sd) == sorted(fastpeft.get_peft_model_state_dict(fp))
    res = fastpeft.set_peft_model_state_dict(fp, sd)
    assert not res.missing_keys and not res.unexpected_keys
    x = inputs_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(run(fp, x), run(hf, x))
    # targets taken from a state dict (HF: low_cpu_mem_usage / state_dict loading path)
    fp2 = fastpeft.inject_adapter_in_model(fastpeft.LoraConfig(r=2, target_modules=["value"]), copy.deepcopy(base),
                                           state_dict=sd)
    assert sorted(fastpeft.get_peft_model_state_dict(fp2)) == sorted(sd)


# -- get_peft_model / task classes / from_pretrained ----------------------------------------------------
@pytest.mark.parametrize("task,cls", [("CAUSAL_LM", "PeftModelForCausalLM"),
                                      ("SEQ_CLS", "PeftModelForSequenceClassification"),
                                      ("TOKEN_CLS", "PeftModelForTokenClassification"),
                                      ("SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"),
                                      ("QUESTION_ANS", "PeftModelForQuestionAnswering"),
                                      ("FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
                                      (None, "PeftModel")])
def test_task_classes(task, cls, tmp_path):
    build, tm = {"CAUSAL_LM": (llama_lm, "q_proj"), "SEQ_2_SEQ_LM": (_t5, "q")}.get(task, (bert_cls, "query"))
    m = fastpeft.get_peft_model(build(), fastpeft.LoraConfig(r=2, target_modules=[tm], task_type=task))
    assert type(m).__name__ == cls and isinstance(m, fastpeft.PeftModel)
    assert type(m).__name__ == type(peft.get_peft_model(build(), peft.LoraConfig(
        r=2, target_modules=[tm], task_type=task))).__name__
    m.save_pretrained(tmp_path)
    assert type(fastpeft.PeftModel.from_pretrained(build(), str(tmp_path))).__name__ == cls


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0)).eval()


def test_task_type_enum_is_honoured():
    m = fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(r=2, target_modules=["query"],
                                                                task_type=peft.TaskType.SEQ_CLS))
    assert type(m).__name__ == "PeftModelForSequenceClassification"
    assert m.peft_config["default"].modules_to_save == ["classifier"]


def test_get_peft_model_arguments(tmp_path):
    cfg = fastpeft.LoraConfig(r=2, target_modules=["query"])
    with pytest.raises(ValueError, match="mixed=True"):
        fastpeft.get_peft_model(bert_cls(), cfg, mixed=True)
    with pytest.raises(TypeError):
        fastpeft.get_peft_model(bert_cls(), cfg, not_an_argument=1)
    m = fastpeft.get_peft_model(bert_cls(), cfg, revision="v1.2", low_cpu_mem_usage=True)
    m.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).revision == "v1.2"
    assert fastpeft.PeftConfig.from_pretrained(str(tmp_path)).revision == "v1.2"


def test_from_pretrained_arguments(tmp_path):
    _, hf, fp = hf_and_fast("bert", dict(r=2, target_modules=["query"]))
    hf.add_adapter("other", peft.LoraConfig(r=3, target_modules=["value"], init_lora_weights=False))
    hf.save_pretrained(tmp_path)  # default in tmp_path, "other" in tmp_path/other
    x = inputs_for("bert")
    m = fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path), subfolder="other")  # was ignored
    hf.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(run(m, x), run(hf.eval(), x))
    assert m.peft_config["default"].r == 3
    with pytest.raises(TypeError, match="not_an_argument"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path), not_an_argument=True)
    with pytest.raises(TypeError, match="not_an_argument"):
        m.load_adapter(str(tmp_path), "again", not_an_argument=True)
    with pytest.raises(ValueError, match="revision"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path), revision="main")
    with pytest.raises(FileNotFoundError, match="subfolder"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path), subfolder="missing")
    with pytest.raises(ValueError, match="subfolder"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), str(tmp_path), subfolder="../x")
    m.load_adapter(str(tmp_path), "first", torch_device="cpu")
    assert set(m.peft_config) == {"default", "first"}


def test_hub_model_id_is_downloaded_or_a_clear_error(tmp_path, monkeypatch):
    """A model_id that is no local directory goes to the Hub (offline here: a clear OSError naming it)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="someone/no-such-adapter"):
        fastpeft.PeftModel.from_pretrained(bert_cls(), "someone/no-such-adapter", revision="v2")


def test_errors_name_the_peft_model_not_the_base_class():
    m = fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(AttributeError, match="'PeftModel' object has no attribute 'no_such_thing'"):
        m.no_such_thing
    assert m.config is m.get_base_model().config  # falling through still works
    for hub_writer in ("_upload_modified_files", "_create_repo"):
        assert not hasattr(m, hub_writer)


# -- status ---------------------------------------------------------------------------------------------
def test_layer_and_model_status_match_hf():
    _, hf, fp = hf_and_fast("bert", HEAD)
    for m in (hf, fp):
        m.add_adapter("b", (peft if m is hf else fastpeft).LoraConfig(r=2, target_modules=["query"]))
        m.merge_adapter(["default"]) if m is hf else m.merge_adapter(["default"])
    a = {s.name: s for s in hf.get_layer_status()}
    b = {s.name: s for s in fp.get_layer_status()}
    assert set(a) == set(b)
    for name in a:
        x, y = dataclasses.asdict(a[name]), dataclasses.asdict(b[name])
        assert x == y, (name, x, y)
    assert fastpeft.get_layer_status(fp) == fp.get_layer_status()
    ma, mb = dataclasses.asdict(hf.get_model_status()), dataclasses.asdict(fp.get_model_status())
    assert ma == mb
    with pytest.raises(ValueError, match="No adapter layers"):
        fastpeft.get_layer_status(bert_cls())


# -- add_weighted_adapter -------------------------------------------------------------------------------
def _two_adapters(kind="bert"):
    base, hf, fp = hf_and_fast(kind, dict(r=4, target_modules=["query", "value", "word_embeddings"]
                                          if kind == "bert" else ["q_proj", "v_proj"]))
    tm = ["query", "value", "word_embeddings"] if kind == "bert" else ["q_proj", "v_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=16, target_modules=tm, init_lora_weights=False))
    fp.add_adapter("b", fastpeft.LoraConfig(r=4, lora_alpha=16, target_modules=tm, init_lora_weights=False))
    fp.load_state_dict(hf.state_dict())
    return hf, fp


@pytest.mark.parametrize("combination", ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
                                         "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                                         "magnitude_prune_svd"])
def test_add_weighted_adapter_matches_hf(combination):
    hf, fp = _two_adapters()
    kw = dict(density=0.5) if combination not in ("svd", "linear", "cat") else {}
    for m in (hf, fp):
        torch.manual_seed(11)
        m.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination, svd_rank=3, **kw)
    sa = peft.get_peft_model_state_dict(hf, adapter_name="mix")
    sb = fastpeft.get_peft_model_state_dict(fp, adapter_name="mix")
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k].abs(), sa[k].abs(), atol=1e-5, rtol=1e-4)  # svd: signs may differ
    for m in (hf, fp):
        m.set_adapter("mix")
    x = inputs_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(run(fp.eval(), x), run(hf.eval(), x), atol=1e-5, rtol=1e-4)
    assert fp.peft_config["mix"].r == hf.peft_config["mix"].r


def test_add_weighted_adapter_errors():
    hf, fp = _two_adapters()
    with pytest.raises(ValueError, match="does not exist"):
        fp.add_weighted_adapter(["default", "nope"], [1, 1], "mix")
    with pytest.raises(ValueError, match="combination_type"):
        fp.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="average")
    with pytest.raises(ValueError, match="needs density"):
        fp.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="ties")
    fp.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="already exists"):  # HF returns silently
        fp.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")
    assert fp.active_adapters == ["default"] and not fp.peft_config["mix"].inference_mode


def test_peft_model_signature_kwargs_are_checked(tmp_path):
    m = fastpeft.get_peft_model(llama_lm(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        m.save_pretrained(tmp_path, not_an_argument=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        m.push_to_hub("me/x", not_an_argument=1)


def test_a_model_seen_by_peft_functions_still_pickles_and_prints(tmp_path):
    _, hf, fp = hf_and_fast("bert", HEAD)
    text = repr(fp)
    peft.get_peft_model_state_dict(fp)  # gives the head wrapper peft's AuxiliaryTrainingWrapper as a base
    assert repr(fp) == text
    torch.save(fp, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x = inputs_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(run(back.eval(), x), run(fp.eval(), x))


def test_fastpeft_functions_on_an_hf_injected_model_say_so():
    """The reverse of the silent {}: fastpeft's functions on adapters fastpeft does not hold raise."""
    m = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["query"]), bert_cls())
    with pytest.raises(ValueError, match="peft.get_peft_model_state_dict"):
        fastpeft.get_peft_model_state_dict(m)
    with pytest.raises(ValueError, match="peft.set_peft_model_state_dict"):
        fastpeft.set_peft_model_state_dict(m, {})
