"""A study's schema: a base run, a grid over run-config keys, seeds, a search, resources, tracking.

Validated as one: every problem of a study file (a grid value that gives a bad run config, a
search range, a combination that cannot run) is reported at once with its place in the YAML.
Trials are expanded from a validated study by ``nem_study.trials``.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from nem_study.config import InputError, RunConfig, Strict
from nem_study.config_files import apply_overrides, format_validation_error, read_yaml
from nem_study.contract import DEFAULT_URI

# Keys a study sets itself, so a grid must not: seeds come from ``seeds``, checkpoints go
# into each trial's own folder.
#: grid cells x seeds of one study; checked before the grid is expanded (a 10-key grid of 10 values
#: each would be 10^10 trials)
MAX_TRIALS = 10_000
STUDY_OWNED_KEYS = {"train.seed": "set by `seeds`", "train.checkpoint_dir": "set per trial by the study"}


class ResourcesConfig(Strict):
    """What one trial reserves from Ray; fractions let several trials share a GPU."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class EvaluationConfig(Strict):
    """One generalisation test run on each trial's best network after training (NEM_SPEC.md §5)."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="metric prefix eval/<name>/ (default from the fields set, e.g. k5-objects3, steps50)")
    k: int | None = Field(None, ge=1, le=64, description="components at test time (default: the trained K)")
    objects: int | None = Field(None, ge=1, le=9, description="objects per image (default: as trained)")
    steps: int | None = Field(None, ge=1, description="time / EM steps (default: as trained; 50 for Figure 6)")
    static: bool = Field(False, description="repeat each first frame for every step (static transfer)")
    n: int | None = Field(None, ge=1, description="test sequences (default: train.test_samples, else all)")

    @property
    def label(self) -> str:
        """The metric prefix: ``name``, or the fields set, like ``k5-objects3`` or ``static-steps50``.

        The same in every grid cell, so that a report can put it in one column.
        """
        if self.name:
            return self.name
        parts = ["static" if self.static else "", f"k{self.k}" if self.k else "",
                 f"objects{self.objects}" if self.objects else "", f"steps{self.steps}" if self.steps else ""]
        return "-".join(p for p in parts if p) or "as-trained"


class SchedulerConfig(Strict):
    """ASHA (asynchronous successive halving): stop trials whose validation loss lags behind."""

    kind: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="keep 1 / reduction_factor at each rung")


class StopConfig(Strict):
    """Limits applied to every trial (they override ``base.train``)."""

    max_epochs: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)


class TrackingConfig(Strict):
    uri: str = Field(DEFAULT_URI, min_length=1, description="MLflow tracking URI")
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment (default: the study name)")
    artifact_location: str | None = Field(
        None, min_length=1, description="where a new experiment stores artifacts (default: ./mlartifacts "
        "for a local store; an MLflow server's own artifact store for http(s) URIs)")

    @property
    def artifacts(self) -> str | None:
        """The artifact location a new experiment gets (None: the tracking server decides)."""
        if self.artifact_location is None and not self.uri.startswith(("http://", "https://")):
            return "./mlartifacts"
        return self.artifact_location


class SpaceConfig(Strict):
    """One searched key: a range ``{low, high, log}`` or ``{choices: [...]}``.

    A range with whole-number ends samples integers, both ends included (``model.k``).
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = Field(False, description="sample a range on a log scale (needs low > 0)")
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceConfig:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("either choices or low/high/log, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected low and high (and optionally log), or choices")
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class SearchConfig(Strict):
    """Optuna TPE over ``space``: ``n_trials`` sampled configs per grid cell, each trained once."""

    n_trials: int = Field(ge=1, description="sampled trials per grid cell")
    seed: int = Field(0, ge=0, description="seed of the sampler: the same seed samples the same values")
    metric: Literal["valid_loss", "valid_ami"] = Field(
        "valid_loss", description="what TPE optimises (last reported epoch): loss minimised, AMI maximised")
    space: dict[str, SpaceConfig] = Field(min_length=1)

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "valid_loss" else "max"


