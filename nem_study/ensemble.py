"""The seeds of one grid cell trained together as one vectorised model: ``fit_ensemble``.

E run configs that differ only in ``train.seed`` share their shapes, so their networks can be
stacked (``torch.func.stack_module_state``) and run as one ``vmap``-ed forward and backward
per batch: E small trials become one larger one, which a GPU runs at a far better utilisation
(issue 6; BENCHMARKS.md). One Adam over the stacked weights is E independent Adams, since Adam
is elementwise. Every member keeps what ``train.fit`` would give it: its initial weights, data
order and noise (all from its seed), its early stopping, its checkpoints (``fit``'s format, in
``<checkpoint_dir>/seed<s>/``) and its final test; ``tests/test_ensemble.py`` checks that a
member trains as ``fit`` does. A member whose loss turns non-finite fails alone.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from nem_study.batches import corrupt, gamma0_noise, to_steps
from nem_study.checkpoints import load_checkpoint, save_checkpoint
from nem_study.config import InputError, RunConfig
from nem_study.data import Split
from nem_study.evaluate import evaluate
from nem_study.model import NEM
from nem_study.step import autocast, pick_device, resolve_precision
from nem_study.train import progress_bar

# report({member index: that member's epoch metrics}, checkpoint root) once per epoch
EnsembleReport = Callable[[dict[int, dict[str, Any]], Path | None], None]
FAILED = "failed.txt"  # in a member's checkpoint folder: why its loss became non-finite


def check_members(cfgs: list[RunConfig]) -> None:
    """Members must be one grid cell: equal configs but for ``train.seed``."""
    if not cfgs:
        raise InputError("an ensemble needs at least one member")
    seeds = [c.train.seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"ensemble members need distinct train.seed values, got {seeds}")
    first = cfgs[0].model_dump(mode="json")
    for cfg in cfgs[1:]:
        other = cfg.model_dump(mode="json")
        other["train"]["seed"] = first["train"]["seed"]
        if other != first:
            raise InputError("ensemble members must differ only in train.seed")
    if cfgs[0].data.curriculum:
        raise InputError("data.curriculum: an ensemble trains one stage (run curricula as single trials)")
    if cfgs[0].train.compile:
        raise InputError("train.compile: not supported in an ensemble (vmap runs the eager network)")


def member_dir(root: Path | None, seed: int) -> Path | None:
    return root / f"seed{seed}" if root is not None else None


class Stack:
    """The active members' weights stacked along a new first dim, and their Adam."""

    def __init__(self, template: NEM, states: list[dict[str, torch.Tensor]], optim_states: list[dict | None],
                 lr: float, capturable: bool = False):
        self.template = copy.deepcopy(template).to("meta")   # the network's structure, no weights
        models = []
        for state in states:
            m = copy.deepcopy(template)
            m.load_state_dict(state)
            models.append(m)
        self.params, self.buffers = stack_module_state(models)  # each (E, *shape)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=lr, capturable=capturable)
        if optim_states[0] is not None:                          # resumed members: stack their Adam
            first = optim_states[0]
            stacked = {"param_groups": first["param_groups"], "state": {}}
            for i in first["state"]:
                stacked["state"][i] = {
                    "step": first["state"][i]["step"],           # equal: the members train in step
                    "exp_avg": torch.stack([o["state"][i]["exp_avg"] for o in optim_states]),
                    "exp_avg_sq": torch.stack([o["state"][i]["exp_avg_sq"] for o in optim_states])}
            self.optimizer.load_state_dict(stacked)

    def member(self, e: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Member e's (model state_dict, Adam state_dict), as ``fit`` saves them."""
        state = {n: p[e].detach().clone() for n, p in self.params.items()}
        optim = self.optimizer.state_dict()
        per_member = {"param_groups": optim["param_groups"], "state": {
            i: {"step": s["step"].clone(), "exp_avg": s["exp_avg"][e].clone(), "exp_avg_sq": s["exp_avg_sq"][e].clone()}
            for i, s in optim["state"].items()}}
        return state, per_member

    def train_step(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, precision: str,
                   cache: bool = True):
        """Forward, backward and Adam for every member at once; their losses, detached:
        (E,), (E, T), (E, T). ``cache=False`` inside a CUDA graph capture (``train.autocast``)."""
        with autocast(x_tilde.device, precision, cache):
            loss, intra, inter = self.losses(x_tilde, targets, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # d sum / d loss_e = 1: each member gets its own gradient
        self.optimizer.step()
        return loss.detach(), intra.detach(), inter.detach()

    def losses(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor):
        """Every member's EM loss on its own batch: inputs (E, T, B, 1, H, W) -> (E,), (E, T), (E, T)."""

        def one(params, buffers, x_tilde, targets, noise):
            out = functional_call(self.template, (params, buffers), (x_tilde, targets), {"noise": noise})
            return out.loss, out.intra, out.inter

        return vmap(one)(self.params, self.buffers, x_tilde, targets, noise)


def fit_ensemble(cfgs: list[RunConfig], splits: Mapping[str, Split], report: EnsembleReport | None = None,
                 resume: str | Path | None = None, progress: bool = False, test: bool = True,
                 panel: Callable[[int], str | Path | None] | None = None) -> list[dict[str, Any]]:
    """Train the members of ``cfgs`` together; return one result per member, in ``fit``'s format.

    ``resume``: the checkpoint root of an interrupted ensemble (each member's ``last.pt``). A
    member that failed has ``{"failed": reason}`` as its result. ``panel(e)``: where member e's
    final test draws its groupings, or None.
    """
    check_members(cfgs)
    cfg, tc = cfgs[0], cfgs[0].train
    E = len(cfgs)
    seeds = [c.train.seed for c in cfgs]
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device)
    root = Path(tc.checkpoint_dir) if tc.checkpoint_dir else None

    # Each member's start, as fit makes it: weights from its seed, or its own last.pt.
    template, states, optim_states = None, [], []
    epochs, best_loss, best_epoch = [0] * E, [math.inf] * E, [0] * E
    history: list[list[dict[str, Any]]] = [[] for _ in range(E)]
    failed: dict[int, str] = {}  # member -> why its loss became non-finite
    for e, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = NEM(cfg.model, cfg.data.image_size).to(device)
        template = template or model
        if resume is not None and (member_dir(Path(resume), seed) / FAILED).is_file():
            failed[e] = (member_dir(Path(resume), seed) / FAILED).read_text()
            optim_states.append(None)
        elif resume is not None:
            ckpt = load_checkpoint(member_dir(Path(resume), seed) / "last.pt")
            model.load_state_dict(ckpt["model"])
            epochs[e], best_loss[e], best_epoch[e] = ckpt["epoch"], ckpt["best_valid_loss"], ckpt["best_epoch"]
            history[e] = ckpt["history"]
            optim_states.append(ckpt["optimizer"])
        else:
            optim_states.append(None)
        states.append(model.state_dict())

    stop_reason: dict[int, str] = {}
    for e in range(E):  # members that had stopped or failed before the restart stay so
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
        for seed in seeds:
            member_dir(root, seed).mkdir(parents=True, exist_ok=True)

    train, valid = splits["train"], splits["valid"]
    steps, static = cfg.steps, cfg.data.is_static
    n_batches = len(train) // tc.batch_size or 1
    start_epoch = (epochs[active[0]] + 1) if active else tc.max_epochs + 1
    stack = Stack(template, [states[e] for e in active], [optim_states[e] for e in active], tc.lr) if active else None
    # A resumed ensemble's time budget goes on from the epochs it already trained.
    t_start = time.monotonic() - max((sum(m["epoch_seconds"] for m in history[e]) for e in active), default=0.0)
    probe = copy.deepcopy(template)  # a member's weights, for its evaluation

    for epoch in range(start_epoch, tc.max_epochs + 1):
        if not active:
            break
        t0 = time.monotonic()
        orders = {e: np.random.default_rng([seeds[e], epoch]).permutation(len(train)) for e in active}
        gens = {e: torch.Generator(device).manual_seed(seeds[e] * 1_000_003 + epoch) for e in active}
        total = dict.fromkeys(active, 0.0)
        bar = progress_bar(n_batches, f"epoch {epoch} ({len(active)} members)", progress)
        for b in range(n_batches):
            xs, ts, ns = [], [], []
            for e in active:  # each member's batch and noise, drawn in fit's order
                idx = np.sort(orders[e][b * tc.batch_size:(b + 1) * tc.batch_size])
                frames, _ = train.batch(idx)
                inputs, targets = to_steps(torch.from_numpy(frames).to(device), steps, static)
                xs.append(corrupt(inputs, cfg.noise, gens[e]))             # (T, B, 1, H, W)
                ts.append(targets)                                         # (T, B, 1, H, W)
                ns.append(gamma0_noise(inputs, cfg.model.k, gens[e]))      # (B, K, 1, H, W)
            loss, intra, inter = stack.train_step(torch.stack(xs), torch.stack(ts), torch.stack(ns), tc.precision)
            values = loss.tolist()                                         # (E,)
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            for i in bad:
                e = active[i]
                failed[e] = (f"non-finite loss ({values[i]}) at epoch {epoch}, batch {b + 1} of {n_batches}: "
                             f"intra {intra[i].tolist()}, inter {inter[i].tolist()}")
                if root:  # a restarted ensemble leaves it out
                    (member_dir(root, seeds[e]) / FAILED).write_text(failed[e])
            for i, e in enumerate(active):
                total[e] += values[i]
            if bad:
                stack, active = _drop(stack, template, active, bad, tc.lr)
                if not active:
                    break
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not active:
            break

        # Each member's validation, checkpoints and stopping, as in fit.
        metrics_by_member, stopped = {}, []
        for i, e in enumerate(active):
            state, optim = stack.member(i)
            probe.load_state_dict(state)
            val = evaluate(probe, valid, cfgs[e], tc.valid_samples, seed=seeds[e])
            improved = val["loss"] < best_loss[e]
            if improved:
                best_loss[e], best_epoch[e] = val["loss"], epoch
            seconds = time.monotonic() - t0
            metrics = {"epoch": epoch, "train_loss": total[e] / n_batches, "valid_loss": val["loss"],
                       "valid_ami": val["ami"], "valid_ami_mean": val["ami_mean"], "valid_ami_last": val["ami_last"],
                       "best_valid_loss": best_loss[e], "best_epoch": best_epoch[e], "epoch_seconds": seconds,
                       "sequences_per_second": n_batches * tc.batch_size / seconds,
                       "sequences_seen": epoch * n_batches * tc.batch_size}
            if tc.test_each_epoch:
                t = evaluate(probe, splits["test"], cfgs[e], tc.test_each_epoch, seed=seeds[e])
                metrics |= {"test_ami": t["ami"], "test_ami_mean": t["ami_mean"], "test_ami_last": t["ami_last"]}
            history[e].append(metrics)
            metrics_by_member[e] = metrics
            if root:
                saved = dict(config=cfgs[e].model_dump(mode="json"), model=state, optimizer=optim, epoch=epoch,
                             best_valid_loss=best_loss[e], best_epoch=best_epoch[e], history=history[e])
                save_checkpoint(member_dir(root, seeds[e]) / "last.pt", **saved)
                if improved:
                    save_checkpoint(member_dir(root, seeds[e]) / "best.pt", **saved)
            if progress:
                print(f"epoch {epoch} seed {seeds[e]}: train {metrics['train_loss']:.2f}  valid {val['loss']:.2f}"
                      f"  valid AMI {val['ami']:.3f}{'  *' if improved else ''}", flush=True)
            epochs[e] = epoch
            if epoch - best_epoch[e] >= tc.patience:
                stop_reason[e] = "early_stopping"
                stopped.append(i)
        if report is not None:
            report(metrics_by_member, root)
        if tc.time_budget_s and time.monotonic() - t_start > tc.time_budget_s:
            for e in active:
                stop_reason.setdefault(e, "time_budget")
            break
        if stopped:  # stopped members leave the stack; the others go on
            stack, active = _drop(stack, template, active, stopped, tc.lr)
    for e in active:
        stop_reason.setdefault(e, "max_epochs")

    # Each member's summary and final test with its best weights, as fit returns them.
    results = []
    train_seconds = time.monotonic() - t_start
    for e, seed in enumerate(seeds):
        if e in failed:
            results.append({"failed": failed[e], "epochs": epochs[e]})
            continue
        summary = {"epochs": epochs[e], "best_epoch": best_epoch[e], "best_valid_loss": best_loss[e],
                   "sequences_seen": epochs[e] * n_batches * tc.batch_size,
                   "stop_reason": stop_reason[e], "train_seconds": train_seconds,
                   "precision": resolve_precision(tc.precision, device), "ensemble_size": E}
        best = member_dir(root, seed) / "best.pt" if root else None
        if best is not None and best.is_file():
            summary["checkpoint"] = str(best)
        if test:
            if best is not None and best.is_file():
                probe.load_state_dict(load_checkpoint(best)["model"])
            elif stack is not None and e in active:
                probe.load_state_dict(stack.member(active.index(e))[0])
            result = evaluate(probe, splits["test"], cfgs[e], tc.test_samples, seed=seed,
                              panel=panel(e) if panel else None)
            summary = {"test_" + k: v for k, v in result.items()} | summary
        results.append(summary)
    return results


def _drop(stack: Stack, template: NEM, active: list[int], leave: list[int], lr: float) -> tuple[Stack | None, list[int]]:
    """A new stack without the members at positions ``leave`` (their Adam state goes with them)."""
    keep = [i for i in range(len(active)) if i not in leave]
    if not keep:
        return None, []
    members = [stack.member(i) for i in keep]
    return Stack(template, [m[0] for m in members], [m[1] for m in members], lr), [active[i] for i in keep]

