"""Studies end to end: real Ray (one CPU), real MLflow on SQLite, tiny static-shapes data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nem_study.study_config import load_study_config
from nem_study.tracking import child_runs, flatten

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3   # EM steps of the tiny static data: the length of the per-step AMI


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module (starting one costs seconds); one CPU, beside other work."""
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def study_yaml(tmp_path: Path, grid: str, seeds: int = 2, max_failures: int = 0,
               uri: str | None = None, max_epochs: int = 2, extra: str = "") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"""
name: tiny
base:
  data: {{name: static_shapes, train: 32, valid: 16, test: 16}}
  model: {{em_steps: {STEPS}}}
  train: {{batch_size: 16, valid_samples: 16, patience: 1000}}
grid:
{grid}
seeds: {seeds}
stop: {{max_epochs: {max_epochs}}}
tracking:
  uri: {uri or f"sqlite:///{tmp_path / 'mlflow.db'}"}
  artifact_location: {tmp_path / 'mlartifacts'}
storage: {tmp_path / 'ray_results'}
max_failures: {max_failures}
{extra}""")
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nem_study.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NEM_RAY_CPUS": "1"}, timeout=300)


def runs_by_name(tmp_path: Path, parent_run_id: str) -> dict[str, object]:
    return {r.info.run_name: r for r in child_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", parent_run_id)}


def test_a_nonfinite_trial_fails_with_its_reason_and_the_others_finish(tmp_path):
    """Through the CLI. w_inter = 1e38 overflows the inter-cluster loss (float32) to inf at once.

    Runs before the module's Ray instance starts: the CLI starts its own local Ray.
    """
    path = study_yaml(tmp_path, "  model.w_inter: [1.0, 1.0e38]", seeds=1, max_failures=1)
    r = cli("run", str(path), cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "1 trial(s) finished, 1 failed" in r.stdout
    assert "failed  w_inter=1e+38,seed=0: " in r.stdout and "non-finite loss" in r.stdout
    assert "best test AMI" in r.stdout and "w_inter=1.0" in r.stdout
    parent_run_id = json.loads(r.stdout.strip().splitlines()[-1])["parent_run_id"]

    children = runs_by_name(tmp_path, parent_run_id)
    assert sorted(children) == ["w_inter=1.0,seed=0", "w_inter=1e+38,seed=0"]   # the restart re-attached
    good, bad = children["w_inter=1.0,seed=0"], children["w_inter=1e+38,seed=0"]
    assert good.info.status == "FINISHED" and "test_ami" in good.data.metrics
    assert bad.info.status == "FAILED"
    assert bad.data.tags["failure_reason"].startswith("NonFiniteLoss: non-finite loss (inf) at epoch 1, batch 1")
    assert bad.data.tags["nem_study.restarts"] == "1" and "previous_failure_reason" in bad.data.tags
    assert "test_ami" not in bad.data.metrics


def test_four_quarter_gpu_trials_share_one_logical_gpu_at_the_same_time(tmp_path):
    """One logical GPU declared to Ray (no real one needed), resources.gpu 0.25: 4 trials at once.

    Each trial's MLflow run opens when it starts and closes when it ends; all four intervals
    must overlap. Through the CLI, with its own local Ray of 4 logical CPUs.
    """
    path = study_yaml(tmp_path, "  model.k: [2, 3]", max_epochs=25,
                      extra="resources: {cpu: 0.5, gpu: 0.25}\n")
    r = cli("run", str(path), "--num-cpus", "2", "--num-gpus", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    parent_run_id = json.loads(r.stdout.strip().splitlines()[-1])["parent_run_id"]
    runs = list(runs_by_name(tmp_path, parent_run_id).values())
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    last_start = max(run.info.start_time for run in runs)
    first_end = min(run.info.end_time for run in runs)
    assert last_start < first_end, "the four trials did not all run at the same time"


def test_four_trials_are_four_child_runs_under_one_parent(tmp_path, local_ray):
    from nem_study.study import run_study

    evaluations = "evaluations:\n  - {k: 4}\n  - {name: two-shapes, objects: 2, steps: 5}\n"
    path = study_yaml(tmp_path, "  model.k: [2, 3]", extra=evaluations)
    study = load_study_config(path)
    result = run_study(study, path, verbose=0)
    names = ["k=2,seed=0", "k=2,seed=1", "k=3,seed=0", "k=3,seed=1"]
    assert sorted(result.finished) == names and not result.failed
    assert set(result.best_test_ami) == {'{"model.k": 2}', '{"model.k": 3}'}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["study"] == "tiny"
    assert parent.data.tags["nem_study.version"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"study.yaml", "study_resolved.yaml", "trials.json"}
    trials = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert [t["name"] for t in trials] == names

    children = runs_by_name(tmp_path, result.parent_run_id)
    assert sorted(children) == names
    for trial in trials:
        run = children[trial["name"]]
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        # The params are the resolved config the trial ran (its checkpoints are Tune's).
        expected = flatten(load_study_config(path).run_config(trial["cell"], trial["seed"]))
        params = dict(run.data.params)
        assert params["train.checkpoint_dir"] == expected["train.checkpoint_dir"] == "None"
        assert expected.pop("train.threads") == "None" and params.pop("train.threads") == "1"  # resources.cpu
        assert params == expected
        assert params["model.k"] == str(trial["cell"]["model.k"]) and params["train.seed"] == str(trial["seed"])
        for metric in ("train_loss", "valid_loss", "valid_ami", "iteration"):
            assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2], metric
        assert [m.value for m in client.get_metric_history(run_id, "stage")] == [1, 1]
        for metric in ("test_loss", "test_ami", "test_ami_mean", "test_ami_last", "test_bce_bound"):
            assert metric in run.data.metrics, metric
        assert run.data.tags["ami_score"] == ("last" if expected["data.name"] == "static_shapes" else "mean")
        phases = [run.data.metrics[f"trial_{p}_seconds"] for p in ("setup", "fit", "report", "evaluations")]
        assert all(t > 0 for t in phases), phases     # logged; how long each takes is bench/'s business
        assert run.data.tags["precision"] == "fp32"
        per_step = client.get_metric_history(run_id, "test_ami_step")
        assert sorted(m.step for m in per_step) == list(range(1, STEPS + 1))
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"ami_per_step.json", "test_metrics.json", "checkpoint", "evaluations.json", "groupings.png",
                "groupings-k4.png", "groupings-two-shapes.png"} <= artifacts
        k = trial["cell"]["model.k"]
        evals = json.loads(Path(client.download_artifacts(run_id, "evaluations.json", str(tmp_path / run_id)))
                           .read_text())
        assert [(e["name"], e["k"], e["objects"], e["steps"]) for e in evals] == \
            [("k4", 4, 3, STEPS), ("two-shapes", k, 2, 5)]
        for e in evals:
            assert len(e["ami_per_step"]) == len(e["ami_q25_per_step"]) == e["steps"]
            assert run.data.metrics[f"eval/{e['name']}/ami"] == pytest.approx(e["ami"])
        assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/best.pt"]
        table = json.loads(Path(client.download_artifacts(run_id, "ami_per_step.json", str(tmp_path / run_id)))
                           .read_text())
        assert table["step"] == list(range(1, STEPS + 1))
        assert table["test_ami"] == pytest.approx([m.value for m in sorted(per_step, key=lambda m: m.step)])
        assert all(lo <= hi for lo, hi in zip(table["test_ami_q25"], table["test_ami_q75"]))
    # Each Tune trial folder in storage holds Tune's checkpoint copies (last.pt to resume from,
    # best.pt) and the trial's panels, although workers are reused from trial to trial.
    folders = sorted((tmp_path / "ray_results" / "tiny").glob("0*"))
    assert len(folders) == 4
    for folder in folders:
        checkpoints = list(folder.glob("checkpoint_*"))
        assert checkpoints and all((c / "last.pt").is_file() and (c / "best.pt").is_file() for c in checkpoints)
        assert {"groupings.png", "groupings-k4.png", "groupings-two-shapes.png"} <= {p.name for p in folder.iterdir()}
        assert not (folder / "checkpoints").exists()  # the trainer's working copy is not synced twice
    # Tune sees the grid itself: its trial configs (and its progress table) are the grid keys and seeds.
    assert sorted((json.loads((f / "params.json").read_text()) for f in folders), key=json.dumps) == \
        [{"model.k": k, "train.seed": seed} for k in (2, 3) for seed in (0, 1)]


def test_asha_stops_the_trial_whose_validation_loss_lags(tmp_path, local_ray):
    """Two trials, one at a learning rate too small to move: ASHA keeps the better half at the
    first rung, so the second trial (run after the first on one CPU) stops after 1 epoch."""
    from nem_study.study import run_study

    path = study_yaml(tmp_path, "  train.lr: [0.01, 1.0e-9]", seeds=1, max_epochs=4,
                      extra="scheduler: {grace_period: 1, reduction_factor: 2}\n")
    result = run_study(load_study_config(path), path, verbose=0)
    assert result.finished == ["lr=0.01,seed=0"] and result.stopped == ["lr=1e-09,seed=0"] and not result.failed
    runs = runs_by_name(tmp_path, result.parent_run_id)
    good, stopped = runs["lr=0.01,seed=0"], runs["lr=1e-09,seed=0"]
    assert good.info.status == "FINISHED" and good.data.metrics["epochs"] == 4
    assert stopped.info.status == "KILLED" and "scheduler" in stopped.data.tags["stop_reason"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.get_metric_history(stopped.info.run_id, "valid_loss")) < 4
    assert "test_ami" not in stopped.data.metrics


def test_a_killed_trial_restarts_from_its_last_checkpoint(tmp_path, local_ray):
    """Kill the trial's worker process after a few epochs: Tune restarts it, fit resumes."""
    from nem_study.study import run_study

    epochs = 30
    path = study_yaml(tmp_path, "  model.k: [2]", seeds=1, max_failures=1, max_epochs=epochs)
    results = tmp_path / "ray_results" / "tiny"
    killed = []

    def kill_after_third_epoch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for result_file in results.glob("000_*/result.json"):
                lines = result_file.read_text().splitlines()
                if len(lines) >= 3 and list(result_file.parent.glob("checkpoint_*")):
                    pid = json.loads(lines[-1])["pid"]
                    os.kill(pid, signal.SIGKILL)   # the Ray worker this test's study started
                    killed.append(json.loads(lines[-1])["epoch"])
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_third_epoch, daemon=True)
    watcher.start()
    result = run_study(load_study_config(path), path, verbose=0)
    watcher.join()
    assert killed, "the trial finished before it could be killed"
    assert result.finished == ["k=2,seed=0"] and not result.failed

    reported = [json.loads(line)["epoch"] for line in next(results.glob("000_*/result.json")).read_text()
                .splitlines()]
    assert reported.count(1) == 1 and sorted(set(reported)) == list(range(1, epochs + 1)), reported
    run = runs_by_name(tmp_path, result.parent_run_id)["k=2,seed=0"]
    assert run.info.status == "FINISHED" and run.data.tags["nem_study.restarts"] == "1"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")} == set(range(1, epochs + 1))


