"""A study on Ray Tune: every trial of ``expand_trials`` runs ``fit`` once, tracked in MLflow.

The driver (``run_study``) checks the tracking store, opens the study's parent run, and hands
Ray Tune the study's grid and seeds as its ``param_space`` (``model.k``, ``train.seed``), so one
Tune trial is exactly one ``TrialSpec`` and Tune's table speaks the config; with a
``search``, one Tune experiment per grid cell samples ``n_trials`` configs with Optuna. After the
driver died, ``run_study(resume=True)`` restores the Tune experiments from storage. Each trial
(``run_trial``, a plain function) trains in its Tune trial folder, reports every epoch with
its checkpoint folder, and on a restart after a failure resumes from the last checkpoint.
All Ray code lives here, all MLflow code in ``nem_study.tracking``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nem_study import contract, tracking
from nem_study.config import InputError, RunConfig, replace
from nem_study.study_config import SpaceConfig, StudyConfig, cell_name, grid_cells
from nem_study.trials import TrialSpec, expand_trials, sampled_name

CHECKPOINTS_KEPT = 2          # Tune's copies per trial; each holds last.pt (resume) and best.pt
CPUS_ENV = "NEM_RAY_CPUS"     # CPUs of a local Ray instance (default: all of this machine)


@dataclass
class StudyResult:
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)          # trial name -> error
    best_test_ami: dict[str, float] = field(default_factory=dict)  # grid cell -> best over seeds
    stopped: list[str] = field(default_factory=list)               # stopped early by ASHA
    interrupted: bool = False   # Ctrl-C: Tune saved its state and returned before the end


# ----------------------------------------------------------------------------------------
# One trial, in a Ray worker


def run_trial(config: dict[str, Any], *, trials: list[dict[str, Any]], study: StudyConfig, tracking_uri: str,
              parent_run_id: str, data_dir: str, threads: int) -> None:
    """Train one trial; every epoch goes to Tune (with its checkpoint) and to MLflow.

    ``config`` holds a grid cell's values and ``train.seed`` (see ``trial_index``); with a search,
    ``config["trial"]`` is the index of a TrialSpec and ``config["space"]`` holds
    the values sampled for this trial, set over the TrialSpec's grid cell. The seconds spent
    before training, in training and testing (of which reporting epochs to Tune and MLflow),
    and in the evaluations go to MLflow as ``trial_*_seconds`` (what a trial costs beyond its
    training: BENCHMARKS.md).
    """
    t_start = time.monotonic()
    from ray import tune

    from nem_study import data
    from nem_study.train import fit_curriculum

    trial = trials[trial_index(study, config)]
    os.environ["NEM_DATA_DIR"] = data_dir  # the cache the driver sees, whatever the worker's env
    sampled = config.get("space") or {}
    if sampled:
        cfg = study.run_config({**trial["cell"], **sampled}, trial["seed"])
        trial = {**trial, "name": tune.get_context().get_trial_name(), "sampled": sampled}
    else:
        cfg = RunConfig.model_validate(trial["config"])
    cfg = replace(cfg, {"train.threads": cfg.train.threads or threads})
    run_id = tracking.start_child(tracking_uri, parent_run_id, trial, cfg)
    # After a restart or a resumed study, epochs between the last checkpoint and the crash run
    # again; MLflow keeps their first values, so each epoch is in the history once.
    logged = tracking.logged_iterations(tracking_uri, run_id)
    trial_dir = Path(tune.get_context().get_trial_dir())  # synced to storage: the panels
    panel = trial_dir / "groupings.png"
    # The trainer's own last.pt/best.pt stay out of the synced folder: Tune copies them to
    # storage as its checkpoints already, and they are large (40 MB for flying shapes).
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="nem-checkpoints-"))
    cfg = replace(cfg, {"train.checkpoint_dir": str(checkpoint_dir)})

    reporting = [0.0]  # seconds spent handing epochs to MLflow and Tune (inside the fit)

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        t0 = time.monotonic()
        if int(metrics["iteration"]) not in logged:
            tracking.log_epoch(tracking_uri, run_id, metrics)
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        tune.report(metrics, checkpoint=checkpoint)
        reporting[0] += time.monotonic() - t0

    try:
        resume = _restore(tune.get_checkpoint(), checkpoint_dir)
        t_fit = time.monotonic()
        result = fit_curriculum(cfg, lambda spec, split: data.load(spec, split, progress=False),
                                report=report, resume=resume, panel=panel)
        t_evaluations = time.monotonic()
        evaluations = run_evaluations(study, cfg, result.get("checkpoint"), trial_dir)
        result |= {"trial_setup_seconds": t_fit - t_start, "trial_fit_seconds": t_evaluations - t_fit,
                   "trial_report_seconds": reporting[0],
                   "trial_evaluations_seconds": time.monotonic() - t_evaluations}
        tracking.log_final(tracking_uri, run_id, result, evaluations, panel)
    except SystemExit:  # Tune stopped the trial (the scheduler, or the study ending): not a failure
        tracking.mark_stopped(tracking_uri, run_id, "stopped by Ray Tune (the scheduler, or the study interrupted)")
        raise
    except BaseException as e:
        tracking.mark_failed(tracking_uri, run_id, e)
        raise  # Ray marks the trial failed (and restarts it up to max_failures times)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # this worker may run the next trial


def run_ensemble_trial(config: dict[str, Any], *, trials: list[dict[str, Any]], study: StudyConfig,
                       tracking_uri: str, parent_run_id: str, data_dir: str, threads: int) -> None:
    """``ensemble: true``: the seeds of one grid cell (``config["members"]``, TrialSpec indices)
    trained together by ``fit_ensemble`` in one Tune trial, each seed in its own MLflow child run.

    Tune sees the members' mean losses and AMI per epoch and one checkpoint folder holding
    every member's (``seed<s>/``); each seed's panels are in ``seed<s>/`` of the trial folder.
    """
    t_start = time.monotonic()
    from ray import tune

    from nem_study import data
    from nem_study.ensemble import fit_ensemble, member_dir
    from nem_study.train import NonFiniteLoss

    members = [trials[i] for i in config["members"]]
    os.environ["NEM_DATA_DIR"] = data_dir
    cfgs = [RunConfig.model_validate(m["config"]) for m in members]
    run_ids = [tracking.start_child(tracking_uri, parent_run_id, m, c) for m, c in zip(members, cfgs)]
    logged = [tracking.logged_iterations(tracking_uri, r) for r in run_ids]
    trial_dir = Path(tune.get_context().get_trial_dir())
    panels = [member_dir(trial_dir, m["seed"]) / "groupings.png" for m in members]
    for panel in panels:
        panel.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="nem-checkpoints-"))  # as in run_trial
    cfgs = [replace(c, {"train.threads": c.train.threads or threads, "train.checkpoint_dir": str(checkpoint_dir)})
            for c in cfgs]

    def report(by_member: dict[int, dict[str, Any]], ckpt_dir: Path | None) -> None:
        for e, metrics in by_member.items():
            if metrics["epoch"] not in logged[e]:
                tracking.log_epoch(tracking_uri, run_ids[e], metrics | {"stage": 1, "iteration": metrics["epoch"]})
        mean = {key: sum(m[key] for m in by_member.values()) / len(by_member)
                for key in ("train_loss", "valid_loss", "valid_ami", "valid_ami_mean", "valid_ami_last",
                            "best_valid_loss")}
        epoch = next(iter(by_member.values()))["epoch"]
        summary = mean | {"epoch": epoch, "iteration": epoch, "members_training": len(by_member),
                          "sequences_per_second": sum(m["sequences_per_second"] for m in by_member.values())}
        tune.report(summary, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    try:
        resume = _restore(tune.get_checkpoint(), checkpoint_dir)
        t_fit = time.monotonic()
        splits = {split: data.load(cfgs[0].data, split, progress=False) for split in ("train", "valid", "test")}
        results = fit_ensemble(cfgs, splits, report=report, resume=resume, panel=lambda e: panels[e])
        t_evaluations = time.monotonic()
        for e, result in enumerate(results):
            if "failed" in result:
                tracking.mark_failed(tracking_uri, run_ids[e], NonFiniteLoss(result["failed"]))
                continue
            evaluations = run_evaluations(study, cfgs[e], result.get("checkpoint"), panels[e].parent)
            result |= {"trial_setup_seconds": t_fit - t_start, "trial_fit_seconds": t_evaluations - t_fit}
            tracking.log_final(tracking_uri, run_ids[e], result, evaluations, panels[e])
    except SystemExit:
        for run_id in run_ids:
            tracking.mark_stopped(tracking_uri, run_id, "stopped by Ray Tune")
        raise
    except BaseException as e:
        for run_id in run_ids:
            tracking.mark_failed(tracking_uri, run_id, e)
        raise
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def run_evaluations(study: StudyConfig, cfg: RunConfig, checkpoint: str | None, trial_dir: Path) -> list[dict[str, Any]]:
    """The study's generalisation tests on the trial's best network, each with its Figure-4 panel
    (``groupings-<name>.png``; the final test drew ``groupings.png``, test sequence 0 as trained)."""
    from nem_study.evaluate import generalisation

    if checkpoint is None:
        return []
    results = []
    for ev in study.evaluations:
        result = generalisation(checkpoint, k=ev.k, objects=ev.objects, steps=ev.steps, static=ev.static,
                                n=ev.n, panel=str(trial_dir / f"groupings-{ev.label}.png"))
        results.append({"name": ev.label, "k": result["k"], "objects": result["test"]["objects"],
                        "steps": result["steps"], "static": result["static"]} |
                       {k: result[k] for k in ("n", "ami", "ami_mean", "ami_last", "ami_score", "bce_bound", "ami_per_step",
                                               "ami_q25_per_step", "ami_q75_per_step", "bce_per_step")})
    return results


def _restore(checkpoint: Any, checkpoint_dir: Path) -> Path | None:
    """After a restart: put Tune's latest checkpoint folder back in place and return it (the
    trainer resumes from its last.pt, or from the curriculum stage it had reached)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as restored:
        if Path(restored).resolve() != checkpoint_dir.resolve():  # last.pt, best.pt, curriculum stages
            shutil.copytree(restored, checkpoint_dir, dirs_exist_ok=True)
    return checkpoint_dir


