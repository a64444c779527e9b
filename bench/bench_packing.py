"""Trials packed onto one GPU with Ray's fractional resources: aggregate sequences / s.

N = 1, 2, 4, 8 Ray tasks, each asking for 1/N of the GPU, each training the flying-shapes
network (batch 64, T = 20) for ``--seconds`` after a warm-up; the aggregate rate is the sum of
their sequences / s. Target (issue 6): 8 trials give at least 4x the rate of one.

    .venv/bin/python bench/bench_packing.py                          # a GPU machine
    .venv/bin/python bench/bench_packing.py --device cpu --trials 1 2 --seconds 5   # smoke run
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_for(seconds: float, device: str, precision: str, batch: int) -> float:
    """Sequences / s of one trial's training steps, after one warm-up step."""
    import torch

    from bench.bench_train import Step
    from nem_study.config import RunConfig

    torch.set_num_threads(1)
    step = Step(RunConfig.model_validate({"data": {"name": "flying_shapes"}}), batch, device=device)
    step.run(precision)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step.run(precision)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()

    import ray
    import torch

    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    name = torch.cuda.get_device_name() if gpus else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}, ray {ray.__version__}; {args.precision}, batch {args.batch}\n")
    print("| trials on the device | aggregate sequences / s | per trial | vs one trial |")
    print("|---|---|---|---|")
    task = ray.remote(train_for)
    one = None
    for n in args.trials:
        rates = ray.get([task.options(num_gpus=gpus / n, num_cpus=0).remote(
            args.seconds, args.device, args.precision, args.batch) for _ in range(n)])
        total = sum(rates)
        one = one or total / n
        print(f"| {n} | {total:.1f} | {total / n:.1f} | {total / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
