"""transformers' Trainer with a fastpeft model, unchanged: labels found (eval_loss, compute_metrics),
the best checkpoint restored, checkpoints and save_model in HF PEFT's adapter format (HF PEFT loads
them), resuming, gradient checkpointing, bf16 autocast on the fused path; the same with an HF PEFT
model after fastpeft.accelerate; and the wrapper class that makes it so."""
import copy
import inspect
import os
import pickle
import warnings

import pytest
import torch

from .lora_models import peft

import fastpeft
from fastpeft import peft_model as pm

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_utils import _is_peft_model  # noqa: E402
from transformers.utils.generic import find_labels  # noqa: E402

VOCAB = 64


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


LORA = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")


def _fastpeft_bert():
    torch.manual_seed(1)
    return fastpeft.get_peft_model(_bert(), fastpeft.LoraConfig(**LORA))


def _data(n=24, seq=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=g), "labels": i % 3, "text": "unused column"}
            for i in range(n)]


def _args(out, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2, report_to=[],
                use_cpu=True, disable_tqdm=True, save_strategy="steps", logging_steps=50, seed=0)
    base.update(kw)
    return TrainingArguments(str(out), **base)


def _adapter_files(directory):
    return {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(directory))


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


def test_trainer_finds_labels_evaluates_and_restores_the_best_checkpoint_in_peft_format(tmp_path):
    model = _fastpeft_bert()
    scores = iter([0.2, 0.9, 0.5, 0.0])      # checkpoint-4 is the best (the last: evaluate() below)
    seen = []

    def metrics(pred):
        seen.append(pred.label_ids.shape)
        return {"score": next(scores)}

    data = _data()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                                              save_steps=2, load_best_model_at_end=True, bf16=True,
                                              metric_for_best_model="score", greater_is_better=True),
                      train_dataset=data, eval_dataset=data[:8], compute_metrics=metrics)
    assert trainer.label_names == ["labels"]
    fastpeft.reset_fusion_report(model)
    trainer.train()
    report = fastpeft.fusion_report(model)
    assert report.fused_calls > 0 and report.fallback_calls == 0, str(report)   # bf16 autocast, fused
    assert len(seen) == 3 and seen[0] == (8,)
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(history) == 3 and all("eval_score" in h for h in history)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    for step in (2, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert _adapter_files(ckpt) and not (ckpt / "model.safetensors").exists()
    # the best checkpoint's adapter is what the model holds now
    best = pm.PeftModel.from_pretrained(_bert(), str(tmp_path / "checkpoint-4"))
    for k, v in _lora_state(best).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=lambda m: f"{k}: {m}")
    assert "eval_loss" in trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    assert _adapter_files(tmp_path / "final") and not (tmp_path / "final" / "model.safetensors").exists()
    # HF PEFT loads it and computes what fastpeft computes from it (the trained model itself still runs
    # under the bf16 autocast that accelerate wrapped its forward in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "final")).eval()
    ours = pm.PeftModel.from_pretrained(_bert(), str(tmp_path / "final"))
    for k, v in _lora_state(ours).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=lambda m: f"{k}: {m}")
    ids = torch.stack([d["input_ids"] for d in data[:5]])
    torch.testing.assert_close(hf(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_trainer_resumes_from_a_fastpeft_checkpoint_exactly(tmp_path):
    data = _data()
    straight = _fastpeft_bert()
    Trainer(model=straight, args=_args(tmp_path / "a", max_steps=4, save_steps=2), train_dataset=data).train()
    resumed = fastpeft.get_peft_model(_bert(), fastpeft.LoraConfig(**LORA))   # other weights: all come from the file
    trainer = Trainer(model=resumed, args=_args(tmp_path / "b", max_steps=4, save_steps=2), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    want, got = _lora_state(straight), _lora_state(resumed)
    assert sorted(want) == sorted(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}")


def test_trainer_with_gradient_checkpointing_trains_the_adapter(tmp_path):
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(_llama(), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                  task_type="CAUSAL_LM"))
    before = _lora_state(model)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 10), generator=g)]
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="no", gradient_checkpointing=True,
                                              bf16=True), train_dataset=data)
    assert trainer.label_names == ["labels"]
    fastpeft.reset_fusion_report(model)
    trainer.train()
    assert model.get_base_model().model.gradient_checkpointing
    report = fastpeft.fusion_report(model)
    assert report.fallback_calls == 0 and report.fused_calls == 2 * 2 * len(report.layers)  # recomputed
    after = _lora_state(model)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_A" in k)


