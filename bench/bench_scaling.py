"""Scaling of the training step with K, T and batch size (flying shapes, RNN-EM conv).

Three one-factor sweeps around the base point K = 3, T = 20, batch 64: K in 1..8, T in
10..50, batch in 16..512. One step is timed exactly as in ``bench_train.py`` (``step_time``:
forward over all EM steps, backward, Adam update on random frames; median of the repeats
after one warm-up step). Each row gives the time of one epoch of 50,000 sequences
(= 50,000 / batch x s / step); under each table, the log-log slope of that time against the
factor (1: linear). The plot has the three sweeps as log-log panels.

    .venv/bin/python bench/bench_scaling.py --threads 2                # bf16 autocast, minutes on 2 cores
    .venv/bin/python bench/bench_scaling.py --precision fp32 --plot results/scaling_fp32.png
    .venv/bin/python bench/bench_scaling.py --quick --repeats 1 --plot /tmp/scaling.png   # smoke run
    python bench/bench_scaling.py --device cuda --plot scaling_gpu.png   # a GPU: the graphed step (its default)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_train import step_time  # noqa: E402
from nem_study.config import RunConfig  # noqa: E402

EPOCH = 50_000  # training sequences per epoch (NEM_SPEC.md §4)
BASE = {"K": 3, "T": 20, "batch": 64}
SWEEPS = {"K": [1, 2, 3, 4, 5, 6, 8], "T": [10, 20, 30, 40, 50], "batch": [16, 32, 64, 128, 256, 512]}
QUICK_BASE = {"K": 2, "T": 2, "batch": 4}
QUICK_SWEEPS = {"K": [1, 2], "T": [2, 3], "batch": [4, 8]}


def time_point(k: int, t: int, batch: int, repeats: int, precision: str, device: str = "cpu") -> float:
    """Median seconds per training step at K = k, T = t (t + 1 frames), batch ``batch``; on a GPU
    the step the trainer takes there by default, one CUDA graph (``train.cuda_graph``)."""
    cfg = RunConfig.model_validate({"data": {"name": "flying_shapes", "frames": t + 1},
                                    "model": {"k": k}, "train": {"batch_size": batch, "precision": precision}})
    return statistics.median(step_time(cfg, batch, repeats, precision, device, graph=device == "cuda"))


def loglog_fit(xs: list[int], ys: list[float]) -> np.ndarray:
    """(b, log a) of y ~ a x^b, least squares on the logs; b is the slope."""
    return np.polyfit(np.log(xs), np.log(ys), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sweeps around K 2, T 2, batch 4")
    p.add_argument("--plot", default="results/scaling.png", help="where the log-log PNG goes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base, sweeps = (QUICK_BASE, QUICK_SWEEPS) if args.quick else (BASE, SWEEPS)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}; torch {torch.__version__}, python {platform.python_version()}; "
          f"precision {args.precision}; device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    print(f"flying shapes, RNN-EM (conv); base K {base['K']}, T {base['T']}, batch {base['batch']}; "
          f"median of {args.repeats} steps after one warm-up step; epoch = {EPOCH:,} sequences")

    results: dict[str, tuple[list[int], list[float], np.ndarray]] = {}
    for factor, values in sweeps.items():
        print("\n| factor | value | s / step | sequences / s | s / epoch |\n|---|---|---|---|---|")
        epochs = []
        for v in values:
            point = {**base, factor: v}
            s = time_point(point["K"], point["T"], point["batch"], args.repeats, args.precision, args.device)
            epochs.append(EPOCH / point["batch"] * s)
            print(f"| {factor} | {v} | {s:.3f} | {point['batch'] / s:.1f} | {epochs[-1]:,.0f} |", flush=True)
        coef = loglog_fit(values, epochs)
        results[factor] = (values, epochs, coef)
        print(f"\nlog-log slope of s / epoch vs {factor}: {coef[0]:.2f}")

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6))
    for ax, (factor, (values, epochs, coef)) in zip(np.atleast_1d(axes), results.items()):
        fit = np.exp(np.polyval(coef, np.log(values)))
        ax.loglog(values, epochs, "o-", label="measured")
        ax.loglog(values, fit, "--", color="grey", label=f"fit, slope {coef[0]:.2f}")
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.set_xlabel(factor if factor != "T" else "T (EM steps)")
        ax.set_ylabel(f"s / epoch of {EPOCH:,} sequences")
        others = ", ".join(f"{k} {v}" for k, v in base.items() if k != factor)
        ax.set_title(f"vs {factor} ({others})", fontsize=10)
        ax.legend(fontsize=8)
    where = "one CUDA graph per step" if args.device == "cuda" else f"torch threads {args.threads}"
    fig.suptitle(f"flying shapes RNN-EM training time, {args.precision}, {where}", fontsize=11)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
