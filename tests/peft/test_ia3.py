"""(IA)³ against HF PEFT: same config + same vectors -> same outputs and gradients; merge/unmerge; keys."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastpeft.tuners import ia3  # noqa: E402


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _out(model, ids):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


CASES = [
    (tiny_bert, None, None),
    (tiny_bert, ["query", "value", "intermediate.dense"], ["intermediate.dense"]),
    (tiny_gpt2, None, None),
    (tiny_llama, None, None),
    (tiny_llama, ["q_proj", "up_proj", "down_proj"], ["down_proj"]),
]


@pytest.mark.parametrize("factory,targets,ff", CASES)
def test_matches_hf_peft_outputs_grads_and_keys(factory, targets, ff):
    base = factory()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=targets, feedforward_modules=ff,
                                                                   init_ia3_weights=False))
    ours = copy.deepcopy(base)
    touched = ia3.inject(ours, ia3.IA3Config(target_modules=targets, feedforward_modules=ff), "default")
    assert touched
    # same parameter names in memory (HF PEFT's prefix base_model.model.)
    hf_keys = {k[len("base_model.model."):] for k in hf.state_dict()}
    assert hf_keys == set(ours.state_dict())
    # copy HF's random vectors into ours via the on-disk format
    disk = peft.get_peft_model_state_dict(hf)
    ia3.load_adapter_state_dict(ours, {k[len("base_model.model."):]: v for k, v in disk.items()}, "default")
    ours_disk = ia3.adapter_state_dict(ours, "default")
    assert {"base_model.model." + k for k in ours_disk} == set(disk)
    ids = torch.randint(0, 97, (2, 7))
    y_hf, y = _out(hf, ids), _out(ours, ids)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, _out(base, ids), atol=1e-3)  # the adapter does something
    y_hf.square().mean().backward()
    y.square().mean().backward()
    hf_grads = {k[len("base_model.model."):]: p.grad for k, p in hf.named_parameters() if "ia3_l" in k}
    for k, p in ours.named_parameters():
        if "ia3_l" in k:
            torch.testing.assert_close(p.grad, hf_grads[k], atol=1e-5, rtol=1e-4)


def test_merge_unmerge_restores_weights_and_keeps_outputs():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ia3.inject(model, ia3.IA3Config(init_ia3_weights=False), "default")
    with torch.no_grad():  # keep vectors away from 0 so unmerge is well conditioned
        for _, m in ia3.iter_ia3_layers(model):
            m.ia3_l["default"].copy_(torch.rand_like(m.ia3_l["default"]) + 0.5)
    ids = torch.randint(0, 97, (2, 5))
    y = _out(model, ids)
    ia3.merge(model)
    torch.testing.assert_close(_out(model, ids), y, atol=1e-5, rtol=1e-5)
    ia3.unmerge(model)
    torch.testing.assert_close(_out(model, ids), y, atol=1e-5, rtol=1e-5)
    ia3.remove(model, "default")
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6, rtol=1e-5)


def test_disable_and_remove_restore_base_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 6))
    y0 = _out(model, ids)
    ia3.inject(model, ia3.IA3Config(init_ia3_weights=False), "a")
    assert not torch.allclose(_out(model, ids), y0, atol=1e-4)
    ia3.enable_adapters(model, False)
    torch.testing.assert_close(_out(model, ids), y0)
    ia3.enable_adapters(model, True)
    ia3.remove(model, "a")
    torch.testing.assert_close(_out(model, ids), y0)
    assert not any("ia3" in k for k in model.state_dict())


def test_bad_configs_raise_clear_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="candidates.*query"):
        ia3.inject(model, ia3.IA3Config(target_modules=["nope"]), "default")
    assert not any("ia3" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="subset"):
        ia3.IA3Config(target_modules=["query"], feedforward_modules=["value"])
    with pytest.raises(ValueError, match="does not support.*LayerNorm"):
        ia3.inject(model, ia3.IA3Config(target_modules=["LayerNorm"]), "default")
    ia3.inject(model, ia3.IA3Config(target_modules=["query"]), "default")
    with pytest.raises(ValueError, match="already exists"):
        ia3.inject(model, ia3.IA3Config(target_modules=["query"]), "default")
    sd = ia3.adapter_state_dict(model)
    k = next(iter(sd))
    with pytest.raises(ValueError, match="shape mismatches.*" + k.split(".")[0]):
        ia3.load_adapter_state_dict(model, {**sd, k: torch.ones(3, 1)})
    with pytest.raises(ValueError, match="missing keys"):
        ia3.load_adapter_state_dict(model, {})
    with pytest.raises(ValueError, match="no default for model_type"):
        ia3.inject(torch.nn.Sequential(torch.nn.Linear(3, 3)), ia3.IA3Config(), "default")


def _get_peft_model():
    import fastpeft
    fn = getattr(fastpeft, "get_peft_model", None)
    if fn is None:
        from fastpeft.mapping import get_peft_model as fn
    return fn


def test_through_get_peft_model_round_trip_with_hf(tmp_path):
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 6))
    model = _get_peft_model()(copy.deepcopy(base), ia3.IA3Config(init_ia3_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ia3_l.default" in n for n in trainable)
    y = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "ours"))
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(hf(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
    # and back: HF-saved adapter loads in fastpeft
    hf2 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False))
    hf2.save_pretrained(str(tmp_path / "hf"))
    from fastpeft.peft_model import PeftModel
    ours2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "hf"))
    torch.testing.assert_close(ours2(input_ids=ids).logits, hf2(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_safe_merge_refuses_non_finite_and_merges_nothing():
    model = tiny_llama()
    ia3.inject(model, ia3.IA3Config(), "default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = next(m for _, m in ia3.iter_ia3_layers(model))
    with torch.no_grad():
        layer.ia3_l["default"][0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        ia3.merge(model, safe_merge=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or "ia3_l" in k, k
    assert not any(m.merged for _, m in ia3.iter_ia3_layers(model))


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def test_conv2d_matches_hf_peft_and_merges():
    torch.manual_seed(0)
    base = TinyCNN()
    kw = dict(target_modules=["conv1", "conv2", "fc"], feedforward_modules=["conv2"])
    hf = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **kw))
    ours = copy.deepcopy(base)
    ia3.inject(ours, ia3.IA3Config(**kw), "default")
    ia3.load_adapter_state_dict(ours, {k[len("base_model.model."):]: v
                                       for k, v in peft.get_peft_model_state_dict(hf).items()})
    x = torch.randn(2, 3, 7, 7)
    y_hf, y = hf(x), ours(x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_hf.sum().backward()
    for k, p in ours.named_parameters():
        if "ia3_l" in k:
            torch.testing.assert_close(p.grad, hf.get_parameter("base_model.model." + k).grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for _, m in ia3.iter_ia3_layers(ours):
            m.ia3_l["default"].copy_(torch.rand_like(m.ia3_l["default"]) + 0.5)
    y = ours(x)
    ia3.merge(ours)
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)
    ia3.unmerge(ours)
    torch.testing.assert_close(ours(x), y, atol=1e-5, rtol=1e-5)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match="groups=1"):
        ia3.inject(grouped, ia3.IA3Config(target_modules=["0", "1"], feedforward_modules=["0"]), "default")
    assert not any(isinstance(m, ia3.IA3Linear) for m in grouped.modules())  # unchanged


def test_several_adapters_through_peft_model():
    base = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 5))
    pm = _get_peft_model()(copy.deepcopy(base), ia3.IA3Config(init_ia3_weights=False))
    y_a = pm(input_ids=ids).logits
    pm.add_adapter("b", ia3.IA3Config(init_ia3_weights=False))
    torch.testing.assert_close(pm(input_ids=ids).logits, y_a)  # "default" still active
    pm.set_adapter("b")
    y_b = pm(input_ids=ids).logits
    assert not torch.allclose(y_a, y_b, atol=1e-4)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".ia3_l.b") for n in trainable)
    pm.delete_adapter("b")
    pm.set_adapter("default")
    torch.testing.assert_close(pm(input_ids=ids).logits, y_a)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, y_a, atol=1e-5, rtol=1e-5)
    assert not any("ia3" in k for k in merged.state_dict())
