"""The trainer: learning, determinism, checkpoints and resume, early stopping, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nem_study.checkpoints import LEGACY_CHOICES, load_checkpoint, load_model, save_checkpoint
from nem_study.config import InputError, RunConfig
from nem_study.data import Split
from nem_study.evaluate import evaluate
from nem_study.model import NEM
from nem_study.train import NonFiniteLoss, fit

from conftest import make_splits


def static_cfg(tmp_path, **train) -> RunConfig:
    """Static shapes with the small fully connected RNN-EM: seconds per epoch."""
    return RunConfig(
        data={"name": "static_shapes", "train": 128, "valid": 32, "test": 32},
        model={"k": 3, "em_steps": 5},
        train={"batch_size": 32, "max_epochs": 2, "valid_samples": 32,
               "checkpoint_dir": str(tmp_path / "ckpt")} | train)


def test_learning_lifts_test_ami_on_small_flying_shapes(tmp_path):
    """A short CPU run on small flying shapes: test AMI rises clearly above initialisation.

    The paper's network and K = 3 on 3 objects, 6 steps, 256 Adam steps of 16 sequences: about
    a minute and a half on one core.
    """
    cfg = RunConfig(
        data={"name": "flying_shapes", "frames": 7, "train": 2048, "valid": 128, "test": 128},
        model={"k": 3},
        train={"batch_size": 16, "max_epochs": 2, "valid_samples": 128})
    splits = make_splits(cfg)
    torch.manual_seed(cfg.train.seed)
    untrained = evaluate(NEM(cfg.model, 28), splits["test"], cfg)
    result = fit(cfg, splits)
    assert result["test_ami"] > untrained["ami"] + 0.05, (untrained["ami"], result["test_ami"])


def test_static_data_scores_the_last_em_step_and_sequences_the_mean(tmp_path):
    """NEM_SPEC.md §5: static data reports the last step's AMI; the mean stays under its own name."""
    cfg = static_cfg(tmp_path)
    splits = make_splits(cfg)
    torch.manual_seed(0)
    model = NEM(cfg.model, 28)
    static = evaluate(model, splits["test"], cfg)
    per_step = static["ami_per_step"]
    assert static["ami_score"] == "last" and static["ami"] == static["ami_last"] == per_step[-1]
    assert static["ami_mean"] == pytest.approx(np.nanmean(per_step))
    assert static["ami_mean"] != static["ami"]   # the two differ, so the test tells them apart
    seq = RunConfig(data={"name": "flying_shapes", "frames": 4, "train": 8, "valid": 8, "test": 8})
    result = evaluate(NEM(seq.model, 28), make_splits(seq)["test"], seq)
    assert result["ami_score"] == "mean" and result["ami"] == result["ami_mean"]
    assert result["ami"] == pytest.approx(np.nanmean(result["ami_per_step"]))
    # static transfer of a sequence model: scored at the last step too
    transfer = evaluate(NEM(seq.model, 28), make_splits(seq)["test"], seq, static=True, steps=5)
    assert transfer["ami_score"] == "last" and transfer["ami"] == transfer["ami_per_step"][-1]


def test_a_checkpoint_from_before_the_authors_defaults_loads_as_it_trained(tmp_path):
    """Its config lacks the sprites / motion / init keys: they mean the old choices, not the new defaults."""
    old = RunConfig(data={"name": "flying_shapes", "sprites": "outline", "motion": "continuous"},
                    model={"init": "torch", "layer_norm_affine": "element", "layer_norm_eps": 1e-5,
                           "input_std_floor": True})
    model = NEM(old.model, 28)
    config = old.model_dump(mode="json")
    for section, keys in LEGACY_CHOICES.items():
        for key in keys:
            del config[section][key]
    save_checkpoint(tmp_path / "old.pt", config=config, model=model.state_dict())
    loaded, cfg, _ = load_model(tmp_path / "old.pt", device="cpu")
    assert cfg == old
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name


def test_training_is_deterministic_and_resume_continues_exactly(tmp_path):
    splits = make_splits(static_cfg(tmp_path))
    straight = fit(static_cfg(tmp_path / "a"), splits)
    fit(static_cfg(tmp_path / "b", max_epochs=1), splits)
    resumed = fit(static_cfg(tmp_path / "b"), splits, resume=tmp_path / "b" / "ckpt" / "last.pt")
    assert resumed["epochs"] == straight["epochs"] == 2
    # the budget counts on over the resume: 2 epochs of 128 // 32 batches of 32
    assert resumed["sequences_seen"] == straight["sequences_seen"] == 2 * 4 * 32
    a = load_checkpoint(tmp_path / "a" / "ckpt" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "ckpt" / "last.pt")
    assert [m["sequences_seen"] for m in b["history"]] == [128, 256]
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    assert a["history"][-1]["valid_loss"] == b["history"][-1]["valid_loss"]
    assert resumed["test_ami"] == straight["test_ami"]
    # the time budget and train_seconds count the epochs trained before the resume too
    assert resumed["train_seconds"] >= sum(m["epoch_seconds"] for m in b["history"])


