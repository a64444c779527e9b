"""Seeds -> numbers: mean, sample std and n per grid cell; the comparison with the paper.

Conventions (also stated in every report):
- ``std`` is the sample standard deviation over seeds (ddof = 1). With one finished run it is
  undefined: NaN here, shown as "± –".
- Only FINISHED runs enter a mean; the others are counted per grid cell as failed (FAILED),
  stopped (KILLED: stopped early on purpose, e.g. by ASHA) or unfinished (RUNNING, SCHEDULED).
- Ours lies "within" the paper's value when |ours − paper| ≤ std_ours + std_paper; with one run
  std_ours counts as 0, so the paper's error alone decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd



@dataclass(frozen=True)
class Stat:
    """A mean with its spread. ``n`` = runs behind it; None for a published value."""

    mean: float = math.nan
    std: float = math.nan
    n: int | None = 0

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        """Mean, sample std (ddof = 1) and n of the finite values; NaN std for n = 1."""
        x = np.array([v for v in values if _finite(v)], dtype=float)
        if x.size == 0:
            return cls()
        return cls(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))

    @classmethod
    def published(cls, value: dict[str, float] | None) -> Stat:
        return cls() if not value else cls(float(value["mean"]), float(value["std"]), None)

    @property
    def missing(self) -> bool:
        return self.n == 0 or math.isnan(self.mean)

    def __str__(self) -> str:
        if self.missing:
            return "–"
        return f"{self.mean:.3f} ± " + ("–" if math.isnan(self.std) else f"{self.std:.3f}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def within(ours: Stat, paper: Stat) -> bool | None:
    """|ours − paper| ≤ std_ours + std_paper (std_ours = 0 for one run); None if either is missing."""
    if ours.missing or paper.mean != paper.mean:
        return None
    spread = (0.0 if math.isnan(ours.std) else ours.std) + (0.0 if math.isnan(paper.std) else paper.std)
    return abs(ours.mean - paper.mean) <= spread + 1e-12   # 1e-12: values on the edge count as within


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "FINISHED"]


def counts(runs: pd.DataFrame) -> dict[str, int]:
    """Runs by outcome: finished, failed, stopped (KILLED), unfinished (RUNNING, SCHEDULED)."""
    status = runs["status"] if "status" in runs else pd.Series(dtype=str)
    n = {key: int((status == value).sum()) for key, value in
         (("finished", "FINISHED"), ("failed", "FAILED"), ("stopped", "KILLED"))}
    return n | {"unfinished": len(status) - sum(n.values())}


def stat(runs: pd.DataFrame, column: str) -> Stat:
    """``column`` over the finished runs."""
    done = finished(runs)
    return Stat.of(done[column]) if column in done else Stat()


def evaluation(run: pd.Series, k: int | None = None, objects: int | None = None, static: bool | None = None,
               steps: int | None = None) -> dict[str, Any] | None:
    """The run's evaluation with these settings (None = any); the fewest steps if several match,
    so a 20-step test is preferred to a 50-step one unless ``steps`` asks for it."""
    found = [e for e in run.get("evaluations") or []
             if (k is None or e.get("k") == k) and (objects is None or e.get("objects") == objects)
             and (static is None or bool(e.get("static")) == static) and (steps is None or e.get("steps") == steps)]
    return min(found, key=lambda e: e.get("steps") or 0) if found else None


def eval_stat(runs: pd.DataFrame, pick: Callable[[pd.Series], dict[str, Any] | None], key: str = "ami") -> Stat:
    """``key`` of the evaluation ``pick(run)`` chooses, over the finished runs."""
    return Stat.of((pick(run) or {}).get(key, math.nan) for _, run in finished(runs).iterrows())


def eval_names(runs: pd.DataFrame) -> list[str]:
    """The evaluations' names, in the order of their AMI metric columns."""
    return sorted({c.split("/")[1] for c in runs.columns if c.startswith("eval/") and c.endswith("/ami")})


