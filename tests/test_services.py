"""A study survives its services failing (issue 20), each with the real service on loopback.

- The MLflow tracking server (SQLite behind it, artifacts proxied) is stopped mid-trial and
  started again: the trial's calls wait in MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_
  MAX_RETRIES``, 7 by default: about 4 minutes), the study finishes, and every trial has one
  child run with every epoch logged once. Beyond the retries a trial fails and Ray Tune restarts
  it from its checkpoint, into the same child run (test_study.py covers that restart).
- A second ``nem-study run`` of a running study is refused; ``nem-study resume`` of an edited
  study is refused, naming the edit, and writes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import free_port, http_ok

from nem_study.study_config import load_study_config
from nem_study.guards import check_unchanged
from nem_study.tracking import child_runs

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("ray")

BIN = Path(sys.executable).parent


def study_yaml(tmp_path: Path, uri: str, max_epochs: int, grid: str = "  model.k: [2, 3]",
               lr: str = "0.001") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"""
name: services
base:
  data: {{name: static_shapes, train: 32, valid: 16, test: 16}}
  model: {{em_steps: 3}}
  train: {{batch_size: 16, valid_samples: 16, patience: 1000, lr: {lr}}}
grid:
{grid}
stop: {{max_epochs: {max_epochs}}}
tracking:
  uri: {uri}
  artifact_location: {tmp_path / 'mlartifacts'}
storage: {tmp_path / 'ray_results'}
""")
    return path


def start_cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEM_RAY_CPUS": "1", "NEM_DATA_DIR": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-m", "nem_study.cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(what: str, ready, timeout: float, step: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(step)


def epochs_logged(run_id: str, uri: str, metric: str = "iteration") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, metric))


def parents(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "tags.`nem_study.kind` = 'study'")]


class MlflowServer:
    """``mlflow server`` on a fixed loopback port, to be stopped and started again."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{root / 'server.db'}"

    def start(self) -> None:
        log = open(self.root / "mlflow-server.log", "a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.root / "served-artifacts"), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=log, start_new_session=True)   # its own group: stop() ends its workers too
        wait_for("the MLflow server", lambda: http_ok(f"{self.uri}/health"), 240, step=0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        wait_for("the MLflow server to go", lambda: not http_ok(f"{self.uri}/health"), 30)


def test_the_mlflow_server_stopped_mid_trial_and_started_again(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    study = None
    try:
        path = study_yaml(tmp_path, server.uri, max_epochs=15)
        study = start_cli(tmp_path, "run", str(path))

        def running_child():   # a trial that has logged two epochs
            for parent in parents(server.uri):
                for run in child_runs(server.uri, parent.info.run_id):
                    if run.info.status == "RUNNING" and len(epochs_logged(run.info.run_id, server.uri)) >= 2:
                        return run
            return None

        wait_for("a trial logging epochs", lambda: running_child() is not None or study.poll() is not None, 240)
        run = running_child()
        assert run is not None, study.communicate()
        logged_before = len(epochs_logged(run.info.run_id, server.uri))
        server.stop()
        time.sleep(8)   # the trial trains on and waits in MLflow's retries meanwhile
        assert study.poll() is None, study.communicate()
        server.start()
        back = time.time()
        out, err = study.communicate(timeout=300)
    finally:
        if study is not None and study.poll() is None:   # a failed check above: do not leave the study running
            study.kill()
        server.stop()
    assert study.returncode == 0, (study.returncode, err[-3000:])
    assert "2 trial(s) finished, 0 failed" in out, out

    store = server.backend   # read back from the server's own store, the server gone
    [parent] = parents(store)
    children = {r.info.run_name: r for r in child_runs(store, parent.info.run_id)}
    assert sorted(children) == ["k=2,seed=0", "k=3,seed=0"]
    for child in children.values():
        assert child.info.status == "FINISHED"
        epochs = int(child.data.metrics["epochs"])
        for metric in ("iteration", "train_loss", "valid_loss", "valid_ami"):
            assert epochs_logged(child.info.run_id, store, metric) == list(range(1, epochs + 1)), metric
    # The trial that was logging when the server went logged the rest of its epochs, and ended, after.
    cut = children[run.info.run_name]
    assert logged_before < int(cut.data.metrics["epochs"]) and cut.info.end_time / 1000 > back


def test_a_second_run_is_refused_and_an_edited_study_does_not_resume(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = study_yaml(tmp_path, uri, max_epochs=3)
    lock = tmp_path / "ray_results" / ".services.lock"
    first = start_cli(tmp_path, "run", str(path))
    # Once the first driver holds the lock and has opened its parent run.
    wait_for("the first driver", lambda: lock.exists() and "pid" in lock.read_text() and (tmp_path / "mlflow.db").exists()
             and parents(uri), 120)

    t0 = time.monotonic()
    second = start_cli(tmp_path, "run", str(path))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2 and time.monotonic() - t0 < 30, (second.returncode, err, first.communicate())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"study 'services' is running already (pid {first.pid} on " in err and "nem-study resume" in err

    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    [parent] = parents(uri)          # one parent run, its two trials
    assert sorted(r.info.run_name for r in child_runs(uri, parent.info.run_id)) == ["k=2,seed=0", "k=3,seed=0"]

    def state() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}

    before = state()
    for edit, named in [({"grid": "  model.k: [2, 4]"}, "grid.model.k: [2, 3] -> [2, 4]"),
                        ({"lr": "0.01"}, "base.train.lr: 0.001 -> 0.01")]:
        study_yaml(tmp_path, uri, max_epochs=3, **edit)
        r = start_cli(tmp_path, "resume", str(path))
        _, err = r.communicate(timeout=120)
        assert r.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"study 'services' changed since it started: {named}. Resume runs the study as it started" in err
        assert state() == {**before, str(path): state()[str(path)]}   # nothing written but the edit

    # Unedited, the stored study compares equal to the file (floats and lists survive MLflow's YAML).
    study_yaml(tmp_path, uri, max_epochs=3)
    check_unchanged(load_study_config(path), uri, parent.info.run_id)
    assert json.loads(out.strip().splitlines()[-1])["finished"] == 2
