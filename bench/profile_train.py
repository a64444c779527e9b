"""Where the training time goes (flying shapes, RNN-EM conv, K = 3, T = 20, batch 64).

    .venv/bin/python bench/profile_train.py [--threads 2] [--precision auto] [--steps 5]

1. Inside one training step (``torch.profiler``, self CPU time of the ops over ``--steps``
   steps after a warm-up): the forward pass by part of the EM loop (encoder, RNN, decoder,
   E-step, loss; labelled by wrapping those parts for the profile only), the backward pass and
   the optimiser by kind of op. Then the step against the matmul peak: its FLOP/s now, and
   what it would reach if every conv and matmul ran at the peak while the rest (LayerNorm,
   activations, copies, the E-step, ...) took the time it takes now.
2. Around the steps, in ``train.fit`` itself (``cProfile`` of one epoch of 1,024 sequences with
   validation on 256, test on 256 and checkpoints): data reads, noise, the steps, validation
   and test (with the AMI and the BCE bound), checkpoint writes.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import os
import platform
import pstats
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench.bench_train import DTYPES, Step, matmul_peak, step_flops  # noqa: E402
from nem_study import batches, checkpoints, data, evaluate, model, train  # noqa: E402
from nem_study.config import RunConfig, replace  # noqa: E402
from nem_study.step import resolve_precision  # noqa: E402

# Op kinds for the backward pass and the optimiser (substrings of aten op names).
KINDS = [("conv", ("conv",)), ("matmul / linear", ("addmm", "mm", "linear")),
         ("LayerNorm", ("layer_norm",)), ("optimiser (Adam)", ("_foreach", "adam")),
         ("E-step softmax", ("softmax",)),
         ("activations", ("elu", "relu", "sigmoid", "threshold")),
         ("copies, casts", ("copy", "to", "clone", "contiguous", "cat", "stack", "view", "reshape"))]


class Labelled(nn.Module):
    """Runs ``inner`` inside a profiler range named ``label``."""

    def __init__(self, inner: nn.Module, label: str):
        super().__init__()
        self.inner, self.label = inner, label

    def forward(self, *args):
        with record_function(self.label):
            return self.inner(*args)


def labelled(fn, label):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def step_profile(cfg: RunConfig, steps: int, precision: str) -> None:
    step = Step(cfg, 64, precision=precision)
    cell = step.model.cell
    cell.encoder = Labelled(cell.encoder, "forward: encoder")
    cell.decoder = Labelled(cell.decoder, "forward: decoder")
    cell.W_x, cell.W_h = Labelled(cell.W_x, "forward: RNN"), Labelled(cell.W_h, "forward: RNN")
    model.e_step = labelled(model.e_step, "forward: E-step")
    model.em_loss = labelled(model.em_loss, "forward: loss")
    model.pixel_terms = labelled(model.pixel_terms, "forward: loss")
    step.run()
    plain = sorted(step.run() for _ in range(steps))[steps // 2]  # the same steps, unprofiled
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step.run()
    total, gemm, parts = 0.0, 0.0, defaultdict(float)
    for e in prof.events():
        total += e.self_cpu_time_total
        kind = next((k for k, subs in KINDS if any(s in e.name.lower() for s in subs)), "other elementwise")
        if kind in ("conv", "matmul / linear"):  # the ops with FLOPs, forward and backward
            gemm += e.self_cpu_time_total
        label, up = None, e
        while up is not None and label is None:  # the forward part this op ran in, if any
            label = up.name if up.name.startswith("forward: ") else None
            up = up.cpu_parent
        if label is None:
            label = f"backward, optimiser, noise: {kind}"
        parts[label] += e.self_cpu_time_total
    print(f"\n### Inside a training step ({precision}, {steps} steps, {total / steps / 1e6:.3f} s / step)\n")
    print("| part | s / step | share |")
    print("|---|---|---|")
    for name, us in sorted(parts.items(), key=lambda r: -r[1]):
        print(f"| {name} | {us / steps / 1e6:.3f} | {100 * us / total:.1f} % |")
    ceiling(cfg, plain, total / steps / 1e6, gemm / steps / 1e6, precision)


def ceiling(cfg: RunConfig, plain: float, profiled: float, gemm: float, precision: str) -> None:
    """How close to the matmul peak the step could get if every conv and matmul ran at the peak
    and everything else took the time it takes now."""
    flops, peak = step_flops(cfg, 64), matmul_peak(DTYPES[precision])
    rest = (profiled - gemm) * plain / profiled  # the profiler's overhead taken out in proportion
    print(f"\n### Against the {precision} matmul peak ({peak / 1e9:.0f} GFLOP/s in this run)\n")
    print(f"- one step unprofiled: {plain:.3f} s for {flops / 1e9:.1f} GFLOP = {flops / plain / 1e9:.0f} GFLOP/s, "
          f"{100 * flops / plain / peak:.0f} % of the peak")
    print(f"- convs and matmuls: {100 * gemm / profiled:.0f} % of the profiled step, at "
          f"{100 * flops / (gemm * plain / profiled) / peak:.0f} % of the peak; everything else "
          f"{rest:.3f} s")
    print(f"- with every conv and matmul at the peak and the rest as now: {flops / peak + rest:.3f} s, "
          f"{100 * flops / (flops / peak + rest) / peak:.0f} % of the peak")


def fit_parts() -> list[tuple[str, object]]:
    from nem_study import metrics
    from nem_study.data.store import Split

    return [("data reads (Split.batch)", Split.batch), ("noise (corrupt)", batches.corrupt),
            ("forward (every NEM.forward, also in evaluate)", model.NEM.forward), ("backward", torch.Tensor.backward),
            ("Adam step", torch.optim.Adam.step), ("validation + test (evaluate)", evaluate.evaluate),
            ("of which AMI", metrics.ami_matrix), ("of which BCE bound", metrics.bce_upper_bound),
            ("checkpoints (save_checkpoint)", checkpoints.save_checkpoint)]


def fit_profile(cfg: RunConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NEM_DATA_DIR"] = tmp
        cfg = replace(cfg, {"data.train": 1024, "data.valid": 256, "data.test": 256, "train.valid_samples": 256,
                            "train.test_each_epoch": 256, "train.max_epochs": 1,
                            "train.checkpoint_dir": str(Path(tmp) / "ckpt")})
        splits = {s: data.load(cfg.data, s, progress=False) for s in ("train", "valid", "test")}
        prof = cProfile.Profile()
        prof.enable()
        result = train.fit(cfg, splits, test=False)
        prof.disable()
    stats = pstats.Stats(prof).stats
    total = result["train_seconds"]
    print(f"\n### Around the steps: one epoch of `train.fit` ({result['precision']}, 1,024 sequences, "
          f"{total:.1f} s under cProfile)\n")
    print("| part | s | share of the epoch |")
    print("|---|---|---|")
    for name, fn in fit_parts():
        code = inspect.unwrap(fn).__code__
        ct = stats.get((code.co_filename, code.co_firstlineno, code.co_name), (0, 0, 0, 0.0))[3]
        print(f"| {name} | {ct:.2f} | {100 * ct / total:.1f} % |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {args.threads}; torch {torch.__version__}, python {platform.python_version()}")
    cfg = RunConfig.model_validate({"data": {"name": "flying_shapes"}, "train": {"precision": precision}})
    fit_profile(cfg.model_copy(deep=True))
    step_profile(cfg, args.steps, precision)


if __name__ == "__main__":
    main()