# ----------------------------------------------------------------------------------------
# The driver


def trial_dirname(trial: TrialSpec) -> str:
    return f"{trial.index:03d}_" + _safe(trial.name)


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when no Ray cluster answers at ``HOST:PORT``.

    Ray itself waits and retries for minutes before it gives up on an address.
    """
    if not address or address == "auto":
        return  # a local Ray, or the cluster this node belongs to (ray.init finds it or says so)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise InputError(f"--address {address}: no Ray cluster answers there ({type(e).__name__}: {e}). "
                         "Start one (ray start --head) or fix the address (HOST:PORT, or auto).") from None


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


@dataclass
class _Experiment:
    """One Tune experiment (one Tuner, one folder under ``storage``) and how to name its trials."""

    name: str
    param_space: dict[str, Any]
    trial_name: Any                 # Tune trial -> trial name
    trial_dirname: Any              # Tune trial -> folder name
    search_alg: Any = None
    num_samples: int = 1


def _experiments(study: StudyConfig, trials: list[TrialSpec]) -> list[_Experiment]:
    """A grid: one experiment over all trial indices. A search: one experiment per grid cell.

    Optuna samples within one Tune experiment but cannot take a ``grid_search``, so the grid
    cells run one after another, each with its own sampler seeded by ``search.seed``.
    """
    from ray import tune

    if study.ensemble:  # one Tune trial per grid cell, its seeds stacked (run_ensemble_trial)
        cells = [trials[i:i + study.seeds] for i in range(0, len(trials), study.seeds)]
        return [_Experiment(
            study.name, {"members": tune.grid_search([[t.index for t in cell] for cell in cells])},
            lambda t: ensemble_name([trials[i] for i in t.config["members"]]),
            lambda t: f"{t.config['members'][0]:03d}_" + _safe(ensemble_name([trials[i] for i in t.config["members"]])))]
    if study.search is None:
        # The grid itself, so Tune's table and trial configs read model.k=3, train.seed=0.
        space = {key: tune.grid_search(values) for key, values in study.grid.items()}
        space["train.seed"] = tune.grid_search([study.base.train.seed + i for i in range(study.seeds)])
        return [_Experiment(study.name, space, lambda t: trials[trial_index(study, t.config)].name,
                            lambda t: trial_dirname(trials[trial_index(study, t.config)]))]

    from ray.tune.search.optuna import OptunaSearch

    search = study.search
    space = {key: _tune_domain(spec) for key, spec in search.space.items()}

    def sample(t) -> int:  # the search's trial counter (1, 2, ...; kept on resume) starts the tag
        return int(t.experiment_tag.split("_", 1)[0]) - 1

    return [_Experiment(
        f"{study.name}-cell{trial.index:03d}", {"trial": trial.index, "space": space},
        lambda t, trial=trial: sampled_name(trial, sample(t)),
        lambda t, trial=trial: f"{sample(t):03d}_" + _safe(sampled_name(trial, sample(t))),
        OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed), search.n_trials)
        for trial in trials]


def trial_index(study: StudyConfig, config: dict[str, Any]) -> int:
    """The TrialSpec index of a Tune trial's config: its grid values and ``train.seed`` (grid
    studies), or ``config["trial"]`` (a search, or a study started before the grid reached Tune)."""
    if "trial" in config:
        return config["trial"]
    cell = [config[key] for key in study.grid]
    seed = config["train.seed"] - study.base.train.seed
    return grid_cells(study.grid).index(dict(zip(study.grid, cell))) * study.seeds + seed


def ensemble_name(members: list[TrialSpec]) -> str:
    """``k=3,seeds=0-2``: the Tune trial of a grid cell's stacked seeds."""
    seeds = f"seeds={members[0].seed}-{members[-1].seed}" if len(members) > 1 else f"seed={members[0].seed}"
    return ",".join(filter(None, [cell_name(members[0].cell), seeds]))