class StudyConfig(Strict):
    """A study: the cartesian product of ``grid`` over ``base``, times ``seeds``.

    With ``search``, each grid cell instead gets ``search.n_trials`` configs sampled from
    ``search.space`` (Optuna TPE), each trained once with the base seed.

    Every grid key is a dotted run-config key (``model.k``) and every value must give a valid
    run config; problems are reported all at once, located in the YAML (``grid.model.k[1]``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="also the Ray and MLflow name")
    base: RunConfig = Field(default_factory=RunConfig)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1, description="independent runs per grid cell (train.seed; data are shared)")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: str = Field("./ray_results", min_length=1, description="Ray Tune results and checkpoints")
    max_failures: int = Field(2, ge=0, description="restarts of a failed trial (from its last checkpoint)")
    search: SearchConfig | None = Field(None, description="Optuna search within each grid cell")
    scheduler: SchedulerConfig | None = Field(None, description="ASHA on the validation loss")
    evaluations: list[EvaluationConfig] = Field(
        default_factory=list, description="generalisation tests after training; metrics eval/<name>/...")
    ensemble: bool = Field(False, description="train the seeds of each grid cell together as one vectorised "
                           "Ray trial (one MLflow child run per seed still); for GPUs: BENCHMARKS.md")

    # The base as written: grid values are applied to it before defaults are resolved, so a
    # grid over data.name still gets each data set's own defaults.
    _base_raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _validate_with_grid(cls, data: Any, handler: Any) -> StudyConfig:
        if not isinstance(data, dict):
            return handler(data)
        problems: list[InitErrorDetails] = []
        study = None
        try:
            study = handler(data)
        except ValidationError as e:
            problems += [_detail(err["loc"], err["type"], err["msg"], err.get("input")) for err in e.errors()]
        base = data.get("base", {})
        base_raw = base.model_dump(mode="json", exclude_unset=True) if isinstance(base, RunConfig) else base
        grid = data.get("grid")
        if isinstance(base_raw, dict) and isinstance(grid, dict):
            problems += _grid_problems(base_raw, grid)
        search = data.get("search")
        if isinstance(base_raw, dict) and isinstance(search, dict) and isinstance(search.get("space"), dict):
            problems += _space_problems(base_raw, search["space"], grid if isinstance(grid, dict) else {})
        if study is not None and study.search is not None and study.seeds > 1:
            problems.append(_detail(("seeds",), "seeds", "with `search`, each sampled config is trained once "
                                    "(base.train.seed); use seeds: 1", study.seeds))
        if study is not None and study.ensemble:
            problems += _ensemble_problems(study)
        if study is not None:
            labels = [e.label for e in study.evaluations]
            for i, label in enumerate(labels):
                if label in labels[:i]:
                    problems.append(_detail(("evaluations", i), "evaluations", f"a second evaluation named "
                                            f"{label!r}; give one a `name`", label))
        cells = math.prod(len(v) for v in grid.values() if isinstance(v, list)) if isinstance(grid, dict) else 1
        if cells * (study.seeds if study is not None else 1) > MAX_TRIALS:  # before expanding any
            problems.append(_detail(("grid",) if cells > 1 else ("seeds",), "too_many_trials",
                                    f"{cells:,} grid cell(s) x {study.seeds if study else 1:,} seed(s) is more "
                                    f"than {MAX_TRIALS:,} trials", {}))
        if not problems:
            study._base_raw = copy.deepcopy(base_raw)
            problems += _combination_problems(study)
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        return study

    def run_config(self, cell: dict[str, Any], seed: int) -> RunConfig:
        """The resolved run config of one grid cell with ``train.seed = seed``."""
        raw = _with_values(self._base_raw, cell)
        train = raw.setdefault("train", {})
        train["seed"] = seed
        if self.stop.max_epochs is not None:
            train["max_epochs"] = self.stop.max_epochs
        if self.stop.time_budget_s is not None:
            train["time_budget_s"] = self.stop.time_budget_s
        return RunConfig.model_validate(raw)

    @property
    def seed_values(self) -> list[int]:
        """Each grid cell's seeds: base.train.seed, +1, ... (``seeds`` of them)."""
        return [self.base.train.seed + i for i in range(self.seeds)]

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _detail(loc: tuple, kind: str, msg: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError(kind, msg.replace("{", "{{").replace("}", "}}")),
                            loc=loc, input=value)


def _with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with dotted keys (``model.k``) set to the given values."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        section, field = key.split(".")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][field] = value
    return out


def _errors(raw: dict[str, Any]) -> list[tuple[tuple, str, str, Any]]:
    """The run config's validation errors as (loc, type, msg, input)."""
    try:
        RunConfig.model_validate(raw)
    except ValidationError as e:
        return [(tuple(err["loc"]), err["type"], err["msg"], err.get("input")) for err in e.errors()]
    except Exception as e:  # a value of the wrong shape (e.g. a list where a section goes)
        return [((), "value_error", str(e), None)]
    return []


def _key_problem(loc: tuple, key: Any, where: str) -> InitErrorDetails | None:
    """A grid or search key must be a real run-config field that the study does not set itself."""
    parts = str(key).split(".")
    sections = RunConfig.model_fields
    if len(parts) != 2 or parts[0] not in sections or \
            parts[1] not in sections[parts[0]].annotation.model_fields:
        return _detail(loc, "grid_key", "not a run-config key (expected SECTION.FIELD, e.g. model.k, "
                       "data.objects, noise.prob, train.lr)", key)
    if key in STUDY_OWNED_KEYS:
        return _detail(loc, "grid_key", f"not allowed in {where}: {STUDY_OWNED_KEYS[key]}", key)
    return None


