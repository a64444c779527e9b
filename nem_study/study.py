"""A study on Ray Tune: every trial of ``expand_trials`` runs ``fit`` once, tracked in MLflow.

The driver (``run_study``) checks what it needs before anything starts (``nem_study.guards``),
generates the data, opens the study's parent run and runs the study's Tune experiments
(``nem_study.experiments``: the grid and seeds as Tune's ``param_space``, or an Optuna search per
grid cell), each trial one call of ``nem_study.trial.run_trial``. After the driver died,
``run_study(resume=True)`` restores the Tune experiments from storage. Ray code lives in these
modules, all MLflow code in ``nem_study.tracking``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nem_study import contract, tracking
from nem_study.config import InputError
from nem_study.experiments import Experiment, join, result_names, storage_path, tune_experiments, tuner
from nem_study.guards import check_address, check_unchanged, driver_lock
from nem_study.study_config import StudyConfig
from nem_study.trial import OUTCOMES, RUN_IDS
from nem_study.trials import TrialSpec, expand_trials

CPUS_ENV = "NEM_RAY_CPUS"     # CPUs of a local Ray instance (default: all of this machine)


@dataclass
class StudyResult:
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)          # trial name -> error
    best_test_ami: dict[str, float] = field(default_factory=dict)  # grid cell -> best over seeds
    stopped: list[str] = field(default_factory=list)               # stopped early by ASHA
    interrupted: bool = False   # Ctrl-C: Tune saved its state and returned before the end


def _start_ray(address: str | None, num_cpus: int | None, num_gpus: int | None = None) -> None:
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
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)


def data_specs(study: StudyConfig, trials: list[TrialSpec]) -> list[Any]:
    """Every data set the trials and their evaluations read (curriculum stages too), once each."""
    from nem_study.evaluate import test_spec
    from nem_study.curriculum import curriculum_stages

    specs = {}
    for trial in trials:
        stages = curriculum_stages(trial.config)
        for stage in stages:
            specs[stage.data.model_dump_json()] = stage.data
        for ev in study.evaluations:  # they test the last stage's checkpoint, with its data spec
            spec = test_spec(stages[-1], ev.objects, ev.steps)
            specs[spec.model_dump_json()] = spec
    return list(specs.values())


def prepare_data(study: StudyConfig, trials: list[TrialSpec], mnist_path: str | None = None) -> None:
    """Generate every data set of :func:`data_specs`. A missing MNIST is then one clear error
    before any trial starts, not a failure per trial."""
    from nem_study import data

    for spec in data_specs(study, trials):
        data.ensure(spec, mnist_path=mnist_path)


def run_study(study: StudyConfig, study_yaml: str | Path, address: str | None = None,
              num_cpus: int | None = None, verbose: int = 1, resume: bool = False,
              num_gpus: int | None = None, mnist_path: str | None = None) -> StudyResult:
    """Run every trial of ``study``; return what finished, what failed and the best test AMI.

    ``address``: an existing Ray cluster (``auto`` or ``HOST:PORT``); otherwise a local Ray
    with ``num_cpus`` (default ``$NEM_RAY_CPUS``, else all CPUs) and ``num_gpus`` (default:
    those Ray detects). A Ray instance already started in this process is used as it is.

    ``resume``: continue a study whose driver died, from its Tune state in ``storage`` and
    under its latest MLflow parent run; its trials keep their child runs.
    """
    from ray import tune

    trials = expand_trials(study)
    experiments = tune_experiments(study, trials)
    storage = storage_path(study)
    if resume and not any(tune.Tuner.can_restore(join(storage, e.name)) for e in experiments):
        raise InputError(f"study {study.name!r}: nothing to resume in {join(storage, experiments[0].name)} "
                         "(no Tune experiment state there; start the study with `nem-study run`)")
    check_address(address)  # before anything is written
    uri = contract.resolve_uri(study.tracking.uri)
    tracking.ensure_reachable(uri)  # before any trial starts
    parent_run_id = None
    if resume:
        experiment = tracking.find_experiment(uri, study.experiment)
        parent_run_id = experiment and tracking.find_parent(uri, experiment, study.name)
        if parent_run_id is None:
            raise InputError(f"study {study.name!r}: no parent run in MLflow experiment {study.experiment!r} "
                             f"at {uri} to resume under")
        check_unchanged(study, uri, parent_run_id)
    prepare_data(study, trials, mnist_path)  # once, here: trials then only read the cache (a bad --mnist: no lock)
    with driver_lock(study):
        return _drive(study, study_yaml, trials, experiments, uri, parent_run_id, address, num_cpus, num_gpus,
                      verbose, resume)


def _drive(study: StudyConfig, study_yaml: str | Path, trials: list[TrialSpec], experiments: list[Experiment],
           uri: str, parent_run_id: str | None, address: str | None, num_cpus: int | None, num_gpus: int | None,
           verbose: int, resume: bool) -> StudyResult:
    """``run_study`` once it holds the study's driver lock (``parent_run_id``: the one to resume)."""
    import ray

    experiment_id = tracking.get_experiment(uri, study.experiment, study.tracking.artifacts)
    started_ray = not ray.is_initialized()
    if started_ray:
        _start_ray(address, num_cpus, num_gpus)
    rows, interrupted = [], False
    try:
        if parent_run_id is None:
            parent_run_id = tracking.start_parent(uri, experiment_id, study, study_yaml, trials)
        else:
            tracking.reopen_parent(uri, parent_run_id)
        try:
            for experiment in experiments:
                grid = tuner(study, trials, experiment, uri, parent_run_id, verbose, resume).fit()
                rows += list(grid)
                # Ctrl-C: Tune saved its state and returned, with trials that neither ended ("done",
                # set on a trial's return and on a scheduler's stop) nor failed.
                if any(r.error is None and not r.metrics.get("done") for r in grid):
                    interrupted = True
                    break
        except BaseException as e:
            tracking.mark_failed(uri, parent_run_id, e)  # the parent run must not stay RUNNING
            raise
    finally:
        if started_ray:
            ray.shutdown()

    result = StudyResult(parent_run_id, interrupted=interrupted)
    for run_id in tally(result, rows, trials, study):  # their workers may have gone before they could say so
        tracking.mark_stopped(uri, run_id, "stopped early by the scheduler (ASHA)")
    # Interrupted, the parent stays open to `nem-study resume`; its trials' runs are left as they are.
    tracking.end_parent(uri, parent_run_id, len(result.finished), len(result.failed), interrupted=interrupted)
    return result


