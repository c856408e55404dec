"""PeftModel lifecycle against HF PEFT: several named adapters, disable_adapter,
merge_and_unload / unload, modules_to_save, wrapper transparency (config, generate),
torch.compile, and short training runs (fused vs torch backend vs HF PEFT)."""
import copy
import warnings

import pytest
import torch

from .lora_models import builder, hf_and_fast, inputs_for, peft, run

import fastpeft
from fastpeft.tuners import lora as flora


def _two_adapters():
    base, hf, fp = hf_and_fast("bert", dict(r=4, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, mod in ((hf, peft), (fp, fastpeft)):
            m.add_adapter("b", mod.LoraConfig(r=2, lora_alpha=3, target_modules=["query", "key"],
                                              init_lora_weights=False))
    assert list(fp.state_dict()) == list(hf.state_dict())
    with torch.no_grad():
        for k, v in fp.state_dict().items():
            v.copy_(torch.randn_like(v) * 0.2 if ("lora_B" in k or "modules_to_save" in k) else v)
    hf.load_state_dict(fp.state_dict())
    return base, hf.eval(), fp.eval()


def test_multiple_adapters_set_delete_match_hf():
    base, hf, fp = _two_adapters()
    x = inputs_for("bert")
    with torch.no_grad():
        for names in ("default", "b", ["default", "b"], "default"):
            if isinstance(names, list):
                hf.base_model.set_adapter(names)
                fp.set_adapter(names)
            else:
                hf.set_adapter(names)
                fp.set_adapter(names)
            torch.testing.assert_close(run(fp, x), run(hf, x), atol=1e-5, rtol=1e-4)
        assert fp.active_adapter == hf.active_adapter == "default"
        assert [n for n, p in fp.named_parameters() if p.requires_grad] == \
            [n for n, p in hf.named_parameters() if p.requires_grad]
        fp.delete_adapter("b")
        hf.delete_adapter("b")
        assert list(fp.state_dict()) == list(hf.state_dict())
        torch.testing.assert_close(run(fp, x), run(hf, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown adapter"):
        fp.set_adapter("nope")
    fp.add_adapter("c", fastpeft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="only one of them can be active"):
        fp.set_adapter(["default", "c"])
    with pytest.raises(ValueError, match="already exists"):
        fp.add_adapter("default", fastpeft.LoraConfig(r=2, target_modules=["query"]))


def test_disable_adapter_gives_base_model_and_restores():
    base, hf, fp = _two_adapters()
    x = inputs_for("bert")
    with torch.no_grad():
        ref = run(base, x)
        adapted = run(fp, x)
        with fp.disable_adapter():
            torch.testing.assert_close(run(fp, x), ref)
        torch.testing.assert_close(run(fp, x), adapted)
        fp.merge_adapter()
        with fp.disable_adapter():  # unmerges, as HF PEFT does
            torch.testing.assert_close(run(fp, x), ref, atol=1e-5, rtol=1e-4)


def test_merge_and_unload_and_unload():
    base, hf, fp = _two_adapters()
    x = inputs_for("bert")
    orig = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        adapted = run(fp, x)
        merged = copy.deepcopy(fp).merge_and_unload()
        hf_merged = copy.deepcopy(hf).merge_and_unload()
        assert list(merged.state_dict()) == list(hf_merged.state_dict()) == list(orig)
        torch.testing.assert_close(run(merged, x), adapted, atol=1e-5, rtol=1e-4)
        plain = fp.unload()
        assert not any(isinstance(m, flora.LoraLayer) for m in plain.modules())
        assert list(plain.state_dict()) == list(orig)
        for k, v in plain.state_dict().items():
            torch.testing.assert_close(v, orig[k], msg=lambda m: k)


def test_task_type_seq_cls_saves_head_like_hf():
    base = builder("bert")()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"],
                                                                      task_type="SEQ_CLS"))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=2, target_modules=["query"],
                                                                          task_type="SEQ_CLS"))
    assert list(fp.state_dict()) == list(hf.state_dict())
    assert sorted(fp.get_adapter_state_dict()) == sorted(peft.get_peft_model_state_dict(hf))


