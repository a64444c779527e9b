"""MLflow -> one tidy table: a row per trial (child run) of a study.

A study is found by its YAML file, its name or its parent run id (see ``find_study``); the
contract it was written with is ``nem_study/contract.py`` (standard library only: no torch, no Ray). Runs are kept whatever their status:
a failed or unfinished trial is a row like any other, so the report can count it.

Columns of the table (``collect_runs``):
  run_id, trial, seed, cell (the grid cell as JSON), status, stop_reason, failure_reason,
  every param (``data.name``, ``model.k``, ... as MLflow strings), every latest metric
  (``test_ami``, ``eval/<name>/ami``, ...), and per run the arrays
  ``ami_per_step``, ``ami_q25_per_step``, ``ami_q75_per_step``, ``bce_per_step`` (lists),
  ``evaluations`` (list of dicts: name, k, objects, steps, static, ami, ..., per-step lists),
  ``curves`` ({metric: {epoch: value}} for the validation curves), ``has_groupings``.
Anything a run did not log is NaN / empty, never an error.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis import ReportError
from nem_study import contract
from nem_study.contract import (AMI_PER_STEP, CELL_TAG, DEFAULT_URI, EVALUATIONS, GROUPINGS, KIND_TAG, PARENT_TAG,
                                SEED_TAG, STUDY_TAG, resolve_uri)

CURVES = ("valid_loss", "valid_ami")   # the per-epoch histories the report draws


@dataclass
class Study:
    """A study's parent run and where it lives."""

    name: str
    uri: str
    parent_run_id: str
    experiment: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def grid(self) -> dict[str, list[Any]]:
        """The grid as logged on the parent run ({"model.k": [3, 5]}); {} if absent."""
        try:
            grid = json.loads(self.params.get("grid", "{}"))
        except json.JSONDecodeError:   # truncated by MLflow's param length limit
            return {}
        return grid if isinstance(grid, dict) else {}


