"""The report's figures, each as PNG (for index.md) and PDF (for a paper), on the Agg backend.

Each function takes numbers already aggregated over seeds (``analysis.aggregate``) and a path
stem; it returns the files written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analysis.aggregate import Stat


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return paths


def ami_per_step(curves: dict[str, dict[str, Any]], stem: Path) -> list[Path]:
    """Figure 6 style: mean test AMI per time step, one line per grid cell, with the band between
    the lower and upper quartile over test sequences where the runs logged quartiles."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, c in curves.items():
        line, = ax.plot(c["steps"], c["mean"], label=label)
        if c["q25"].size == c["mean"].size and c["q75"].size == c["mean"].size:
            ax.fill_between(c["steps"], c["q25"], c["q75"], color=line.get_color(), alpha=0.2, linewidth=0)
    sources = sorted({c["source"] for c in curves.values()})
    ax.set(xlabel="time step", ylabel="AMI", title=f"Test AMI per time step ({', '.join(sources)}; "
           "mean over seeds, quartile band)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def bce_bars(values: dict[str, dict[int, Stat]], stem: Path) -> list[Path]:
    """Figure 5 style: next-step BCE bound per object count (the keys, as axis labels), a bar per K
    (mean ± std over seeds)."""
    plt = _pyplot()
    objects = list(values)
    ks = sorted({k for per_k in values.values() for k in per_k})
    width = 0.8 / len(ks)
    fig, ax = plt.subplots(figsize=(max(4.0, 2.0 + 1.2 * len(objects)), 4))
    for i, k in enumerate(ks):
        stats = [values[o].get(k, Stat()) for o in objects]
        ax.bar(np.arange(len(objects)) + (i - (len(ks) - 1) / 2) * width, [s.mean for s in stats], width,
               yerr=[0 if np.isnan(s.std) else s.std for s in stats], capsize=3, label=f"K = {k}")
    ax.set_xticks(np.arange(len(objects)), objects)
    ax.set(xlabel="objects", ylabel="next-step BCE bound", title="Next-step BCE bound (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return _save(fig, stem)


def training_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], stem: Path) -> list[Path]:
    """Validation loss and AMI per epoch, one line per grid cell (mean over its seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, metrics in curves.items():
        for ax, metric in zip(axes, ("valid_loss", "valid_ami")):
            epochs, mean = metrics.get(metric, (np.array([]), np.array([])))
            if epochs.size:
                ax.plot(epochs, mean, marker="." if epochs.size < 30 else None, label=label)
    for ax, ylabel in zip(axes, ("validation loss", "validation AMI")):
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Training curves per grid cell (mean over seeds)", fontsize=10)
    return _save(fig, stem)
