"""UpConv (sub-pixel 3x3 conv + pixel shuffle) against upsample -> pad -> 4x4 conv.

Times the flying-shapes training step (batch 64, T = 20, K = 3) with the project's UpConv, with
the plain PyTorch layers it replaces, and with UpConv handing conv2d its kernel made contiguous
(einsum returns a channels-last view for the 32 -> 1 up-conv, and conv2d then copies its input
to channels-last). Same weights, alternating, in one process.

    .venv/bin/python bench/bench_upconv.py [--repeats 5] [--threads 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from nem_study.config import RunConfig
from nem_study.model import NEM
from nem_study.networks import UpConv


class PlainUpConv(nn.Module):
    """The reference: nearest upsample x2, TF-SAME padding (1, 2), 4x4 conv."""

    def __init__(self, layer: UpConv):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x):
        return F.conv2d(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 2, 1, 2)),
                        self.weight, self.bias)


class ContiguousKernelUpConv(UpConv):
    """UpConv with its kernel made contiguous before the conv (tried in 1d31b6e, reverted)."""

    def __init__(self, layer: UpConv):
        nn.Module.__init__(self)
        self.weight, self.bias, self.taps = layer.weight, layer.bias, layer.taps

    def kernel(self):
        return super().kernel().contiguous()


def swap_in(module: nn.Module, cls) -> None:
    for name, child in module.named_children():
        if isinstance(child, UpConv):
            setattr(module, name, cls(child))
        else:
            swap_in(child, cls)


def step(model, opt, x, precision):
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(x, x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return time.perf_counter() - t0, out.loss.item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig(data={"name": "flying_shapes"})
    models = {}
    variants = {"UpConv": None, "UpConv, contiguous kernel": ContiguousKernelUpConv, "plain": PlainUpConv}
    for name, cls in variants.items():
        torch.manual_seed(0)
        models[name] = NEM(cfg.model, 28)
        if cls is not None:
            swap_in(models[name], cls)
    opts = {n: torch.optim.SGD(m.parameters(), lr=0.0) for n, m in models.items()}  # lr 0: same weights
    x = (torch.rand(20, 64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.85).float()
    times = {n: [] for n in models}
    losses = {}
    for i in range(args.repeats + 1):
        for n in models:
            torch.manual_seed(i)  # same gamma_0 for both
            t, losses[n] = step(models[n], opts[n], x, args.precision)
            if i:
                times[n].append(t)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"torch {torch.__version__}, threads {args.threads}, {args.precision}, batch 64, T = 20, K = 3, "
          f"median of {args.repeats} steps")
    for n in models:
        print(f"{n:31s}: {med[n]:.3f} s / step, {64 / med[n]:.1f} sequences / s, loss {losses[n]:.4f}, "
              f"time {med[n] / med['UpConv']:.2f}x UpConv's, relative loss difference "
              f"{abs(losses[n] - losses['UpConv']) / losses['UpConv']:.1e}")


if __name__ == "__main__":
    main()
