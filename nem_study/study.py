"""A study on Ray Tune: every trial of ``expand_trials`` runs ``fit`` once, tracked in MLflow.

The driver (``run_study``) checks the tracking store, opens the study's parent run, and hands
Ray Tune a grid over trial indices, so one Tune trial is exactly one ``TrialSpec``. Each trial
(``run_trial``, a plain function) trains in its Tune trial folder, reports every epoch with
its checkpoint folder, and on a restart after a failure resumes from the last checkpoint.
All Ray code lives here, all MLflow code in ``nem_study.tracking``.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nem_study import tracking
from nem_study.config import InputError, RunConfig, StudyConfig, TrialSpec, expand_trials

CHECKPOINTS_KEPT = 2          # Tune's copies per trial; each holds last.pt (resume) and best.pt
CPUS_ENV = "NEM_RAY_CPUS"     # CPUs of a local Ray instance (default: all of this machine)


@dataclass
class StudyResult:
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)          # trial name -> error
    best_test_ami: dict[str, float] = field(default_factory=dict)  # grid cell -> best over seeds


# ----------------------------------------------------------------------------------------
# One trial, in a Ray worker


def run_trial(config: dict[str, Any], *, trials: list[dict[str, Any]], tracking_uri: str,
              parent_run_id: str, data_dir: str, threads: int) -> None:
    """Train one trial; every epoch goes to Tune (with its checkpoint) and to MLflow."""
    from ray import tune

    from nem_study import data
    from nem_study.train import fit

    trial = trials[config["trial"]]
    os.environ["NEM_DATA_DIR"] = data_dir  # the cache the driver sees, whatever the worker's env
    cfg = RunConfig.model_validate(trial["config"])
    checkpoint_dir = Path(tune.get_context().get_trial_dir()) / "checkpoints"
    cfg.train.checkpoint_dir = str(checkpoint_dir)
    cfg.train.threads = cfg.train.threads or threads
    run_id = tracking.start_child(tracking_uri, parent_run_id, trial, cfg)

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        tracking.log_epoch(tracking_uri, run_id, metrics)
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    try:
        resume = _restore(tune.get_checkpoint(), checkpoint_dir)
        splits = {s: data.load(cfg.data, s, progress=False) for s in data.SPLITS}
        result = fit(cfg, splits, report=report, resume=resume)
    except BaseException as e:
        tracking.mark_failed(tracking_uri, run_id, e)
        raise  # Ray marks the trial failed (and restarts it up to max_failures times)
    tracking.log_final(tracking_uri, run_id, result, checkpoint_dir)


def _restore(checkpoint: Any, checkpoint_dir: Path) -> Path | None:
    """After a restart: put Tune's latest checkpoint back in place; the last.pt to resume from."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as restored:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt"):
            if (Path(restored) / name).is_file() and Path(restored) != checkpoint_dir:
                shutil.copy2(Path(restored) / name, checkpoint_dir / name)
    return checkpoint_dir / "last.pt"


# ----------------------------------------------------------------------------------------
# The driver


def trial_dirname(trial: TrialSpec) -> str:
    return f"{trial.index:03d}_" + re.sub(r"[^A-Za-z0-9_.=,-]", "_", trial.name)[:100]


def _start_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if address:
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise InputError(f"--address {address}: no Ray cluster to connect to ({e})") from None
        return
    if num_cpus is None and os.environ.get(CPUS_ENV):
        try:
            num_cpus = int(os.environ[CPUS_ENV])
        except ValueError:
            raise InputError(f"${CPUS_ENV}={os.environ[CPUS_ENV]!r}: expected a number of CPUs") from None
    ray.init(num_cpus=num_cpus, include_dashboard=False)


def _tune(study: StudyConfig, trials: list[TrialSpec], uri: str, parent_run_id: str, verbose: int):
    """One Tune trial per TrialSpec: a grid over trial indices, named after the specs."""
    from ray import tune

    from nem_study import data

    trainable = tune.with_parameters(
        run_trial, trials=[t.to_json() for t in trials], tracking_uri=uri, parent_run_id=parent_run_id,
        data_dir=str(data.data_dir().resolve()), threads=max(1, int(study.resources.cpu)))
    trainable = tune.with_resources(trainable, {"cpu": study.resources.cpu, "gpu": study.resources.gpu})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.index for t in trials])},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: trials[t.config["trial"]].name,
            trial_dirname_creator=lambda t: trial_dirname(trials[t.config["trial"]])),
        run_config=tune.RunConfig(
            name=study.name, storage_path=str(Path(study.storage).resolve()), verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))
    return tuner.fit()


def run_study(study: StudyConfig, study_yaml: str | Path, address: str | None = None,
              num_cpus: int | None = None, verbose: int = 1) -> StudyResult:
    """Run every trial of ``study``; return what finished, what failed and the best test AMI.

    ``address``: an existing Ray cluster (``auto`` or ``HOST:PORT``); otherwise a local Ray
    with ``num_cpus`` (default ``$NEM_RAY_CPUS``, else all CPUs). A Ray instance already
    started in this process is used as it is.
    """
    import ray

    trials = expand_trials(study)
    uri = tracking.resolve_uri(study.tracking.uri)
    tracking.ensure_reachable(uri)  # before any trial starts
    experiment_id = tracking.get_experiment(uri, study.experiment, study.tracking.artifact_location)

    started_ray = not ray.is_initialized()
    if started_ray:
        _start_ray(address, num_cpus)
    try:
        parent_run_id = tracking.start_parent(uri, experiment_id, study, study_yaml, trials)
        try:
            grid = _tune(study, trials, uri, parent_run_id, verbose)
        except BaseException as e:
            tracking.mark_failed(uri, parent_run_id, e)  # the parent run must not stay RUNNING
            raise
    finally:
        if started_ray:
            ray.shutdown()

    result = StudyResult(parent_run_id)
    for r in grid:
        name = trials[r.config["trial"]].name
        if r.error is not None:
            result.failed[name] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() \
                else type(r.error).__name__
        else:
            result.finished.append(name)
    for run in tracking.child_runs(uri, parent_run_id):
        ami = run.data.metrics.get("test_ami")
        cell = run.data.tags.get("nem_study.cell", "{}")
        if run.info.status == "FINISHED" and ami is not None:
            result.best_test_ami[cell] = max(ami, result.best_test_ami.get(cell, -1.0))
    tracking.end_parent(uri, parent_run_id, len(result.finished), len(result.failed))
    return result
