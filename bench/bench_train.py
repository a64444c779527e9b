"""Training-step throughput (sequences / s) of each network of NEM_SPEC.md §3.

One step = forward over all EM steps, backward, Adam update, on random binary / grey frames,
batch 64, T = 20 (static data: 15 EM steps). Prints the median over repeats.

    .venv/bin/python bench/bench_train.py [--repeats 5] [--threads 2] [--batch 64]

Each network runs in fp32 and with bf16 autocast (``train.precision: bf16``; the likelihoods,
E-step and loss stay fp32), alternating in the same process; the last column is the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from nem_study.config import RunConfig
from nem_study.model import NEM
from nem_study.train import autocast, corrupt, to_steps

SETUPS = {
    "static shapes, N-EM": {"data": {"name": "static_shapes"}, "model": {"kind": "nem"}},
    "static shapes, RNN-EM (fc)": {"data": {"name": "static_shapes"}},
    "flying shapes, RNN-EM (conv)": {"data": {"name": "flying_shapes"}},
    "flying MNIST, RNN-EM (conv)": {"data": {"name": "flying_mnist"}, "model": {"k": 2}},
}


def step_time(cfg: RunConfig, batch: int, repeats: int, precision: str = "fp32") -> list[float]:
    torch.manual_seed(0)
    model = NEM(cfg.model, cfg.data.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    S, F = cfg.data.image_size, cfg.data.frames
    frames = torch.rand(batch, F, S, S)
    if not cfg.data.grey:
        frames = (frames > 0.85).float()
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 1):  # the first step warms up
        t0 = time.perf_counter()
        inputs, targets = to_steps(frames, cfg.steps, cfg.data.is_static)
        with autocast(torch.device("cpu"), precision):
            out = model(corrupt(inputs, cfg.noise, gen), targets, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}; torch {torch.__version__}, python {platform.python_version()}")
    print(f"batch {args.batch}, median of {args.repeats} steps after one warm-up step\n")
    print("| network | K | steps | fp32 s / step | fp32 sequences / s | bf16 autocast sequences / s | bf16 / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, setup in SETUPS.items():
        cfg = RunConfig.model_validate(setup)
        times = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):  # alternate, so that the machine's drift hits both alike
            for precision in times:
                times[precision] += step_time(cfg, args.batch, 1, precision)
        fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
        print(f"| {name} | {cfg.model.k} | {cfg.steps} | {fp32:.3f} | {args.batch / fp32:.1f} | "
              f"{args.batch / bf16:.1f} | {fp32 / bf16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
