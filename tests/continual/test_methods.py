"""Strategy building blocks: diagonal Fisher vs an analytic computation, penalties, the reservoir
buffer (bounded, uniform), the LwF distillation loss, and bad-parameter errors."""
import collections
from types import SimpleNamespace

import pytest
import torch

from fastpeft.continual import (EWC, L2SP, ReservoirBuffer, concat_datasets, diagonal_fisher,
                                lwf_distillation, make_strategy)
from fastpeft.workflow.data import EncodedDataset, PaddingCollator


class Toy(torch.nn.Module):
    """Mean-pooled embedding (frozen) -> linear: logits = W h + b, so d log p(y|x)/dW = (e_y - p) h^T."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(12, 3)
        self.emb.requires_grad_(False)
        self.lin = torch.nn.Linear(3, 4)

    def hidden(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.emb(input_ids) * m).sum(1) / m.sum(1)

    def forward(self, input_ids, attention_mask, labels=None, **_):
        return SimpleNamespace(logits=self.lin(self.hidden(input_ids, attention_mask)), loss=None)


def _toy_data():
    g = torch.Generator().manual_seed(0)
    feats = []
    for i in range(7):
        n = 2 + i % 3
        ids = torch.randint(1, 12, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "attention_mask": [1] * n, "labels": i % 4})
    return EncodedDataset(feats)


@pytest.mark.parametrize("mode", ["empirical", "expected"])
def test_fisher_matches_the_analytic_gradient(mode):
    model, ds = Toy(), _toy_data()
    fisher = diagonal_fisher(model, ds, PaddingCollator(0), mode=mode)
    assert set(fisher) == {"lin.weight", "lin.bias"}  # trainable parameters only (embedding frozen)
    fw = torch.zeros(4, 3, dtype=torch.float64)
    fb = torch.zeros(4, dtype=torch.float64)
    W, b = model.lin.weight.detach().double(), model.lin.bias.detach().double()
    for f in ds.features:
        ids = torch.tensor([f["input_ids"]])
        h = model.hidden(ids, torch.ones_like(ids)).detach().double()[0]
        p = torch.softmax(W @ h + b, -1)
        ys = [(f["labels"], 1.0)] if mode == "empirical" else [(c, float(p[c])) for c in range(4)]
        for y, w in ys:
            d = -p.clone()
            d[y] += 1.0                      # d log p_y / d logits
            fw += w * torch.outer(d, h) ** 2
            fb += w * d ** 2
    n = len(ds)
    torch.testing.assert_close(fisher["lin.weight"].double(), fw / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["lin.bias"].double(), fb / n, rtol=1e-5, atol=1e-7)
    assert model.lin.weight.grad is None  # .grad untouched


def test_fisher_subset_is_seeded_and_sized():
    model, ds = Toy(), _toy_data()
    a = diagonal_fisher(model, ds, PaddingCollator(0), samples=3, seed=1)
    b = diagonal_fisher(model, ds, PaddingCollator(0), samples=3, seed=1)
    c = diagonal_fisher(model, ds, PaddingCollator(0), samples=3, seed=2)
    assert torch.equal(a["lin.weight"], b["lin.weight"]) and not torch.equal(a["lin.weight"], c["lin.weight"])
    with pytest.raises(ValueError, match="fisher_samples"):
        diagonal_fisher(model, ds, PaddingCollator(0), samples=0)
    with pytest.raises(ValueError, match="fisher_mode"):
        diagonal_fisher(model, ds, PaddingCollator(0), mode="true")


def test_ewc_and_l2sp_penalties():
    model = Toy()
    ewc = EWC(ewc_lambda=3.0)
    runner = SimpleNamespace(model=model, collator=PaddingCollator(0))
    ewc.after_task(runner, 0, SimpleNamespace(train=_toy_data()))
    assert float(ewc.penalty(model).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        model.lin.weight.add_(0.5)
    expected = 0.5 * 3.0 * float((ewc.fisher["lin.weight"] * 0.25).sum())
    assert float(ewc.penalty(model).detach()) == pytest.approx(expected, rel=1e-5)
    # accumulation: F = gamma * F_old + F_new
    old = ewc.fisher["lin.bias"].clone()
    ewc.ewc_gamma = 0.5
    ewc.after_task(runner, 1, SimpleNamespace(train=_toy_data()))
    new = diagonal_fisher(model, _toy_data(), PaddingCollator(0), samples=200, seed=1)["lin.bias"]
    torch.testing.assert_close(ewc.fisher["lin.bias"], 0.5 * old + new)

    l2 = L2SP(l2_lambda=2.0)
    l2.before_task(runner, 0, None)
    with torch.no_grad():
        model.lin.bias.sub_(1.0)
    assert float(l2.penalty(model).detach()) == pytest.approx(0.5 * 2.0 * 4 * 1.0, rel=1e-6)
    assert l2.loss_fn(runner, 0, None) is None  # anchor "previous": nothing to hold on the first task


def test_reservoir_is_bounded_and_uniform():
    cap, n, trials = 5, 20, 4000
    counts = collections.Counter()
    for s in range(trials):
        buf = ReservoirBuffer(cap, seed=s)
        buf.extend(range(n))
        assert len(buf) == cap and buf.n_seen == n and len(set(buf.items)) == cap
        counts.update(buf.items)
    # each item kept with probability cap/n = 0.25; 4000 trials -> std 0.0068, allow ~4.4 sigma
    for i in range(n):
        assert abs(counts[i] / trials - cap / n) < 0.03, (i, counts[i])
    a, b = ReservoirBuffer(cap, seed=7), ReservoirBuffer(cap, seed=7)
    a.extend(range(100))
    b.extend(range(100))
    assert a.items == b.items  # seeded


@pytest.mark.parametrize("bad", [0, -3, 2.5, None, True])
def test_replay_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="replay_size"):
        ReservoirBuffer(bad)
    with pytest.raises(ValueError, match="replay_size"):
        make_strategy("replay", replay_size=bad if bad is not None else 0)


def test_lwf_loss_math():
    torch.manual_seed(0)
    new, old, T = torch.randn(5, 3), torch.randn(5, 3), 2.0
    po, pn = torch.softmax(old / T, -1), torch.softmax(new / T, -1)
    hand = T * T * (po * (po.log() - pn.log())).sum(-1).mean()
    assert float(lwf_distillation(new, old, T)) == pytest.approx(float(hand), rel=1e-5)
    assert float(lwf_distillation(old, old, T)) == pytest.approx(0.0, abs=1e-6)
    # gradient flows to the new logits only
    new.requires_grad_(True)
    lwf_distillation(new, old, T).backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    # 3-D (token) logits: only labelled positions count
    n3, o3 = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    labels = torch.tensor([[0, -100, 1, -100], [2, 2, -100, -100]])
    m = labels != -100
    assert float(lwf_distillation(n3, o3, T, labels)) == pytest.approx(float(lwf_distillation(n3[m], o3[m], T)),
                                                                      rel=1e-6)
    with pytest.raises(ValueError, match="old_logits"):
        lwf_distillation(torch.zeros(2, 3), torch.zeros(2, 4), T)


@pytest.mark.parametrize("name,kw,key", [
    ("ewc", {"ewc_lambda": -1.0}, "ewc_lambda"), ("ewc", {"ewc_gamma": 2.0}, "ewc_gamma"),
    ("ewc", {"fisher_samples": 0}, "fisher_samples"), ("ewc", {"fisher_mode": "x"}, "fisher_mode"),
    ("l2sp", {"l2_lambda": -0.1}, "l2_lambda"), ("l2sp", {"l2_anchor": "start"}, "l2_anchor"),
    ("lwf", {"lwf_temperature": 0.0}, "lwf_temperature"), ("lwf", {"lwf_alpha": -1}, "lwf_alpha"),
    ("naive", {"ewc_lambda": 3.0}, "ewc_lambda"), ("magic", {}, "strategy")])
def test_bad_strategy_parameters_name_the_argument(name, kw, key):
    with pytest.raises(ValueError, match=key):
        make_strategy(name, **kw)


def test_concat_datasets_checks_keys():
    a = EncodedDataset([{"input_ids": [1], "labels": 0}], [{"text": "x"}])
    both = concat_datasets(a, [{"input_ids": [2, 3], "labels": 1}])
    assert len(both) == 2 and both.lengths == [1, 2] and both.records is None
    with pytest.raises(ValueError, match="keys"):
        concat_datasets(a, [{"input_ids": [2]}])
    with pytest.raises(ValueError, match="datasets"):
        concat_datasets([])
    assert len(concat_datasets(a, a)) == 2