def _tune_domain(spec: SpaceConfig) -> Any:
    from ray import tune

    if spec.choices is not None:
        return tune.choice(spec.choices)
    if spec.integer:  # Tune's integer ranges exclude the upper end; ours include it
        return (tune.lograndint if spec.log else tune.randint)(spec.low, spec.high + 1)
    return (tune.loguniform if spec.log else tune.uniform)(spec.low, spec.high)


def _tuner(study: StudyConfig, trials: list[TrialSpec], experiment: _Experiment, uri: str, parent_run_id: str,
           verbose: int, resume: bool):
    """A new Tuner for ``experiment``, or with ``resume`` the interrupted one restored from storage."""
    from ray import tune

    from nem_study import data

    trainable = tune.with_parameters(
        run_ensemble_trial if study.ensemble else run_trial, trials=[t.to_json() for t in trials], study=study, tracking_uri=uri,
        parent_run_id=parent_run_id, data_dir=str(data.data_dir().resolve()),
        threads=max(1, int(study.resources.cpu)))
    trainable = tune.with_resources(trainable, {"cpu": study.resources.cpu, "gpu": study.resources.gpu})
    path = _join(storage_path(study), experiment.name)
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


def _result_names(trials: list[TrialSpec], study: StudyConfig, result: Any) -> list[str]:
    """The trial names (MLflow child runs) a Tune result stands for: an ensemble's seeds, or one.

    Read from the trial's folder (``<index>_<name>``, see ``_experiments``), not its config:
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


def _join(storage: str, name: str) -> str:
    return storage.rstrip("/") + "/" + name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", name)[:100]


def data_specs(study: StudyConfig, trials: list[TrialSpec]) -> list[Any]:
    """Every data set the trials and their evaluations read (curriculum stages too), once each."""
    from nem_study.evaluate import test_spec
    from nem_study.train import curriculum_stages

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


@contextmanager
def driver_lock(study: StudyConfig) -> Iterator[None]:
    """One driver per study at a time: two would open two parent runs and share Tune's folder.

    An ``flock`` on ``.<name>.lock`` in the local storage folder (with URI storage, in the data
    cache): the kernel releases it when the driver exits, however it exits.
    """
    from nem_study import data

    storage = storage_path(study)
    folder = data.data_dir() / "locks" if contract.has_scheme(storage) else Path(storage)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / f".{_safe(study.name)}.lock", "a+")
    except OSError as e:
        raise InputError(f"storage {storage}: cannot write there ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise InputError(f"study {study.name!r} is running already ({holder}), with its trials in {storage}. "
                             "Wait for it to end, or stop it (Ctrl-C) and continue it with `nem-study resume`.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def edits(before: Any, after: Any, key: str = "") -> list[str]:
    """``["grid.model.k: [2, 3] -> [2, 4]", ...]``: the values that differ between two resolved
    studies. Keys only one side has (a field added or dropped by another nem-study version) are
    not edits."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for k in before if k in after
                for change in edits(before[k], after[k], f"{key}.{k}" if key else str(k))]
    return [] if before == after else [f"{key}: {json.dumps(before)} -> {json.dumps(after)}"]


