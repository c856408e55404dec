"""Tiny random-init decoders of every family patch_model supports (fast CPU tests)."""
from __future__ import annotations

import pytest
import torch

VOCAB = 97

# model_type -> config keywords (2 layers, hidden 32, 4 query / 2 key-value heads, no dropout in the model)
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 50.0},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gpt2": None,
}


def config(model_type: str):
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                    eos_token_id=2)
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    kw.update(FAMILIES[model_type])
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, dtype=torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(model_type)).to(dtype)
    with torch.no_grad():  # Gemma's norm weights start at 0 (1 + w): spread them so the offset matters
        for name, p in m.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def batch(seed: int = 1, B: int = 2, S: int = 13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, -2:] = 0  # right padding in the second row
        labels[1, -2:] = -100
    return ids, mask, labels
