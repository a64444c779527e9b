"""Overlay the per-epoch histories of several `nem-study train` runs (RESULTS.md figures).

    .venv/bin/python results/plot_runs.py OUT.png LABEL=CHECKPOINT [LABEL=CHECKPOINT ...]

Left: test AMI (the first 1,000 test sequences, ``train.test_each_epoch``) per epoch; right:
the same against training wall time, so runs of different speed compare on one axis.
"""

from __future__ import annotations

import sys
from itertools import accumulate

from nem_study.plots import _pyplot, _save
from nem_study.checkpoints import load_checkpoint


def main(out: str, runs: list[str]) -> None:
    plt = _pyplot()
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for item in runs:
        label, path = item.split("=", 1)
        history = load_checkpoint(path)["history"]
        key = "test_ami" if "test_ami" in history[0] else "valid_ami"
        epochs = [h["epoch"] for h in history]
        ami = [h[key] for h in history]
        minutes = list(accumulate(h["epoch_seconds"] / 60 for h in history))
        by_epoch.plot(epochs, ami, marker="o", ms=3, label=label)
        by_time.plot(minutes, ami, marker="o", ms=3, label=label)
    for ax, xlabel in ((by_epoch, "epoch (10,000 sequences)"), (by_time, "training wall time (minutes)")):
        ax.set(xlabel=xlabel, ylabel="test AMI (first test sequences)")
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    _save(fig, out, title="Flying shapes, 3 objects, K = 3, T = 20, bitflip 0.2", rect=(0, 0, 1, 0.95))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
