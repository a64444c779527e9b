"""``nem-study report STUDY``: one folder with the study's tables, figures and an index.md.

Steps: find the study's parent run, collect its child runs, write the tables and figures,
copy each grid cell's grouping panel, write ``index.md`` (tables inline, figures embedded by
relative links), and log every file on the parent run under ``report/`` so the MLflow UI shows
the same report.

Layout of the folder:
  index.md, runs.csv (one row per run, scalar columns)
  tables/<name>.md|.tex|.csv   figures/<name>.png|.pdf   groupings/<cell>.png
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from analysis import aggregate, figures
from analysis.aggregate import by_cell, counts
from analysis.collect import Study, cell_label, collect_runs, download, find_study
from analysis.tables import Table, all_tables
from nem_study.contract import GROUPINGS

CONVENTIONS = ("Numbers are the mean ± sample standard deviation (ddof = 1) over seeds, of finished runs "
               "only; \"± –\" where one run finished. within: |ours − paper| ≤ std_ours + std_paper "
               "(std_ours = 0 with one run). Paper values: `analysis/published.yaml` (NEM_SPEC.md §6).")


def make_report(study: str, tracking_uri: str | None = None, out: str | Path | None = None,
                echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Path:
    """Write the report of ``study`` (YAML path, study name or parent run id); the index.md path.

    ``echo`` gets one progress line per step. Raises ``ReportError`` for a study, run or
    tracking store that cannot be found.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per step is enough
    found, client = find_study(study, tracking_uri)
    echo(f"study {found.name!r}: parent run {found.parent_run_id}, experiment {found.experiment!r} at {found.uri}")
    runs = collect_runs(found, client)
    n = counts(runs)
    echo(f"collected {len(runs)} run(s) in {runs['cell'].nunique()} grid cell(s): {_counted(n)}")

    folder = Path(out) if out else Path("reports") / _slug(found.name)
    folder.mkdir(parents=True, exist_ok=True)
    runs.drop(columns=[c for c in runs if runs[c].map(lambda v: isinstance(v, (list, dict))).any()]) \
        .to_csv(folder / "runs.csv", index=False)
    tables = all_tables(runs, found.grid)
    table_files = [path for table in tables for path in table.write(folder / "tables").values()]
    echo(f"tables: {', '.join(t.name for t in tables)}")
    drawn = _figures(runs, folder / "figures")
    echo(f"figures: {', '.join(drawn) or 'none (no run logged what they need)'}")
    panels = _groupings(runs, client, folder / "groupings")
    echo(f"grouping panels: {len(panels)}")

    index = folder / "index.md"
    index.write_text(_index(found, runs, tables, drawn, panels))
    written = [index, folder / "runs.csv", *table_files, *(p for _, paths in drawn.values() for p in paths),
               *panels.values()]
    try:
        for path in written:
            sub = path.relative_to(folder).parent
            client.log_artifact(found.parent_run_id, str(path), artifact_path="/".join(["report", *sub.parts]))
        echo(f"logged {len(written)} file(s) on parent run {found.parent_run_id} under report/")
    except Exception as e:   # the local report stands on its own
        echo(f"warning: could not log the report on the parent run ({type(e).__name__}: {e})")
    return index


def _figures(runs: pd.DataFrame, folder: Path) -> dict[str, tuple[str, list[Path]]]:
    """The figures the runs allow: name -> (title, PNG and PDF paths)."""
    drawn = {}
    cells = [(cell_label(cell), group) for cell, group in by_cell(runs)]
    curves = {label: c for label, group in cells if (c := aggregate.ami_curve(group)) is not None}
    if curves:
        drawn["ami_per_step"] = ("Test AMI per time step (Figure 6)",
                                 figures.ami_per_step(curves, folder / "ami_per_step"))
    bce = aggregate.bce_by_objects(runs)
    if bce:
        drawn["bce_k1_k5"] = ("Next-step BCE bound, K = 1 vs K = 5 (Figure 5)",
                              figures.bce_bars(bce, folder / "bce_k1_k5"))
    # Every run's history counts here, also a failed or stopped run's (how far did it get?).
    training = {label: {m: aggregate.training_curve(group, m) for m in ("valid_loss", "valid_ami")}
                for label, group in cells}
    if any(e.size for metrics in training.values() for e, _ in metrics.values()):
        drawn["training_curves"] = ("Training curves", figures.training_curves(training, folder / "training_curves"))
    return drawn


