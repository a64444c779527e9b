"""One typed schema for everything: data specs, runs and studies.

The CLI, the YAML files and the tests all build these pydantic models. Unknown keys are
errors (``extra="forbid"``), and every field left as ``None`` is filled from the data set's
defaults in NEM_SPEC.md §3 when the run config is validated, so a resolved config is fully
explicit (what gets logged is what ran).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from nem_study import inputs
from nem_study.contract import DEFAULT_URI
from nem_study.inputs import InputError  # defined with the guarded reader; imported from here too

DataName = Literal["static_shapes", "flying_shapes", "flying_mnist"]


class Strict(BaseModel):
    """Unknown keys are errors; a validated config is frozen (change one with ``replace``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# What ``None`` means, per data set: NEM_SPEC.md §3, one column per data set ...
DEFAULTS: dict[str, dict[str, Any]] = {
    "static_shapes": {
        "data.objects": 3, "data.frames": 1, "data.image_size": 28,
        "model.network": "static_fc", "model.pixel": "bernoulli", "model.gamma_gradient": "flow",
        "model.loss_step_weights": "last", "model.w_inter": 1.0, "model.em_steps": 15,
        "noise.kind": "bitflip", "noise.prob": 0.1, "train.lr": 1e-3},
    "flying_shapes": {
        "data.objects": 3, "data.frames": 21, "data.image_size": 28, "data.motion": "unit",
        "model.network": "flying_shapes_conv", "model.pixel": "bernoulli", "model.gamma_gradient": "stop",
        "model.loss_step_weights": "all", "model.w_inter": 1.0,
        "noise.kind": "bitflip", "noise.prob": 0.2, "train.lr": 1e-3},
    "flying_mnist": {
        "data.objects": 2, "data.frames": 21, "data.image_size": 24, "data.motion": "unit",
        "model.network": "flying_mnist_conv", "model.pixel": "gaussian", "model.gamma_gradient": "stop",
        "model.loss_step_weights": "all", "model.w_inter": 0.2,
        "noise.kind": "masked_uniform", "noise.prob": 0.2, "train.lr": 5e-4},
}
# ... then per network, whatever the data set; on sequences model.em_steps is data.frames - 1.
NETWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "static_fc": {"model.hidden": 250, "model.layer_norm": False},
    "flying_shapes_conv": {"model.hidden": 100, "model.layer_norm": True},
    "flying_mnist_conv": {"model.hidden": 250, "model.layer_norm": True},
}
SECTIONS = ("data", "model", "noise", "train")


def _fill_defaults(raw: dict[str, Any], only: str | None = None) -> dict[str, Any]:
    """``raw`` (sections of plain values) with every missing or None value the tables define set;
    ``only``: the one section ``raw`` is (a data spec on its own)."""
    sections = {only: raw} if only else {s: raw.get(s) if raw.get(s) is not None else {} for s in SECTIONS}
    sections = {s: v.model_dump() if isinstance(v, BaseModel) else v for s, v in sections.items()}
    if not all(isinstance(v, dict) for v in sections.values()):
        return raw  # not a mapping: the field's own validation says so
    data = sections.get("data", {})
    table = dict(DEFAULTS.get(data.get("name", "flying_shapes"), {}))
    if not table:
        return raw  # an unknown data set: data.name's validation says so
    table |= NETWORK_DEFAULTS.get(sections.get("model", {}).get("network") or table["model.network"], {})
    frames = data.get("frames") if data.get("frames") is not None else table["data.frames"]
    if "model.em_steps" not in table and isinstance(frames, int):
        table["model.em_steps"] = frames - 1
    filled = {s: dict(v) for s, v in sections.items()}
    for key, value in table.items():
        section, field = key.split(".")
        if section in filled and filled[section].get(field) is None:
            filled[section][field] = value
    return filled[only] if only else {**raw, **filled}


