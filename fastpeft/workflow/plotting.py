"""PNG of the training and validation curves (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import os


def plot_curves(history: list[dict], path: str, metric: str | None = None) -> str | None:
    """Plot train loss per step and every validation metric over steps from ``history`` records
    (``{"type": "train", "step", "loss", "lr"}`` / ``{"type": "eval", "step", <metric>: value}``).
    Returns ``path``, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [h for h in history if h.get("type") == "train" and h.get("loss") is not None]
    evals = [h for h in history if h.get("type") == "eval"]
    if not train and not evals:
        return None
    keys = sorted({k for h in evals for k, v in h.items()
                   if k not in ("type", "step", "epoch", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool)})
    n = 1 + (1 if keys else 0)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", lw=1)
    if any(h.get("loss") is not None for h in evals):
        ax.plot([h["step"] for h in evals if h.get("loss") is not None],
                [h["loss"] for h in evals if h.get("loss") is not None], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if keys:
        ax2 = axes[0][1]
        for k in keys:
            if k == "loss":
                continue
            pts = [(h["step"], h[k]) for h in evals if h.get(k) is not None]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k, lw=2 if k == metric else 1)
        ax2.set_xlabel("optimizer step")
        ax2.set_title("validation")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "." + os.path.basename(path) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
