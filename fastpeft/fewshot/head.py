"""The light classification head of the few-shot methods: multinomial logistic regression in torch.

``X`` [N, D] (pooled, L2-normalised sentence embeddings), ``y`` [N] int class ids in ``[0, C)``.
The objective is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, L2) written per example::

    loss(W, b) = F.cross_entropy(X @ W.T + b, y) + (W ** 2).sum() / (2 * C * N)

minimised full-batch with L-BFGS (strong-Wolfe line search) from zeros, so the result is a pure function
of ``(X, y, C)`` -- no seed needed, deterministic on CPU. Predictions: ``(X @ W.T + b).argmax(-1)``.

With a ``prior`` weight ``P`` [C, D] (e.g. the label-name prior of :mod:`~fastpeft.fewshot.setfit`), the L2
penalty pulls ``W`` towards ``P`` instead of towards zero (a Gaussian prior centred on ``P``)::

    loss(W, b) = F.cross_entropy(X @ W.T + b, y) + ((W - P) ** 2).sum() / (2 * C * N)

so ``C -> 0`` gives the prior's classifier ``W = P`` (with a fitted bias) and ``C -> inf`` plain logistic
regression; the fit starts from ``W = P``, ``b = 0``. Still convex: a pure function of ``(X, y, C, P)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LogisticHead(torch.nn.Module):
    """Weights ``weight`` [C, D] and ``bias`` [C] fitted by :meth:`fit` (see module docstring)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim: expected >= 1, got {dim}")
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        # zeros, not nn.Linear's random init: the fit starts from W = 0, b = 0 and draws no random numbers
        self.weight = torch.nn.Parameter(torch.zeros(num_classes, dim))
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def penalty(self, prior: torch.Tensor, C: float, n: int) -> torch.Tensor:
        """The L2 term of the objective: ``((weight - prior) ** 2).sum() / (2 * C * n)``."""
        return ((self.weight - prior) ** 2).sum() / (2 * C * n)

    def fit(self, X: torch.Tensor, y: torch.Tensor, *, C: float = 1.0, max_iter: int = 200,
            prior: torch.Tensor | None = None) -> "LogisticHead":
        X, y = _check_xy(X, y, self.weight.shape[0], self.weight.shape[1])
        if not C > 0:
            raise ValueError(f"C: expected > 0 (inverse L2 strength), got {C}")
        if max_iter < 1:
            raise ValueError(f"max_iter: expected >= 1, got {max_iter}")
        if prior is not None:
            if not isinstance(prior, torch.Tensor) or tuple(prior.shape) != tuple(self.weight.shape):
                raise ValueError(f"prior: expected a tensor of shape {tuple(self.weight.shape)} [C, D], got "
                                 f"{tuple(getattr(prior, 'shape', ())) or type(prior).__name__}")
            if not torch.isfinite(prior).all():
                raise ValueError("prior: contains non-finite values")
        X = X.to(self.weight.dtype)
        n = X.shape[0]
        P = torch.zeros_like(self.weight) if prior is None else prior.detach().to(self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(P)
            self.bias.zero_()
        opt = torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self(X), y) + self.penalty(P, C, n)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self

    @torch.no_grad()
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self(X.to(self.weight.dtype)).argmax(-1)


def _check_xy(X, y, num_classes, dim):
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"X: expected a 2-D tensor [N, D], got {getattr(X, 'shape', type(X))}")
    y = torch.as_tensor(y, dtype=torch.long)
    if y.dim() != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y: expected shape [{X.shape[0]}] to match X, got {tuple(y.shape)}")
    if X.shape[1] != dim:
        raise ValueError(f"X: expected {dim} features, got {X.shape[1]}")
    if X.shape[0] == 0:
        raise ValueError("X: no examples to fit")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"y: class ids must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return X, y


def fit_logistic_head(X: torch.Tensor, y, num_classes: int | None = None, *, C: float = 1.0,
                      max_iter: int = 200, prior: torch.Tensor | None = None) -> LogisticHead:
    """Fit and return a :class:`LogisticHead` on ``X`` [N, D], ``y`` [N] (optionally with a ``prior``)."""
    y = torch.as_tensor(y, dtype=torch.long)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.numel() else 0
    return LogisticHead(X.shape[1], num_classes).fit(X, y, C=C, max_iter=max_iter, prior=prior)