def test_unreachable_tracking_store_is_a_clear_error_before_any_trial(tmp_path):
    path = study_yaml(tmp_path, "  model.k: [2]", uri="http://127.0.0.1:9")
    r = cli("run", str(path), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert "tracking.uri http://127.0.0.1:9: the MLflow server is not reachable" in r.stderr
    assert not (tmp_path / "ray_results").exists()   # no trial started
    missing = study_yaml(tmp_path, "  model.k: [2]", uri=f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}")
    r = cli("run", str(missing), cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_prints_the_trials_and_starts_nothing(tmp_path):
    path = study_yaml(tmp_path, "  model.k: [2, 3]")
    r = cli("run", str(path), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 trial(s) (2 grid cell(s) x 2 seed(s))" in r.stdout and "k=3,seed=1" in r.stdout
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_restore_puts_the_checkpoint_back_for_resume(tmp_path):
    from ray import tune

    from nem_study.trial import restore_checkpoint

    saved = tmp_path / "saved"
    (saved / "stage1").mkdir(parents=True)
    (saved / "last.pt").write_bytes(b"last")
    (saved / "best.pt").write_bytes(b"best")
    (saved / "stage1" / "stage.json").write_text("{}")  # a curriculum's finished stage
    target = tmp_path / "trial" / "checkpoints"
    assert restore_checkpoint(None, target) is None
    assert restore_checkpoint(tune.Checkpoint.from_directory(str(saved)), target) == target
    assert (target / "last.pt").read_bytes() == b"last" and (target / "best.pt").read_bytes() == b"best"
    assert (target / "stage1" / "stage.json").read_text() == "{}"


SEARCH = """
search:
  n_trials: 2
  seed: {seed}
  space:
    train.lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
    model.hidden: {{low: 8, high: 32}}
    model.psi_init: {{choices: [zero, median]}}
"""


def test_a_search_samples_n_trials_per_grid_cell_within_the_ranges(tmp_path, local_ray):
    from nem_study.trials import expand_trials
    from nem_study.experiments import tune_experiments
    from nem_study.study import run_study

    path = study_yaml(tmp_path, "  model.k: [2, 3]", seeds=1, max_epochs=1)
    path.write_text(path.read_text() + SEARCH.format(seed=3))
    study = load_study_config(path)
    result = run_study(study, path, verbose=0)
    names = ["k=2,sample=0", "k=2,sample=1", "k=3,sample=0", "k=3,sample=1"]
    assert sorted(result.finished) == names and not result.failed
    assert set(result.best_test_ami) == {'{"model.k": 2}', '{"model.k": 3}'}   # the best over each cell's samples
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.parent_run_id).data.params[
        "trials"] == "4"

    children = runs_by_name(tmp_path, result.parent_run_id)
    assert sorted(children) == names
    sampled = {}
    for name, run in children.items():
        params, tags = run.data.params, run.data.tags
        assert run.info.status == "FINISHED" and "test_ami" in run.data.metrics
        assert f"k={params['model.k']},sample=" in name and params["train.seed"] == "0"
        assert 1e-4 <= float(params["train.lr"]) <= 1e-2
        assert 8 <= int(params["model.hidden"]) <= 32            # an integer range gives integers
        assert params["model.psi_init"] in ("zero", "median")
        for key in ("train.lr", "model.hidden", "model.psi_init"):
            assert tags[f"nem_study.sampled.{key}"] == params[key]
        sampled[name] = (float(params["train.lr"]), int(params["model.hidden"]), params["model.psi_init"])
    assert sampled["k=2,sample=0"] != sampled["k=2,sample=1"]

    def first_two(seed: int) -> list[tuple]:
        """What a fresh sampler with this seed suggests first (TPE starts with seeded random samples)."""
        seeded = study.model_copy(update={"search": study.search.model_copy(update={"seed": seed})})
        experiment = tune_experiments(seeded, expand_trials(seeded))[0]
        searcher = experiment.search_alg
        searcher.set_search_properties(None, None, experiment.param_space)
        return [tuple(v for v in searcher.suggest(f"t{i}")["space"].values()) for i in range(2)]

    assert first_two(3) == [sampled["k=2,sample=0"], sampled["k=2,sample=1"]]   # the same seed, the same values
    assert first_two(4) != first_two(3)


def start_driver(tmp_path: Path, path: Path, until) -> tuple[subprocess.Popen, object]:
    """Start `nem-study run STUDY` in its own process group on one Ray CPU (output in run.log), and
    poll ``until()`` every 50 ms for up to 180 s. Returns the running driver and until()'s last value."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEM_RAY_CPUS": "1"}
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "nem_study.cli", "run", str(path)], cwd=tmp_path, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, value = time.monotonic() + 180, None
    while time.monotonic() < deadline and driver.poll() is None and not (value := until()):
        time.sleep(0.05)
    assert driver.poll() is None, "the study ended first:\n" + (tmp_path / "run.log").read_text()[-3000:]
    return driver, value


def test_resume_after_the_driver_is_killed_continues_each_trial_in_its_own_child_run(tmp_path):
    """SIGKILL `nem-study run` (its process group) once a trial has reported an epoch, then resume."""
    epochs = 10
    path = study_yaml(tmp_path, "  model.k: [2, 3]", seeds=1, max_epochs=epochs)
    results = tmp_path / "ray_results" / "tiny"

    def reported_epochs() -> list[dict]:
        if not list(results.glob("experiment_state-*.json")):   # Tune has nothing to restore from yet
            return []
        return [json.loads(line) for f in results.glob("0*/result.json") for line in f.read_text().splitlines()]

    driver, reported = start_driver(tmp_path, path, until=reported_epochs)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert reported, "no epoch reported in time"
    # The trial's worker outlives the driver for a moment; it must not log beside the resumed one.
    for pid in {r["pid"] for r in reported}:
        try:
            if "ray::" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass

    r = cli("resume", str(path), cwd=tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "2 trial(s) finished, 0 failed" in r.stdout

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["nem_study.resumes"] == "1"
    assert json.loads(r.stdout.strip().splitlines()[-1])["parent_run_id"] == parents[0].info.run_id
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    assert sorted(run.info.run_name for run in children) == ["k=2,seed=0", "k=3,seed=0"]   # no duplicates
    for run in children:
        assert run.info.status == "FINISHED" and "test_ami" in run.data.metrics
        for metric in ("epoch", "train_loss", "valid_loss", "valid_ami"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, epochs + 1)), (run.info.run_name, metric, steps)
    # The killed trial went on in its own child run, not a new one.
    assert any(run.data.tags.get("nem_study.restarts") == "1" for run in children), reported


def test_ctrl_c_with_trials_pending_says_how_to_resume_and_resume_finishes(tmp_path):
    """SIGINT to `nem-study run` (Ctrl-C) while one trial runs and two wait for the one CPU."""
    path = study_yaml(tmp_path, "  model.k: [2, 3, 4]", seeds=1, max_epochs=10)
    results = tmp_path / "ray_results" / "tiny"
    driver, _ = start_driver(tmp_path, path, until=lambda: list(results.glob("0*/result.json")))
    os.kill(driver.pid, signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    out = (tmp_path / "run.log").read_text()
    assert "Traceback" not in out, out[-3000:]
    assert f"Continue with: nem-study resume {path}" in out, out[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent, = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "KILLED" and "resume" in parent.data.tags["stop_reason"]
    assert not any("ASHA" in run.data.tags.get("stop_reason", "") for run in runs)   # no scheduler here

    r = cli("resume", str(path), cwd=tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "3 trial(s) finished, 0 failed" in r.stdout
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert sorted(run.info.run_name for run in children) == ["k=2,seed=0", "k=3,seed=0", "k=4,seed=0"]
    assert all(run.info.status == "FINISHED" for run in runs)


def test_resume_with_nothing_to_resume_names_the_storage_folder(tmp_path):
    path = study_yaml(tmp_path, "  model.k: [2]")
    r = cli("resume", str(path), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert f"study 'tiny': nothing to resume in {tmp_path / 'ray_results' / 'tiny'}" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_resumed_trial_finds_its_parent_its_child_run_and_the_epochs_it_logged(tmp_path):
    """The MLflow side of `resume`, without Ray: what run_trial re-attaches to after the driver died."""
    from nem_study import tracking
    from nem_study.trials import expand_trials

    path = study_yaml(tmp_path, "  model.k: [2]", seeds=1)
    study = load_study_config(path)
    trial = expand_trials(study)[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.get_experiment(uri, study.experiment, study.tracking.artifact_location)
    assert tracking.find_parent(uri, experiment_id, "tiny") is None
    older = tracking.start_parent(uri, experiment_id, study, path, [trial])
    time.sleep(0.01)   # start times are in milliseconds
    parent = tracking.start_parent(uri, experiment_id, study, path, [trial])
    assert tracking.find_parent(uri, experiment_id, "tiny") == parent != older   # the latest one
    assert tracking.find_parent(uri, experiment_id, "other") is None

    run_id = tracking.start_child(uri, parent, trial.to_json(), trial.config)
    assert tracking.logged_iterations(uri, run_id) == set()
    for epoch in (1, 2):
        tracking.log_epoch(uri, run_id, {"epoch": epoch, "iteration": epoch, "valid_loss": 1.0 / epoch})
    assert tracking.start_child(uri, parent, trial.to_json(), trial.config) == run_id
    assert tracking.logged_iterations(uri, run_id) == {1, 2}
    tracking.reopen_parent(uri, parent)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent).data.tags["nem_study.resumes"] == "1"
    assert client.get_run(run_id).data.tags["nem_study.restarts"] == "1"


def test_uris_pass_through_and_local_paths_become_absolute(tmp_path, monkeypatch):
    """A cluster's tracking server, its proxied artifact store and bucket storage stay URIs."""
    from nem_study.study_config import StudyConfig
    from nem_study.contract import resolve_uri
    from nem_study.experiments import storage_path

    monkeypatch.chdir(tmp_path)
    assert resolve_uri("mlflow-artifacts:/x") == "mlflow-artifacts:/x"
    assert resolve_uri("s3://bucket/a") == "s3://bucket/a"
    assert resolve_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert resolve_uri("arts") == (tmp_path / "arts").as_uri()
    study = StudyConfig.model_validate({"name": "s", "storage": "gs://bucket/runs"})
    assert storage_path(study) == "gs://bucket/runs"
    assert storage_path(study.model_copy(update={"storage": "runs"})) == str(tmp_path / "runs")
    # An MLflow server keeps artifacts in its own store unless the study names one.
    assert study.tracking.artifacts == "./mlartifacts"
    server = StudyConfig.model_validate({"name": "s", "tracking": {"uri": "http://mlflow:5000"}})
    assert server.tracking.artifacts is None


def test_an_ensemble_study_stacks_the_seeds_of_a_cell_and_logs_one_child_run_per_seed(tmp_path, local_ray):
    """``ensemble: true``: one Tune trial per grid cell, each seed its own MLflow child run,
    trained as ``fit`` trains it alone."""
    from nem_study.study import run_study
    from nem_study.train import fit

    from conftest import make_splits

    path = study_yaml(tmp_path, "  model.k: [2, 3]", extra="ensemble: true\nevaluations:\n  - {k: 4}\n")
    study = load_study_config(path)
    result = run_study(study, path, verbose=0)
    names = ["k=2,seed=0", "k=2,seed=1", "k=3,seed=0", "k=3,seed=1"]
    assert sorted(result.finished) == names and not result.failed

    folders = sorted((tmp_path / "ray_results" / "tiny").glob("0*"))
    assert [f.name for f in folders] == ["000_k=2,seeds=0-1", "002_k=3,seeds=0-1"]
    for folder in folders:
        checkpoints = list(folder.glob("checkpoint_*"))
        assert checkpoints and all((c / f"seed{s}" / "last.pt").is_file() for c in checkpoints for s in (0, 1))
        for s in (0, 1):
            assert {"groupings.png", "groupings-k4.png"} <= {p.name for p in (folder / f"seed{s}").iterdir()}

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = runs_by_name(tmp_path, result.parent_run_id)
    assert sorted(children) == names
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        for metric in ("train_loss", "valid_loss", "valid_ami", "iteration"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
        assert {"test_ami", "eval/k4/ami"} <= set(run.data.metrics)
        assert {"groupings.png", "groupings-k4.png", "checkpoint"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # A member's run is the run fit makes alone with that config.
    k3_seed1 = study.run_config({"model.k": 3}, 1)
    alone = fit(k3_seed1, make_splits(k3_seed1))
    assert children["k=3,seed=1"].data.metrics["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)


def test_trial_status_comes_from_the_result_grid(tmp_path):
    """``tally`` reads each trial's status from Tune's results alone: an error, its outcome (an
    ensemble member may fail alone), ended without one (ASHA), or neither (left at Ctrl-C)."""
    from types import SimpleNamespace

    from nem_study.study import StudyResult, tally
    from nem_study.trial import OUTCOMES, RUN_IDS
    from nem_study.trials import expand_trials

    study = load_study_config(study_yaml(tmp_path, "  model.k: [2, 3]", extra="ensemble: true\n"))
    trials = expand_trials(study)
    k2, k3 = '{"model.k": 2}', '{"model.k": 3}'

    def row(folder: str, metrics: dict, error: Exception | None = None):
        return SimpleNamespace(path=str(tmp_path / "tiny" / folder), metrics=metrics, error=error)

    outcomes = {"k=2,seed=0": {"test_ami": 0.5, "cell": k2},
                "k=2,seed=1": {"failed": "NonFiniteLoss: non-finite loss (nan) at epoch 3"}}
    result = StudyResult("parent")
    stopped = tally(result, [row("000_k=2,seeds=0-1", {"done": True, OUTCOMES: outcomes}),
                             row("002_k=3,seeds=0-1", {"done": True, RUN_IDS: ["r3a", "r3b"]})], trials, study)
    assert result.finished == ["k=2,seed=0"] and result.best_test_ami == {k2: 0.5}
    assert result.failed == {"k=2,seed=1": "NonFiniteLoss: non-finite loss (nan) at epoch 3"}
    assert result.stopped == ["k=3,seed=0", "k=3,seed=1"] and stopped == ["r3a", "r3b"]

    result = StudyResult("parent", interrupted=True)
    stopped = tally(result, [row("000_k=2,seeds=0-1", {"iteration": 1, RUN_IDS: ["r2a", "r2b"]}),
                             row("002_k=3,seeds=0-1", {}, error=RuntimeError("worker died\nOOM"))], trials, study)
    assert not result.finished and not result.stopped and stopped == []  # k=2 continues on resume
    assert result.failed == {"k=3,seed=0": "OOM", "k=3,seed=1": "OOM"} and k3 not in result.best_test_ami