def connect(uri: str):
    """An ``MlflowClient`` for ``uri``, or a ``ReportError`` saying why the store is not usable.

    A missing SQLite file is an error here: the client would silently create an empty store.
    HTTP servers get one short probe, because the client retries for minutes before it fails.
    """
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"tracking URI {uri}: no MLflow database at {uri.removeprefix('sqlite:///')}")
    if uri.startswith("file://") and not Path(uri.removeprefix("file://")).is_dir():
        raise ReportError(f"tracking URI {uri}: no MLflow store in that folder")
    if (why := contract.http_unreachable(uri)) is not None:
        raise ReportError(f"tracking URI {uri}: the MLflow server is not reachable ({why})")
    client = contract.client(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ReportError(f"tracking URI {uri}: the MLflow store is not usable ({type(e).__name__}: {first})") \
            from None
    return client


def find_study(study: str, tracking_uri: str | None = None) -> tuple[Study, Any]:
    """The study named by ``study`` and a client for its store.

    ``study`` is a study YAML (its ``name`` and ``tracking`` section are read), a study name
    (the latest parent run with that ``nem_study.study`` tag, in any experiment) or a parent
    run id. ``tracking_uri`` overrides the YAML's; otherwise $MLFLOW_TRACKING_URI or the
    schema's default ``sqlite:///mlflow.db``.
    """
    experiment = None
    if study.endswith((".yaml", ".yml")):
        try:
            raw = yaml.safe_load(Path(study).read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:   # ValueError: not UTF-8 text
            raise ReportError(f"{study}: cannot read the study file ({type(e).__name__})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ReportError(f"{study}: a study file needs a `name`")
        tracking = raw.get("tracking") or {}
        name, experiment = raw["name"], tracking.get("experiment") or raw["name"]
        uri = tracking_uri or tracking.get("uri") or DEFAULT_URI
    else:
        name, uri = study, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    uri = resolve_uri(uri)
    client = connect(uri)

    if re.fullmatch(r"[0-9a-f]{32}", name):   # a run id
        run = _get_run(client, name)
        if run is None:
            raise ReportError(f"no run {name} at {uri}")
        if run.data.tags.get(KIND_TAG) != "study":
            parent = run.data.tags.get(PARENT_TAG)
            hint = f" (its study's parent run is {parent})" if parent else ""
            raise ReportError(f"run {name} is not a study's parent run{hint}")
    else:
        run = _latest_parent(client, name, experiment, uri)
    experiment_name = client.get_experiment(run.info.experiment_id).name
    return Study(run.data.tags.get(STUDY_TAG, run.info.run_name or name), uri, run.info.run_id, experiment_name,
                 dict(run.data.params), dict(run.data.tags)), client


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _latest_parent(client, name: str, experiment: str | None, uri: str):
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ReportError(f"study {name!r}: no MLflow experiment {experiment!r} at {uri}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments(max_results=50_000)]
    runs = client.search_runs(
        ids, filter_string=f"tags.`{STUDY_TAG}` = '{name}' and tags.`{KIND_TAG}` = 'study'",
        order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        where = f"experiment {experiment!r}" if experiment else f"any of {len(ids)} experiment(s)"
        raise ReportError(f"no study {name!r} in {where} at {uri}")
    return runs[0]


def collect_runs(study: Study, client) -> pd.DataFrame:
    """Every child run of the study's parent run as one row (see the module docstring)."""
    runs = client.search_runs([client.get_run(study.parent_run_id).info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{study.parent_run_id}'", max_results=50_000)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_row(client, run, Path(tmp)) for run in runs]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["run_id", "trial", "seed", "cell", "status"])
    order = {cell: i for i, cell in enumerate(cell_order(table["cell"].unique(), study.grid))}
    table["_order"] = table["cell"].map(order)
    return table.sort_values(["_order", "seed", "trial"]).drop(columns="_order").reset_index(drop=True)


def _row(client, run, tmp: Path) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    row: dict[str, Any] = {
        "run_id": run.info.run_id, "trial": tags.get("nem_study.trial", run.info.run_name),
        "seed": _int(tags.get(SEED_TAG)), "cell": _cell_json(tags.get(CELL_TAG)),
        "status": run.info.status, "stop_reason": tags.get("stop_reason"),
        "failure_reason": tags.get("failure_reason"),
    }
    row.update(run.data.params)
    row.update(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    per_step = _load_json(client, run.info.run_id, AMI_PER_STEP, artifacts, tmp) or {}
    if not per_step.get("test_ami") and "test_ami_step" in metrics:   # the metric history instead
        history = sorted(client.get_metric_history(run.info.run_id, "test_ami_step"), key=lambda m: m.step)
        per_step = {"test_ami": [m.value for m in history]}
    row["ami_per_step"] = list(per_step.get("test_ami") or [])
    row["ami_q25_per_step"] = list(per_step.get("test_ami_q25") or [])
    row["ami_q75_per_step"] = list(per_step.get("test_ami_q75") or [])
    row["bce_per_step"] = list(per_step.get("test_bce_bound") or [])
    row["evaluations"] = _evaluations(_load_json(client, run.info.run_id, EVALUATIONS, artifacts, tmp),
                                      metrics)
    row["curves"] = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                     for name in CURVES if name in metrics}
    row["has_groupings"] = GROUPINGS in artifacts
    return row


def _evaluations(logged: Any, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The run's generalisation tests: ``evaluations.json`` where logged (with the K, object
    count and steps each ran with), else only what the ``eval/<name>/...`` metrics tell."""
    if isinstance(logged, list):
        return [e for e in logged if isinstance(e, dict) and "name" in e]
    names = sorted({key.split("/")[1] for key in metrics if key.startswith("eval/") and key.count("/") == 2})
    return [{"name": name, **{key: metrics.get(f"eval/{name}/{key}", math.nan)
                              for key in ("ami", "ami_mean", "ami_last", "bce_bound")}} for name in names]


def _load_json(client, run_id: str, path: str, artifacts: set[str], tmp: Path) -> Any:
    if path not in artifacts:
        return None
    try:
        return json.loads(Path(client.download_artifacts(run_id, path, str(tmp / run_id))).read_text())
    except (OSError, ValueError):   # unreadable or half-written: as if not logged
        return None


def download(client, run_id: str, path: str, folder: Path) -> Path:
    """One artifact of a run into ``folder`` (created); the local path."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder)))


def _cell_json(text: str | None) -> str:
    """The grid-cell tag in one canonical spelling ("{}" for a study without a grid)."""
    try:
        cell = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return json.dumps({"cell": text})
    return json.dumps(cell if isinstance(cell, dict) else {"cell": cell})


def _int(text: str | None) -> float | int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return math.nan


def cell_order(cells, grid: dict[str, list[Any]]) -> list[str]:
    """Grid cells (JSON) in the grid's own order: keys as written, values as listed."""
    def key(cell: str) -> tuple:
        values = json.loads(cell)
        return tuple((grid[k].index(values[k]) if values.get(k) in grid[k] else len(grid[k]), str(values.get(k)))
                     if k in values else (-1, "") for k in grid) + (cell,)
    return sorted(cells, key=key)


def cell_label(cell: str) -> str:
    """``k=3,objects=3`` (like the trial names): the field names, or the dotted keys if two clash."""
    values = json.loads(cell)
    fields = [key.split(".")[-1] for key in values]
    short = len(set(fields)) == len(fields)
    return ",".join(f"{key.split('.')[-1] if short else key}={value}" for key, value in values.items()) \
        or "(no grid)"
