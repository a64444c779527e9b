"""One typed schema for a run: data spec, model, noise, training (studies: ``study_config``).

The CLI, the YAML files and the tests all build these pydantic models. Unknown keys are
errors (``extra="forbid"``), and every field left as ``None`` is filled from the data set's
defaults in NEM_SPEC.md §3 when the run config is validated, so a resolved config is fully
explicit (what gets logged is what ran).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nem_study.inputs import InputError  # noqa: F401  (defined with the guarded reader; imported from here too)

DataName = Literal["static_shapes", "flying_shapes", "flying_mnist"]
SPLITS = ("train", "valid", "test")   # a data set's splits, each a field of DataConfig (its size)


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


def flat(config: RunConfig) -> dict[str, Any]:
    """``{"model.k": 3, ...}``: a resolved run config key by key, its values as JSON has them."""
    return {f"{section}.{key}": value for section, fields in config.model_dump(mode="json").items()
            for key, value in fields.items()}


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
    compile: bool = Field(False, description="torch.compile each EM iteration (M-step cell, E-step and "
                          "loss): 1.28-1.35x eager for the static-shapes step on a CPU; with only the "
                          "cell compiled, the conv networks were slower (BENCHMARKS.md)")
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
