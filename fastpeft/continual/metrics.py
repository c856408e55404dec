"""Continual-learning metrics on the accuracy matrix, and its PNG heat-map.

``R[i][j]`` is the metric (accuracy for classification) on task ``j``'s evaluation set after training
task ``i``; ``T = len(R)`` tasks, indices from 0, so ``R[T-1]`` is the final row. Entries above the
diagonal (tasks not trained yet) are measured too, but no metric below uses them.

* average final accuracy  ``A = mean_j R[T-1][j]``
* learning accuracy       ``LA = mean_j R[j][j]``  (how well each task was learned when it was trained)
* forgetting (Chaudhry et al. 2018) ``F = mean_{j<T-1} ( max_{j<=i<T-1} R[i][j] - R[T-1][j] )``: the drop
  from task j's best accuracy *once it had been trained* to its final accuracy. Entries before task j
  was trained (``i < j``, zero-shot accuracy) are not knowledge that can be forgotten and are left out of
  the max (with them, a model that never changes task j's predictions could still show "forgetting")
* backward transfer (Lopez-Paz & Ranzato 2017) ``BWT = mean_{j<T-1} ( R[T-1][j] - R[j][j] )``
  (negative: forgetting; positive: later tasks helped earlier ones)

Equivalent NumPy::

    R = np.asarray(R); T = len(R)
    avg = R[-1].mean()
    forgetting = np.mean([R[j:-1, j].max() - R[-1, j] for j in range(T - 1)])   # T >= 2
    bwt = (R[-1, :-1] - np.diag(R)[:-1]).mean()                 # T >= 2

With one task, forgetting and BWT are undefined and returned as ``None``.
"""
from __future__ import annotations

import math
import os
from typing import Sequence


def check_matrix(R) -> list[list[float]]:
    """``R`` as a square list of float lists; ValueError naming ``R`` otherwise."""
    try:
        rows = [[float(v) for v in row] for row in R]
    except (TypeError, ValueError):
        raise ValueError(f"R: expected a square matrix of numbers (list of rows), got {R!r}") from None
    if not rows:
        raise ValueError("R: expected a non-empty square matrix, got no rows")
    T = len(rows)
    if any(len(r) != T for r in rows):
        raise ValueError(f"R: expected a square {T}x{T} matrix, got row lengths {[len(r) for r in rows]}")
    if any(math.isnan(rows[i][j]) for i in range(T) for j in range(i + 1)):
        raise ValueError("R: NaN on or below the diagonal (every trained task must be evaluated)")
    return rows


def average_accuracy(R) -> float:
    rows = check_matrix(R)
    return sum(rows[-1]) / len(rows)


def learning_accuracy(R) -> float:
    rows = check_matrix(R)
    return sum(rows[j][j] for j in range(len(rows))) / len(rows)


def forgetting(R) -> float | None:
    rows = check_matrix(R)
    T = len(rows)
    if T < 2:
        return None
    return sum(max(rows[i][j] for i in range(j, T - 1)) - rows[-1][j] for j in range(T - 1)) / (T - 1)


def backward_transfer(R) -> float | None:
    rows = check_matrix(R)
    T = len(rows)
    if T < 2:
        return None
    return sum(rows[-1][j] - rows[j][j] for j in range(T - 1)) / (T - 1)


def summarize(R) -> dict:
    """``{"avg_accuracy", "learning_accuracy", "forgetting", "bwt", "final_row"}``."""
    rows = check_matrix(R)
    return {"avg_accuracy": average_accuracy(rows), "learning_accuracy": learning_accuracy(rows),
            "forgetting": forgetting(rows), "bwt": backward_transfer(rows), "final_row": list(rows[-1])}


# --------------------------------------------------------------------------- plots

def plot_matrices(matrices: dict, task_names: Sequence[str], path: str, *, metric: str = "accuracy",
                  subtitles: dict | None = None) -> str | None:
    """One annotated heat-map per entry of ``matrices`` (``{title: R}``), side by side, written
    atomically to ``path`` (PNG, matplotlib Agg). Rows: after training task i; columns: evaluated on
    task j. Returns ``path``, or None when matplotlib is missing."""
    if not matrices:
        raise ValueError("matrices: expected at least one {title: R} entry")
    checked = {k: check_matrix(v) for k, v in matrices.items()}
    T = len(task_names)
    for k, R in checked.items():
        if len(R) != T:
            raise ValueError(f"matrices[{k!r}]: {len(R)}x{len(R)} matrix but {T} task_names")
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(checked)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    size = 1.2 + 0.9 * T
    fig, axes = plt.subplots(nrows, cols, figsize=((size + 1.6) * cols + 0.8, (size + 1.0) * nrows), squeeze=False)
    im = None
    for ax, (title, R) in zip([a for row in axes for a in row], checked.items()):
        im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if R[i][j] < 0.6 else "black")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(task_names, rotation=45, ha="right", fontsize=7)
        ax.set_yticklabels(task_names, fontsize=7)
        ax.set_xlabel(f"evaluated on task ({metric})", fontsize=8)
        ax.set_ylabel("after training task", fontsize=8)
        sub = (subtitles or {}).get(title)
        ax.set_title(f"{title}\n{sub}" if sub else title, fontsize=9)
    for ax in [a for row in axes for a in row][n:]:
        ax.axis("off")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "." + os.path.basename(path) + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_matrix(R, task_names: Sequence[str], path: str, *, title: str = "accuracy matrix",
                metric: str = "accuracy") -> str | None:
    """A single heat-map (see :func:`plot_matrices`)."""
    return plot_matrices({title: R}, task_names, path, metric=metric)

