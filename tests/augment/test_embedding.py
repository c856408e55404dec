"""NEFTune (training only, scale, removable, seeded) and embedding mixup (hook mixes embeddings, loss is
lam * CE(y_a) + (1 - lam) * CE(y_b), no mixing in eval)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.augment import EmbeddingMixup, NEFTune, soft_cross_entropy


def _bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=num_labels)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def _batch(B=6, L=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for i in range(B):
        mask[i, L - i:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=g)}


def _emb_out(model, batch):
    outs = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h.remove()
    return outs[0]


@pytest.mark.parametrize("dist", ["uniform", "gaussian"])
def test_neftune_train_only_and_scale(dist):
    model = _bert()
    b = _batch()
    model.eval()
    clean = _emb_out(model, b)
    ref_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    nef = NEFTune(alpha=5.0, distribution=dist, seed=1).attach(model)
    model.train()
    noisy = _emb_out(model, b)   # our capture hook runs after NEFTune's (registered later)
    noise = noisy - clean
    scale = 5.0 / math.sqrt(b["input_ids"].shape[1] * 16)
    if dist == "uniform":
        assert float(noise.abs().max()) <= scale * (1 + 1e-5)
        assert abs(float(noise.std()) - scale / math.sqrt(3)) < 0.15 * scale
    else:
        assert abs(float(noise.std()) - scale) < 0.15 * scale
    model.eval()                                                   # no noise in eval
    assert torch.equal(_emb_out(model, b), clean)
    torch.testing.assert_close(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               ref_logits)
    model.train()
    nef.remove()                                                   # removable
    assert torch.equal(_emb_out(model, b), clean)
    assert not nef.attached


def test_neftune_seeded_per_batch():
    model = _bert()
    model.train()
    b = _batch()
    model.eval()
    clean = _emb_out(model, b)
    model.train()

    def draws(seed):
        n = NEFTune(alpha=3.0, seed=seed).attach(model)
        out = []
        for _ in range(2):
            n.on_batch(None, b)
            out.append(_emb_out(model, b) - clean)
        n.remove()
        return out

    a, c, d = draws(4), draws(4), draws(5)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], d[0])
    with pytest.raises(ValueError, match="^alpha:"):
        NEFTune(alpha=0)
    with pytest.raises(ValueError, match="^distribution:"):
        NEFTune(distribution="laplace")


def test_mixup_loss_math():
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    ya = torch.randint(0, 4, (7,))
    perm = torch.randperm(7)
    lam = 0.3
    mix = EmbeddingMixup(alpha=0.4)
    batch = {"labels": ya, "_mixup_lam": torch.tensor(lam), "_mixup_perm": perm}
    loss = mix.loss_fn(type("O", (), {"logits": logits})(), batch)
    expected = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, ya[perm])
    torch.testing.assert_close(loss, expected)
    t = mix.targets(ya, 4, lam, perm)
    torch.testing.assert_close(t.sum(1), torch.ones(7))
    torch.testing.assert_close(soft_cross_entropy(logits, t), expected)
    # a batch without mixup keys: plain CE
    torch.testing.assert_close(mix.loss_fn(type("O", (), {"logits": logits})(), {"labels": ya}),
                               F.cross_entropy(logits, ya))


def test_mixup_hook_mixes_embeddings_train_only():
    model = _bert()
    b = _batch()
    model.eval()
    clean = _emb_out(model, b)
    mix = EmbeddingMixup(alpha=0.4, p=1.0, seed=2).attach(model)
    mb = mix.mix_batch(b)
    lam, perm = float(mb["_mixup_lam"]), mb["_mixup_perm"]
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6))
    assert torch.equal(mb["attention_mask"], torch.maximum(b["attention_mask"], b["attention_mask"][perm]))
    assert torch.equal(b["attention_mask"], _batch()["attention_mask"])          # input batch not modified
    model.train()
    mixed = _emb_out(model, mb)
    torch.testing.assert_close(mixed, lam * clean + (1 - lam) * clean[perm])
    # gradients flow to the model through the mixed loss
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
    mix.loss_fn(out, mb).backward()
    assert model.classifier.weight.grad is not None
    model.eval()
    assert torch.equal(_emb_out(model, mb), clean)
    mix.remove()
    model.train()
    assert torch.equal(_emb_out(model, mb), clean)


def test_mixup_p_and_seed_and_errors():
    b = _batch(B=40, L=4)
    b["labels"] = torch.randint(0, 3, (40,))
    none = EmbeddingMixup(alpha=1.0, p=0.0, seed=0).mix_batch(b)
    assert torch.equal(none["_mixup_perm"], torch.arange(40))
    a = EmbeddingMixup(alpha=1.0, p=0.5, seed=3)
    c = EmbeddingMixup(alpha=1.0, p=0.5, seed=3)
    x, y = a.mix_batch(b), c.mix_batch(b)
    assert torch.equal(x["_mixup_perm"], y["_mixup_perm"]) and float(x["_mixup_lam"]) == float(y["_mixup_lam"])
    assert 5 < int((x["_mixup_perm"] != torch.arange(40)).sum()) < 35
    assert float(a.mix_batch(b)["_mixup_lam"]) != float(x["_mixup_lam"])
    with pytest.raises(ValueError, match="one integer class label per example"):
        EmbeddingMixup().mix_batch(dict(b, labels=torch.zeros(40, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="^p:"):
        EmbeddingMixup(p=2)
    with pytest.raises(ValueError, match="^alpha:"):
        EmbeddingMixup(alpha=-1)
