"""``fastpeft.accelerate`` on layers it must not fuse, and what the switched layers look like (issue 21):
a LoRA layer wrapping another adapter (a mixed model) keeps PEFT's forward, the swapped class does not show
in ``print(model)`` / ``get_layer_status()``, and a LoRA layer's output can be modified in place."""
import copy
import warnings

import torch
import torch.nn as nn

from .lora_models import bert_cls, hf_and_fast, inputs_for, llama_lm, peft, run

import fastpeft


def test_lora_wrapping_another_adapter_is_not_fused():
    """It followed get_base_layer() to the nn.Linear, fused, and dropped the inner LoHa adapter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.get_peft_model(llama_lm(), peft.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False),
                                mixed=True)
        m.add_adapter("lora", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        m.set_adapter(["default", "lora"])
    x = inputs_for("llama")
    with torch.no_grad():
        ref = run(m.eval(), x)
        summary = fastpeft.accelerate(m)
        assert summary.accelerated == 0 and summary.patched == 0
        assert any("another adapter layer" in r for r in summary.skipped)
        torch.testing.assert_close(run(m, x), ref)


def test_switched_class_does_not_show():
    _, hf, _ = hf_and_fast("bert", dict(r=2, target_modules=["query"]))
    before, status = repr(hf), [s.module_type for s in hf.get_layer_status()]
    fastpeft.accelerate(hf)
    assert "Fastpeft" not in repr(hf) and repr(hf) == before
    assert [s.module_type for s in hf.get_layer_status()] == status == ["lora.Linear"] * 2


class _InplaceAfter(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.act = layer, nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.layer(x))


def test_inplace_activation_after_a_lora_layer():
    """'Output 0 of ...lora_linear_fwd... is a view and is being modified inplace' on backward."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    cfg = dict(r=2, target_modules=["0"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(**cfg))
    fp.load_state_dict(hf.state_dict())
    acc = copy.deepcopy(hf)
    fastpeft.accelerate(acc)
    x = torch.randn(3, 5, 8)
    grads = []
    for m in (hf, fp, acc):
        layer = m.base_model.model[0]
        m.base_model.model[0] = _InplaceAfter(layer)
        out = m(x)
        (out * torch.arange(8.0)).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for g in grads[1:]:
        assert sorted(g) == sorted(grads[0])
        for k in g:
            torch.testing.assert_close(g[k], grads[0][k], atol=1e-5, rtol=1e-4)


def test_stacked_adapter_adds_in_place_into_the_output():
    """Another adapter stacked on a fused layer adds into its output in place."""
    torch.manual_seed(0)
    fp = fastpeft.get_peft_model(bert_cls(), fastpeft.LoraConfig(r=2, target_modules=["query"],
                                                                 init_lora_weights=False))
    layer = fp.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 4, 16, requires_grad=True)
    y = layer(x)
    y += 1.0
    y.sum().backward()
    assert x.grad is not None
