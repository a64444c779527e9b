"""One typed schema for everything: data specs, runs (and, later, studies).

The CLI, the YAML files and the tests all build these pydantic models. Unknown keys are
errors (``extra="forbid"``), and every field left as ``None`` is filled from the data set's
defaults in NEM_SPEC.md §3 when the run config is validated, so a resolved config is fully
explicit (what gets logged is what ran).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DataName = Literal["static_shapes", "flying_shapes", "flying_mnist"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    digit_size: int = Field(14, ge=4, description="flying MNIST: side of the down-sampled digit")
    overlap: Literal["max", "clip_sum"] = Field("max", description="flying MNIST: ink where digits overlap")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _defaults(self) -> DataConfig:
        static = self.name == "static_shapes"
        if self.objects is None:
            self.objects = 2 if self.name == "flying_mnist" else 3
        if self.frames is None:
            self.frames = 1 if static else 21
        if static and self.frames != 1:
            raise ValueError("static_shapes has frames = 1")
        if self.image_size is None:
            self.image_size = 24 if self.name == "flying_mnist" else 28
        if self.name == "flying_mnist" and self.digit_size > self.image_size:
            raise ValueError("digit_size must not exceed image_size")
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
    checkpoint_dir: str | None = Field(None, description="where best.pt / last.pt go (None: none)")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds")


class RunConfig(Strict):
    """Everything one training run needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _resolve(self) -> RunConfig:
        """Fill every ``None`` from the data set's column of NEM_SPEC.md §3."""
        d, m, n, t = self.data, self.model, self.noise, self.train
        static, mnist = d.is_static, d.name == "flying_mnist"
        if m.network is None:
            m.network = {"static_shapes": "static_fc", "flying_shapes": "flying_shapes_conv",
                         "flying_mnist": "flying_mnist_conv"}[d.name]
        if m.kind == "nem" and m.network != "static_fc":
            raise ValueError("model.kind 'nem' (the tied-weight gradient cell) needs network 'static_fc'")
        if m.hidden is None:
            m.hidden = 100 if m.network == "flying_shapes_conv" else 250
        if m.layer_norm is None:
            m.layer_norm = m.network != "static_fc"
        if m.pixel is None:
            m.pixel = "gaussian" if mnist else "bernoulli"
        if m.gamma_gradient is None:
            m.gamma_gradient = "flow" if static else "stop"
        if m.loss_step_weights is None:
            m.loss_step_weights = "last" if static else "all"
        if m.w_inter is None:
            m.w_inter = 0.2 if mnist else 1.0
        if m.em_steps is None:
            m.em_steps = 15 if static else d.frames - 1
        if not static and d.frames < 2:
            raise ValueError("sequences need data.frames >= 2 (T + 1)")
        if n.kind is None:
            n.kind = "masked_uniform" if mnist else "bitflip"
        if n.prob is None:
            n.prob = {"static_shapes": 0.1, "flying_shapes": 0.2, "flying_mnist": 0.2}[d.name]
        if t.lr is None:
            t.lr = 5e-4 if mnist else 1e-3
        return self

    @property
    def steps(self) -> int:
        """EM steps per sequence: T for sequences, N for static images."""
        return self.model.em_steps if self.data.is_static else self.data.frames - 1


# ----------------------------------------------------------------------------------------
# Loading, overrides and errors


class InputError(Exception):
    """A problem with user input; the CLI prints it and exits with code 2."""


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
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
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
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
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