def _value_problems(base_raw: dict[str, Any], base_errors: set, key: str,
                    values: list[tuple[tuple, Any]]) -> list[InitErrorDetails]:
    """The one check of a grid value or a search-space end or choice: each ``(place, value)`` set at
    ``key`` over the base is blamed for errors at its own key, and for errors elsewhere that the base
    alone does not have, so a broken base is reported once (under ``base``), not under every value."""
    problems = []
    for place, value in values:
        for loc, kind, msg, _ in _errors(_with_values(base_raw, {key: value})):
            if loc == tuple(str(key).split(".")) or (loc, msg) not in base_errors:
                problems.append(_detail(place, kind, msg, value))
    return problems


def _space_problems(base_raw: dict[str, Any], space: dict[str, Any], grid: dict[str, Any]) -> list[InitErrorDetails]:
    """Search keys like grid keys; each end of a range and each choice must give a valid run config."""
    base_errors = set((loc, msg) for loc, _, msg, _ in _errors(base_raw))
    problems = []
    for key, spec in space.items():
        loc = ("search", "space", str(key))
        if (problem := _key_problem(loc, key, "a search space")) is not None:
            problems.append(problem)
            continue
        if key in grid:
            problems.append(_detail(loc, "grid_key", "already a grid key; a key is either searched or gridded", key))
            continue
        if not isinstance(spec, dict):
            continue  # the schema reports the shape
        values = [(f"{key}.{end}", spec[end]) for end in ("low", "high") if end in spec]
        if isinstance(spec.get("choices"), list):
            values = [(f"{key}.choices[{i}]", v) for i, v in enumerate(spec["choices"])]
        problems += _value_problems(base_raw, base_errors, key, [(("search", "space", w), v) for w, v in values])
    return problems


def _grid_problems(base_raw: dict[str, Any], grid: dict[str, Any]) -> list[InitErrorDetails]:
    """Every problem of the grid: unknown keys, empty lists, values that break the run config.

    """
    base_errors = set((loc, msg) for loc, _, msg, _ in _errors(base_raw))
    problems = []
    for key, values in grid.items():
        if (problem := _key_problem(("grid", str(key)), key, "a grid")) is not None:
            problems.append(problem)
            continue
        if not isinstance(values, list) or not values:
            problems.append(_detail(("grid", key), "grid_values", "expected a non-empty list of values",
                                    values))
            continue
        problems += _value_problems(base_raw, base_errors, key,
                                    [(("grid", f"{key}[{i}]"), value) for i, value in enumerate(values)])
    return problems


def _ensemble_problems(study: StudyConfig) -> list[InitErrorDetails]:
    """What an ensemble (the seeds of a cell stacked in one trial) cannot do."""
    why = {"search": "a search trains each sampled config once; there are no seeds to stack",
           "scheduler": "ASHA would stop all seeds of a cell at once; run without `scheduler`"}
    problems = [_detail((key,), "ensemble", f"not with `ensemble: true`: {msg}", getattr(study, key))
                for key, msg in why.items() if getattr(study, key) is not None]
    if study.base.data.curriculum or "data.curriculum" in study.grid:
        problems.append(_detail(("ensemble",), "ensemble", "a curriculum is trained stage by stage in "
                                "single trials; set `ensemble: false`", True))
    if study.base.train.compile:
        problems.append(_detail(("base", "train", "compile"), "ensemble", "not with `ensemble: true` "
                                "(the vmapped ensemble runs the eager network)", True))
    return problems


def _combination_problems(study: StudyConfig) -> list[InitErrorDetails]:
    """Values valid one by one can still clash (e.g. data.name and data.frames); try every cell."""
    problems = []
    for cell in grid_cells(study.grid):
        try:
            study.run_config(cell, study.base.train.seed)
        except ValidationError as e:
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"]) or "(top level)"
                problems.append(_detail(("grid",), "grid_cell", f"the cell {cell_name(cell)} gives "
                                        f"{where}: {err['msg']}", cell))
    return problems


def grid_cells(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in YAML order (the last key varies fastest)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def cell_name(cell: dict[str, Any]) -> str:
    """``k=3,objects=3``: the field names, or the dotted keys where two fields share a name."""
    fields = [key.split(".")[-1] for key in cell]
    short = len(set(fields)) == len(fields)
    return ",".join(f"{key.split('.')[-1] if short else key}={value}" for key, value in cell.items())


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML (``--set`` overrides applied); every problem in one InputError."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, str(path))) from None
