"""The vectorised ensemble: each member trains as ``fit`` would train it alone."""

from __future__ import annotations

import math

import pytest
import torch

from nem_study.checkpoints import load_checkpoint
from nem_study.config import InputError, RunConfig
from nem_study.train import fit

from conftest import make_splits


def cfg_for(tmp_path, seed: int, data: dict, model: dict, **train) -> RunConfig:
    return RunConfig(data=data, model=model,
                     train={"batch_size": 16, "max_epochs": 2, "valid_samples": 16, "seed": seed,
                            "precision": "fp32", "checkpoint_dir": str(tmp_path)} | train)


# Batched kernels may sum in another order: the losses agreed to 1e-7 relative after 2 epochs
# of Adam (most exactly), where two seeds differ by 0.5 % or more.
RTOL = 1e-5

# The conv case keeps the data it was established on (1-pixel outlines, continuous motion): on
# the default data, 3 of its 1.6 M weights, whose gradients sit at rounding level, took Adam's
# lr-sized steps in different directions (9e-4 apart) while every loss still agreed. The
# equivalence under test is the vmapped network's, which the data do not change.
CASES = {
    "rnn_em static fc": ({"name": "static_shapes", "train": 64, "valid": 16, "test": 16}, {"k": 3, "em_steps": 4}),
    "nem static fc": ({"name": "static_shapes", "train": 64, "valid": 16, "test": 16},
                      {"kind": "nem", "k": 3, "em_steps": 4}),
    "rnn_em flying shapes conv": ({"name": "flying_shapes", "frames": 4, "train": 32, "valid": 16, "test": 16,
                                   "sprites": "outline", "motion": "continuous"},
                                  {"k": 3}),
}


@pytest.mark.parametrize("case", CASES)
def test_each_member_trains_as_fit_trains_it_alone(tmp_path, case):
    data, model = CASES[case]
    seeds = [0, 7]
    cfgs = [cfg_for(tmp_path / "ens", s, data, model) for s in seeds]
    splits = make_splits(cfgs[0])
    reports = []
    together = fit(cfgs, splits, report=lambda by_member, root: reports.append(by_member))
    assert [sorted(r) for r in reports] == [[0, 1], [0, 1]]
    for e, seed in enumerate(seeds):
        alone = fit(cfg_for(tmp_path / f"alone{seed}", seed, data, model), splits)
        a = load_checkpoint(tmp_path / f"alone{seed}" / "last.pt")
        b = load_checkpoint(tmp_path / "ens" / f"seed{seed}" / "last.pt")
        for h_alone, h_ens in zip(a["history"], b["history"], strict=True):
            for key in ("train_loss", "valid_loss"):
                assert h_ens[key] == pytest.approx(h_alone[key], rel=RTOL), (seed, key)
        for name, w in a["model"].items():
            torch.testing.assert_close(b["model"][name], w, rtol=1e-4, atol=1e-4)  # Adam: tiny grads, ~lr steps
        assert together[e]["epochs"] == alone["epochs"] == 2
        assert together[e]["test_loss"] == pytest.approx(alone["test_loss"], rel=RTOL)
        assert together[e]["best_epoch"] == alone["best_epoch"]
    # the two members are different runs
    w0, w7 = (load_checkpoint(tmp_path / "ens" / f"seed{s}" / "last.pt")["model"] for s in seeds)
    assert not all(torch.allclose(w0[name], w7[name], rtol=1e-2, atol=1e-3) for name in w0)


def test_resume_continues_the_ensemble_exactly(tmp_path):
    data, model = CASES["rnn_em static fc"]
    straight = fit([cfg_for(tmp_path / "a", s, data, model) for s in (0, 1)], make_splits(
        cfg_for(tmp_path, 0, data, model)))
    splits = make_splits(cfg_for(tmp_path, 0, data, model))
    fit([cfg_for(tmp_path / "b", s, data, model, max_epochs=1) for s in (0, 1)], splits)
    resumed = fit([cfg_for(tmp_path / "b", s, data, model) for s in (0, 1)], splits, resume=tmp_path / "b")
    for s, r in zip((0, 1), resumed, strict=True):
        a = load_checkpoint(tmp_path / "a" / f"seed{s}" / "last.pt")
        b = load_checkpoint(tmp_path / "b" / f"seed{s}" / "last.pt")
        assert a["epoch"] == b["epoch"] == 2
        for name, w in a["model"].items():
            assert torch.equal(w, b["model"][name]), name
    assert [r["test_ami"] for r in resumed] == [r["test_ami"] for r in straight]
    assert resumed[0]["train_seconds"] >= sum(m["epoch_seconds"] for m in b["history"])  # budget goes on


def test_members_stop_early_on_their_own(tmp_path):
    """With patience 1 and a learning rate that makes validation worse, members leave the stack.

    lr 0.1: under the TF init (NEM_SPEC.md §3) 0.05 let all three members improve for 6 epochs."""
    data, model = CASES["rnn_em static fc"]
    cfgs = [cfg_for(tmp_path, s, data, model, max_epochs=6, patience=1, lr=0.1) for s in (0, 1, 2)]
    results = fit(cfgs, make_splits(cfgs[0]))
    for r in results:
        assert r["stop_reason"] in ("early_stopping", "max_epochs")
        if r["stop_reason"] == "early_stopping":
            assert r["epochs"] == r["best_epoch"] + 1
        assert load_checkpoint(r["checkpoint"])["epoch"] == r["best_epoch"]
    assert any(r["stop_reason"] == "early_stopping" for r in results), results


def test_a_member_with_a_non_finite_loss_fails_alone(tmp_path, monkeypatch):
    data, model = CASES["rnn_em static fc"]
    cfgs = [cfg_for(tmp_path, s, data, model) for s in (0, 1)]
    splits = make_splits(cfgs[0])
    from nem_study import members

    real = members.Stack.losses

    def poisoned(self, x_tilde, targets, noise):  # the second member's loss: NaN
        loss, intra, inter = real(self, x_tilde, targets, noise)
        if len(loss) == 2:
            loss = loss * torch.tensor([1.0, math.nan])
        return loss, intra, inter

    monkeypatch.setattr(members.Stack, "losses", poisoned)
    results = fit(cfgs, splits)
    assert "failed" not in results[0] and results[0]["epochs"] == 2 and math.isfinite(results[0]["test_loss"])
    assert results[1]["failed"].startswith("non-finite loss (nan) at epoch 1, batch 1 of 4")
    assert (tmp_path / "seed1" / "failed.txt").read_text() == results[1]["failed"]
    resumed = fit(cfgs, splits, resume=tmp_path)  # a restart leaves the failed member out
    assert resumed[1] == results[1] and resumed[0]["test_loss"] == results[0]["test_loss"]


def test_members_must_be_one_grid_cell(tmp_path):
    data, model = CASES["rnn_em static fc"]
    with pytest.raises(InputError, match="differ only in train.seed"):
        fit([cfg_for(tmp_path, 0, data, model), cfg_for(tmp_path, 1, data, model, lr=0.01)], {})
    with pytest.raises(InputError, match="distinct train.seed"):
        fit([cfg_for(tmp_path, 0, data, model), cfg_for(tmp_path, 0, data, model)], {})
