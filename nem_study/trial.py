"""One trial of a study, in a Ray worker: a plain function Ray Tune calls (``run_trial``).

It trains in its Tune trial folder, reports every epoch to Tune (with its checkpoint folder)
and to MLflow (``nem_study.tracking``), and on a restart after a failure resumes from Tune's
last checkpoint; with ``ensemble: true`` one trial trains the stacked seeds of one grid cell.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from nem_study import tracking
from nem_study.config import RunConfig, replace
from nem_study.study_config import StudyConfig, grid_cells

# Keys of a trial's Tune results that the driver reads (``study.tally``): the MLflow child runs
# of the trial (every result), and, as its last result, each member's outcome.
RUN_IDS = "mlflow_run_ids"
OUTCOMES = "outcomes"  # {trial name: {"test_ami": x, "cell": cell JSON} or {"failed": reason}}


def trial_index(study: StudyConfig, config: dict[str, Any]) -> int:
    """The TrialSpec index of a Tune trial's config: its grid values and ``train.seed`` (grid
    studies), or ``config["trial"]`` (a search, or a study started before the grid reached Tune)."""
    if "trial" in config:
        return config["trial"]
    cell = {key: config[key] for key in study.grid}
    return grid_cells(study.grid).index(cell) * study.seeds + study.seed_values.index(config["train.seed"])


def run_trial(config: dict[str, Any], *, trials: list[dict[str, Any]], study: StudyConfig, tracking_uri: str,
              parent_run_id: str, data_dir: str, threads: int) -> None:
    """Train one trial; every epoch goes to Tune (with its checkpoint) and to MLflow.

    ``config`` holds a grid cell's values and ``train.seed`` (see ``trial_index``); with a search,
    ``config["trial"]`` is the index of a TrialSpec and ``config["space"]`` holds the values
    sampled for this trial, set over the TrialSpec's grid cell. With ``ensemble: true``,
    ``config["members"]`` are the TrialSpec indices of one grid cell's seeds, trained together by
    ``fit`` as one stack, each seed in its own MLflow child run, its panels in ``seed<s>/`` of the
    trial folder; Tune then sees the members' mean losses and AMI, and one checkpoint folder
    holding every member's. The seconds spent before training, in training and testing (of which
    reporting epochs to Tune and MLflow), and in the evaluations go to MLflow as
    ``trial_*_seconds`` (what a trial costs beyond its training: BENCHMARKS.md).
    """
    t_start = time.monotonic()
    from ray import tune

    from nem_study import data
    from nem_study.curriculum import fit_curriculum
    from nem_study.train import NonFiniteLoss, fit, member_dir

    os.environ["NEM_DATA_DIR"] = data_dir  # the cache the driver sees, whatever the worker's env
    trial_dir = Path(tune.get_context().get_trial_dir())  # synced to storage: the panels
    stacked = "members" in config
    if stacked:
        members = [trials[i] for i in config["members"]]
        cfgs = [RunConfig.model_validate(m["config"]) for m in members]
        panels = [member_dir(trial_dir, m["seed"]) / "groupings.png" for m in members]
    else:
        trial = trials[trial_index(study, config)]
        sampled = config.get("space") or {}
        if sampled:
            cfg = study.run_config({**trial["cell"], **sampled}, trial["seed"])
            trial = {**trial, "name": tune.get_context().get_trial_name(), "sampled": sampled}
        else:
            cfg = RunConfig.model_validate(trial["config"])
        members, cfgs, panels = [trial], [cfg], [trial_dir / "groupings.png"]
    for panel in panels:
        panel.parent.mkdir(parents=True, exist_ok=True)
    cfgs = [replace(c, {"train.threads": c.train.threads or threads}) for c in cfgs]
    run_ids = [tracking.start_child(tracking_uri, parent_run_id, m, c) for m, c in zip(members, cfgs)]
    # After a restart or a resumed study, epochs between the last checkpoint and the crash run
    # again; MLflow keeps their first values, so each epoch is in the history once.
    logged = [tracking.logged_iterations(tracking_uri, r) for r in run_ids]
    # The trainer's own last.pt/best.pt stay out of the synced folder: Tune copies them to
    # storage as its checkpoints already, and they are large (40 MB for flying shapes).
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="nem-checkpoints-"))
    cfgs = [replace(c, {"train.checkpoint_dir": str(checkpoint_dir)}) for c in cfgs]

    reporting = [0.0]  # seconds spent handing epochs to MLflow and Tune (inside the fit)
    last: list[dict[str, Any]] = [{}]  # the last result Tune got

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        t0 = time.monotonic()
        by_member = metrics if stacked else {0: metrics}
        for e, m in by_member.items():
            m = {"stage": 1, "iteration": m["epoch"]} | m  # a curriculum's stage and epoch over all stages
            if int(m["iteration"]) not in logged[e]:
                tracking.log_epoch(tracking_uri, run_ids[e], m)
        if stacked:
            mean = {key: sum(m[key] for m in by_member.values()) / len(by_member)
                    for key in ("train_loss", "valid_loss", "valid_ami", "valid_ami_mean", "valid_ami_last",
                                "best_valid_loss")}
            epoch = next(iter(by_member.values()))["epoch"]
            metrics = mean | {"epoch": epoch, "iteration": epoch, "members_training": len(by_member),
                              "sequences_per_second": sum(m["sequences_per_second"] for m in by_member.values())}
        last[0] = metrics | {RUN_IDS: run_ids}
        checkpoint = tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        tune.report(last[0], checkpoint=checkpoint)
        reporting[0] += time.monotonic() - t0

    try:
        resume = restore_checkpoint(tune.get_checkpoint(), checkpoint_dir)
        t_fit = time.monotonic()
        if stacked:
            splits = {split: data.load(cfgs[0].data, split, progress=False) for split in ("train", "valid", "test")}
            results = fit(cfgs, splits, report=report, resume=resume, panel=lambda e: panels[e])
        else:
            results = [fit_curriculum(cfgs[0], lambda spec, split: data.load(spec, split, progress=False),
                                      report=report, resume=resume, panel=panels[0])]
        t_fitted = time.monotonic()
        outcomes = {}
        for e, result in enumerate(results):
            if "failed" in result:  # an ensemble member whose loss became non-finite
                error = NonFiniteLoss(result["failed"])
                tracking.mark_failed(tracking_uri, run_ids[e], error)
                outcomes[members[e]["name"]] = {"failed": tracking.failure_reason(error)}
                continue
            t_evaluations = time.monotonic()
            evaluations = run_evaluations(study, cfgs[e], result.get("checkpoint"), panels[e].parent)
            result |= {"trial_setup_seconds": t_fit - t_start, "trial_fit_seconds": t_fitted - t_fit,
                       "trial_report_seconds": reporting[0],
                       "trial_evaluations_seconds": time.monotonic() - t_evaluations}
            tracking.log_final(tracking_uri, run_ids[e], result, evaluations, panels[e])
            outcomes[members[e]["name"]] = {"test_ami": result.get("test_ami"), "cell": json.dumps(members[e]["cell"])}
    except SystemExit:  # Tune stopped the trial (the scheduler, or the study ending): not a failure
        for run_id in run_ids:
            tracking.mark_stopped(tracking_uri, run_id, "stopped by Ray Tune (the scheduler, or the study interrupted)")
        raise
    except BaseException as e:
        for run_id in run_ids:
            tracking.mark_failed(tracking_uri, run_id, e)
        raise  # Ray marks the trial failed (and restarts it up to max_failures times)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # this worker may run the next trial
    # The outcome as the trial's last result (after the runs are closed, so a stop here cannot
    # mark them stopped); the epoch keys too, for a trial restored after its last epoch.
    fallback = {"iteration": results[0]["epochs"], "valid_loss": results[0].get("best_valid_loss"), RUN_IDS: run_ids}
    tune.report(fallback | last[0] | {OUTCOMES: outcomes})


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


def restore_checkpoint(checkpoint: Any, checkpoint_dir: Path) -> Path | None:
    """After a restart: put Tune's latest checkpoint folder back in place and return it (the
    trainer resumes from its last.pt, or from the curriculum stage it had reached)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as restored:
        if Path(restored).resolve() != checkpoint_dir.resolve():  # last.pt, best.pt, curriculum stages
            shutil.copytree(restored, checkpoint_dir, dirs_exist_ok=True)
    return checkpoint_dir