def test_trainer_with_an_accelerated_hf_peft_model_runs_fused_and_matches_fastpeft(tmp_path):
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        hf = peft.get_peft_model(_bert(), peft.LoraConfig(**LORA))
    ours = _fastpeft_bert()
    ours.load_state_dict(hf.state_dict())
    assert fastpeft.accelerate(hf).accelerated == 2
    losses = []
    for name, model in (("hf", hf), ("ours", ours)):
        fastpeft.reset_fusion_report(model)
        trainer = Trainer(model=model, args=_args(tmp_path / name, max_steps=3, save_strategy="no", bf16=True),
                          train_dataset=data)
        losses.append(trainer.train().training_loss)
        assert fastpeft.fusion_report(model).fused_calls == 3 * 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


# -- the wrapper class ------------------------------------------------------------------------
def test_wrapper_is_a_peft_model_for_transformers_with_the_wrapped_signature():
    model = _fastpeft_bert()
    base_cls = type(model.get_base_model())
    assert isinstance(model, fastpeft.PeftModel) and isinstance(model, peft.PeftModel)
    # task_type SEQ_CLS: HF PEFT's task class, as peft.get_peft_model returns
    assert _is_peft_model(model) and type(model).__name__ == "PeftModelForSequenceClassification"
    assert isinstance(model, fastpeft.PeftModelForSequenceClassification)
    assert find_labels(type(model)) == ["labels"]
    assert list(inspect.signature(model.forward).parameters) == \
        list(inspect.signature(base_cls.forward).parameters)[1:]
    assert type(_fastpeft_bert()) is type(model)        # one class per wrapped model class
    # nothing of HF PEFT's class is inherited: its names read as missing, the wrapped model answers
    assert hasattr(peft.PeftModel, "get_prompt_embedding_to_save") and not hasattr(model, "get_prompt_embedding_to_save")
    assert model.config is model.get_base_model().config
    assert model.base_model.model is model.get_base_model()


def test_wrapper_pickles_and_deep_copies():
    model = _fastpeft_bert().eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other) is type(model)
        torch.testing.assert_close(other(input_ids=ids).logits, model(input_ids=ids).logits)


def test_without_hf_peft_the_signature_still_gives_labels(monkeypatch):
    monkeypatch.setattr(pm, "peft_model_cls", lambda: None)
    model = _fastpeft_bert()
    assert not isinstance(model, peft.PeftModel)
    assert find_labels(type(model)) == ["labels"]
    assert "input_ids" in inspect.signature(model.forward).parameters


def test_load_adapter_into_an_existing_adapter_replaces_its_weights(tmp_path):
    saved = _fastpeft_bert()
    with torch.no_grad():
        for n, p in saved.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    saved.save_pretrained(str(tmp_path / "a"))
    model = _fastpeft_bert()
    model.load_adapter(str(tmp_path / "a"), "default", is_trainable=True)
    assert model.active_adapters == ["default"]
    for k, v in _lora_state(saved).items():
        torch.testing.assert_close(model.state_dict()[k], v)
    other = fastpeft.get_peft_model(_bert(), fastpeft.LoraConfig(**{**LORA, "r": 3}))
    before = _lora_state(other)
    with pytest.raises(ValueError, match="shape"):
        other.load_adapter(str(tmp_path / "a"), "default")
    for k, v in before.items():
        assert torch.equal(other.state_dict()[k], v)
