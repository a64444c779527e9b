"""Training-step throughput (sequences / s) of each network of NEM_SPEC.md §3, per execution path.

One step = forward over all EM steps, backward, Adam update, on random binary / grey frames,
batch 64, T = 20 (static data: 15 EM steps). Prints the median over repeats.

    .venv/bin/python bench/bench_train.py [--repeats 5] [--threads 2] [--batch 64] [--compile]
    .venv/bin/python bench/bench_train.py --device cuda --compile      # a GPU: adds CUDA graphs

Paths, alternating in one process so that the machine's drift hits all alike: eager fp32, eager
bf16 autocast (``train.precision: bf16``; likelihoods, E-step and loss stay fp32) and, with
``--compile``, ``torch.compile`` of each EM iteration in both precisions (as ``train.compile``) (compiling takes about a
minute per network and path on 2 cores; it is not timed). On a GPU also ``graph``: the whole
step replayed as one CUDA graph (``train.cuda_graph``, the GPU default), and with ``--compile``
``reduce-overhead`` (CUDA graphs of the compiled iteration only). Ratios are against eager fp32.

The FLOPs of one step (forward + backward, ``torch.utils.flop_counter``: matmuls and convs)
over its time give the achieved FLOP/s, shown beside each rate as a fraction of this machine's
dense matmul peak for the same precision, measured in the same run (the best of square matmuls
of 512..4096).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nem_study.batches import corrupt, gamma0_noise, to_steps
from nem_study.config import RunConfig
from nem_study.model import NEM
from nem_study.step import GraphedStep, autocast, train_step

SETUPS = {
    "static shapes, N-EM": {"data": {"name": "static_shapes"}, "model": {"kind": "nem"}},
    "static shapes, RNN-EM (fc)": {"data": {"name": "static_shapes"}},
    "flying shapes, RNN-EM (conv)": {"data": {"name": "flying_shapes"}},
    "flying MNIST, RNN-EM (conv)": {"data": {"name": "flying_mnist"}, "model": {"k": 2}},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Step:
    """One model, optimiser and batch; ``run()`` is one timed training step, as ``fit`` takes it:
    noise drawn, then ``train_step`` (eager) or, for ``graph=True``, ``GraphedStep`` (CUDA graph)."""

    def __init__(self, cfg: RunConfig, batch: int, compile: str | None = None, device: str = "cpu",
                 graph: bool = False, precision: str = "fp32"):
        torch.manual_seed(0)
        self.cfg, self.device, self.precision = cfg, torch.device(device), precision
        self.model = NEM(cfg.model, cfg.data.image_size).to(device)
        if compile:  # "default", or "reduce-overhead" (CUDA graphs of it on a GPU)
            self.model.compile_iteration(compile)  # as train.compile does
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr, capturable=graph)
        def step(x_tilde, targets, noise, cache=True):
            return train_step(self.model, self.opt, x_tilde, targets, noise, precision, cache)
        self.step = GraphedStep(step) if graph else step
        S, F = cfg.data.image_size, cfg.data.frames
        frames = torch.rand(batch, F, S, S, device=device)
        self.frames = frames if cfg.data.grey else (frames > 0.85).float()
        self.gen = torch.Generator(device).manual_seed(0)

    def run(self) -> float:
        cfg = self.cfg
        t0 = time.perf_counter()
        inputs, targets = to_steps(self.frames, cfg.steps, cfg.data.is_static)
        x_tilde = corrupt(inputs, cfg.noise, self.gen)
        out = self.step(x_tilde, targets, gamma0_noise(inputs, cfg.model.k, self.gen))
        out.loss.item()  # fit reads every step's loss
        return time.perf_counter() - t0


class NetworkStep(Step):
    """The M-step network alone, the ceiling for the whole step: T cell calls on fixed inputs
    (B*K images), a plain loss on their outputs, backward and Adam. No EM: no noise, E-step,
    likelihoods or EM loss. Its FLOPs are the whole step's, less the EM's few elementwise ones."""

    def run(self) -> float:
        cfg, B, K = self.cfg, self.frames.shape[0], self.cfg.model.k
        t0 = time.perf_counter()
        inputs = self.frames[:, :1].repeat_interleave(K, 0)                # (B*K, 1, H, W)
        h = inputs.new_zeros(B * K, self.model.cfg.hidden)                  # (B*K, Z)
        loss = 0.0
        with autocast(self.device, self.precision):
            for _ in range(cfg.steps):
                h, out = self.model.cell(inputs, h)                         # (B*K, 1, H, W)
                loss = loss + out.float().square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss = loss.item()
        return time.perf_counter() - t0


def step_time(cfg: RunConfig, batch: int, repeats: int, precision: str = "fp32", device: str = "cpu",
              graph: bool = False) -> list[float]:
    """Seconds per training step, ``repeats`` times after one warm-up step."""
    step = Step(cfg, batch, precision=precision, device=device, graph=graph)
    step.run()
    return [step.run() for _ in range(repeats)]


def step_flops(cfg: RunConfig, batch: int) -> int:
    """Matmul and conv FLOPs of one training step (forward and backward)."""
    step = Step(cfg, batch)
    with FlopCounterMode(display=False) as counter:
        step.run()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 1.0) -> float:
    """Best FLOP/s of a square dense matmul on this device (sizes 512..4096, 8192 on a GPU)."""
    best = 0.0
    for n in (512, 1024, 2048, 4096) + ((8192,) if device == "cuda" else ()):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of each EM "
                   "iteration (on a GPU also mode='reduce-overhead', i.e. CUDA graphs of it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--paths", nargs="+", metavar="MODE:PRECISION",
                   help="the paths to time, e.g. eager:fp32 graph:bf16 compile:fp32 reduce-overhead:fp32; "
                   "network:fp32 is the M-step network alone (no EM), the ceiling for the whole step "
                   "(default: eager and, on a GPU, graph, in fp32 and bf16, plus the compiled ones with --compile)")
    p.add_argument("--only", help="run only the networks whose name contains this text")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled iteration per path and network
    gpu = f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}{gpu}; torch {torch.__version__}, python {platform.python_version()}")
    peak = {name: matmul_peak(dtype, args.device) for name, dtype in DTYPES.items()}
    print(f"dense matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"batch {args.batch}, median of {args.repeats} steps after one warm-up step\n")

    modes = ["eager"] + (["graph"] if args.device == "cuda" else [])
    if args.compile:
        modes += ["compile"] + (["reduce-overhead"] if args.device == "cuda" else [])
    paths = [(mode, prec) for mode in modes for prec in DTYPES]
    if args.paths:
        paths = [tuple(p.split(":")) for p in args.paths]
    if ("eager", "fp32") not in paths:
        paths.insert(0, ("eager", "fp32"))  # the baseline of every ratio
    cols = " | ".join(f"{mode} {prec}: seq / s (% of peak)" for mode, prec in paths)
    print(f"| network | GFLOP / step | {cols} | fastest / eager fp32 |")
    print("|---|---|" + "---|" * len(paths) + "---|")
    for name, setup in SETUPS.items():
        if args.only and args.only not in name:
            continue
        cfg = RunConfig.model_validate(setup)
        flops = step_flops(cfg, args.batch)
        steps = {}
        for mode, prec in paths:
            compile = {"eager": None, "graph": None, "network": None, "compile": "default"}.get(mode, mode)
            kind = NetworkStep if mode == "network" else Step
            steps[mode, prec] = step = kind(cfg, args.batch, compile, args.device, mode == "graph", prec)
            for _ in range(5 if mode == "graph" else 1):
                step.run()  # warm-up: compiles the iteration; the graph's eager steps and capture
        times = {path: [] for path in paths}
        for _ in range(args.repeats):
            for path in paths:
                times[path].append(steps[path].run())
        median = {path: statistics.median(t) for path, t in times.items()}
        fastest = min(median, key=median.get)
        print(f"| {name} | {flops / 1e9:.1f} | "
              + " | ".join(f"{args.batch / median[path]:.1f} ({100 * flops / median[path] / peak[path[1]]:.0f} %)"
                           for path in paths)
              + f" | {' '.join(fastest)}, {median['eager', 'fp32'] / median[fastest]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
