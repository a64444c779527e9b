"""A study as Ray Tune experiments: the param space, the trial names, the Tuner.

A grid study is one experiment whose ``param_space`` is the grid itself and ``train.seed``; a
search is one experiment per grid cell, sampled by Optuna; an ensemble study one trial per grid
cell. ``tuner`` builds a Tuner for one of them, or restores it from storage to resume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nem_study import contract
from nem_study.study_config import SpaceConfig, StudyConfig, cell_name
from nem_study.trial import run_trial, trial_index
from nem_study.trials import TrialSpec, sampled_name

CHECKPOINTS_KEPT = 2          # Tune's copies per trial; each holds last.pt (resume) and best.pt


@dataclass
class Experiment:
    """One Tune experiment (one Tuner, one folder under ``storage``) and how to name its trials."""

    name: str
    param_space: dict[str, Any]
    trial_name: Any                 # Tune trial -> trial name
    trial_dirname: Any              # Tune trial -> folder name
    search_alg: Any = None
    num_samples: int = 1


def tune_experiments(study: StudyConfig, trials: list[TrialSpec]) -> list[Experiment]:
    """A grid: one experiment over the grid keys and seeds. A search: one experiment per grid cell.

    Optuna samples within one Tune experiment but cannot take a ``grid_search``, so the grid
    cells run one after another, each with its own sampler seeded by ``search.seed``.
    """
    from ray import tune

    if study.ensemble:  # one Tune trial per grid cell, its seeds stacked (run_trial with config["members"])
        cells = [trials[i:i + study.seeds] for i in range(0, len(trials), study.seeds)]
        return [Experiment(
            study.name, {"members": tune.grid_search([[t.index for t in cell] for cell in cells])},
            lambda t: ensemble_name([trials[i] for i in t.config["members"]]),
            lambda t: f"{t.config['members'][0]:03d}_" + safe_name(ensemble_name([trials[i] for i in t.config["members"]])))]
    if study.search is None:
        # The grid itself, so Tune's table and trial configs read model.k=3, train.seed=0.
        space = {key: tune.grid_search(values) for key, values in study.grid.items()}
        space["train.seed"] = tune.grid_search(study.seed_values)
        return [Experiment(study.name, space, lambda t: trials[trial_index(study, t.config)].name,
                            lambda t: trial_dirname(trials[trial_index(study, t.config)]))]

    from ray.tune.search.optuna import OptunaSearch

    search = study.search
    space = {key: _tune_domain(spec) for key, spec in search.space.items()}

    def sample(t) -> int:  # the search's trial counter (1, 2, ...; kept on resume) starts the tag
        return int(t.experiment_tag.split("_", 1)[0]) - 1

    return [Experiment(
        f"{study.name}-cell{trial.index:03d}", {"trial": trial.index, "space": space},
        lambda t, trial=trial: sampled_name(trial, sample(t)),
        lambda t, trial=trial: f"{sample(t):03d}_" + safe_name(sampled_name(trial, sample(t))),
        OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed), search.n_trials)
        for trial in trials]


def ensemble_name(members: list[TrialSpec]) -> str:
    """``k=3,seeds=0-2``: the Tune trial of a grid cell's stacked seeds."""
    seeds = f"seeds={members[0].seed}-{members[-1].seed}" if len(members) > 1 else f"seed={members[0].seed}"
    return ",".join(filter(None, [cell_name(members[0].cell), seeds]))


def trial_dirname(trial: TrialSpec) -> str:
    return f"{trial.index:03d}_" + safe_name(trial.name)


def _tune_domain(spec: SpaceConfig) -> Any:
    from ray import tune

    if spec.choices is not None:
        return tune.choice(spec.choices)
    if spec.integer:  # Tune's integer ranges exclude the upper end; ours include it
        return (tune.lograndint if spec.log else tune.randint)(spec.low, spec.high + 1)
    return (tune.loguniform if spec.log else tune.uniform)(spec.low, spec.high)


def tuner(study: StudyConfig, trials: list[TrialSpec], experiment: Experiment, uri: str, parent_run_id: str,
          verbose: int, resume: bool):
    """A new Tuner for ``experiment``, or with ``resume`` the interrupted one restored from storage."""
    from ray import tune

    from nem_study import data

    trainable = tune.with_parameters(
        run_trial, trials=[t.to_json() for t in trials], study=study, tracking_uri=uri,
        parent_run_id=parent_run_id, data_dir=str(data.data_dir().resolve()),
        threads=max(1, int(study.resources.cpu)))
    trainable = tune.with_resources(trainable, {"cpu": study.resources.cpu, "gpu": study.resources.gpu})
    path = join(storage_path(study), experiment.name)
    if resume and tune.Tuner.can_restore(path):
        # Finished trials stay as they are; unfinished and errored ones go on from their last
        # checkpoint, in their own folders, so they re-attach to their own MLflow child runs.
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=experiment.param_space,
        tune_config=tune.TuneConfig(
            search_alg=experiment.search_alg, num_samples=experiment.num_samples, scheduler=_scheduler(study, trials),
            # A worker runs trial after trial: no new process, torch import and MLflow store
            # per trial (4 s of setup, BENCHMARKS.md). Its trial folders then reach storage
            # only by artifact syncing, hence sync_artifacts below.
            reuse_actors=True,
            trial_name_creator=experiment.trial_name, trial_dirname_creator=experiment.trial_dirname),
        run_config=tune.RunConfig(
            name=experiment.name, storage_path=storage_path(study), verbose=verbose,
            sync_config=tune.SyncConfig(sync_artifacts=True),
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))


def _scheduler(study: StudyConfig, trials: list[TrialSpec]) -> Any:
    """ASHA on the validation loss, in epochs counted over curriculum stages (``iteration``:
    unlike Tune's ``training_iteration`` it does not restart when a trial restarts)."""
    if study.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(t.config.train.max_epochs * len(t.config.data.curriculum or [None]) for t in trials)
    return ASHAScheduler(time_attr="iteration", metric="valid_loss", mode="min", max_t=max_t,
                         grace_period=study.scheduler.grace_period,
                         reduction_factor=study.scheduler.reduction_factor,
                         stop_last_trials=False)  # a trial at max_t still ends itself, with its test


def result_names(trials: list[TrialSpec], study: StudyConfig, result: Any) -> list[str]:
    """The trial names (MLflow child runs) a Tune result stands for: an ensemble's seeds, or one.

    Read from the trial's folder (``<index>_<name>``, see ``tune_experiments``), not its config:
    a trial that never reported (pending at Ctrl-C, or failed at once) has no config.
    """
    folder = Path(result.path)
    first = int(folder.name.split("_", 1)[0])
    if study.ensemble:
        return [t.name for t in trials[first:first + study.seeds]]
    if study.search is None:
        return [trials[first].name]
    cell = int(re.search(r"-cell(\d+)$", folder.parent.name).group(1))   # one experiment per cell
    return [sampled_name(trials[cell], first)]


def storage_path(study: StudyConfig) -> str:
    """Where Tune keeps the study: a local folder (made absolute) or a URI such as ``s3://b/x``."""
    return study.storage if contract.has_scheme(study.storage) else str(Path(study.storage).resolve())


def join(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", name)[:100]
