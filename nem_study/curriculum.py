"""A curriculum: ``fit`` stage after stage of ``data.curriculum``, each stage starting from the
previous stage's best weights (NEM_SPEC.md §4); one plain ``fit`` without one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nem_study.config import InputError, RunConfig, replace
from nem_study.data import Split
from nem_study.train import fit

Report = Callable[[dict[str, Any], Path | None], None]

def curriculum_stages(cfg: RunConfig) -> list[RunConfig]:
    """One run config per stage (``data.digit_pool`` = the stage's pool); ``[cfg]`` without one."""
    if not cfg.data.curriculum:
        return [cfg]
    raw = cfg.model_dump(mode="json")
    return [RunConfig.model_validate(raw | {"data": raw["data"] | {"curriculum": None, "digit_pool": pool}})
            for pool in cfg.data.curriculum]


def fit_curriculum(cfg: RunConfig, load: Callable[[Any, str], Split], report: Report | None = None,
                   resume: str | Path | None = None, progress: bool = False,
                   panel: str | Path | None = None) -> dict[str, Any]:
    """``fit`` stage after stage of ``data.curriculum`` (NEM_SPEC.md §4); one stage without one.

    ``load(data_config, split)`` returns a split. Each stage has its own early stopping and
    checkpoints in ``<checkpoint_dir>/stage<i>/``; a finished stage leaves ``stage.json``, so a
    resumed run (``resume`` = the checkpoint folder) skips it. Only the last stage is tested.
    Every report carries ``stage`` and ``iteration``, the epoch counted over all stages.
    """
    stages = curriculum_stages(cfg)
    final = stages[-1]
    root = Path(cfg.train.checkpoint_dir) if cfg.train.checkpoint_dir else None
    if len(stages) > 1 and root is None:
        raise InputError("data.curriculum needs train.checkpoint_dir (stages start from the previous best.pt)")
    splits = {"valid": load(final.data, "valid"), "test": load(final.data, "test")}
    offset, init, done = 0, None, []
    for i, stage in enumerate(stages, start=1):
        stage_dir = root / f"stage{i}" if len(stages) > 1 else root
        if stage_dir is not None:
            stage = replace(stage, {"train.checkpoint_dir": str(stage_dir)})
        marker = stage_dir / "stage.json" if len(stages) > 1 else None
        if marker is not None and marker.is_file():  # finished before a restart
            done.append(json.loads(marker.read_text()))
            offset, init = offset + done[-1]["epochs"], stage_dir / "best.pt"
            continue
        stage_resume = resume
        if len(stages) > 1 and resume is not None:  # the stage's own last.pt, if it got that far
            stage_resume = stage_dir / "last.pt" if (stage_dir / "last.pt").is_file() else None

        def stage_report(metrics: dict[str, Any], _dir: Path | None, i: int = i, offset: int = offset) -> None:
            if report is not None:
                per_epoch = metrics["sequences_seen"] // metrics["epoch"]
                report(metrics | {"stage": i, "iteration": offset + metrics["epoch"],
                                  "sequences_seen": (offset + metrics["epoch"]) * per_epoch}, root)

        if progress and len(stages) > 1:
            print(f"stage {i} of {len(stages)}: digit pool {stage.data.digit_pool}", flush=True)
        splits["train"] = load(stage.data, "train")
        result = fit(stage, splits, stage_report, stage_resume, progress, init=init, test=i == len(stages),
                     panel=panel)
        if marker is not None and i < len(stages):
            done.append({"stage": i, "digit_pool": stage.data.digit_pool} |
                        {k: result[k] for k in ("epochs", "best_epoch", "best_valid_loss", "stop_reason")})
            marker.write_text(json.dumps(done[-1]))
        offset, init = offset + result["epochs"], result.get("checkpoint")
    if len(stages) > 1:
        result |= {"epochs": offset, "stages": done,
                   "sequences_seen": offset * (result["sequences_seen"] // max(result["epochs"], 1))}
    return result
