"""What ``train.fit`` trains: one network with its Adam (``Single``), or E stacked (``Stack``).

Both take one batch per member, stacked on a first dim E, and return every member's losses;
both hand out member i's weights and Adam state as a checkpoint keeps them, and leave members
out (``drop``) when they stop or fail. ``Single`` is the plain run, eager, compiled or replayed
as a CUDA graph. ``Stack`` runs the seeds of one grid cell, networks that differ only in their
weights, as one ``vmap``-ed forward and backward (``torch.func``): E small trials become one
larger one, which a GPU runs at a far better utilisation (issue 6; BENCHMARKS.md). One Adam over
the stacked weights is E independent Adams, since Adam is elementwise.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from nem_study.config import InputError, RunConfig
from nem_study.model import NEM
from nem_study.step import GraphedStep, autocast, train_step

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # detached: (E,), (E, T), (E, T)


def check_members(cfgs: list[RunConfig]) -> None:
    """Stacked members must be one grid cell: equal configs but for ``train.seed``."""
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


class Single:
    """One network and its Adam."""

    def __init__(self, model: NEM, optim_state: dict | None, cfg: RunConfig, device: torch.device):
        tc = cfg.train
        if tc.compile:
            # A fresh cache: a Ray worker reused for the next trial would otherwise count this
            # network's compiles against dynamo's recompile limit (and fall back to eager).
            torch._dynamo.reset()
            model.compile_iteration()
        graphed = tc.cuda_graph and device.type == "cuda"
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, capturable=graphed)
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)

        def step(x_tilde, targets, noise, cache=True):
            return train_step(model, self.optimizer, x_tilde, targets, noise, tc.precision, cache)
        self._step = GraphedStep(step) if graphed else step

    def step(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> Losses:
        """(1, T, B, 1, H, W), (1, T, B, 1, H, W), (1, B, K, 1, H, W) -> the losses."""
        out = self._step(x_tilde[0], targets[0], noise[0])
        return out.loss[None], out.intra[None], out.inter[None]

    def member(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.model.state_dict(), self.optimizer.state_dict()

    def drop(self, leave: list[int]) -> Single | None:
        return None  # its one member leaves


class Stack:
    """The members' weights stacked along a new first dim, and their Adam."""

    def __init__(self, template: NEM, states: list[dict[str, torch.Tensor]], optim_states: list[dict | None],
                 lr: float, capturable: bool = False, precision: str = "fp32"):
        self.source = template                               # rebuilds the stack in ``drop``
        self.template = copy.deepcopy(template).to("meta")   # the network's structure, no weights
        self.lr, self.precision, self.size = lr, precision, len(states)
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

    def member(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Member i's (model state_dict, Adam state_dict), as a ``Single`` saves them."""
        state = {n: p[i].detach().clone() for n, p in self.params.items()}
        optim = self.optimizer.state_dict()
        per_member = {"param_groups": optim["param_groups"], "state": {
            j: {"step": s["step"].clone(), "exp_avg": s["exp_avg"][i].clone(), "exp_avg_sq": s["exp_avg_sq"][i].clone()}
            for j, s in optim["state"].items()}}
        return state, per_member

    def drop(self, leave: list[int]) -> Stack | None:
        """A new stack without the members at positions ``leave`` (their Adam state goes with them)."""
        keep = [i for i in range(self.size) if i not in leave]
        if not keep:
            return None
        members = [self.member(i) for i in keep]
        return Stack(self.source, [m[0] for m in members], [m[1] for m in members], self.lr,
                     precision=self.precision)

    def step(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> Losses:
        return self.train_step(x_tilde, targets, noise, self.precision)

    def train_step(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, precision: str,
                   cache: bool = True) -> Losses:
        """Forward, backward and Adam for every member at once. ``cache=False`` inside a CUDA
        graph capture (``step.autocast``)."""
        with autocast(x_tilde.device, precision, cache):
            loss, intra, inter = self.losses(x_tilde, targets, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # d sum / d loss_e = 1: each member gets its own gradient
        self.optimizer.step()
        return loss.detach(), intra.detach(), inter.detach()

    def losses(self, x_tilde: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor) -> Losses:
        """Every member's EM loss on its own batch: inputs (E, T, B, 1, H, W) -> (E,), (E, T), (E, T)."""

        def one(params, buffers, x_tilde, targets, noise):
            out = functional_call(self.template, (params, buffers), (x_tilde, targets), {"noise": noise})
            return out.loss, out.intra, out.inter

        return vmap(one)(self.params, self.buffers, x_tilde, targets, noise)
