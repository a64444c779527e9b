"""MLflow: one parent run per study, one child run per trial, metrics and artifacts.

Everything here is plain MLflow client calls on plain data (dicts, files), so the trial
function can call it from any Ray worker. The trainer never imports this module.

Tag and artifact names, URI resolution and the client come from ``nem_study.contract``, the
contract the report (``analysis``) reads back with. A tracking URI is resolved once, in the
driver: relative SQLite paths and artifact folders become absolute, because Ray runs each trial
in its own working directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from nem_study import contract
from nem_study.config import InputError, RunConfig, flat
from nem_study.contract import (AMI_PER_STEP, CELL_TAG, CHECKPOINT, EVALUATIONS, KIND_TAG, PARENT_TAG, SAMPLED_TAG,
                                SEED_TAG, STUDY_RESOLVED, STUDY_TAG, TEST_METRICS, TRIAL_TAG, TRIALS,
                                http_unreachable, resolve_uri)
from nem_study.study_config import StudyConfig
from nem_study.trials import TrialSpec

DESCRIPTIVE = {"test_n", "test_k", "test_steps", "test_static"}


def ensure_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early, naming the URI, if the tracking store cannot be used.

    HTTP servers get one short probe first: the MLflow client itself retries with back-off
    for minutes before it gives up.
    """
    if (why := http_unreachable(uri, timeout_s)) is not None:
        raise InputError(f"tracking.uri {uri}: the MLflow server is not reachable "
                         f"({why}). Start it (mlflow server ...) or fix the URI.") from None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise InputError(f"tracking.uri {uri}: the folder {folder} does not exist")
    try:
        contract.client(uri).search_experiments(max_results=1)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise InputError(f"tracking.uri {uri}: the MLflow tracking store is not usable "
                         f"({type(e).__name__}: {first})") from None


def find_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name``, None if there is none (nothing is created)."""
    experiment = contract.client(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else None


def get_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (with its artifact folder) if absent."""
    client = contract.client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=resolve_uri(artifact_location) if artifact_location else None)


def git_commit() -> str | None:
    """The commit of the source tree this package runs from, with ``-dirty`` if changed."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def start_parent(uri: str, experiment_id: str, study: StudyConfig, study_yaml: str | Path,
                 trials: list[TrialSpec]) -> str:
    """One parent run per study: its name, version, commit, the YAML and the trial list."""
    from importlib.metadata import version

    client = contract.client(uri)
    tags = {"nem_study.version": version("nem-study"), KIND_TAG: "study", STUDY_TAG: study.name}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name=study.name, tags=tags)
    run_id = run.info.run_id
    client.log_param(run_id, "study", study.name)
    client.log_param(run_id, "trials", len(trials) * (study.search.n_trials if study.search else 1))
    client.log_param(run_id, "seeds", study.seeds)
    client.log_param(run_id, "grid", json.dumps(study.grid)[:6000])
    if study.search is not None:
        client.log_param(run_id, "search", json.dumps(study.search.model_dump(mode="json"))[:6000])
    client.log_artifact(run_id, str(study_yaml))
    client.log_dict(run_id, study.model_dump(mode="json"), STUDY_RESOLVED)  # with --set overrides
    client.log_dict(run_id, [t.to_json() for t in trials], TRIALS)
    return run_id


def find_parent(uri: str, experiment_id: str, study_name: str) -> str | None:
    """The latest parent run of study ``study_name`` in the experiment (None if there is none)."""
    runs = contract.client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{KIND_TAG}` = 'study'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def study_as_started(uri: str, run_id: str) -> dict[str, Any] | None:
    """The resolved study a parent run started with (``study_resolved.yaml``), None if absent."""
    import yaml

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file, no bar on stderr
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = contract.client(uri).download_artifacts(run_id, STUDY_RESOLVED, tmp)
        except Exception:  # MLflow raises its own errors for a missing artifact, by store
            return None
        return yaml.safe_load(Path(path).read_text())


def reopen_parent(uri: str, run_id: str) -> None:
    """A resumed study runs under its parent again (RUNNING until it ends)."""
    client = contract.client(uri)
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "nem_study.resumes", int(run.data.tags.get("nem_study.resumes", 0)) + 1)


def end_parent(uri: str, run_id: str, finished: int, failed: int, interrupted: bool = False) -> None:
    """FINISHED; or, ``interrupted`` (Ctrl-C), KILLED with how to go on: `nem-study resume`."""
    client = contract.client(uri)
    client.log_metric(run_id, "trials_finished", finished)
    client.log_metric(run_id, "trials_failed", failed)
    if interrupted:
        client.set_tag(run_id, "stop_reason", "interrupted; continue with `nem-study resume`")
    client.set_terminated(run_id, "KILLED" if interrupted else "FINISHED")


def flatten(config: RunConfig) -> dict[str, str]:
    """``{"model.k": "3", ...}``: the resolved run config as MLflow params."""
    return {key: str(value) for key, value in flat(config).items()}


def start_child(uri: str, parent_run_id: str, trial: dict[str, Any], config: RunConfig) -> str:
    """The child run of a trial; a restarted trial re-attaches to its earlier run."""
    client = contract.client(uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    earlier = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                       f"and tags.`{TRIAL_TAG}` = '{trial['name']}'", max_results=1)
    if earlier:
        run_id, tags = earlier[0].info.run_id, earlier[0].data.tags
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "nem_study.restarts", int(tags.get("nem_study.restarts", 0)) + 1)
        if "failure_reason" in tags:  # a restart that finishes is not a failure; keep why it restarted
            client.set_tag(run_id, "previous_failure_reason", tags["failure_reason"])
            client.delete_tag(run_id, "failure_reason")
        return run_id
    tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial["name"], SEED_TAG: str(trial["seed"]),
            CELL_TAG: json.dumps(trial["cell"])}
    tags.update({SAMPLED_TAG + key: str(value) for key, value in trial.get("sampled", {}).items()})
    run = client.create_run(experiment_id, run_name=trial["name"], tags=tags)
    _log_params(client, run.info.run_id, flatten(config))
    return run.info.run_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[lo:lo + 100])


def _metrics(values: dict[str, Any], step: int):
    """Finite numbers only: MLflow stores floats, and a NaN AMI (no objects) says nothing."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def logged_iterations(uri: str, run_id: str) -> set[int]:
    """The epochs (counted over curriculum stages) a run has logged already."""
    return {m.step for m in contract.client(uri).get_metric_history(run_id, "iteration")}