def by_cell(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(cell JSON, its runs) in the table's order (collect sorts the runs by grid order)."""
    return [(cell, runs[runs["cell"] == cell]) for cell in dict.fromkeys(runs["cell"])]


def mean_curve(arrays: Iterable[list[float]]) -> np.ndarray:
    """The mean over runs of per-step arrays; shorter arrays count where they have values."""
    arrays = [np.asarray(a, dtype=float) for a in arrays if a is not None and len(a)]
    if not arrays:
        return np.array([])
    padded = np.full((len(arrays), max(len(a) for a in arrays)), np.nan)
    for i, a in enumerate(arrays):
        padded[i, :len(a)] = a
    with np.errstate(all="ignore"):
        return np.nanmean(padded, axis=0)


def ami_curve(runs: pd.DataFrame) -> dict[str, Any] | None:
    """Test AMI per time step of a cell's finished runs, mean over seeds, with the quartile band.

    The 50-step evaluation where there is one (Figure 6: does AMI keep rising past the 20 steps
    trained on?), else the test per-step AMI. The band is the mean over seeds of each run's
    lower / upper quartile over test sequences; absent where the runs did not log quartiles.
    """
    done = finished(runs)
    if done.empty:
        return None
    long = [_long_eval(run) for _, run in done.iterrows()]
    if all(long):
        source = "50-step evaluation"
        mean, q25, q75 = (mean_curve(e.get(key) for e in long)
                          for key in ("ami_per_step", "ami_q25_per_step", "ami_q75_per_step"))
    else:
        source = "test"
        mean, q25, q75 = (mean_curve(done[col]) for col in ("ami_per_step", "ami_q25_per_step", "ami_q75_per_step"))
    if not mean.size:
        return None
    return {"steps": np.arange(1, mean.size + 1), "mean": mean, "q25": q25, "q75": q75, "source": source}


def _long_eval(run: pd.Series) -> dict[str, Any] | None:
    """The run's 50-step, non-static evaluation with per-step values; the trained K and objects first."""
    found = [e for e in run.get("evaluations") or [] if e.get("steps") == 50 and not e.get("static")
             and e.get("ami_per_step")]
    trained = (num(run.get("model.k")), num(run.get("data.objects")))
    found.sort(key=lambda e: (e.get("k"), e.get("objects")) != trained)
    return found[0] if found else None


def training_curve(runs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean over the cell's runs) of a per-epoch metric; epochs any run logged."""
    histories = [c.get(metric, {}) for c in runs["curves"] if isinstance(c, dict)] if "curves" in runs else []
    epochs = sorted({e for h in histories for e in h})
    if not epochs:
        return np.array([]), np.array([])
    with np.errstate(all="ignore"):
        means = np.nanmean([[h.get(e, np.nan) for e in epochs] for h in histories], axis=0)
    return np.array(epochs), means


def bce_by_objects(runs: pd.DataFrame) -> dict[str, dict[int, Stat]]:
    """Test BCE bound per (data set, objects) for K = 1 and K = 5, where the study has both K.

    Runs are pooled by (data, objects, K): other grid keys, if any, are averaged over.
    """
    done = finished(runs)
    if done.empty or not {"model.k", "data.objects", "data.name", "test_bce_bound"} <= set(done):
        return {}
    ks = done["model.k"].map(num)
    if not {1, 5} <= set(ks):
        return {}
    several = done["data.name"].nunique() > 1
    out: dict[str, dict[int, Stat]] = {}
    for (name, objects), group in done[ks.isin([1, 5])].groupby(["data.name", "data.objects"], sort=False):
        key = f"{name} {objects}" if several else str(objects)
        out[key] = {k: Stat.of(g["test_bce_bound"]) for k, g in group.groupby(group["model.k"].map(num))}
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def num(value: Any) -> float | int | None:
    """An MLflow param string as a number ("3" -> 3, "0.1" -> 0.1); None if it is not one."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else f