def tally(result: StudyResult, rows: list[Any], trials: list[TrialSpec], study: StudyConfig) -> list[str]:
    """Each trial's status from Tune's ResultGrid rows, into ``result``: an error (failed), its
    outcome as its last result (finished, or an ensemble member failed alone), ended without one
    (stopped early by ASHA), or neither (left at Ctrl-C, for resume). Returns the MLflow run ids
    of the stopped trials."""
    stopped_runs = []
    for r in rows:
        outcomes = r.metrics.get(OUTCOMES) if r.error is None else None
        for name in result_names(trials, study, r):
            if r.error is not None:
                result.failed[name] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() \
                    else type(r.error).__name__
            elif outcomes is not None and "failed" in outcomes[name]:
                result.failed[name] = outcomes[name]["failed"][:300]
            elif outcomes is not None:
                result.finished.append(name)
                cell, ami = outcomes[name]["cell"], outcomes[name]["test_ami"]
                if ami is not None:
                    result.best_test_ami[cell] = max(ami, result.best_test_ami.get(cell, -1.0))
            elif r.metrics.get("done"):
                result.stopped.append(name)
        if r.error is None and outcomes is None and r.metrics.get("done"):
            stopped_runs += r.metrics.get(RUN_IDS, [])
    return stopped_runs
