"""A study's trials: its grid cells x seeds, each a resolved run config with a name.

``expand_trials`` is what a study runs (``k=3,seed=0``, ...); ``sampled_name`` names a
search's sampled configs (``k=3,sample=0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nem_study.config import RunConfig
from nem_study.study_config import StudyConfig, cell_name, grid_cells


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
        for seed in study.seed_values:
            config = study.run_config(cell, seed)
            # The values as validated (YAML reads 1.0e38 as a string; the config has a float).
            typed = {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in cell}
            name = ",".join(filter(None, [cell_name(typed), f"seed={config.train.seed}"]))
            trials.append(TrialSpec(len(trials), name, typed, config.train.seed, config))
    return trials


def sampled_name(trial: TrialSpec, sample: int) -> str:
    """The name of the ``sample``-th config sampled in the grid cell of ``trial``: ``k=3,sample=0``."""
    return ",".join(filter(None, [cell_name(trial.cell), f"sample={sample}"]))
