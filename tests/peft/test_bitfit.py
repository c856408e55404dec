"""BitFit: only biases train, disable/remove restore the original biases, state dict round trip."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fastpeft.tuners import bitfit  # noqa: E402


def tiny_bert_cls():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_only_biases_get_gradients_and_change():
    model = tiny_bert_cls()
    touched = bitfit.inject(model, bitfit.BitFitConfig(), "default")
    assert "bert.encoder.layer.0.attention.self.query" in touched
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert trainable == set(bitfit.trainable_bias_names(model))
    assert {n for n, p in model.named_parameters() if n.endswith(".bias")} == trainable
    ids = torch.randint(0, 97, (3, 6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith(".bias"), n
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_disable_remove_merge_and_round_trip():
    model = tiny_bert_cls()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 5))
    y0 = model(input_ids=ids).logits
    bitfit.inject(model, bitfit.BitFitConfig(target_modules=["query", "value"]), "default")
    with torch.no_grad():
        for n in bitfit.trainable_bias_names(model):
            model.get_parameter(n).add_(torch.randn_like(model.get_parameter(n)))
    y1 = model(input_ids=ids).logits
    assert not torch.allclose(y1, y0, atol=1e-4)
    sd = bitfit.adapter_state_dict(model)
    assert set(sd) == {f"bert.encoder.layer.{i}.attention.self.{w}.bias" for i in (0, 1) for w in ("query", "value")}
    bitfit.enable_adapters(model, False)
    torch.testing.assert_close(model(input_ids=ids).logits, y0)
    assert set(bitfit.adapter_state_dict(model)) == set(sd)
    bitfit.enable_adapters(model, True)
    torch.testing.assert_close(model(input_ids=ids).logits, y1)
    # load into a fresh copy gives the same outputs
    other = copy.deepcopy(base)
    bitfit.inject(other, bitfit.BitFitConfig(target_modules=["query", "value"]), "default")
    bitfit.load_adapter_state_dict(other, {k: v.clone() for k, v in sd.items()})
    torch.testing.assert_close(other(input_ids=ids).logits, y1)
    # remove without merge: original biases and requires_grad back
    bitfit.remove(other)
    torch.testing.assert_close(other(input_ids=ids).logits, y0)
    assert all(p.requires_grad for p in other.parameters())
    # merge then remove keeps the trained biases
    bitfit.merge(model)
    bitfit.remove(model)
    torch.testing.assert_close(model(input_ids=ids).logits, y1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no module with a bias; candidates: none"):
        bitfit.inject(nn.Sequential(nn.Linear(3, 3, bias=False)), bitfit.BitFitConfig(), "default")
    model = tiny_bert_cls()
    with pytest.raises(ValueError, match="candidates: .*query"):
        bitfit.inject(model, bitfit.BitFitConfig(target_modules=["nope"]), "default")
    assert all(p.requires_grad for p in model.parameters())  # unchanged
    bitfit.inject(model, bitfit.BitFitConfig(), "default")
    with pytest.raises(ValueError, match="one adapter"):
        bitfit.inject(model, bitfit.BitFitConfig(), "other")
    sd = bitfit.adapter_state_dict(model)
    k = next(iter(sd))
    with pytest.raises(ValueError, match="shape mismatches"):
        bitfit.load_adapter_state_dict(model, {**sd, k: torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*foo"):
        bitfit.load_adapter_state_dict(model, {**sd, "foo.bias": torch.zeros(1)})


def test_through_get_peft_model_save_load(tmp_path):
    import fastpeft
    get_peft_model = getattr(fastpeft, "get_peft_model", None)
    if get_peft_model is None:
        from fastpeft.mapping import get_peft_model
    from fastpeft.peft_model import PeftModel
    base = tiny_bert_cls()
    ids = torch.randint(0, 97, (2, 5))
    model = get_peft_model(copy.deepcopy(base), bitfit.BitFitConfig(task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable)  # classifier head trains in full
    assert all(n.endswith(".bias") or "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    y = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(again(input_ids=ids).logits, y)
