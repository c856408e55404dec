"""Layer freezing: only the top k blocks (and the head) get gradients, on BERT/GPT-2/Llama/ViT."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpeft.blocks import find_block_list as find_blocks  # noqa: E402
from fastpeft.freezing import FreezeConfig, apply_freezing  # noqa: E402


def bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(cfg), "bert.encoder.layer", \
        dict(input_ids=torch.randint(0, 97, (2, 5)), labels=torch.tensor([0, 1]))


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    ids = torch.randint(0, 97, (2, 5))
    return transformers.GPT2LMHeadModel(cfg), "transformer.h", dict(input_ids=ids, labels=ids)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64)
    ids = torch.randint(0, 97, (2, 5))
    return transformers.LlamaForCausalLM(cfg), "model.layers", dict(input_ids=ids, labels=ids)


def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, intermediate_size=37, num_labels=2)
    return transformers.ViTForImageClassification(cfg), "vit.layers", \
        dict(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("factory", [bert, gpt2, llama, vit])
@pytest.mark.parametrize("k", [0, 1, 2, None])
def test_only_top_k_blocks_and_head_get_gradients(factory, k):
    torch.manual_seed(0)
    model, path, batch = factory()
    summary = apply_freezing(model, FreezeConfig(train_top_k=k))
    assert summary["blocks_path"] == path and summary["num_blocks"] == 3
    model(**batch).loss.backward()
    blocks = model.get_submodule(path)
    n_train = 3 if k is None else k
    for i, b in enumerate(blocks):
        expect = i >= 3 - n_train
        for name, p in b.named_parameters():
            assert (p.grad is not None) == expect, (i, name)
            if expect:
                assert p.grad.abs().sum() > 0 or "bias" in name, (i, name)
    emb = next(model.parameters())  # registered first: the (token or patch) embeddings
    assert (emb.grad is not None) == (k is None)
    block_ids = {id(p) for p in blocks.parameters()}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in block_ids]
    head = [(n, p) for n, p in others if not any(s in n for s in ("embed", "wte", "wpe"))]
    assert all(p.requires_grad for n, p in head if "classifier" in n or "norm" in n.lower() or "ln_f" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary["trainable"] == trainable


def test_config_options_and_errors():
    model, path, batch = bert()
    s = apply_freezing(model, {"train_top_k": 1, "train_embeddings": True, "train_head": False})
    assert s["trained_blocks"] == [2]
    assert model.bert.embeddings.word_embeddings.weight.requires_grad
    assert not model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="train_top_k=4 but the model has only 3 blocks"):
        apply_freezing(model, FreezeConfig(train_top_k=4))
    with pytest.raises(ValueError, match="train_top_k"):
        FreezeConfig(train_top_k=-1)
    with pytest.raises(ValueError, match="unknown keys"):
        apply_freezing(model, {"top_k": 1})
    with pytest.raises(ValueError, match="blocks_path='bert.nope'.*candidates.*bert.encoder.layer"):
        apply_freezing(model, FreezeConfig(blocks_path="bert.nope"))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        apply_freezing(torch.nn.Linear(2, 2), FreezeConfig())
    # a plain model: the largest ModuleList is found
    net = torch.nn.Module()
    net.stem = torch.nn.Linear(4, 8)
    net.stages = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    net.out = torch.nn.Linear(8, 2)
    assert find_blocks(net)[0] == "stages"
    apply_freezing(net, FreezeConfig(train_top_k=2))
    assert [b.weight.requires_grad for b in net.stages] == [False, False, True, True]
    assert net.out.weight.requires_grad and not net.stem.weight.requires_grad