def _groupings(runs: pd.DataFrame, client: Any, folder: Path) -> dict[str, Path]:
    """Each grid cell's ``groupings.png`` from its first seed (finished runs first)."""
    panels: dict[str, Path] = {}
    if "has_groupings" not in runs:
        return panels
    with tempfile.TemporaryDirectory() as tmp:
        for cell, group in by_cell(runs):
            candidates = group[group["has_groupings"].fillna(False).astype(bool)]
            if candidates.empty:
                continue
            run = candidates.assign(_done=candidates["status"] != "FINISHED").sort_values(["_done", "seed"]).iloc[0]
            label = cell_label(cell)
            path = folder / f"{_slug(label)}.png"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(download(client, run["run_id"], GROUPINGS, Path(tmp) / run["run_id"]), path)
            panels[f"{label} (trial {run['trial']})"] = path
    return panels


def _index(study: Study, runs: pd.DataFrame, tables: list[Table], drawn: dict[str, tuple[str, list[Path]]],
           panels: dict[str, Path]) -> str:
    n = counts(runs)
    commit = study.tags.get("mlflow.source.git.commit", "unknown")
    lines = [f"# Study `{study.name}`", "",
             f"- MLflow: parent run `{study.parent_run_id}`, experiment `{study.experiment}`, `{study.uri}`",
             f"- nem-study {study.tags.get('nem_study.version', '?')}, commit `{commit}`; "
             f"report made {time.strftime('%Y-%m-%d %H:%M')}",
             f"- trials planned: {study.params.get('trials', '?')}; runs: {len(runs)} ({_counted(n)})",
             "", CONVENTIONS, "", "## Tables", ""]
    for table in tables:
        lines += [f"### {table.title}", "", table.markdown(), "", table.note, "",
                  f"[CSV](tables/{table.name}.csv) · [LaTeX](tables/{table.name}.tex)", ""]
    lines += ["All runs: [runs.csv](runs.csv).", ""]
    not_done = runs[runs["status"] != "FINISHED"] if len(runs) else runs
    if len(not_done):
        lines += ["## Runs that did not finish", "", "| trial | status | reason |", "|---|---|---|"]
        for _, run in not_done.iterrows():
            reason = next((r for r in (run.get("failure_reason"), run.get("stop_reason")) if isinstance(r, str)), "–")
            lines.append(f"| {run['trial']} | {run['status']} | {_one_line(reason)} |")
        lines.append("")
    lines += ["## Figures", ""]
    for title, paths in drawn.values():
        png, pdf = (f"figures/{p.name}" for p in paths)
        lines += [f"### {title}", "", f"![{title}]({png})", "", f"[PDF]({pdf})", ""]
    if not drawn:
        lines += ["No figures: no run logged what they need.", ""]
    if panels:
        lines += ["## Groupings (first seed of each grid cell, test sequence 0)", ""]
        for label, path in panels.items():
            lines += [f"### {label}", "", f"![{label}](groupings/{path.name})", ""]
    return "\n".join(lines)


def _counted(n: dict[str, int]) -> str:
    return ", ".join(f"{count} {what}" for what, count in n.items())


def _one_line(text: str) -> str:
    return text.strip().splitlines()[0][:200].replace("|", "\\|") if text.strip() else "–"


def _slug(text: str) -> str:
    """A file name from a label: ``k=3,objects=5`` -> ``k-3_objects-5``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("=", "-")).strip("_") or "report"

