"""GAN-based feature augmentation: a small conditional GAN on pooled features of a (frozen or adapted)
base model, trained per task to synthesise extra feature vectors for rare classes / few-shot tasks, and
a classification head trained on real + synthetic features.

Pipeline::

    X = extract_features(model, tokenizer, texts)                    # [N, d] mean-pooled last hidden state
    gan = FeatureGAN(X.shape[1], num_classes=2, seed=0).fit(X, y, steps=1000)
    Xs, ys = gan.sample_per_class(64)                                # 64 synthetic vectors per class
    head = train_linear_head(torch.cat([X, Xs]), torch.cat([y, ys]), num_classes=2)
    # or in one call: head, info = train_head_with_synthetic(X, y, num_classes=2, n_synthetic_per_class=64)

Model (all on standardised features ``(x - mean) / std`` of the real training set):

* generator ``G(z, y) = MLP([z ; E_g[y]])`` -> ``d``, ``z ~ N(0, I_noise_dim)``, LeakyReLU(0.2) MLP;
* projection discriminator (Miyato & Koyama 2018) ``D(x, y) = w . phi(x) + <E_d[y], phi(x)>`` with
  ``phi`` an MLP, stabilised by the R1 gradient penalty (Mescheder et al. 2018)
  ``r1_gamma / 2 * E ||grad_x D(x_real, y)||^2`` (default ``r1_gamma=1``) and/or spectral normalisation
  of every linear layer and ``E_d`` (``spectral_norm=True``; ``torch.nn.utils.parametrizations.
  spectral_norm``: ``W / sigma_max(W)``, 1-Lipschitz layers). On a 3-class Gaussian mixture in 12-d the
  R1-only discriminator matched the class means and spreads best; spectral norm alone left the
  discriminator too weak (loss stuck at 2, generated spread ~0.3 of the real one) -- hence the default;
* hinge losses: ``L_D = E relu(1 - D(x, y)) + E relu(1 + D(G(z, y), y))``, ``L_G = -E D(G(z, y), y)``;
  Adam(lr, betas=(0.5, 0.999)), ``n_critic`` discriminator steps per generator step; real mini-batches
  are drawn class-balanced (each class equally likely), so rare classes get as many updates as frequent
  ones; fake labels are drawn uniformly over the classes.

Seeding: the weights are initialised under ``torch.random.fork_rng`` seeded with ``seed`` and all noise /
mini-batch draws use the GAN's own ``torch.Generator``, so ``fit`` + ``sample`` are deterministic for a
seed on CPU (and do not disturb the global RNG).

Measured effect (few-shot SST-2, 8 examples per class, frozen MiniLM features): see
``benchmarks/augment_effect.py`` / ``benchmarks/results/augment_effect.json``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FeatureGAN", "LinearHead", "train_linear_head", "train_head_with_synthetic", "extract_features"]


def _int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return v


def _pos(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 if allow_zero else v > 0) \
            or math.isinf(v):
        raise ValueError(f"{name}: expected a number {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


def _check_xy(features, labels, num_classes=None, feature_dim=None):
    if not torch.is_tensor(features) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features: expected a float tensor [N, d], got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels: expected an integer tensor [N] with N = {features.shape[0]} (one class id per "
                         f"feature row), got {getattr(labels, 'shape', type(labels).__name__)}")
    if features.shape[0] == 0:
        raise ValueError("features: no examples")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise ValueError(f"features: expected feature dimension {feature_dim}, got {features.shape[1]}")
    if num_classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected class ids in [0, {num_classes}), got min {int(labels.min())} "
                         f"max {int(labels.max())}")


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mlp(sizes, sn: bool, act=lambda: nn.LeakyReLU(0.2)):
    layers = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        layers.append(nn.utils.parametrizations.spectral_norm(lin) if sn else lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class _Generator(nn.Module):
    def __init__(self, noise_dim, num_classes, hidden, out_dim, layers):
        super().__init__()
        self.embed = nn.Embedding(num_classes, noise_dim)
        self.net = _mlp([2 * noise_dim] + [hidden] * layers + [out_dim], sn=False)

    def forward(self, z, y):
        return self.net(torch.cat([z, self.embed(y)], dim=1))


class _Discriminator(nn.Module):
    def __init__(self, in_dim, num_classes, hidden, layers, sn):
        super().__init__()
        self.phi = nn.Sequential(_mlp([in_dim] + [hidden] * layers, sn=sn), nn.LeakyReLU(0.2))
        lin = nn.Linear(hidden, 1)
        emb = nn.Embedding(num_classes, hidden)
        self.out = nn.utils.parametrizations.spectral_norm(lin) if sn else lin
        self.embed = nn.utils.parametrizations.spectral_norm(emb) if sn else emb

    def forward(self, x, y):
        h = self.phi(x)
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


class FeatureGAN:
    """Conditional GAN on feature vectors (module docstring).

    ``feature_dim`` d; ``num_classes``; ``noise_dim`` (default 32); ``hidden`` width (128) and ``layers``
    (2) of both networks; ``spectral_norm`` (False) on the discriminator; ``r1_gamma`` (1.0; 0: off) R1
    penalty weight; at least one of the two must be on; ``seed``."""

    def __init__(self, feature_dim: int, num_classes: int, *, noise_dim: int = 32, hidden: int = 128,
                 layers: int = 2, spectral_norm: bool = False, r1_gamma: float = 1.0, seed: int = 0):
        self.feature_dim = _int("feature_dim", feature_dim, 1)
        self.num_classes = _int("num_classes", num_classes, 1)
        self.noise_dim = _int("noise_dim", noise_dim, 1)
        _int("hidden", hidden, 1)
        _int("layers", layers, 1)
        self.r1_gamma = _pos("r1_gamma", r1_gamma, allow_zero=True)
        if not spectral_norm and not self.r1_gamma:
            raise ValueError("r1_gamma: 0 with spectral_norm=False leaves the discriminator unregularised "
                             "(unstable); set r1_gamma > 0 or spectral_norm=True")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.G = _Generator(noise_dim, num_classes, hidden, feature_dim, layers)
            self.D = _Discriminator(feature_dim, num_classes, hidden, layers, bool(spectral_norm))
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.mean = torch.zeros(feature_dim)
        self.std = torch.ones(feature_dim)
        self.history: list[dict] = []
        self.fitted = False

    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, steps: int = 1000, batch_size: int = 64,
            lr: float = 2e-4, n_critic: int = 1, log_every: int = 50) -> "FeatureGAN":
        """Train on real ``features`` [N, d] with class ids ``labels`` [N] (CPU, float32, one thread: the
        networks are tiny and thread hand-offs cost more than they save). Returns self; ``history``
        holds ``{"step", "d_loss", "g_loss"}`` every ``log_every`` steps."""
        with _one_thread():
            return self._fit(features, labels, steps=steps, batch_size=batch_size, lr=lr, n_critic=n_critic,
                             log_every=log_every)

    def _fit(self, features, labels, *, steps, batch_size, lr, n_critic, log_every):
        _check_xy(features, labels, self.num_classes, self.feature_dim)
        _int("steps", steps, 1)
        _int("batch_size", batch_size, 1)
        _int("n_critic", n_critic, 1)
        _pos("lr", lr)
        x = features.detach().float().cpu()
        y = labels.detach().long().cpu()
        self.mean = x.mean(0)
        self.std = x.std(0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1])
        xs = (x - self.mean) / self.std
        present = torch.unique(y)
        order = torch.argsort(y, stable=True)                 # example ids grouped by class
        counts = torch.stack([(y == c).sum() for c in present])
        starts = torch.cumsum(counts, 0) - counts
        g = self.generator
        optG = torch.optim.Adam(self.G.parameters(), lr=lr, betas=(0.5, 0.999))
        optD = torch.optim.Adam(self.D.parameters(), lr=lr, betas=(0.5, 0.999))
        self.G.train()
        self.D.train()

        def real_batch():  # class-balanced: a class uniformly, then one of its examples uniformly
            cls = torch.randint(0, present.numel(), (batch_size,), generator=g)
            within = (torch.rand(batch_size, generator=g) * counts[cls]).long().clamp_max(counts[cls] - 1)
            idx = order[starts[cls] + within]
            return xs[idx], y[idx]

        for step in range(1, steps + 1):
            for _ in range(n_critic):
                xr, yr = real_batch()
                yf = present[torch.randint(0, present.numel(), (batch_size,), generator=g)]
                z = torch.randn(batch_size, self.noise_dim, generator=g)
                with torch.no_grad():
                    xf = self.G(z, yf)
                if self.r1_gamma:
                    xr = xr.clone().requires_grad_(True)
                d_real = self.D(xr, yr)
                d_loss = F.relu(1 - d_real).mean() + F.relu(1 + self.D(xf, yf)).mean()
                if self.r1_gamma:
                    (grad,) = torch.autograd.grad(d_real.sum(), xr, create_graph=True)
                    d_loss = d_loss + 0.5 * self.r1_gamma * grad.pow(2).sum(1).mean()
                optD.zero_grad(set_to_none=True)
                d_loss.backward()
                optD.step()
            yf = present[torch.randint(0, present.numel(), (batch_size,), generator=g)]
            z = torch.randn(batch_size, self.noise_dim, generator=g)
            g_loss = -self.D(self.G(z, yf), yf).mean()
            optG.zero_grad(set_to_none=True)
            g_loss.backward()
            optG.step()
            if step % log_every == 0 or step == steps:
                self.history.append({"step": step, "d_loss": float(d_loss.detach()),
                                     "g_loss": float(g_loss.detach())})
        self.G.eval()
        self.D.eval()
        self.fitted = True
        return self

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], *, seed: int | None = None) -> torch.Tensor:
        """Synthetic features [M, d] (original, un-standardised scale) for class ids ``labels`` [M].
        ``seed``: a fixed noise draw (default: continue the GAN's generator)."""
        if not self.fitted:
            raise RuntimeError("FeatureGAN.sample: call fit(features, labels) first")
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels: expected class ids in [0, {self.num_classes}), got {y.tolist()[:8]}")
        g = self.generator
        if seed is not None:
            g = torch.Generator()
            g.manual_seed(seed)
        z = torch.randn(y.numel(), self.noise_dim, generator=g)
        return self.G(z, y) * self.std + self.mean

    def sample_per_class(self, n: int, classes: Sequence[int] | None = None, *, seed: int | None = None):
        """``(features [n * C, d], labels [n * C])``: ``n`` synthetic vectors for each class (all by default)."""
        _int("n", n, 0)
        classes = list(range(self.num_classes)) if classes is None else list(classes)
        y = torch.tensor(classes, dtype=torch.long).repeat_interleave(n)
        return self.sample(y, seed=seed), y


class LinearHead(nn.Module):
    """``Linear(d, C)`` on standardised features: ``logits = W ((x - mean) / std) + b``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(mean.numel(), num_classes)

    def forward(self, x):
        return self.linear((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        return self(x.float()).argmax(-1)


def train_linear_head(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                      weights: torch.Tensor | None = None, l2: float = 1e-2, max_iter: int = 200,
                      standardise_on: torch.Tensor | None = None, seed: int = 0) -> LinearHead:
    """Multinomial logistic regression (L-BFGS, full batch, deterministic): minimises
    ``sum_i w_i CE(head(x_i), y_i) / sum_i w_i + l2 * ||W||^2``. Features are standardised with the mean /
    std of ``standardise_on`` (default ``features``)."""
    num_classes = num_classes or int(labels.max()) + 1
    _check_xy(features, labels, num_classes)
    _pos("l2", l2, allow_zero=True)
    x = features.detach().float().cpu()
    y = labels.detach().long().cpu()
    w = torch.ones(x.shape[0]) if weights is None else torch.as_tensor(weights, dtype=torch.float32).cpu()
    if w.shape != (x.shape[0],) or bool((w < 0).any()):
        raise ValueError(f"weights: expected {x.shape[0]} non-negative weights, got {list(w.shape)}")
    ref = x if standardise_on is None else standardise_on.detach().float().cpu()
    std = ref.std(0, unbiased=False).clamp_min(1e-6) if ref.shape[0] > 1 else torch.ones(x.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearHead(ref.mean(0), std, num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(head(x), y, reduction="none") * w).sum() / w.sum() \
            + l2 * head.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with _one_thread():
        opt.step(closure)
    head.eval()
    return head


def train_head_with_synthetic(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                              gan: FeatureGAN | None = None, n_synthetic_per_class: int = 64,
                              synthetic_weight: float = 1.0, gan_steps: int = 1000, gan_kwargs: dict | None = None,
                              head_kwargs: dict | None = None, seed: int = 0):
    """Fit (or use) a :class:`FeatureGAN` on the real features, sample ``n_synthetic_per_class`` vectors
    per class, and train a :func:`train_linear_head` on real + synthetic (synthetic rows weighted
    ``synthetic_weight``; standardisation from the real features). Returns ``(head, info)`` with
    ``info = {"gan", "synthetic_features", "synthetic_labels"}``."""
    num_classes = num_classes or int(labels.max()) + 1
    _check_xy(features, labels, num_classes)
    _pos("synthetic_weight", synthetic_weight, allow_zero=True)
    if gan is None:
        gan = FeatureGAN(features.shape[1], num_classes, seed=seed, **(gan_kwargs or {}))
        gan.fit(features, labels, steps=gan_steps)
    xs, ys = gan.sample_per_class(n_synthetic_per_class, sorted(set(labels.tolist())), seed=seed + 1)
    x = torch.cat([features.float().cpu(), xs])
    y = torch.cat([labels.long().cpu(), ys])
    w = torch.cat([torch.ones(features.shape[0]), torch.full((xs.shape[0],), float(synthetic_weight))])
    head = train_linear_head(x, y, num_classes=num_classes, weights=w, standardise_on=features,
                             seed=seed, **(head_kwargs or {}))
    return head, {"gan": gan, "synthetic_features": xs, "synthetic_labels": ys}


@torch.no_grad()
def extract_features(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
                     pooling: str = "mean") -> torch.Tensor:
    """Pooled last-layer features [N, hidden] of ``texts`` (``pooling``: ``"mean"`` over real tokens, as
    sentence-transformers' MiniLM, or ``"cls"``). ``model``: a transformers encoder (``AutoModel``) or a
    task model / PeftModel (its last hidden state is read through ``output_hidden_states``)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
    _int("batch_size", batch_size, 1)
    texts = list(texts)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(dev)
            o = model(**enc, output_hidden_states=True)
            h = getattr(o, "last_hidden_state", None)
            if h is None:
                h = o.hidden_states[-1]
            if pooling == "cls":
                out.append(h[:, 0].float().cpu())
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)
