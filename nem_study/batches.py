"""Batches: cached frames -> the EM loop's inputs and targets, and the noise drawn per step.

Step-major tensors (T, B, 1, H, W) as the model takes them (NEM_SPEC.md §1.3, §3). The random
draws (the corruption x_tilde, gamma_0's noise) are made here, by the caller of a step, so that
a step holds no random draws of its own (a CUDA graph replays fixed kernels).
"""

from __future__ import annotations

import numpy as np
import torch

from nem_study.config import InputError, NoiseConfig


def to_steps(frames: torch.Tensor, steps: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean frames (B, F, H, W) -> step-major inputs and targets, each (T, B, 1, H, W).

    Sequences predict the next frame: input frame t, target frame t + 1 (§1.3).
    Static data repeat one image for every EM step, and the target is the image itself.
    """
    x = frames.transpose(0, 1).unsqueeze(2)                       # (F, B, 1, H, W)
    if static:
        x0 = x[:1].expand(steps, *x.shape[1:])                    # (T, B, 1, H, W)
        return x0, x0
    if x.shape[0] < steps + 1:
        raise InputError(f"the data have {x.shape[0]} frames, {steps} steps need {steps + 1}")
    return x[:steps], x[1:steps + 1]


def target_labels(labels: np.ndarray, steps: int, static: bool) -> np.ndarray:
    """Label maps (B, F, H, W) of each step's target, (B, T, H, W)."""
    return np.repeat(labels[:, :1], steps, axis=1) if static else labels[:, 1:steps + 1]


def corrupt(x: torch.Tensor, noise: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """x_tilde, drawn fresh for every step (§3): bitflip x^n or masked uniform m u + (1-m) x."""
    if noise.kind == "none" or noise.prob == 0:
        return x
    m = torch.rand(x.shape, generator=generator, device=x.device) < noise.prob
    if noise.kind == "bitflip":
        return torch.where(m, 1.0 - x, x)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(m, u, x)


def gamma0_noise(inputs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """gamma_0's N(0, 1) draw for a batch of inputs (T, B, C, H, W): (B, K, C, H, W).

    Drawn by the caller, after ``corrupt``, so that the step itself holds no random draws
    (a CUDA graph replays fixed kernels) and eager and graphed training see the same numbers.
    """
    return torch.randn((inputs.shape[1], k, *inputs.shape[2:]), generator=generator, device=inputs.device)
