"""The small matplotlib helpers every script and harness uses for its curves (Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["curve", "finish", "subplots"]


def subplots(ncols: int = 1, width: float = 6.5, height: float = 4.0):
    """``(fig, axes)`` with ``axes`` a flat list, on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def curve(ax, x, runs, label: str, color: str | None = None, band: str = "minmax", **kwargs) -> None:
    """The mean over the rows of ``runs`` (one row per seed, or a 1-D series) against ``x``, with a
    shaded band: the min-max over the rows (``band="minmax"``) or ``± runs_std`` (a 2-tuple
    ``(mean, std)`` for ``runs`` with ``band="std"``)."""
    if band == "std":
        mean, std = (np.asarray(v, dtype=float) for v in runs)
        low, high = mean - std, mean + std
    else:
        values = np.atleast_2d(np.asarray(runs, dtype=float))
        mean, low, high = values.mean(0), values.min(0), values.max(0)
        if values.shape[0] == 1:
            low = high = None
    kwargs.setdefault("marker", "o")
    line = ax.plot(x, mean, color=color, label=label, **kwargs)[0]
    if low is not None:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)


def finish(fig, axes_labels, path: Path, title: str | None = None, legend_size: int = 7) -> Path:
    """Label each axis (``axes_labels``: ``[(ax, xlabel, ylabel), ...]``), add legends, save at
    120 dpi and close. Returns ``path``."""
    import matplotlib.pyplot as plt

    for ax, xlabel, ylabel in axes_labels:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
    if title:
        axes_labels[0][0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
