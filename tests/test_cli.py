"""The command line as a user meets it: help, errors (exit 2, no traceback), a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nem_study.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def assert_clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


@pytest.mark.parametrize("args", [[], ["train"], ["evaluate"], ["data"], ["data", "generate"], ["data", "show"],
                                  ["validate"], ["run"], ["resume"], ["report"], ["config"], ["config", "show"]])
def test_every_command_has_help(args):
    r = cli(*args, "--help")
    assert r.returncode == 0 and "usage: nem-study" in r.stdout


def test_config_show_prints_the_resolved_run_and_each_trials_differences(tmp_path):
    import yaml

    from nem_study.config_files import load_run_config
    from nem_study.study_config import load_study_config

    r = cli("config", "show", "studies/runs/flying_shapes.yaml", "--set", "model.k=5")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    expected = load_run_config(ROOT / "studies/runs/flying_shapes.yaml", ["model.k=5"]).model_dump(mode="json")
    assert shown == expected and shown["model"]["k"] == 5 and shown["model"]["hidden"] == 100  # a §3 default
    r = cli("config", "show", "studies/quickstart.yaml", "--set", "base.model.k=4")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    study = load_study_config(ROOT / "studies/quickstart.yaml", ["base.model.k=4"])
    assert shown["base"] == study.run_config({}, study.base.train.seed).model_dump(mode="json")
    assert shown["base"]["model"]["k"] == 4
    assert shown["trials"] == {"kind=rnn_em,seed=0": {}, "kind=nem,seed=0": {"model.kind": "nem"}}
    assert_clean_error(cli("config", "show", str(tmp_path / "missing.yaml")), "missing.yaml")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("yaml_text,needles", [
    ("model:\n  kk: 3\n", ["model.kk", "unknown key"]),
    ("model:\n  k: 0\n", ["model.k", "greater than or equal to 1"]),
    ("model:\n  k: three\n", ["model.k", "three"]),
    ("noise:\n  prob: -0.1\n", ["noise.prob", "-0.1"]),
    ("data:\n  name: flying_cats\n", ["data.name"]),
    ("model: [1, 2\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["expected a mapping"]),
])
def test_bad_config_is_one_clear_message_and_exit_2(tmp_path, yaml_text, needles):
    assert_clean_error(cli("train", write(tmp_path, yaml_text)), *needles)


def test_bad_override_and_missing_config(tmp_path):
    assert_clean_error(cli("train", "nope.yaml"), "nope.yaml", "no such file")
    assert_clean_error(cli("train", write(tmp_path, "{}"), "--set", "model.k"), "KEY=VALUE")


def test_missing_mnist_file_names_it(tmp_path):
    missing = tmp_path / "mnist.npz"
    assert_clean_error(cli("data", "generate", "flying_mnist", "--mnist", str(missing)), str(missing))


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"\x00garbage")
    assert_clean_error(cli("evaluate", str(bad)), str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert_clean_error(cli("evaluate", str(foreign)), "not a nem-study checkpoint")


def test_corrupt_cached_data_file_names_it(tmp_path):
    env = {"NEM_DATA_DIR": str(tmp_path / "cache")}
    r = cli("data", "generate", "static_shapes", "--set", "train=8", "--set", "valid=4", "--set", "test=4",
            env=env)
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip().splitlines()[-1])
    victim = folder / "valid.arrow"
    raw = bytearray(victim.read_bytes())
    raw[-200] ^= 0xFF
    victim.write_bytes(bytes(raw))
    r = cli("data", "show", "static_shapes", "--split", "valid", "--set", "train=8", "--set", "valid=4",
            "--set", "test=4", "--out", str(tmp_path / "s.png"), env=env)
    assert_clean_error(r, "valid.arrow", "sha256")


def test_train_then_evaluate_generalisation_end_to_end(tmp_path):
    env = {"NEM_DATA_DIR": str(tmp_path / "cache")}
    cfg = write(tmp_path, "data:\n  name: flying_shapes\n  frames: 4\n  train: 32\n  valid: 16\n  test: 16\n"
                          "train:\n  batch_size: 16\n  max_epochs: 1\n  valid_samples: 16\n")
    out = tmp_path / "run"
    r = cli("train", cfg, "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["test_ami"] <= 1.0 or result["test_ami"] != result["test_ami"]
    assert len(result["test_ami_per_step"]) == 3
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1

    r = cli("evaluate", str(out / "best.pt"), "--k", "5", "--objects", "2", "--steps", "6", env=env)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["test"] == {"k": 5, "objects": 2, "steps": 6, "static": False}
    assert len(ev["ami_per_step"]) == 6

    r = cli("evaluate", str(out), "--static", "--steps", "5", "--n", "8", "--panel", str(tmp_path / "p.png"),
            env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").stat().st_size > 1000
    ev = json.loads(r.stdout)
    assert ev["test"]["static"] is True and ev["n"] == 8 and len(ev["ami_per_step"]) == 5


def test_a_flying_mnist_study_without_mnist_stops_before_any_trial(tmp_path):
    missing = tmp_path / "mnist.npz"
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: no-mnist
base:
  data: {{name: flying_mnist, train: 8, valid: 8, test: 8, curriculum: [5, 10]}}
tracking: {{uri: sqlite:///{tmp_path / 'mlflow.db'}, artifact_location: {tmp_path / 'art'}}}
storage: {tmp_path / 'ray'}
""")
    assert_clean_error(cli("run", str(study), "--mnist", str(missing)), str(missing))
    assert not (tmp_path / "ray").exists()   # no trial started


def test_an_unreachable_ray_address_is_a_clear_error_before_anything_is_written(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: nowhere
tracking: {{uri: sqlite:///{tmp_path / 'mlflow.db'}, artifact_location: {tmp_path / 'art'}}}
storage: {tmp_path / 'ray'}
""")
    assert_clean_error(cli("run", str(study), "--address", "127.0.0.1:1"), "--address 127.0.0.1:1", "no Ray cluster")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