def test_wrapper_is_transparent(capsys):
    base = builder("gpt2")()
    fp = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert fp.config is base.config and fp.get_base_model() is base and fp.base_model.model is base
    out = fp.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    fp.print_trainable_parameters()
    t, a = fp.get_nb_trainable_parameters()
    assert f"trainable params: {t:,d} || all params: {a:,d}" in capsys.readouterr().out
    assert t == 2 * (2 * 16 + 48 * 2)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(12, 20)
        self.down = torch.nn.Linear(20, 5)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_torch_compile_of_patched_model_runs():
    fp = fastpeft.get_peft_model(_MLP(), fastpeft.LoraConfig(r=2, target_modules=["up", "down"],
                                                             init_lora_weights=False))
    x = torch.randn(3, 12)
    ref = fp(x)
    compiled = torch.compile(fp, backend="eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert fp.base_model.model.up.lora_A["default"].weight.grad is not None


def _train(model, steps=24, lr=0.05):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 9), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tiny_bert_and_init(kw):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(cfg)
    torch.manual_seed(1)
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw))
    return base, fp, copy.deepcopy(fp.state_dict())


_TRAIN_KW = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])


def test_short_training_lowers_loss_equally_on_default_and_torch_backends():
    base, fp, init = _tiny_bert_and_init(_TRAIN_KW)
    default_losses = _train(fp)
    fp_torch = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**_TRAIN_KW))
    fp_torch.load_state_dict(init)
    with fastpeft.use_backend("torch", op="lora_linear"):
        torch_losses = _train(fp_torch)
    assert default_losses[-1] < 0.8 * default_losses[0]
    torch.testing.assert_close(torch.tensor(default_losses), torch.tensor(torch_losses), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_training_run_matches_hf_peft():
    base, fp, init = _tiny_bert_and_init(_TRAIN_KW)
    fp_losses = _train(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_TRAIN_KW))
    hf.load_state_dict(init)
    hf_losses = _train(hf)
    assert fp_losses[-1] < 0.8 * fp_losses[0]
    torch.testing.assert_close(torch.tensor(fp_losses), torch.tensor(hf_losses), atol=2e-3, rtol=2e-3)


def test_training_with_fused_dropout_lowers_loss():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, num_labels=3)
    fp = fastpeft.get_peft_model(BertForSequenceClassification(cfg),
                                 fastpeft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.1,
                                                     modules_to_save=["classifier"]))
    losses = _train(fp, steps=12, lr=0.1)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_hf_trainer_trains_a_fastpeft_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, num_labels=3)
    fp = fastpeft.get_peft_model(BertForSequenceClassification(cfg),
                                 fastpeft.LoraConfig(r=2, target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))
    before = {k: v.clone() for k, v in fp.state_dict().items()}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 64, (6,), generator=g), "labels": torch.tensor(i % 3),
                    "unused_text": "dropped by Trainer"}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no")
    Trainer(model=fp, args=args, train_dataset=DS()).train()
    after = fp.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("lora_" in k or "modules_to_save" in k) for k in changed)


def test_hf_peft_config_is_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hcfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"], task_type="SEQ_CLS",
                               use_rslora=True)
        hf = peft.get_peft_model(builder("bert")(), copy.deepcopy(hcfg))
    fp = fastpeft.get_peft_model(builder("bert")(), hcfg)
    cfg = fp.peft_config["default"]
    assert isinstance(cfg, fastpeft.LoraConfig) and (cfg.r, cfg.task_type, cfg.use_rslora) == (3, "SEQ_CLS", True)
    assert list(fp.state_dict()) == list(hf.state_dict())
    with pytest.raises(TypeError, match="peft_config"):
        fastpeft.get_peft_model(builder("bert")(), {"r": 2})


def test_mixed_adapter_batch_matches_hf():
    _, hf0, fp0 = _two_adapters()  # modules_to_save heads: each row through its adapter's head
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = ["default", "__base__", "default"]  # HF PEFT's heads need a copy for every adapter named
        torch.testing.assert_close(fp0(input_ids=ids, adapter_names=mixed).logits,
                                   hf0(input_ids=ids, adapter_names=mixed).logits, atol=1e-5, rtol=1e-4)
    base, hf, fp = hf_and_fast("bert", dict(r=4, target_modules=["query", "value", "word_embeddings"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, mod in ((hf, peft), (fp, fastpeft)):
            m.add_adapter("b", mod.LoraConfig(r=2, target_modules=["query", "key"], init_lora_weights=False))
    hf.load_state_dict(fp.state_dict())
    hf.eval(), fp.eval()
    x = {"input_ids": torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))}
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        torch.testing.assert_close(fp(**x, adapter_names=names).logits, hf(**x, adapter_names=names).logits,
                                   atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="unknown adapter"):
            fp(**x, adapter_names=["zz"] * 4)
    fp.train()
    with pytest.raises(ValueError, match="inference"):
        fp(**x, adapter_names=names)