def check_unchanged(study: StudyConfig, uri: str, parent_run_id: str) -> None:
    """Resume runs a study as it started: Tune's saved trials are indices into the trial list of
    the study as started, so an edited grid, base or seed count would give them other configs."""
    started = tracking.study_as_started(uri, parent_run_id)
    if started is None:
        return  # a parent run without its resolved study (made by hand): nothing to compare
    changed = edits(started, study.model_dump(mode="json"))
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise InputError(f"study {study.name!r} changed since it started: {shown}. Resume runs the study as it "
                         f"started (MLflow parent run {parent_run_id}, artifact study_resolved.yaml): undo the edit "
                         "(and pass the same --set), or run the edited study under a new name.")


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
    experiments = _experiments(study, trials)
    storage = storage_path(study)
    if resume and not any(tune.Tuner.can_restore(_join(storage, e.name)) for e in experiments):
        raise InputError(f"study {study.name!r}: nothing to resume in {_join(storage, experiments[0].name)} "
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


def _drive(study: StudyConfig, study_yaml: str | Path, trials: list[TrialSpec], experiments: list[_Experiment],
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
                grid = _tuner(study, trials, experiment, uri, parent_run_id, verbose, resume).fit()
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
    for r in rows:
        for name in _result_names(trials, study, r):
            if r.error is not None:
                result.failed[name] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() \
                    else type(r.error).__name__
            elif not interrupted or r.metrics.get("done"):
                result.finished.append(name)
    if interrupted:   # the parent stays open to `nem-study resume`; its trials' runs are left as they are
        tracking.end_parent(uri, parent_run_id, len(result.finished), len(result.failed), interrupted=True)
        return result
    for run in tracking.child_runs(uri, parent_run_id):
        name = run.data.tags.get(contract.TRIAL_TAG, run.info.run_name)
        if run.info.status == "FAILED" and name in result.finished:  # an ensemble member that failed alone
            result.finished.remove(name)
            result.failed[name] = run.data.tags.get("failure_reason", "failed")[:300]
        if run.info.status == "RUNNING" and name not in result.failed:
            # Its Tune trial ended without an error or a result: stopped early by ASHA, and its
            # worker went before it could say so.
            tracking.mark_stopped(uri, run.info.run_id, "stopped early by the scheduler (ASHA)")
        if run.info.status in ("RUNNING", "KILLED") and name not in result.failed:
            result.stopped.append(name)
            if name in result.finished:
                result.finished.remove(name)
        ami = run.data.metrics.get("test_ami")
        cell = run.data.tags.get(contract.CELL_TAG, "{}")
        if run.info.status == "FINISHED" and ami is not None:
            result.best_test_ami[cell] = max(ami, result.best_test_ami.get(cell, -1.0))
    tracking.end_parent(uri, parent_run_id, len(result.finished), len(result.failed))
    return result
