"""Bottleneck adapters: identity at init, gradients only to adapters, placement equals the papers'
math (checked against hand-written blocks), fused op == plain PyTorch, save/load, bad configs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpeft.tuners import adapter as ba  # noqa: E402


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


FACTORIES = [tiny_bert, tiny_gpt2, tiny_llama]
IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(m):
    return m(input_ids=IDS).logits


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("kind", ba.ADAPTER_TYPES)
def test_zero_init_is_identity_and_only_adapters_get_gradients(factory, kind):
    model = factory()
    y0 = _logits(model).detach()
    touched = ba.inject(model, ba.BottleneckAdapterConfig(adapter_type=kind, reduction_factor=4), "default")
    assert len(touched) == (4 if kind == "houlsby" else 2)
    torch.testing.assert_close(_logits(model), y0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_adapter_" in n for n in trainable)
    _logits(model).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # zero up-projection: its gradient is nonzero, the down-projection's is zero (B = 0 blocks it)
    ups = [p.grad for n, p in model.named_parameters() if "adapter_up.weight" in n]
    assert all(g.abs().sum() > 0 for g in ups)


def _randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bottleneck_adapter_" in n:
                p.copy_(0.2 * torch.randn_like(p))


def _manual_bert_layer(layer, x, ad_attn, ad_ffn, parallel):
    """BertLayer with adapters written out by hand (dropout 0, no mask)."""
    sa = layer.attention.self
    B, L, H = x.shape
    nh = sa.num_attention_heads
    q = sa.query(x).view(B, L, nh, -1).transpose(1, 2)
    k = sa.key(x).view(B, L, nh, -1).transpose(1, 2)
    v = sa.value(x).view(B, L, nh, -1).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), -1) @ v
    a = a.transpose(1, 2).reshape(B, L, H)
    s = layer.attention.output.dense(a)
    if ad_attn is not None:
        s = ad_attn.forward_reference(s)
    h = layer.attention.output.LayerNorm(s + x)
    f = layer.output.dense(layer.intermediate(h))
    if ad_ffn is not None:
        f = f + ad_ffn.forward_reference(h, residual=False) if parallel else ad_ffn.forward_reference(f)
    return layer.output.LayerNorm(f + h)


@pytest.mark.parametrize("kind", ba.ADAPTER_TYPES)
def test_bert_placement_matches_houlsby_math(kind):
    model = tiny_bert()
    model.config._attn_implementation = "eager"
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type=kind, bottleneck_size=5, activation="gelu"),
              "default")
    _randomize(model)
    bert = model.bert
    h = bert.embeddings(input_ids=IDS)
    ours = h
    for layer in bert.encoder.layer:
        ours = layer(ours)
    ref = h
    ba.enable_adapters(model, False)  # the reference calls the hooked sub-modules: hooks off
    for layer in bert.encoder.layer:
        ad_attn = layer.bottleneck_adapter_attn["default"] if hasattr(layer, "bottleneck_adapter_attn") else None
        ref = _manual_bert_layer(layer, ref, ad_attn, layer.bottleneck_adapter_ffn["default"], kind == "parallel")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ba.ADAPTER_TYPES)
def test_llama_placement(kind):
    model = tiny_llama()
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type=kind, bottleneck_size=3, activation="silu"),
              "default")
    _randomize(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    # reference: run the sub-modules by hand with hooks disabled
    ba.enable_adapters(model, False)
    mlp_in = torch.randn(2, 5, 32)
    plain_mlp = layer.mlp(mlp_in)
    plain_down_in = layer.mlp.act_fn(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
    ba.enable_adapters(model, True)
    ad = layer.bottleneck_adapter_ffn["default"]
    expect = plain_mlp + ad.forward_reference(mlp_in, residual=False) if kind == "parallel" \
        else ad.forward_reference(layer.mlp.down_proj.weight.new_tensor(0) + plain_mlp)
    torch.testing.assert_close(layer.mlp(mlp_in), expect, atol=1e-5, rtol=1e-4)
    del plain_down_in, x
    if kind == "houlsby":
        o_in = torch.randn(2, 5, 32)
        ad_a = layer.bottleneck_adapter_attn["default"]
        ba.enable_adapters(model, False)
        plain = layer.self_attn.o_proj(o_in)
        ba.enable_adapters(model, True)
        torch.testing.assert_close(layer.self_attn.o_proj(o_in), ad_a.forward_reference(plain), atol=1e-5,
                                   rtol=1e-4)
    else:
        assert not hasattr(layer, "bottleneck_adapter_attn")


def _cpu_backends():
    from tests.helpers import runnable_backends
    x = torch.zeros(2, 4)
    args = (x, torch.zeros(2, 4), None, torch.zeros(4, 2), None, "relu", 0.0, 0, True)
    return [p for p in runnable_backends("bottleneck_adapter", *args) if p.id in ("cpu", "torch")]


@pytest.mark.parametrize("factory,backend", [(tiny_bert, None), (tiny_llama, None)]
                         + [pytest.param(tiny_gpt2, b.values[0], marks=b.marks, id=f"gpt2-{b.id}")
                            for b in _cpu_backends()])
def test_fused_equals_plain_pytorch_forward_and_grads(factory, backend):
    import contextlib

    import fastpeft
    model = factory()
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type="houlsby", bottleneck_size=4), "default")
    _randomize(model)
    forced = fastpeft.use_backend(backend, op="bottleneck_adapter") if backend else contextlib.nullcontext()
    with forced:
        y = _logits(model)
        y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # swap every adapter's forward for the plain PyTorch one
    orig = ba.BottleneckAdapter.forward
    ba.BottleneckAdapter.forward = ba.BottleneckAdapter.forward_reference
    try:
        y_ref = _logits(model)
        y_ref.square().mean().backward()
    finally:
        ba.BottleneckAdapter.forward = orig
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip_disable_remove_and_two_adapters():
    model = tiny_gpt2()
    base = copy.deepcopy(model)
    y0 = _logits(model)
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type="pfeiffer", reduction_factor=8), "a")
    _randomize(model)
    y_a = _logits(model)
    sd = ba.adapter_state_dict(model, "a")
    assert set(sd) == {f"transformer.h.{i}.bottleneck_adapter_ffn.{w}.{t}" for i in (0, 1)
                       for w in ("adapter_down", "adapter_up") for t in ("weight", "bias")}
    other = copy.deepcopy(base)
    ba.inject(other, ba.BottleneckAdapterConfig(adapter_type="pfeiffer", reduction_factor=8), "a")
    ba.load_adapter_state_dict(other, sd, "a")
    torch.testing.assert_close(_logits(other), y_a)
    ba.enable_adapters(model, False)
    torch.testing.assert_close(_logits(model), y0)
    ba.enable_adapters(model, True)
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type="houlsby", reduction_factor=8), "b")
    torch.testing.assert_close(_logits(model), y_a)  # b inactive
    ba.set_adapter(model, ["b"])
    torch.testing.assert_close(_logits(model), y0)  # b is zero-init
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".a." in n)
    ba.remove(model, "b")
    ba.set_adapter(model, ["a"])
    torch.testing.assert_close(_logits(model), y_a)
    ba.remove(model, "a")
    torch.testing.assert_close(_logits(model), y0)
    assert set(model.state_dict()) == set(base.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        ba.load_adapter_state_dict(other, {}, "a")
    k = next(iter(sd))
    with pytest.raises(ValueError, match="shape mismatches"):
        ba.load_adapter_state_dict(other, {**sd, k: torch.zeros(1)}, "a")


def test_training_mode_dropout_and_get_peft_model(tmp_path):
    import fastpeft
    get_peft_model = getattr(fastpeft, "get_peft_model", None)
    if get_peft_model is None:
        from fastpeft.mapping import get_peft_model
    from fastpeft.peft_model import PeftModel
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), ba.BottleneckAdapterConfig(adapter_dropout=0.3,
                                                                          init_weights=False,
                                                                          task_type="SEQ_CLS"))
    model.train()
    y1, y2 = _logits(model), _logits(model)
    assert not torch.allclose(y1, y2)  # dropout active while training
    model.eval()
    y = _logits(model)
    model.save_pretrained(str(tmp_path))
    again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(_logits(again), y)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(base))


def test_bad_configs():
    for kw, msg in [(dict(reduction_factor=0), "reduction_factor"), (dict(bottleneck_size=0), "bottleneck_size"),
                    (dict(bottleneck_size=-3), "bottleneck_size"), (dict(activation="tanhh"), "activation"),
                    (dict(adapter_type="lora"), "adapter_type"), (dict(adapter_dropout=1.0), "adapter_dropout")]:
        with pytest.raises(ValueError, match=msg):
            ba.BottleneckAdapterConfig(**kw)
    with pytest.raises(ValueError, match="no transformer block recognised.*candidates"):
        ba.inject(torch.nn.Sequential(torch.nn.Linear(3, 3)), ba.BottleneckAdapterConfig(), "default")
    model = tiny_llama()
    with pytest.raises(ValueError, match="layers_to_transform.*2 blocks"):
        ba.inject(model, ba.BottleneckAdapterConfig(layers_to_transform=[5]), "default")
    assert not any("bottleneck" in k for k in model.state_dict())
    ba.inject(model, ba.BottleneckAdapterConfig(layers_to_transform=[1]), "default")
    assert {k.split(".")[2] for k in model.state_dict() if "bottleneck" in k} == {"1"}
    with pytest.raises(ValueError, match="already exists"):
        ba.inject(model, ba.BottleneckAdapterConfig(), "default")


def test_vit_blocks_houlsby_identity_and_training():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 8, 8)
    y0 = model(pixel_values=x).logits
    touched = ba.inject(model, ba.BottleneckAdapterConfig(reduction_factor=4), "default")
    assert len(touched) == 4
    torch.testing.assert_close(model(pixel_values=x).logits, y0)
    _randomize(model)
    assert not torch.allclose(model(pixel_values=x).logits, y0)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
def test_deepcopy_gives_an_independent_model(kind):
    model = tiny_bert()
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type=kind, reduction_factor=4), "default")
    _randomize(model)
    y = _logits(model)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin), y)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "adapter_up" in n:
                p.zero_()
    torch.testing.assert_close(_logits(model), y)  # the original still uses its own adapters
    ba.enable_adapters(twin, False)
    torch.testing.assert_close(_logits(model), y)
    ba.remove(twin, "default")
    torch.testing.assert_close(_logits(model), y)


def test_short_training_lowers_loss_through_fused_op():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ba.inject(model, ba.BottleneckAdapterConfig(adapter_type="houlsby", reduction_factor=4), "default")
    model.train()
    ids = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.slow
def test_torch_compile_of_patched_model():
    model = tiny_llama()
    ba.inject(model, ba.BottleneckAdapterConfig(bottleneck_size=4, init_weights=False), "default")
    y = _logits(model)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(input_ids=IDS).logits, y, atol=1e-5, rtol=1e-5)
