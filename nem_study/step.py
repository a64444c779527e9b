"""One optimisation step on a device: which device, which precision, eager or a CUDA graph.

``train_step`` is forward over all EM steps, backward and Adam on one batch; ``GraphedStep``
replays it as a CUDA graph (``train.cuda_graph``); ``autocast`` applies ``train.precision``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nem_study.config import InputError
from nem_study.model import NEM, EMOutput


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 where it was measured faster (a CPU
    with AVX512-BF16 or AMX: 1.1-1.8x, BENCHMARKS.md), fp32 elsewhere (on an H100 bf16 was
    0.89-1.03x fp32: these networks are too small for the tensor cores to matter)."""
    if precision != "auto":
        return precision
    if device.type != "cpu":
        return "fp32"
    try:  # native bf16 dot products; emulated bf16 (plain AVX2/AVX-512) is slower than fp32
        fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # another torch version
        fast = False
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast of the networks' convs and matmuls (``train.precision``); fp32: a no-op.
    ``cache=False`` inside a CUDA graph capture, which must not keep autocast's weight casts."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache)


def train_step(model: NEM, optimizer: torch.optim.Optimizer, x_tilde: torch.Tensor, targets: torch.Tensor,
               noise: torch.Tensor, precision: str, cache: bool = True) -> EMOutput:
    """Forward over all EM steps, backward, Adam: one batch."""
    with autocast(x_tilde.device, precision, cache):
        out = model(x_tilde, targets, noise=noise)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    # Detached: the spent autograd graph is freed now, not when the next step replaces ``out``.
    return EMOutput(out.loss.detach(), out.intra.detach(), out.inter.detach(), None, None)


class GraphedStep:
    """A training step captured once as a CUDA graph and then replayed (``train.cuda_graph``).

    These networks are small: an eager step on a GPU spends its time launching a few thousand
    tiny kernels, one EM step after another. A replay launches them all at once. ``step(*inputs,
    cache=...)`` is the eager step (forward, backward, optimiser; ``train_step``). The first
    ``warmup`` calls run it eagerly on a side stream, as capture requires (cuDNN and cuBLAS set
    up, Adam's state created); the next call captures it and replays. Each later call copies its
    inputs into the captured tensors. The optimiser must be built with ``capturable=True``.
    """

    def __init__(self, step: Callable[..., Any], warmup: int = 3):
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(*inputs, cache=True)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.inputs = [t.clone() for t in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; the replay below runs them
                self.out = self.step(*self.inputs, cache=False)  # autocast must not cache in a graph
        else:
            for static, new in zip(self.inputs, inputs):
                static.copy_(new)
        self.graph.replay()
        return self.out
