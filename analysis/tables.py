"""The report's tables: one per study (its grid) and, where the study has such runs, the paper's.

A ``Table`` holds typed cells (``Stat``, flags, numbers, text) and renders itself three ways:
Markdown and LaTeX for reading (``0.970 ± 0.005``), CSV for further analysis (a Stat becomes
three columns: mean, std, n). Paper tables put the published value beside ours and say whether
ours lies within the combined error (``aggregate.within``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.aggregate import Stat, by_cell, counts, eval_names, eval_stat, evaluation, num, stat, within
from analysis.collect import cell_label

PUBLISHED = Path(__file__).with_name("published.yaml")
# The paper's training budget per run: 50,000 sequences x up to 500 epochs (NEM_SPEC.md §3).
PAPER_SEQUENCES = 50_000 * 500
SEEN = "seen (of paper's)"
SEEN_NOTE = (f"{SEEN}: training sequences (images) each run saw, mean over its finished runs, and the "
             f"share of the paper's budget of 50,000 x up to 500 epochs = {PAPER_SEQUENCES:,}.")


def seen(runs: pd.DataFrame) -> str:
    """``90,000 (0.4 %)``: the mean training sequences seen by the finished runs, against the paper's."""
    value = stat(runs, "sequences_seen")
    if value.missing:
        return "–"
    return f"{value.mean:,.0f} ({100 * value.mean / PAPER_SEQUENCES:.2g} %)"


def published() -> dict[str, Any]:
    """The paper's numbers (``published.yaml``, transcribed from NEM_SPEC.md §6)."""
    return yaml.safe_load(PUBLISHED.read_text())


@dataclass
class Table:
    name: str                     # file stem
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_text(v).replace("|", "\\|") for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def latex(self) -> str:
        body = [" & ".join(_tex(c) for c in self.columns) + r" \\", r"\midrule"]
        body += [" & ".join(_tex(_text(v)) for v in row) + r" \\" for row in self.rows]
        return "\n".join([rf"% {self.title}", r"\begin{tabular}{" + "l" * len(self.columns) + "}", r"\toprule",
                          *body, r"\bottomrule", r"\end{tabular}", ""])

    def frame(self) -> pd.DataFrame:
        """Numbers as numbers: each Stat column becomes ``<col> mean``, ``<col> std``, ``<col> n``."""
        records = []
        for row in self.rows:
            record: dict[str, Any] = {}
            for column, value in zip(self.columns, row):
                if isinstance(value, Stat):
                    record |= {f"{column} mean": value.mean, f"{column} std": value.std, f"{column} n": value.n}
                else:
                    record[column] = value
            records.append(record)
        return pd.DataFrame(records)

    def write(self, folder: Path) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {ext: folder / f"{self.name}.{ext}" for ext in ("md", "tex", "csv")}
        paths["md"].write_text(f"{self.title}\n\n{self.markdown()}\n\n{self.note}\n".replace("\n\n\n", "\n"))
        paths["tex"].write_text(self.latex())
        self.frame().to_csv(paths["csv"], index=False)
        return paths


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.3g}"
    return str(value)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "±": r"$\pm$", "–": "--", "≤": r"$\leq$"}


def _tex(text: str) -> str:
    return re.sub(r"[\\&%$#_{}±–≤]", lambda m: _TEX[m.group()], text)


# ----------------------------------------------------------------------------------------
# The study's own grid


