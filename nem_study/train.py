"""Training: ``fit`` trains one run, or the stacked seeds of one grid cell, with one epoch loop.

Adam, early stopping on the validation loss, best and last checkpoints, resume, a time budget
and a final test evaluation (NEM_SPEC.md §3, §5). What trains, one network or a vmapped stack,
is ``nem_study.members``. It reports through a plain callback and imports neither Ray nor MLflow.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nem_study.batches import corrupt, gamma0_noise, to_steps
from nem_study.checkpoints import load_checkpoint, save_checkpoint
from nem_study.config import InputError, RunConfig
from nem_study.data import Split
from nem_study.evaluate import evaluate
from nem_study.members import Single, Stack, check_members
from nem_study.model import NEM
from nem_study.step import pick_device, resolve_precision

FAILED = "failed.txt"  # in an ensemble member's checkpoint folder: why its loss became non-finite


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message says where."""


# ----------------------------------------------------------------------------------------
# Training


def fit(cfg: RunConfig | Sequence[RunConfig], splits: Mapping[str, Split], report: Callable | None = None,
        resume: str | Path | None = None, progress: bool = False, init: str | Path | None = None,
        test: bool = True, panel: str | Path | Callable[[int], str | Path | None] | None = None):
    """Train until early stopping, max_epochs or the time budget; return the test metrics.

    One config is a plain run: checkpoints in ``train.checkpoint_dir``, ``report(metrics,
    checkpoint_dir)`` per epoch, a non-finite loss raises ``NonFiniteLoss``, one result dict.
    A list of configs that differ only in ``train.seed`` is an ensemble, trained as one
    ``members.Stack``: member s keeps its checkpoints in ``<checkpoint_dir>/seed<s>/``, one
    ``report({member index: metrics}, checkpoint_dir)`` per epoch, a member whose loss turns
    non-finite fails alone (its result ``{"failed": reason}``), one result per member. Each member
    trains as it would alone: weights, data order and noise from its seed, its own stopping.

    ``splits`` holds "train", "valid" and (with ``test``) "test" (see ``nem_study.data.load``).
    ``resume``: a checkpoint (file or folder; an ensemble's: the root) to continue from, with the
    optimiser and counters; ``init``: one whose weights only start a fresh run (a curriculum's
    next stage). ``panel``: the final test also draws test sequence 0's groupings there (a PNG;
    for an ensemble, a function of the member index).
    """
    stacked = not isinstance(cfg, RunConfig)
    cfgs = list(cfg) if stacked else [cfg]
    if stacked:
        check_members(cfgs)
    tc, E, seeds = cfgs[0].train, len(cfgs), [c.train.seed for c in cfgs]
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    root = Path(tc.checkpoint_dir) if tc.checkpoint_dir else None

    def folder(base: Path | None, e: int) -> Path | None:  # member e's checkpoint folder
        return member_dir(base, seeds[e]) if stacked and base is not None else base

    # Each member's start: weights from its seed, or its own last.pt (or failed.txt).
    models, optim_states, weights = [], [], {}
    epochs, best_loss, best_epoch = [0] * E, [math.inf] * E, [0] * E
    history: list[list[dict[str, Any]]] = [[] for _ in range(E)]
    failed: dict[int, str] = {}  # member -> why its loss became non-finite
    for e in range(E):
        torch.manual_seed(seeds[e])
        model = NEM(cfgs[e].model, cfgs[e].data.image_size).to(device)
        ckpt = None
        if resume is not None:
            where = folder(Path(resume), e)
            if stacked and (where / FAILED).is_file():
                failed[e] = (where / FAILED).read_text()
            else:
                ckpt = load_checkpoint(where / "last.pt" if stacked else where)
        elif init is not None:
            model.load_state_dict(load_checkpoint(init)["model"])
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            epochs[e], best_loss[e], best_epoch[e] = ckpt["epoch"], ckpt["best_valid_loss"], ckpt["best_epoch"]
            history[e] = ckpt["history"]
        models.append(model)
        optim_states.append(ckpt["optimizer"] if ckpt is not None else None)
        weights[e] = model.state_dict()  # the member's latest weights, for a test without best.pt

    stop_reason: dict[int, str] = {}
    for e in range(E):  # members that had stopped before a restart stay so
        if e in failed:
            continue
        if epochs[e] and epochs[e] - best_epoch[e] >= tc.patience:
            stop_reason[e] = "early_stopping"
        elif epochs[e] >= tc.max_epochs:
            stop_reason[e] = "max_epochs"
    active = [e for e in range(E) if e not in stop_reason and e not in failed]
    if len({epochs[e] for e in active}) > 1:
        raise InputError(f"{resume}: the members' last.pt are at different epochs "
                         f"({ {seeds[e]: epochs[e] for e in active} }); not one ensemble's checkpoints")
    if root:
        for e in range(E):
            folder(root, e).mkdir(parents=True, exist_ok=True)
    if not stacked:
        learner = Single(models[0], optim_states[0], cfgs[0], device)
    elif active:
        learner = Stack(models[0], [weights[e] for e in active], [optim_states[e] for e in active], tc.lr,
                        precision=tc.precision)
    probe = models[0] if not stacked else copy.deepcopy(models[0])  # evaluates a member's weights

    train, valid = splits["train"], splits["valid"]
    steps, static = cfgs[0].steps, cfgs[0].data.is_static
    n_batches = len(train) // tc.batch_size or 1
    start_epoch = epochs[active[0]] + 1 if active else tc.max_epochs + 1
    # A resumed run's time budget and train_seconds go on from the epochs it already trained
    # (a member that had stopped before the restart counts too: its summary keeps its seconds).
    t_start = time.monotonic() - max((sum(m["epoch_seconds"] for m in history[e]) for e in range(E) if e not in failed),
                                     default=0.0)
    for epoch in range(start_epoch, tc.max_epochs + 1):
        t0 = time.monotonic()
        # Shuffling and noise depend only on (seed, epoch): a resumed run repeats them exactly.
        orders = {e: np.random.default_rng([seeds[e], epoch]).permutation(len(train)) for e in active}
        gens = {e: torch.Generator(device).manual_seed(seeds[e] * 1_000_003 + epoch) for e in active}
        total = dict.fromkeys(active, 0.0)
        bar = progress_bar(n_batches, f"epoch {epoch}" + (f" ({len(active)} members)" if stacked else ""), progress)
        for b in range(n_batches):
            xs, ts, ns = [], [], []
            for e in active:
                idx = np.sort(orders[e][b * tc.batch_size:(b + 1) * tc.batch_size])
                frames, _ = train.batch(idx)
                inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
                xs.append(corrupt(inputs, cfgs[e].noise, gens[e]))            # (T, B, 1, H, W)
                ts.append(targets)                                            # (T, B, 1, H, W)
                ns.append(gamma0_noise(inputs, cfgs[e].model.k, gens[e]))     # (B, K, 1, H, W)
            loss, intra, inter = learner.step(torch.stack(xs), torch.stack(ts), torch.stack(ns))
            values = loss.tolist()                                            # (E,)
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            for i, e in enumerate(active):
                total[e] += values[i]
                if i in bad:
                    failed[e] = (f"non-finite loss ({values[i]}) at epoch {epoch}, batch {b + 1} of {n_batches}: "
                                 f"intra {intra[i].tolist()}, inter {inter[i].tolist()}")
                    if root and stacked:  # a restarted ensemble leaves it out
                        (folder(root, e) / FAILED).write_text(failed[e])
            if bad:
                learner, active = learner.drop(bad), [e for i, e in enumerate(active) if i not in bad]
                if not active:
                    break
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(total[e] for e in active) / len(active) / (b + 1):.1f}")
        if bar is not None:
            bar.close()
        if not active:
            break

        # Each member's validation, checkpoints and stopping.
        by_member, stopped = {}, []
        for i, e in enumerate(active):
            state, optim = learner.member(i)
            probe.load_state_dict(state)
            weights[e] = state
            val = evaluate(probe, valid, cfgs[e], tc.valid_samples, seed=seeds[e])  # same noise every epoch
            improved = val["loss"] < best_loss[e]
            if improved:
                best_loss[e], best_epoch[e] = val["loss"], epoch
            seconds = time.monotonic() - t0
            metrics = {
                "epoch": epoch, "train_loss": total[e] / n_batches, "valid_loss": val["loss"],
                "valid_ami": val["ami"], "valid_ami_mean": val["ami_mean"], "valid_ami_last": val["ami_last"],
                "best_valid_loss": best_loss[e], "best_epoch": best_epoch[e], "epoch_seconds": seconds,
                "sequences_per_second": n_batches * tc.batch_size / seconds,
                "sequences_seen": epoch * n_batches * tc.batch_size,   # the budget, against the paper's
            }
            if tc.test_each_epoch:
                t = evaluate(probe, splits["test"], cfgs[e], tc.test_each_epoch, seed=seeds[e])
                metrics |= {"test_ami": t["ami"], "test_ami_mean": t["ami_mean"], "test_ami_last": t["ami_last"]}
            history[e].append(metrics)
            by_member[e] = metrics
            if root:
                saved = dict(config=cfgs[e].model_dump(mode="json"), model=state, optimizer=optim, epoch=epoch,
                             best_valid_loss=best_loss[e], best_epoch=best_epoch[e], history=history[e])
                save_checkpoint(folder(root, e) / "last.pt", **saved)
                if improved:
                    save_checkpoint(folder(root, e) / "best.pt", **saved)
            if progress:
                print(f"epoch {epoch}{f' seed {seeds[e]}' if stacked else ''}: train {metrics['train_loss']:.2f}  "
                      f"valid {val['loss']:.2f}  valid AMI {val['ami']:.3f}{'  *' if improved else ''}", flush=True)
            epochs[e] = epoch
            if epoch - best_epoch[e] >= tc.patience:
                stop_reason[e] = "early_stopping"
                stopped.append(i)
        if report is not None:
            report(by_member if stacked else by_member[0], root)
        if tc.time_budget_s and time.monotonic() - t_start > tc.time_budget_s:
            for e in active:
                stop_reason.setdefault(e, "time_budget")
            break
        if stopped:  # stopped members leave; the others go on
            learner, active = learner.drop(stopped), [e for i, e in enumerate(active) if i not in stopped]
        if not active:
            break
    for e in active:
        stop_reason.setdefault(e, "max_epochs")

    # Each member's summary, and its final test with its best weights (the kept checkpoint), as the paper does.
    results = []
    train_seconds = time.monotonic() - t_start
    for e in range(E):
        if e in failed:
            if not stacked:
                raise NonFiniteLoss(failed[e])
            results.append({"failed": failed[e], "epochs": epochs[e]})
            continue
        summary = {"epochs": epochs[e], "best_epoch": best_epoch[e], "best_valid_loss": best_loss[e],
                   "sequences_seen": epochs[e] * n_batches * tc.batch_size, "stop_reason": stop_reason[e],
                   "train_seconds": train_seconds, "precision": resolve_precision(tc.precision, device)}
        if stacked:
            summary["ensemble_size"] = E
        best = folder(root, e) / "best.pt" if root else None
        if best is not None and best.is_file():
            summary["checkpoint"] = str(best)
        if test:
            probe.load_state_dict(load_checkpoint(best)["model"] if "checkpoint" in summary else weights[e])
            where = panel(e) if callable(panel) else panel
            result = evaluate(probe, splits["test"], cfgs[e], tc.test_samples, seed=seeds[e], panel=where)
            summary = {"test_" + k: v for k, v in result.items()} | summary
        results.append(summary)
    return results if stacked else results[0]


def member_dir(root: Path | None, seed: int) -> Path | None:
    """An ensemble member's checkpoint folder (and its panels' in a trial folder)."""
    return root / f"seed{seed}" if root is not None else None


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
