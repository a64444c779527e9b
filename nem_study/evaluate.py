"""Generalisation tests of a trained network (NEM_SPEC.md §5).

The same weights on another K, another object count, more time steps, or a static image
repeated for many steps (static transfer). Each test is one evaluation on a test set whose
spec is the training spec with the changed fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nem_study import data
from nem_study.capacity import check_batch
from nem_study.config import DataConfig, InputError, RunConfig
from nem_study.train import evaluate, load_model


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
