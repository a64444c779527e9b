"""One training run: ``fit(config)``, and a curriculum of them: ``fit_curriculum``.

Adam, early stopping on the validation loss, best and last checkpoints, resume, and a final
test evaluation (NEM_SPEC.md §3, §5). It reports through a plain callback
``report(metrics: dict, checkpoint_dir: Path | None)`` and imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nem_study.batches import corrupt, gamma0_noise, to_steps
from nem_study.checkpoints import load_checkpoint, save_checkpoint
from nem_study.config import InputError, RunConfig, replace
from nem_study.data import Split
from nem_study.evaluate import evaluate
from nem_study.model import NEM
from nem_study.step import GraphedStep, pick_device, resolve_precision, train_step

Report = Callable[[dict[str, Any], Path | None], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message says where."""


# ----------------------------------------------------------------------------------------
# Training


def fit(cfg: RunConfig, splits: Mapping[str, Split], report: Report | None = None,
        resume: str | Path | None = None, progress: bool = False, init: str | Path | None = None,
        test: bool = True, panel: str | Path | None = None) -> dict[str, Any]:
    """Train until early stopping, max_epochs or the time budget; return test metrics.

    ``splits`` holds "train", "valid" and (with ``test``) "test" (see ``nem_study.data.load``).
    ``resume`` is a checkpoint (file or directory) to continue from, with its optimiser and
    counters; ``init`` one whose weights only start a fresh run (a curriculum's next stage).
    ``panel``: the final test also draws test sequence 0's groupings there (a PNG).
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    model = NEM(cfg.model, cfg.data.image_size).to(device)
    if tc.compile:
        # In place, so checkpoint keys stay eager's; static shapes, because a dynamic-shape
        # recompile of the flying-MNIST cell fails in torch 2.13's inductor.
        model.cell.compile(dynamic=False)
    graphed = tc.cuda_graph and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, capturable=graphed)
    ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else None
    if ckpt_dir:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    start_epoch, best_loss, best_epoch, history = 1, math.inf, 0, []
    if init is not None and resume is None:
        model.load_state_dict(load_checkpoint(init)["model"])
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
        best_loss, best_epoch, history = ckpt["best_valid_loss"], ckpt["best_epoch"], ckpt["history"]

    def step(x_tilde, targets, noise, cache=True):
        return train_step(model, optimizer, x_tilde, targets, noise, tc.precision, cache)
    if graphed:
        step = GraphedStep(step)
    train, valid = splits["train"], splits["valid"]
    steps, static = cfg.steps, cfg.data.is_static
    n_batches = len(train) // tc.batch_size or 1
    # A resumed run's time budget and train_seconds go on from the epochs it already trained.
    t_start = time.monotonic() - sum(m["epoch_seconds"] for m in history)
    stop_reason = "max_epochs"
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.max_epochs + 1):
        t0 = time.monotonic()
        # Shuffling and noise depend only on (seed, epoch): a resumed run repeats them exactly.
        order = np.random.default_rng([tc.seed, epoch]).permutation(len(train))
        gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + epoch)
        bar = progress_bar(n_batches, f"epoch {epoch}", progress)
        total = 0.0
        for b in range(n_batches):
            idx = np.sort(order[b * tc.batch_size:(b + 1) * tc.batch_size])
            frames, _ = train.batch(idx)
            inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
            x_tilde = corrupt(inputs, cfg.noise, gen)                 # (T, B, 1, H, W)
            noise = gamma0_noise(inputs, cfg.model.k, gen)             # (B, K, 1, H, W)
            out = step(x_tilde, targets, noise)
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss}) at epoch {epoch}, batch {b + 1} of "
                                    f"{n_batches}: intra {out.intra.tolist()}, inter {out.inter.tolist()}")
            total += loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / (b + 1):.1f}")
        if bar is not None:
            bar.close()
        val = evaluate(model, valid, cfg, tc.valid_samples, seed=tc.seed)  # same noise every epoch
        improved = val["loss"] < best_loss
        if improved:
            best_loss, best_epoch = val["loss"], epoch
        metrics = {
            "epoch": epoch, "train_loss": total / n_batches, "valid_loss": val["loss"],
            "valid_ami": val["ami"], "valid_ami_mean": val["ami_mean"], "valid_ami_last": val["ami_last"],
            "best_valid_loss": best_loss, "best_epoch": best_epoch,
            "epoch_seconds": time.monotonic() - t0,
            "sequences_per_second": n_batches * tc.batch_size / (time.monotonic() - t0),
            "sequences_seen": epoch * n_batches * tc.batch_size,   # the budget, against the paper's
        }
        if tc.test_each_epoch:
            test = evaluate(model, splits["test"], cfg, tc.test_each_epoch, seed=tc.seed)
            metrics |= {"test_ami": test["ami"], "test_ami_mean": test["ami_mean"], "test_ami_last": test["ami_last"]}
        history.append(metrics)
        if ckpt_dir:
            state = dict(config=cfg.model_dump(mode="json"), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), epoch=epoch, best_valid_loss=best_loss,
                         best_epoch=best_epoch, history=history)
            save_checkpoint(ckpt_dir / "last.pt", **state)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", **state)
        if progress:
            print(f"epoch {epoch}: train {metrics['train_loss']:.2f}  valid {val['loss']:.2f}  "
                  f"valid AMI {val['ami']:.3f}{'  *' if improved else ''}", flush=True)
        if report is not None:
            report(metrics, ckpt_dir)
        if epoch - best_epoch >= tc.patience:
            stop_reason = "early_stopping"
            break
        if tc.time_budget_s and time.monotonic() - t_start > tc.time_budget_s:
            stop_reason = "time_budget"
            break

    summary = {"epochs": epoch, "best_epoch": best_epoch, "best_valid_loss": best_loss,
               "sequences_seen": epoch * n_batches * tc.batch_size, "stop_reason": stop_reason,
               "train_seconds": time.monotonic() - t_start,
               "precision": resolve_precision(tc.precision, device)}
    best = ckpt_dir / "best.pt" if ckpt_dir else None
    if best is not None and best.is_file():
        summary["checkpoint"] = str(best)
    if not test:
        return summary
    # Test with the best weights (the kept checkpoint), as the paper does.
    if best is not None and best.is_file():
        model.load_state_dict(load_checkpoint(best)["model"])
    result = evaluate(model, splits["test"], cfg, tc.test_samples, seed=tc.seed, panel=panel)
    return {"test_" + k: v for k, v in result.items()} | summary


# ----------------------------------------------------------------------------------------
# A curriculum: one fit per stage, each starting from the previous stage's best weights


def curriculum_stages(cfg: RunConfig) -> list[RunConfig]:
    """One run config per stage (``data.digit_pool`` = the stage's pool); ``[cfg]`` without one."""
    if not cfg.data.curriculum:
        return [cfg]
    raw = cfg.model_dump(mode="json")
    return [RunConfig.model_validate(raw | {"data": raw["data"] | {"curriculum": None, "digit_pool": pool}})
            for pool in cfg.data.curriculum]


def fit_curriculum(cfg: RunConfig, load: Callable[[Any, str], Split], report: Report | None = None,
                   resume: str | Path | None = None, progress: bool = False,
                   panel: str | Path | None = None) -> dict[str, Any]:
    """``fit`` stage after stage of ``data.curriculum`` (NEM_SPEC.md §4); one stage without one.

    ``load(data_config, split)`` returns a split. Each stage has its own early stopping and
    checkpoints in ``<checkpoint_dir>/stage<i>/``; a finished stage leaves ``stage.json``, so a
    resumed run (``resume`` = the checkpoint folder) skips it. Only the last stage is tested.
    Every report carries ``stage`` and ``iteration``, the epoch counted over all stages.
    """
    stages = curriculum_stages(cfg)
    final = stages[-1]
    root = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else None
    if len(stages) > 1 and root is None:
        raise InputError("data.curriculum needs train.checkpoint_dir (stages start from the previous best.pt)")
    splits = {"valid": load(final.data, "valid"), "test": load(final.data, "test")}
    offset, init, done = 0, None, []
    for i, stage in enumerate(stages, start=1):
        stage_dir = root / f"stage{i}" if len(stages) > 1 else root
        if stage_dir is not None:
            stage = replace(stage, {"train.checkpoint_dir": str(stage_dir)})
        marker = stage_dir / "stage.json" if len(stages) > 1 else None
        if marker is not None and marker.is_file():  # finished before a restart
            done.append(json.loads(marker.read_text()))
            offset, init = offset + done[-1]["epochs"], stage_dir / "best.pt"
            continue
        stage_resume = resume
        if len(stages) > 1 and resume is not None:  # the stage's own last.pt, if it got that far
            stage_resume = stage_dir / "last.pt" if (stage_dir / "last.pt").is_file() else None

        def stage_report(metrics: dict[str, Any], _dir: Path | None, i: int = i, offset: int = offset) -> None:
            if report is not None:
                per_epoch = metrics["sequences_seen"] // metrics["epoch"]
                report(metrics | {"stage": i, "iteration": offset + metrics["epoch"],
                                  "sequences_seen": (offset + metrics["epoch"]) * per_epoch}, root)

        if progress and len(stages) > 1:
            print(f"stage {i} of {len(stages)}: digit pool {stage.data.digit_pool}", flush=True)
        splits["train"] = load(stage.data, "train")
        result = fit(stage, splits, stage_report, stage_resume, progress, init=init, test=i == len(stages),
                     panel=panel)
        if marker is not None and i < len(stages):
            done.append({"stage": i, "digit_pool": stage.data.digit_pool} |
                        {k: result[k] for k in ("epochs", "best_epoch", "best_valid_loss", "stop_reason")})
            marker.write_text(json.dumps(done[-1]))
        offset, init = offset + result["epochs"], result.get("checkpoint")
    if len(stages) > 1:
        result |= {"epochs": offset, "stages": done,
                   "sequences_seen": offset * (result["sequences_seen"] // max(result["epochs"], 1))}
    return result


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