def grid_table(runs: pd.DataFrame, grid: dict[str, list[Any]]) -> Table:
    """One row per grid cell: its values, run counts, test AMI (NEM_SPEC.md §5: the last EM step on
    static data, the mean over steps on sequences), the mean-over-steps and last-step AMI, BCE
    bound and each evaluation's AMI (mean ± std over the finished seeds)."""
    cells = [json.loads(c) for c, _ in by_cell(runs)]
    keys = list(dict.fromkeys([*grid, *(k for c in cells for k in c)]))
    short = [k.split(".")[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys   # like the trial names
    evals = eval_names(runs)
    table = Table("grid", "Grid cells: test AMI (mean ± std over seeds)",
                  [*(labels or ["grid cell"]), "finished", "failed", "stopped", "unfinished", "test AMI",
                   "test AMI (mean over steps)", "test AMI (last step)", "BCE bound",
                   *(f"{name} AMI" for name in evals), SEEN],
                  note="test AMI is the last EM step's on static data and the mean over steps on sequences "
                  "(NEM_SPEC.md §5). Failed, stopped (e.g. by ASHA) and unfinished runs are counted, not averaged. "
                  + SEEN_NOTE)
    for cell, group in by_cell(runs):
        values = json.loads(cell)
        n = counts(group)
        table.rows.append([*([_value(values.get(k)) for k in keys] or ["(no grid)"]),
                           n["finished"], n["failed"], n["stopped"], n["unfinished"],
                           stat(group, "test_ami"), stat(group, "test_ami_mean"), stat(group, "test_ami_last"),
                           stat(group, "test_bce_bound"),
                           *(stat(group, f"eval/{name}/ami") for name in evals), seen(group)])
    return table


def _value(v: Any) -> Any:
    """A grid value as written in the trial names: None -> "None" (not "–", which means missing)."""
    return v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v)


def _select(runs: pd.DataFrame, data: str, **params: Any) -> pd.DataFrame:
    """Runs on data set ``data`` whose params equal ``params`` (as numbers where they are)."""
    if "data.name" not in runs:
        return runs.iloc[0:0]
    keep = runs["data.name"] == data
    for key, value in params.items():
        column = runs[key] if key in runs else pd.Series(None, index=runs.index)
        keep &= column.map(lambda v: (num(v) if num(v) is not None else v) == value)
    return runs[keep]


# ----------------------------------------------------------------------------------------
# The paper's tables (NEM_SPEC.md §6)


def flying_shapes_table(runs: pd.DataFrame, paper: dict[str, Any]) -> Table | None:
    """Table 1: RNN-EM trained on 3 or 5 shapes with K = 3 or 5, tested as trained and on the
    paper's generalisation setting (another K and/or object count, the same 20 steps)."""
    shapes = _select(runs, "flying_shapes")
    shapes = shapes[shapes.get("model.kind", pd.Series("rnn_em", index=shapes.index)).fillna("rnn_em") == "rnn_em"]
    if shapes.empty:
        return None
    table = Table("table1_flying_shapes", "Flying shapes (the paper's Table 1): AMI, ours vs paper", [
        "train objects", "train K", "train AMI (paper)", "valid AMI (ours)",
        "test objects", "test K", "test AMI (ours)", "test AMI (paper)", "test within",
        "gen. objects", "gen. K", "gen. AMI (ours)", "gen. AMI (paper)", "gen. within", "n", SEEN, "grid cell"],
        note="RNN-EM runs only. The paper's train column is AMI on the training set; ours is the last "
             "epoch's validation AMI. Generalisation: the run's evaluation with the paper's K and object "
             "count (not static; the fewest steps). within: |ours − paper| ≤ std_ours + std_paper. " + SEEN_NOTE)
    for row in paper["flying_shapes"]:
        gen = row["generalisation"]
        matched = _select(shapes, "flying_shapes", **{"data.objects": row["objects"], "model.k": row["k"]})
        train_p, test_p, gen_p = Stat.published(row["train"]), Stat.published(row["test"]), Stat.published(gen)
        for cell, group in by_cell(matched) or [(None, matched)]:
            test = stat(group, "test_ami")
            generalised = eval_stat(group, lambda r: evaluation(r, k=gen["k"], objects=gen["objects"], static=False))
            table.rows.append([row["objects"], row["k"], train_p, stat(group, "valid_ami"),
                               row["objects"], row["k"], test, test_p, within(test, test_p),
                               gen["objects"], gen["k"], generalised, gen_p, within(generalised, gen_p),
                               counts(group)["finished"], seen(group), cell_label(cell) if cell else "–"])
    return table


def static_shapes_table(runs: pd.DataFrame, paper: dict[str, Any]) -> Table | None:
    """Static shapes: N-EM vs RNN-EM test AMI."""
    static = _select(runs, "static_shapes")
    if static.empty:
        return None
    table = Table("static_shapes", "Static shapes: N-EM vs RNN-EM, test AMI", [
        "model", "K", "test AMI (ours)", "test AMI (paper)", "within", "n", SEEN, "grid cell"],
        note="The paper: K = 3, 15 EM steps; AMI at the last EM step. within: |ours − paper| ≤ std_ours + "
             "std_paper. " + SEEN_NOTE)
    for kind, label in (("rnn_em", "RNN-EM"), ("nem", "N-EM")):
        matched = _select(static, "static_shapes", **{"model.kind": kind})
        paper_value = Stat.published(paper["static_shapes"][kind])
        for cell, group in by_cell(matched) or [(None, matched)]:
            ours = stat(group, "test_ami")
            k = num(group["model.k"].iloc[0]) if cell and "model.k" in group else "–"
            table.rows.append([label, k, ours, paper_value, within(ours, paper_value), counts(group)["finished"],
                               seen(group), cell_label(cell) if cell else "–"])
    return table


def flying_mnist_table(runs: pd.DataFrame, paper: dict[str, Any]) -> Table | None:
    """Flying MNIST, K = 2 on 2 digits, trained directly or stage-wise (a digit-pool curriculum):
    test AMI, 3 digits with K = 3 (no retraining), static transfer (50 RNN-EM steps)."""
    mnist = _select(runs, "flying_mnist")
    if mnist.empty:
        return None
    table = Table("flying_mnist", "Flying MNIST: direct vs stage-wise training, ours vs paper", [
        "training", "K", "digits", "2 digits (ours)", "2 digits (paper)", "2 digits within",
        "3 digits, K=3 (ours)", "3 digits (paper)", "3 digits within",
        "static (ours)", "static (paper)", "static within", "n", SEEN, "grid cell"],
        note="Paper values apply to K = 2 on 2 digits. 3 digits: the evaluation with 3 objects and K = 3; "
             "static: the static evaluation (50 steps where logged). within: |ours − paper| ≤ std_ours + std_paper. "
             + SEEN_NOTE)
    curriculum = mnist.get("data.curriculum", pd.Series("None", index=mnist.index)).fillna("None")
    for key, label in (("direct", "direct"), ("stagewise", "stage-wise")):
        matched = mnist[(curriculum == "None") == (key == "direct")]
        for cell, group in by_cell(matched) or [(None, matched)]:
            k = num(group["model.k"].iloc[0]) if cell else 2
            digits = num(group["data.objects"].iloc[0]) if cell else 2
            as_paper = k == 2 and digits == 2
            p = {name: Stat.published(value if as_paper else None)
                 for name, value in paper["flying_mnist"][key].items()}
            two = stat(group, "test_ami")
            three = eval_stat(group, lambda r: evaluation(r, k=3, objects=3, static=False))
            still = eval_stat(group, lambda r: evaluation(r, static=True, steps=50) or evaluation(r, static=True))
            table.rows.append([label, k, digits, two, p["two_digits"], within(two, p["two_digits"]),
                               three, p["three_digits"], within(three, p["three_digits"]),
                               still, p["static"], within(still, p["static"]), counts(group)["finished"],
                               seen(group), cell_label(cell) if cell else "–"])
    return table


def all_tables(runs: pd.DataFrame, grid: dict[str, list[Any]]) -> list[Table]:
    """The grid table, then each paper table the study has runs for."""
    paper = published()
    tables = [grid_table(runs, grid)]
    if not runs.empty:
        tables += [t for t in (flying_shapes_table(runs, paper), static_shapes_table(runs, paper),
                               flying_mnist_table(runs, paper)) if t is not None]
    return tables