def log_epoch(uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """One epoch's metrics, with ``step`` = the epoch counted over all curriculum stages."""
    contract.client(uri).log_batch(run_id, metrics=_metrics(metrics, int(metrics["iteration"])))


def log_final(uri: str, run_id: str, result: dict[str, Any], evaluations: list[dict[str, Any]],
              panel: Path | None = None) -> None:
    """Test metrics, AMI per step (a metric history and a table), each evaluation (metrics
    ``eval/<name>/...`` and ``evaluations.json``), the Figure-4 panel, the best checkpoint; FINISHED."""
    client = contract.client(uri)
    # Counts that describe the evaluation (n, k, steps) live in test_metrics.json, not as metrics.
    scalars = {k: v for k, v in result.items() if not isinstance(v, list) and k not in DESCRIPTIVE}
    for ev in evaluations:
        scalars |= {f"eval/{ev['name']}/{key}": ev[key] for key in ("ami", "ami_mean", "ami_last", "bce_bound")}
    client.log_batch(run_id, metrics=_metrics(scalars, int(result.get("epochs", 0))))
    per_step = result.get("test_ami_per_step", [])
    steps = [m for t, ami in enumerate(per_step, start=1) for m in _metrics({"test_ami_step": ami}, t)]
    for lo in range(0, len(steps), 1000):
        client.log_batch(run_id, metrics=steps[lo:lo + 1000])
    client.set_tag(run_id, "stop_reason", str(result.get("stop_reason")))
    if "precision" in result:  # what train.precision 'auto' resolved to on the trial's machine
        client.set_tag(run_id, "precision", result["precision"])
    if "test_ami_score" in result:  # which step(s) test_ami scores: 'last' (static) or 'mean'
        client.set_tag(run_id, "ami_score", result["test_ami_score"])
    table = {"step": list(range(1, len(per_step) + 1)), "test_ami": per_step,
             "test_ami_q25": result.get("test_ami_q25_per_step", []),
             "test_ami_q75": result.get("test_ami_q75_per_step", []),
             "test_bce_bound": result.get("test_bce_per_step", [])}
    client.log_dict(run_id, table, AMI_PER_STEP)
    client.log_dict(run_id, result, TEST_METRICS)
    client.log_dict(run_id, evaluations, EVALUATIONS)
    if panel is not None:
        for png in sorted(panel.parent.glob(panel.stem + "*.png")):  # groupings.png, groupings-<eval>.png
            client.log_artifact(run_id, str(png))
    best = result.get("checkpoint")
    if best is not None and Path(best).is_file():
        client.log_artifact(run_id, best, artifact_path=CHECKPOINT)
    client.set_terminated(run_id, "FINISHED")


def mark_stopped(uri: str, run_id: str, reason: str) -> None:
    """KILLED: stopped early on purpose (ASHA), not failed; no test metrics."""
    client = contract.client(uri)
    client.set_tag(run_id, "stop_reason", reason)
    client.set_terminated(run_id, "KILLED")


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:5000]


def mark_failed(uri: str, run_id: str, error: BaseException) -> None:
    """FAILED, with the reason as a tag (the exception still propagates to Ray)."""
    client = contract.client(uri)
    client.set_tag(run_id, "failure_reason", failure_reason(error))
    client.set_terminated(run_id, "FAILED")


def child_runs(uri: str, parent_run_id: str) -> list[Any]:
    """All child runs of a study's parent run."""
    client = contract.client(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)