def replace(config: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with dotted keys changed: ``replace(cfg, {"train.threads": 1})``.
    For values a validated config leaves open (threads, checkpoint folder); configs are frozen."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        section, field = key.split(".")
        by_section.setdefault(section, {})[field] = value
    return config.model_copy(update={s: getattr(config, s).model_copy(update=v) for s, v in by_section.items()})


class DataConfig(Strict):
    """A data set is a pure function of this spec (NEM_SPEC.md §4)."""

    name: DataName = "flying_shapes"
    objects: int | None = Field(None, ge=1, le=9, description="objects per image (3 shapes, 2 digits)")
    frames: int | None = Field(None, ge=1, description="frames per sequence (T + 1); 1 for static")
    image_size: int | None = Field(None, ge=8, description="28 for shapes, 24 for flying MNIST")
    train: int = Field(50_000, ge=1, description="training sequences")
    valid: int = Field(10_000, ge=1, description="validation sequences")
    test: int = Field(10_000, ge=1, description="test sequences")
    digit_pool: int | None = Field(
        None, ge=1, description="flying MNIST: draw training digits from the first N (curriculum)"
    )
    curriculum: list[int] | None = Field(
        None, min_length=1, description="flying MNIST: train stage after stage on these digit pools, "
        "e.g. [20, 500, 50000], each stage with its own early stopping (None: one stage, digit_pool)")
    digit_size: int = Field(14, ge=4, description="flying MNIST: side of the down-sampled digit")
    overlap: Literal["max", "clip_sum"] = Field("max", description="flying MNIST: ink where digits overlap")
    sprites: Literal["binding", "outline"] = Field(
        "binding", description="shapes: the authors' 2-pixel-thick Binding sprites (NEM_SPEC.md §4), or the "
        "1-pixel outlines this project used before")
    motion: Literal["unit", "continuous"] | None = Field(
        None, description="flying data: whole-pixel velocities in {-1, 0, +1} per axis with exact "
        "reflection (the authors'), or a continuous direction at 1-3 px per frame rounded down "
        "(this project's before); None: unit for flying shapes and flying MNIST (NEM_SPEC.md §4; the "
        "evidence for flying MNIST is in data/sequences.py)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        return _fill_defaults(raw, only="data") if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.is_static and self.frames != 1:
            raise ValueError("static_shapes has frames = 1")
        if self.name == "flying_mnist" and self.digit_size > self.image_size:
            raise ValueError("digit_size must not exceed image_size")
        if self.curriculum is not None:
            if self.name != "flying_mnist":
                raise ValueError("curriculum (digit pools) applies to flying_mnist only")
            if min(self.curriculum) < 1:
                raise ValueError("curriculum: every digit pool must be >= 1")
            if self.digit_pool is not None:
                raise ValueError("set either curriculum or digit_pool, not both")
        return self

    @property
    def is_static(self) -> bool:
        return self.name == "static_shapes"

    @property
    def grey(self) -> bool:
        return self.name == "flying_mnist"


class NoiseConfig(Strict):
    """Input corruption, drawn fresh at every step (NEM_SPEC.md §3)."""

    kind: Literal["bitflip", "masked_uniform", "none"] | None = None
    prob: float | None = Field(None, ge=0.0, le=1.0, description="probability per pixel")


class ModelConfig(Strict):
    """N-EM / RNN-EM options. ``None`` means: the default for the data set (NEM_SPEC.md §1-3)."""

    kind: Literal["rnn_em", "nem"] = "rnn_em"
    k: int = Field(3, ge=1, le=64, description="number of components K")
    network: Literal["static_fc", "flying_shapes_conv", "flying_mnist_conv"] | None = None
    hidden: int | None = Field(None, ge=1, description="recurrent size (250 / 100 / 250)")
    layer_norm: bool | None = None
    pixel: Literal["bernoulli", "gaussian"] | None = None
    e_sigma: float = Field(0.25, gt=0, description="Gaussian sigma of the E-step")
    loss_sigma: float = Field(1.0, gt=0, description="Gaussian sigma of the intra-cluster loss (code: 1)")
    input_sign: Literal["x_minus_psi", "psi_minus_x"] = "x_minus_psi"
    psi_init: Literal["zero", "median"] = "zero"
    gamma_gradient: Literal["stop", "flow"] | None = None
    loss_step_weights: Literal["all", "last"] | None = None
    w_inter: float | None = Field(None, ge=0.0, description="weight of the inter-cluster loss")
    em_steps: int | None = Field(None, ge=1, description="EM iterations on static data")
    init: Literal["tf", "torch"] = Field(
        "tf", description="weights as the authors' TF 1 code: glorot-uniform, zero biases, one glorot range "
        "over the RNN's joined [input, h] matrix, N-EM's step size uniform in (-sqrt 3, sqrt 3) "
        "(NEM_SPEC.md §3); torch: PyTorch's layer defaults and a step size of 1")
    layer_norm_affine: Literal["channel", "element"] = Field(
        "channel", description="LayerNorm after a conv: one gain and bias per channel (TF slim's layer_norm), "
        "or one per element (C, H, W)")
    layer_norm_eps: float = Field(1e-12, gt=0, description="LayerNorm epsilon (TF slim: 1e-12; PyTorch: 1e-5)")
    input_std_floor: bool = Field(
        False, description="flying MNIST: floor the per-image std at 1/sqrt(D) as tf.image."
        "per_image_standardization does; the authors' code divides by the std with no floor")


class TrainConfig(Strict):
    lr: float | None = Field(None, gt=0, description="Adam learning rate (1e-3; flying MNIST 5e-4)")
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(500, ge=1)
    patience: int = Field(10, ge=1, description="epochs without a better validation loss")
    valid_samples: int = Field(1000, ge=1, description="validation sequences per epoch")
    test_samples: int | None = Field(None, ge=1, description="test sequences (None: all)")
    test_each_epoch: int = Field(0, ge=0, description="test sequences evaluated after every epoch (0: none)")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16: autocast the networks' convs and matmuls (likelihoods, E-step and loss "
        "stay fp32); auto: bf16 on a CPU with bf16 instructions (1.1-1.8x faster, BENCHMARKS.md), else fp32")
    compile: bool = Field(False, description="torch.compile the M-step cell (measured slower on this "
                          "project's CPU, BENCHMARKS.md; meant for GPUs)")
    cuda_graph: bool = Field(True, description="on a GPU, capture the whole training step (forward, "
                             "backward, Adam) as one CUDA graph and replay it: 5.8-8.6x eager on an H100 "
                             "(BENCHMARKS.md); no effect on a CPU")
    checkpoint_dir: str | None = Field(None, description="where best.pt / last.pt go (None: none)")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds of training "
                                        "(a resumed run counts the epochs it trained before)")


