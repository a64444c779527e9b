"""Denormal floats on the CPU: a trained network's training step with and without flush-to-zero.

    python bench/bench_denormal.py CHECKPOINT [--steps 5] [--repeats 3] [--threads 1]

CHECKPOINT is any ``last.pt`` of a run some epochs into training (a study trial's
``checkpoint_*/last.pt``, or ``nem-study train --checkpoint-dir``). Its config gives the data,
network, batch size and precision. The same batch is trained from four starts, in turns, one
thread by default (as study trials run):

- ``fresh``: the config's initial weights and a new Adam;
- ``trained``: the checkpoint's weights and Adam state;

each with ``torch.set_flush_denormal`` off and on. Each start takes
one warm-up step, then ``--steps`` timed steps; medians over all repeats are printed, with the
share of the trained step's gradients that are denormal (below 1.2e-38, not zero).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a last.pt some epochs into training")
    p.add_argument("--steps", type=int, default=5, help="timed steps per start and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import numpy as np
    import torch

    from nem_study import data
    from nem_study.model import NEM
    from nem_study.batches import corrupt, gamma0_noise, to_steps
    from nem_study.checkpoints import load_checkpoint
    from nem_study.step import train_step

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt["config"]
    tc = cfg.train
    frames, _ = data.load(cfg.data, "train", progress=False).batch(np.arange(tc.batch_size))
    inputs, targets = to_steps(torch.from_numpy(frames), cfg.steps, cfg.data.is_static)  # (T, B, 1, H, W)
    gen = torch.Generator().manual_seed(0)
    x_tilde = corrupt(inputs, cfg.noise, gen)                       # (T, B, 1, H, W)
    noise = gamma0_noise(inputs, cfg.model.k, gen)                  # (B, K, 1, H, W)
    precision = "bf16" if tc.precision == "auto" else tc.precision

    def start(trained: bool):
        torch.manual_seed(tc.seed)
        model = NEM(cfg.model, cfg.data.image_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
        if trained:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        return model, optimizer

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} thread(s); torch "
          f"{torch.__version__}, python {platform.python_version()}")
    print(f"checkpoint: {args.checkpoint} (epoch {ckpt['epoch']}); {cfg.data.name}, K = {cfg.model.k}, "
          f"T = {cfg.steps}, batch {tc.batch_size}, {precision}")
    seconds: dict[tuple[str, bool], list[float]] = {}
    denormal_share = 0.0
    for _ in range(args.repeats):
        for trained in (False, True):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                model, optimizer = start(trained)
                train_step(model, optimizer, x_tilde, targets, noise, precision)   # warm-up
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    train_step(model, optimizer, x_tilde, targets, noise, precision)
                    seconds.setdefault(("trained" if trained else "fresh", flush), []).append(time.perf_counter() - t0)
                if trained and not flush:
                    grads = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
                    tiny = torch.finfo(torch.float32).tiny
                    denormal_share = float(((grads != 0) & (grads.abs() < tiny)).float().mean())

    med = {key: statistics.median(v) for key, v in seconds.items()}
    print(f"\n| start | flush_denormal | s / step (median of {args.steps * args.repeats}) | sequences / s | "
          "vs the same start without flush |")
    print("|---|---|---|---|---|")
    for (name, flush), s in med.items():
        print(f"| {name} | {'on' if flush else 'off'} | {s:.3f} | {tc.batch_size / s:.1f} | "
              f"{med[(name, False)] / s:.2f}x |")
    print(f"\ntrained / fresh, flush off: {med[('trained', False)] / med[('fresh', False)]:.2f}; "
          f"flush on: {med[('trained', True)] / med[('fresh', True)]:.2f}")
    print(f"denormal share of the trained step's gradients (flush off): {100 * denormal_share:.3f} %")


if __name__ == "__main__":
    main()
