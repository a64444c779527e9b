"""Several trials on one device: aggregate sequences / s, two ways (issue 6).

- ``--mode ray``: N = 1, 2, 4, 8 Ray tasks, each asking for 1/N of the GPU, each training the
  flying-shapes network (batch 64, T = 20) for the same ``--seconds`` after a warm-up; the
  aggregate rate is the sum of their sequences / s.
- ``--mode ensemble``: N members stacked in one process (``nem_study.members.Stack``, the
  ``ensemble: true`` study mode): one vmapped step trains all N; the aggregate rate is N x batch
  x steps / s.

Target (issue 6): 8 trials give at least 4x the rate of one.

    .venv/bin/python bench/bench_packing.py --mode ray                # a GPU machine
    .venv/bin/python bench/bench_packing.py --mode ensemble
    .venv/bin/python bench/bench_packing.py --device cpu --mode ensemble --threads 2 --trials 1 2 4 --seconds 30
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_for(seconds: float, device: str, precision: str, batch: int, graph: bool,
              start_at: float = 0.0) -> float:
    """Sequences / s of one trial's training steps, after warm-up steps; timing starts at the
    wall-clock time ``start_at``, so that N trials started one after another overlap fully."""
    import torch

    from bench.bench_train import Step
    from nem_study.config import RunConfig

    torch.set_num_threads(1)
    step = Step(RunConfig.model_validate({"data": {"name": "flying_shapes"}}), batch, device=device,
                graph=graph, precision=precision)
    for _ in range(5 if graph else 1):
        step.run()
    time.sleep(max(0.0, start_at - time.time()))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step.run()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def ensemble_rate(n: int, seconds: float, device: str, precision: str, batch: int, graph: bool = False) -> float:
    """Aggregate sequences / s of n members trained as one vmapped stack, after one warm-up step."""
    import torch

    from nem_study.config import RunConfig
    from nem_study.members import Stack
    from nem_study.model import NEM
    from nem_study.batches import corrupt, to_steps
    from nem_study.step import GraphedStep

    cfg = RunConfig.model_validate({"data": {"name": "flying_shapes"}})
    dev = torch.device(device)
    S, F, K = cfg.data.image_size, cfg.data.frames, cfg.model.k
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(NEM(cfg.model, S).to(dev))
    stack = Stack(models[0], [m.state_dict() for m in models], [None] * n, cfg.train.lr, capturable=graph)
    frames = (torch.rand(n, batch, F, S, S, device=dev) > 0.85).float()
    gen = torch.Generator(dev).manual_seed(0)

    def train_stack(x_tilde, targets, noise, cache=True):
        return stack.train_step(x_tilde, targets, noise, precision, cache)

    graphed = GraphedStep(train_stack) if graph else train_stack

    def step() -> None:
        xs, ts = zip(*(to_steps(frames[e], cfg.steps, False) for e in range(n)))
        x_tilde = corrupt(torch.stack(xs), cfg.noise, gen)                 # (N, T, B, 1, H, W)
        noise = torch.randn((n, batch, K, 1, S, S), generator=gen, device=dev)
        graphed(x_tilde, torch.stack(ts), noise)[0].sum().item()  # as fit reads the losses

    for _ in range(5 if graph else 1):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps * n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mode", default="ray", choices=["ray", "ensemble"])
    p.add_argument("--graph", action="store_true", help="replay each step as a CUDA graph "
                   "(train.cuda_graph, the GPU default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the ensemble process; Ray tasks use 1)")
    args = p.parse_args()
    if args.mode == "ensemble":
        return main_ensemble(args)

    import ray
    import torch

    gpus = 1 if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}})
    name = torch.cuda.get_device_name() if gpus else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}, ray {ray.__version__}; {args.precision}, batch {args.batch}"
          f"{', CUDA graph' if args.graph else ', eager'}\n")
    print("| trials on the device | aggregate sequences / s | per trial | vs one trial |")
    print("|---|---|---|---|")
    task = ray.remote(train_for)
    one = None
    for n in args.trials:
        start_at = time.time() + 20 + 2 * n  # after every task's process start and warm-up
        rates = ray.get([task.options(num_gpus=gpus / n, num_cpus=0).remote(
            args.seconds, args.device, args.precision, args.batch, args.graph, start_at) for _ in range(n)])
        total = sum(rates)
        one = one or total / n
        print(f"| {n} | {total:.1f} | {total / n:.1f} | {total / one:.2f}x |", flush=True)


def main_ensemble(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; {args.threads} thread(s); ensemble (vmap); "
          f"{args.precision}, batch {args.batch}{', CUDA graph' if args.graph else ', eager'}\n")
    print("| members in the stack | aggregate sequences / s | per member | vs one |")
    print("|---|---|---|---|")
    one = None
    for n in args.trials:
        total = ensemble_rate(n, args.seconds, args.device, args.precision, args.batch, args.graph)
        one = one or total / n
        print(f"| {n} | {total:.1f} | {total / n:.1f} | {total / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
