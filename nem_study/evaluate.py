"""Evaluation of a network (NEM_SPEC.md §5): loss, AMI per EM step, the next-step BCE bound.

``evaluate`` scores a model on a split (the trainer's validation and test); the generalisation
tests (``generalisation``) score a trained network on another K, another object count, more time
steps, or a static image repeated for many steps (static transfer), each on a test set whose spec
is the training spec with the changed fields.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nem_study import data
from nem_study.batches import corrupt, target_labels, to_steps
from nem_study.capacity import check_batch
from nem_study.checkpoints import load_model
from nem_study.config import DataConfig, InputError, RunConfig
from nem_study.data import BACKGROUND, OVERLAP, Split
from nem_study.metrics import ami_matrix, bce_upper_bound
from nem_study.model import NEM
from nem_study.step import autocast


def component_shares(pred: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Per image, the share of object pixels each component wins, largest first: (B, K).

    A diagnostic for collapse: K = 3 on 3 objects should approach (1/3, 1/3, 1/3) when every
    component takes one object; (0.5, 0.5, 0) says one component is unused.
    """
    onehot = (pred[..., None] == np.arange(k)) & valid[..., None]         # (B, H, W, K)
    counts = onehot.reshape(len(pred), -1, k).sum(1).astype(np.float64)    # (B, K)
    with np.errstate(invalid="ignore"):
        return -np.sort(-counts / counts.sum(1, keepdims=True), axis=1)


@torch.no_grad()
def evaluate(model: NEM, split: Split, cfg: RunConfig, n: int | None = None, *,
             k: int | None = None, steps: int | None = None, static: bool | None = None,
             seed: int = 0, batch_size: int | None = None,
             average_method: str = "max", panel: str | Path | None = None) -> dict[str, Any]:
    """Loss, AMI per step (§5) and the next-step BCE bound of ``model`` on ``split``.

    ``ami`` is the score NEM_SPEC.md §5 reports: the last EM step's AMI on static inputs (static
    data, or a static transfer), the mean over steps on sequences; ``ami_mean`` and ``ami_last``
    are both kept under their own names, and ``ami_score`` says which one ``ami`` is.

    ``k``, ``steps`` and ``static`` override the run's values: the generalisation tests.
    ``static=True`` on a sequence set repeats each sequence's first frame (static transfer).
    ``panel``: also write a PNG of the first sequence's groupings (``plots.grouping_panel``).
    """
    model.eval()
    device = next(model.parameters()).device
    k = k or cfg.model.k
    static = cfg.data.is_static if static is None else static
    steps = steps or cfg.steps
    n = min(n or len(split), len(split))
    bs = batch_size or cfg.train.batch_size
    gen = torch.Generator(device).manual_seed(10_000 + seed)
    loss_sum, bce_sum = 0.0, torch.zeros(steps, dtype=torch.float64)
    amis, shares = [], []
    for lo in range(0, n, bs):
        idx = np.arange(lo, min(lo + bs, n))
        frames, labels = split.batch(idx)
        inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
        x_tilde = corrupt(inputs, cfg.noise, gen)                 # (T, B, 1, H, W)
        with autocast(device, cfg.train.precision):
            out = model(x_tilde, targets, k=k, generator=gen, collect=True)
        loss_sum += out.loss.item() * len(idx)
        bce = bce_upper_bound(out.psi.flatten(0, 1), targets.flatten(0, 1))  # (T*B,)
        bce_sum += bce.view(steps, -1).sum(1).double().cpu()
        # max's indices, not argmax: the same first maximum, 10x faster over this middle dim
        pred = out.gamma.max(2).indices.squeeze(2).transpose(0, 1)  # (B, T, H, W)
        true = target_labels(labels, steps, static)               # (B, T, H, W)
        valid = (true != BACKGROUND) & (true != OVERLAP)
        pred = pred.cpu().numpy()
        amis.append(ami_matrix(true, pred, valid, average_method=average_method))
        shares.append(component_shares(pred[:, -1], valid[:, -1], k))
        if panel and lo == 0:
            from nem_study.plots import grouping_panel

            grouping_panel(x_tilde[:, 0, 0].cpu(), out.psi[:, 0, :, 0].cpu(), out.gamma[:, 0, :, 0].cpu(),
                           true[0], panel, title=f"K = {k}, {'static' if static else 'sequence'}, "
                           f"test sequence {idx[0]}")
    model.train()
    ami = np.concatenate(amis)                                    # (N, T)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)           # a step with no objects: NaN
        per_step = np.nanmean(ami, axis=0)                        # (T,)
        q25, q75 = np.nanpercentile(ami, [25, 75], axis=0)        # (T,), (T,) Figure 6's band
    return {
        "loss": loss_sum / n,
        "ami_per_step": [float(a) for a in per_step],
        "ami": float(per_step[-1] if static else np.nanmean(per_step)),
        "ami_mean": float(np.nanmean(per_step)),
        "ami_last": float(per_step[-1]),
        "ami_q25_per_step": [float(a) for a in q25],
        "ami_q75_per_step": [float(a) for a in q75],
        "bce_per_step": [float(b) for b in bce_sum / n],
        "component_shares": [float(c) for c in np.nanmean(np.concatenate(shares), axis=0)],
        "bce_bound": float(bce_sum.mean() / n),
        "n": n, "k": k, "steps": steps, "static": static, "average_method": average_method,
        "ami_score": "last" if static else "mean",
    }


def test_spec(cfg: RunConfig, objects: int | None = None, steps: int | None = None) -> DataConfig:
    """The data spec of a generalisation test: the training spec, other objects / length."""
    change: dict[str, Any] = {}
    if objects is not None:
        change["objects"] = objects
    if steps is not None and not cfg.data.is_static and steps + 1 > cfg.data.frames:
        change["frames"] = steps + 1
    if not change:
        return cfg.data
    # Only the test split is used. Each split is seeded on its own (nem_study.data.synth), so
    # one train and one valid sequence leave the test sequences unchanged and cost nothing.
    change |= {"train": 1, "valid": 1}
    return DataConfig.model_validate(cfg.data.model_dump() | change)


def generalisation(checkpoint: str | Path, *, k: int | None = None, objects: int | None = None,
                   steps: int | None = None, static: bool = False, n: int | None = None,
                   mnist_path: str | None = None, device: str = "auto",
                   average_method: str = "max", panel: str | None = None) -> dict[str, Any]:
    """Evaluate the network of ``checkpoint`` with the given changes on its test set."""
    model, cfg, ckpt = load_model(checkpoint, device)
    if k is not None and k < 1:
        raise InputError(f"--k must be >= 1, got {k}")
    spec = test_spec(cfg, objects, steps)
    changed = " ".join(f"--{name} {v}" for name, v in (("k", k), ("steps", steps)) if v is not None)
    check_batch(cfg, k=k, steps=steps, source=changed or None)  # before any test data are made
    split = data.load(spec, "test", mnist_path=mnist_path)
    result = evaluate(model, split, cfg, n or cfg.train.test_samples, k=k, steps=steps,
                      static=static or None, seed=cfg.train.seed, average_method=average_method,
                      panel=panel)
    return {"checkpoint": str(checkpoint), "epoch": ckpt["epoch"],
            "train": {"k": cfg.model.k, "objects": cfg.data.objects, "steps": cfg.steps},
            "test": {"k": result["k"], "objects": spec.objects, "steps": result["steps"],
                     "static": result["static"]}} | result
