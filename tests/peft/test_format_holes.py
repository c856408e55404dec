"""Adapter formats fastpeft refused or dropped (issue 21), each loaded both ways with equal logits against
HF PEFT 0.21: embedding layers saved with the adapter (``save_embedding_layers``), trainable tokens
(``trainable_token_indices``), LoRA on parameters (``target_parameters``)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from .lora_models import inputs_for, llama_lm, peft, run

import fastpeft
from fastpeft.checkpoint import load_safetensors


def _both(base, cfg: dict, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
        fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    assert sorted(fp.state_dict()) == sorted(hf.state_dict())
    with torch.no_grad():  # trained: every trainable tensor moved, the same way in both
        torch.manual_seed(seed + 1)
        for (n, p), (n2, p2) in zip(sorted(hf.named_parameters()), sorted(fp.named_parameters())):
            assert n == n2
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
                p2.copy_(p)
    return hf, fp


def _check_both_ways(base, hf, fp, tmp_path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "hf")
        fp.save_pretrained(tmp_path / "fp")
    a, b = load_safetensors(str(tmp_path / "hf" / "adapter_model.safetensors")), \
        load_safetensors(str(tmp_path / "fp" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    with torch.no_grad():
        ref = run(hf.eval(), x)
        torch.testing.assert_close(run(fp.eval(), x), ref, atol=1e-5, rtol=1e-4)
        for path in ("hf", "fp"):
            for lib in (fastpeft, peft):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / path))
                torch.testing.assert_close(run(m.eval(), x), ref, atol=1e-5, rtol=1e-4,
                                           msg=lambda msg: f"{lib.__name__} loading {path}: {msg}")
    return a


# -- save_embedding_layers ----------------------------------------------------------------------------------
def test_adapter_with_embedding_layers_loads_both_ways(tmp_path):
    """HF saves the base embedding weights when embed_tokens is targeted: fastpeft refused such files."""
    base = llama_lm()
    hf, fp = _both(base, dict(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    with torch.no_grad():  # the embedding itself changed too (e.g. new token rows), as when HF saves it
        for m in (hf, fp):
            m.base_model.model.model.embed_tokens.base_layer.weight[3:5] += 1.0
    saved = _check_both_ways(base, hf, fp, tmp_path, inputs_for("llama"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved


def test_save_embedding_layers_values(tmp_path):
    base = llama_lm()
    _, fp = _both(base, dict(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        assert key in fastpeft.get_peft_model_state_dict(fp)
    assert key not in fastpeft.get_peft_model_state_dict(fp, save_embedding_layers=False)
    fp.save_pretrained(tmp_path, save_embedding_layers=False)
    assert key not in load_safetensors(str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="save_embedding_layers"):
        fp.save_pretrained(tmp_path, save_embedding_layers="yes")


def test_embedding_of_another_vocabulary_size_is_a_clear_error(tmp_path):
    base = llama_lm()
    _, fp = _both(base, dict(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    fp.save_pretrained(tmp_path, save_embedding_layers=True)
    other = llama_lm()
    other.resize_token_embeddings(80)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        fastpeft.PeftModel.from_pretrained(other, str(tmp_path))


# -- trainable_token_indices -------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_load_both_ways(tied, tmp_path):
    base = llama_lm()
    if tied:
        base.config.tie_word_embeddings = True
        base.lm_head.weight = base.model.embed_tokens.weight
    hf, fp = _both(base, dict(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7],
                              init_lora_weights=False))
    saved = _check_both_ways(base, hf, fp, tmp_path, {"input_ids": torch.tensor([[1, 2, 5, 7, 9, 1]])})
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in saved
    assert not any("lm_head" in k for k in saved)


def test_trainable_tokens_by_layer_name_and_training():
    base = llama_lm()
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [2, 3]}))
    delta = fp.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert delta.requires_grad and tuple(delta.shape) == (2, 16)
    run(fp.train(), {"input_ids": torch.tensor([[2, 3, 4]])}).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    emb = fp.base_model.model.model.embed_tokens
    assert emb.original_module.weight.grad is None  # the rest of the embedding is frozen
    with fp.disable_adapter():
        torch.testing.assert_close(run(fp.eval(), {"input_ids": torch.tensor([[2, 3]])}),
                                   run(base.eval(), {"input_ids": torch.tensor([[2, 3]])}))
    merged = fp.merge_and_unload()
    assert isinstance(merged.model.embed_tokens, nn.Embedding)


def test_trainable_tokens_errors():
    with pytest.raises(ValueError, match="trainable_token_indices"):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[-1])
    with pytest.raises(ValueError, match="modules_to_save"):
        fastpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1]},
                            modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match="out of range"):
        fastpeft.get_peft_model(llama_lm(), fastpeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                trainable_token_indices=[100]))
    with pytest.raises(TypeError, match="already an adapter layer"):
        fastpeft.get_peft_model(llama_lm(), fastpeft.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                                trainable_token_indices=[1]))


# -- target_parameters -------------------------------------------------------------------------------------
class Experts(nn.Module):
    """A mixture-of-experts block whose expert weights are stacked parameters (no nn.Linear per expert)."""

    def __init__(self, n=3, d=8, h=12):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, d, h) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(n, h, d) * 0.2)

    def forward(self, x):  # x [B, n, d]: one slot per expert
        return torch.einsum("bnh,nhd->bnd", torch.relu(torch.einsum("bnd,ndh->bnh", x, self.gate_up_proj)),
                            self.down_proj)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)
        self.experts = Experts()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.experts(self.proj(x)))


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ["gate_up_proj", "down_proj"], ["proj.weight"]])
def test_target_parameters_match_hf(targets, tmp_path):
    base = MoE().eval()
    hf, fp = _both(base, dict(r=2, target_modules=[], target_parameters=targets, init_lora_weights=False))
    x = {"x": torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))}
    _check_both_ways(base, hf, fp, tmp_path, x)
    for m in (hf, fp):  # gradients reach A and B, the same ones
        m.train()
        run(m, x).square().sum().backward()
    ga = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    gb = {n: p.grad for n, p in fp.named_parameters() if p.grad is not None}
    assert sorted(ga) == sorted(gb) and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # merge / unmerge round trip
        ref = run(fp.eval(), x)
        fp.merge_adapter()
        torch.testing.assert_close(run(fp, x), ref, atol=1e-5, rtol=1e-4)
        fp.unmerge_adapter()
        torch.testing.assert_close(run(fp.merge_and_unload(), x), ref, atol=1e-5, rtol=1e-4)


def test_target_parameters_refusals():
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.get_peft_model(MoE(), fastpeft.LoraConfig(r=2, target_modules=[], lora_dropout=0.1,
                                                           target_parameters=["gate_up_proj"]))
    with pytest.raises(ValueError, match="matched no parameter"):
        fastpeft.get_peft_model(MoE(), fastpeft.LoraConfig(r=2, target_modules=[], target_parameters=["nope"]))
    with pytest.raises(ValueError, match="target it one way only"):
        fastpeft.get_peft_model(MoE(), fastpeft.LoraConfig(r=2, target_modules=["proj"],
                                                           target_parameters=["proj.weight"]))
