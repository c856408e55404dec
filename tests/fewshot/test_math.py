"""Head, prototypes, pair generation, pair losses, mean/std: checked against plain formulas."""
import statistics

import pytest
import torch
import torch.nn.functional as F

from fastpeft.fewshot.baselines import class_prototypes, prototype_predict
from fastpeft.fewshot.encoder import mean_pool
from fastpeft.fewshot.evaluate import mean_std
from fastpeft.workflow.metrics import accuracy
from fastpeft.fewshot.head import LogisticHead, fit_logistic_head
from fastpeft.fewshot.setfit import generate_pairs, pair_loss


def test_mean_pool_matches_loop():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = mean_pool(h, mask)
    for b in range(3):
        n = int(mask[b].sum())
        torch.testing.assert_close(out[b], h[b, :n].mean(0))
    with pytest.raises(ValueError, match="mean_pool"):
        mean_pool(h, mask[:, :4])


def test_prototypes_are_normalised_class_means():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(9, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    P = class_prototypes(X, y, 3)
    Xn = X / X.norm(dim=1, keepdim=True)
    for c in range(3):
        m = Xn[y == c].mean(0)
        torch.testing.assert_close(P[c].double(), m / m.norm(), rtol=1e-5, atol=1e-6)
    Q = torch.randn(20, 6, generator=g)
    want = torch.stack([F.cosine_similarity(q.double().unsqueeze(0), P.double()).argmax() for q in Q])
    assert torch.equal(prototype_predict(Q, P), want)
    with pytest.raises(ValueError, match="class"):
        class_prototypes(X[:3], y[:3] * 0, 2)


def test_logistic_head_reaches_the_regularised_optimum():
    g = torch.Generator().manual_seed(2)
    X = F.normalize(torch.randn(24, 8, generator=g), dim=-1)
    y = torch.randint(0, 3, (24,), generator=g)
    C = 0.5
    h = fit_logistic_head(X, y, 3, C=C, max_iter=500)
    # gradient of the objective at the solution is ~0 (it is convex)
    W = h.weight.detach().clone().requires_grad_(True)
    b = h.bias.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(X @ W.T + b, y) + (W ** 2).sum() / (2 * C * len(y))
    gw, gb = torch.autograd.grad(loss, (W, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    # deterministic
    h2 = fit_logistic_head(X, y, 3, C=C, max_iter=500)
    assert torch.equal(h.weight, h2.weight)


def test_logistic_head_separates_separable_data():
    X = F.normalize(torch.tensor([[1.0, 0.1], [0.9, -0.2], [-1.0, 0.2], [-0.8, -0.1]]), dim=-1)
    y = torch.tensor([0, 0, 1, 1])
    assert torch.equal(fit_logistic_head(X, y).predict(X), y)


def test_logistic_head_errors():
    X = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="num_classes"):
        LogisticHead(3, 1)
    with pytest.raises(ValueError, match="y: class ids"):
        LogisticHead(3, 2).fit(X, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="y: expected shape"):
        LogisticHead(3, 2).fit(X, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="C"):
        LogisticHead(3, 2).fit(X, torch.tensor([0, 1, 0, 1]), C=0)


def test_generate_pairs():
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    pairs = generate_pairs(labels, 3, seed=5)
    assert len(pairs) == 2 * 3 * len(labels)
    assert sum(t for _, _, t in pairs) == 3 * len(labels)
    for a, b, t in pairs:
        assert (labels[a] == labels[b]) == (t == 1.0)
        assert a != b
    # each anchor appears as first element exactly 2 * iterations times
    assert all(sum(a == i for a, _, _ in pairs) == 6 for i in range(len(labels)))
    assert pairs == generate_pairs(labels, 3, seed=5)
    assert pairs != generate_pairs(labels, 3, seed=6)
    # a singleton class pairs with itself as its positive
    assert all(b == 0 for a, b, t in generate_pairs([0, 1, 1], 2) if a == 0 and t == 1.0)
    with pytest.raises(ValueError, match="iterations"):
        generate_pairs(labels, 0)
    with pytest.raises(ValueError, match="labels"):
        generate_pairs([1, 1], 1)


def test_pair_losses():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0, 1, 0, 0, 1], dtype=torch.float64)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(pair_loss(a, b, t, "cosine"), ((cos - t) ** 2).mean())
    d = 1 - cos
    want = (0.5 * (t * d ** 2 + (1 - t) * torch.clamp(0.3 - d, min=0) ** 2)).mean()
    torch.testing.assert_close(pair_loss(a, b, t, "contrastive", margin=0.3), want)
    with pytest.raises(ValueError, match="loss"):
        pair_loss(a, b, t, "triplet")


def test_mean_std_and_accuracy():
    vals = [0.7, 0.8, 0.75, 0.9]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="values"):
        mean_std([])
    assert accuracy(["a", "b", "b"], ["a", "b", "a"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pred"):
        accuracy(["a"], ["a", "b"])