def test_checkpoints_hold_config_weights_optimiser_and_epoch(tmp_path):
    cfg = static_cfg(tmp_path)
    reports = []
    fit(cfg, make_splits(cfg), report=lambda m, d: reports.append((m, d)))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    assert all(d == tmp_path / "ckpt" for _, d in reports)
    ckpt = load_checkpoint(tmp_path / "ckpt" / "best.pt")
    assert ckpt["config"] == cfg
    assert ckpt["epoch"] == ckpt["best_epoch"] in (1, 2)
    assert ckpt["optimizer"]["state"], "optimiser state is saved"
    model, loaded_cfg, _ = load_model(tmp_path / "ckpt" / "best.pt", "cpu")
    assert loaded_cfg.model.k == 3 and isinstance(model, NEM)


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    # lr so small that the weights cannot change: the validation loss never improves after epoch 1
    cfg = static_cfg(tmp_path, lr=1e-30, max_epochs=10, patience=2)
    result = fit(cfg, make_splits(cfg))
    assert result["stop_reason"] == "early_stopping"
    assert result["best_epoch"] == 1 and result["epochs"] == 3


def test_non_finite_loss_stops_with_epoch_and_batch(tmp_path):
    cfg = static_cfg(tmp_path)
    splits = make_splits(cfg)
    train = splits["train"]

    class PoisonThirdBatch(Split):
        calls = 0

        def batch(self, indices):
            images, labels = super().batch(indices)
            PoisonThirdBatch.calls += 1
            if PoisonThirdBatch.calls == 3:
                images[:] = np.nan
            return images, labels

    splits["train"] = PoisonThirdBatch(train.images, train.labels, 1.0, train.spec)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, batch 3 of 4"):
        fit(cfg, splits)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_or_foreign_checkpoint_is_a_clear_input_error(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)   # a real torch file, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match="x.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_input_error(tmp_path):
    cfg = static_cfg(tmp_path, max_epochs=1)
    fit(cfg, make_splits(cfg))
    path = tmp_path / "ckpt" / "last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="last.pt"):
        load_checkpoint(path)


def test_component_shares_sorts_each_images_shares():
    from nem_study.evaluate import component_shares

    pred = np.array([[[0, 0, 1, 2]], [[1, 1, 1, 1]]])           # (B=2, H=1, W=4)
    valid = np.array([[[True, True, True, False]], [[True, True, False, False]]])
    shares = component_shares(pred, valid, 3)
    assert np.allclose(shares, [[2 / 3, 1 / 3, 0], [1, 0, 0]])


def test_generalisation_specs_keep_the_test_sequences_and_skip_training_data():
    from nem_study import data
    from nem_study.evaluate import test_spec

    cfg = RunConfig(data={"name": "flying_shapes", "train": 50, "valid": 20, "test": 6})
    spec = test_spec(cfg, objects=2, steps=30)
    assert (spec.train, spec.valid, spec.test, spec.objects, spec.frames) == (1, 1, 6, 2, 31)
    full = cfg.data.model_copy(update={"objects": 2, "frames": 31})
    for a, b in zip(data.generate(spec, "test"), data.generate(full, "test")):
        assert np.array_equal(a, b)
    assert test_spec(cfg) is cfg.data


NPZ = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.npz"


@pytest.mark.skipif(not NPZ.is_file(), reason=f"{NPZ} not present")
def test_a_curriculum_trains_stage_after_stage_and_a_resume_skips_finished_stages(tmp_path, monkeypatch):
    from nem_study import data
    from nem_study.curriculum import curriculum_stages, fit_curriculum

    monkeypatch.setenv("NEM_MNIST", str(NPZ))
    cfg = RunConfig(
        data={"name": "flying_mnist", "frames": 4, "train": 16, "valid": 8, "test": 8, "curriculum": [5, 10]},
        train={"batch_size": 8, "max_epochs": 2, "patience": 1000, "valid_samples": 8,
               "checkpoint_dir": str(tmp_path / "ckpt")})
    assert [s.data.digit_pool for s in curriculum_stages(cfg)] == [5, 10]
    loaded = []

    def load(spec, split):
        loaded.append((split, spec.digit_pool))
        return data.load(spec, split, progress=False)

    reports = []
    result = fit_curriculum(cfg, load, report=lambda m, d: reports.append((m, d)))
    assert [(m["stage"], m["epoch"], m["iteration"]) for m, _ in reports] == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)]
    assert {d for _, d in reports} == {tmp_path / "ckpt"}          # Tune checkpoints the whole folder
    assert ("train", 5) in loaded and ("train", 10) in loaded and ("test", 10) in loaded
    assert result["epochs"] == 4 and [s["digit_pool"] for s in result["stages"]] == [5]
    per_epoch = reports[0][0]["sequences_seen"]                    # counted over the stages
    assert [m["sequences_seen"] for m, _ in reports] == [per_epoch * i for i in (1, 2, 3, 4)]
    assert result["sequences_seen"] == 4 * per_epoch
    assert result["checkpoint"] == str(tmp_path / "ckpt" / "stage2" / "best.pt") and "test_ami" in result
    # Stage 2 started from stage 1's best weights: its first epoch beats a fresh start's first epoch.
    assert reports[2][0]["train_loss"] < reports[0][0]["train_loss"]

    # A restart inside stage 2 (its last.pt gone: it died in its first epoch) skips stage 1.
    (tmp_path / "ckpt" / "stage2" / "last.pt").unlink()
    reports.clear()
    again = fit_curriculum(cfg, load, report=lambda m, d: reports.append((m, d)), resume=tmp_path / "ckpt")
    assert [(m["stage"], m["iteration"]) for m, _ in reports] == [(2, 3), (2, 4)]
    assert again["epochs"] == 4


def test_curriculum_is_for_flying_mnist_only():
    with pytest.raises(Exception, match="flying_mnist only"):
        RunConfig(data={"name": "flying_shapes", "curriculum": [20, 500]})