class RunConfig(Strict):
    """Everything one training run needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, raw: Any) -> Any:
        """Fill every ``None`` from the data set's column of NEM_SPEC.md §3 (``DEFAULTS``)."""
        return _fill_defaults(raw) if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.model.kind == "nem" and self.model.network != "static_fc":
            raise ValueError("model.kind 'nem' (the tied-weight gradient cell) needs network 'static_fc'")
        if not self.data.is_static and self.data.frames < 2:
            raise ValueError("sequences need data.frames >= 2 (T + 1)")
        return self

    @property
    def steps(self) -> int:
        """EM steps per sequence: T for sequences, N for static images."""
        return self.model.em_steps if self.data.is_static else self.data.frames - 1


# ----------------------------------------------------------------------------------------
# Loading, overrides and errors


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"{source}: {len(err.errors())} problem(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                           and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, read through :func:`nem_study.inputs.read_yaml` (size, encoding,
    depth and alias limits: any problem is one InputError naming the file)."""
    raw = inputs.read_yaml(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. model.k=5")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = inputs.parse_yaml(value, f"--set {item!r}") if value.strip() else None
    return raw


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, str(path or "config"))) from None


def load_data_config(name_or_path: str, overrides: list[str] | None = None) -> DataConfig:
    """A data set by name (``flying_shapes``) or by a YAML spec file."""
    if name_or_path.endswith((".yaml", ".yml")):
        raw = read_yaml(name_or_path)
        raw = raw.get("data", raw)  # a run config works too
    else:
        raw = {"name": name_or_path}
    raw = apply_overrides(raw, overrides or [])
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, name_or_path)) from None


# ----------------------------------------------------------------------------------------
# Studies: a base run, a grid over run-config keys, seeds; each combination is one trial

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
        for where, value in values:
            for err_loc, kind, msg, _ in _errors(_with_values(base_raw, {key: value})):
                if err_loc == tuple(key.split(".")) or (err_loc, msg) not in base_errors:
                    problems.append(_detail(("search", "space", where), kind, msg, value))
    return problems


def _grid_problems(base_raw: dict[str, Any], grid: dict[str, Any]) -> list[InitErrorDetails]:
    """Every problem of the grid: unknown keys, empty lists, values that break the run config.

    A value is blamed for errors at its own key, and for errors elsewhere that the base alone
    does not have: a broken base is reported once (under ``base``), not under every value.
    """
    base_errors = set((loc, msg) for loc, _, msg, _ in _errors(base_raw))
    problems = []
    for key, values in grid.items():
        parts = str(key).split(".")
        if (problem := _key_problem(("grid", str(key)), key, "a grid")) is not None:
            problems.append(problem)
            continue
        if not isinstance(values, list) or not values:
            problems.append(_detail(("grid", key), "grid_values", "expected a non-empty list of values",
                                    values))
            continue
        for i, value in enumerate(values):
            for loc, kind, msg, _ in _errors(_with_values(base_raw, {key: value})):
                if loc == tuple(parts) or (loc, msg) not in base_errors:
                    problems.append(_detail(("grid", f"{key}[{i}]"), kind, msg, value))
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


@dataclass(frozen=True)
class TrialSpec:
    """One trial of a study: a grid cell, a seed index, and the run config they resolve to."""

    index: int
    name: str
    cell: dict[str, Any]
    seed: int
    config: RunConfig

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "cell": self.cell, "seed": self.seed,
                "config": self.config.model_dump(mode="json")}


def expand_trials(study: StudyConfig) -> list[TrialSpec]:
    """Grid cells x seeds (base.train.seed, +1, ...), seeds innermost; names like ``k=3,objects=3,seed=0``."""
    trials = []
    for cell in grid_cells(study.grid):
        for i in range(study.seeds):
            config = study.run_config(cell, study.base.train.seed + i)
            # The values as validated (YAML reads 1.0e38 as a string; the config has a float).
            typed = {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in cell}
            name = ",".join(filter(None, [cell_name(typed), f"seed={config.train.seed}"]))
            trials.append(TrialSpec(len(trials), name, typed, config.train.seed, config))
    return trials


def sampled_name(trial: TrialSpec, sample: int) -> str:
    """The name of the ``sample``-th config sampled in the grid cell of ``trial``: ``k=3,sample=0``."""
    return ",".join(filter(None, [cell_name(trial.cell), f"sample={sample}"]))


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML (``--set`` overrides applied); every problem in one InputError."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, str(path))) from None
