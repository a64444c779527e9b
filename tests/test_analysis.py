"""analysis/: reports from MLflow. Hand-made tables for the arithmetic and the paper layout; a
real tiny study (Ray, MLflow on SQLite) for collecting, the report folder and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.aggregate import Stat, within
from analysis.tables import (SEEN, flying_mnist_table, flying_shapes_table, grid_table, published,
                             static_shapes_table)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nem_study.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# ----------------------------------------------------------------------------------------
# Arithmetic and layout, on hand-made run tables


def run(cell: dict, seed: int, status: str = "FINISHED", **values) -> dict:
    """One row as collect_runs makes it (params are MLflow strings)."""
    return {"run_id": f"r{seed}", "trial": f"{cell},seed={seed}", "seed": seed, "cell": json.dumps(cell),
            "status": status, "data.name": "flying_shapes", "model.kind": "rnn_em",
            "evaluations": [], **values}


def test_stat_is_the_mean_the_sample_std_and_n_of_the_finite_values():
    s = Stat.of([0.5, 0.7, math.nan, 0.9])
    assert (s.mean, s.n) == (pytest.approx(0.7), 3) and s.std == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert str(s) == "0.700 ± 0.200"
    one = Stat.of([0.4])
    assert one.n == 1 and math.isnan(one.std) and str(one) == "0.400 ± –"
    assert str(Stat.of([])) == "–" and Stat.of([]).missing


def test_within_means_inside_the_combined_error():
    paper = Stat(0.970, 0.005, None)
    assert within(Stat(0.960, 0.006, 3), paper)           # 0.010 <= 0.011
    assert not within(Stat(0.960, 0.004, 3), paper)       # 0.010 >  0.009
    assert within(Stat(0.975, 0.0, 2), paper)             # on the edge counts
    assert within(Stat(0.966, math.nan, 1), paper)        # one run: the paper's error alone
    assert not within(Stat(0.960, math.nan, 1), paper)
    assert within(Stat(), paper) is None and within(Stat(0.9, 0.1, 2), Stat()) is None


def test_the_grid_table_averages_finished_runs_and_counts_the_others():
    runs = pd.DataFrame([
        run({"model.k": 3}, 0, test_ami=0.5), run({"model.k": 3}, 1, test_ami=0.7),
        run({"model.k": 3}, 2, "FAILED"), run({"model.k": 5}, 0, test_ami=0.8),
        run({"model.k": 5}, 1, "RUNNING", test_ami=0.1),      # not finished: not averaged
        run({"model.k": 5}, 2, "KILLED"),                     # stopped by ASHA
    ])
    table = grid_table(runs, {"model.k": [3, 5]})
    assert table.columns[:5] == ["k", "finished", "failed", "stopped", "unfinished"]
    k3, k5 = table.rows
    assert k3[:5] == [3, 2, 1, 0, 0] and k5[:5] == [5, 1, 0, 1, 1]
    assert k3[5] == Stat(0.6, float(np.std([0.5, 0.7], ddof=1)), 2)
    assert k5[5].mean == 0.8 and k5[5].n == 1
    md = table.markdown()
    assert "| 3 | 2 | 1 | 0 | 0 | 0.600 ± 0.141 |" in md and "| 5 | 1 | 0 | 1 | 1 | 0.800 ± – |" in md
    csv = table.frame()
    assert list(csv["test AMI mean"]) == pytest.approx([0.6, 0.8]) and list(csv["test AMI n"]) == [2, 1]
    assert r"0.600 $\pm$ 0.141" in table.latex()


def evals(*specs: tuple[int, int, int, bool, float]) -> list[dict]:
    return [{"name": f"k{k}-objects{o}-steps{t}" + ("-static" if s else ""), "k": k, "objects": o, "steps": t,
             "static": s, "ami": ami} for k, o, t, s, ami in specs]


def test_table1_has_the_papers_rows_and_puts_its_values_beside_ours():
    cell33, cell55 = {"data.objects": 3, "model.k": 3}, {"data.objects": 5, "model.k": 5}
    gen = lambda ami: evals((5, 3, 50, False, 0.1), (5, 3, 20, False, ami), (3, 3, 20, False, 0.2))  # noqa: E731
    runs = pd.DataFrame([
        run(cell33, 0, **{"data.objects": "3", "model.k": "3"}, test_ami=0.965, valid_ami=0.9, evaluations=gen(0.97)),
        run(cell33, 1, **{"data.objects": "3", "model.k": "3"}, test_ami=0.975, valid_ami=0.9, evaluations=gen(0.95)),
        run(cell55, 0, **{"data.objects": "5", "model.k": "5"}, test_ami=0.5,
            evaluations=evals((5, 3, 20, False, 0.9))),
        run({"x": 1}, 0, **{"data.objects": "4", "model.k": "4"}, test_ami=0.3),        # not a row of Table 1
    ])
    table = flying_shapes_table(runs, published())
    rows = {(r[0], r[1]): dict(zip(table.columns, r)) for r in table.rows}
    assert list(rows) == [(3, 3), (3, 5), (5, 3), (5, 5)]
    r33 = rows[(3, 3)]
    assert r33["test AMI (ours)"] == Stat(0.97, float(np.std([0.965, 0.975], ddof=1)), 2)
    assert r33["test AMI (paper)"] == Stat(0.970, 0.005, None) and r33["test within"] is True
    assert r33["train AMI (paper)"] == Stat(0.969, 0.006, None)
    # Generalisation of (3 objects, K 3) is (3 objects, K 5): the 20-step evaluation, not the 50-step one.
    assert (r33["gen. objects"], r33["gen. K"]) == (3, 5) and r33["gen. AMI (ours)"].mean == pytest.approx(0.96)
    assert r33["gen. AMI (paper)"] == Stat(0.972, 0.007, None) and r33["n"] == 2
    assert rows[(3, 5)]["test AMI (ours)"].missing and rows[(3, 5)]["n"] == 0 and rows[(3, 5)]["test within"] is None
    r55 = rows[(5, 5)]
    assert r55["test within"] is False and r55["gen. AMI (ours)"] == Stat(0.9, math.nan, 1)
    assert "| 3 | 5 | 0.997 ± 0.001 | – | 3 | 5 | – | 0.997 ± 0.002 | – |" in table.markdown()
    # A study without flying-shapes runs gets no Table 1 (the other paper tables alike).
    static = runs.assign(**{"data.name": "static_shapes"})
    assert flying_shapes_table(static, published()) is None and flying_mnist_table(static, published()) is None
    assert static_shapes_table(runs, published()) is None


def test_flying_mnist_rows_are_direct_and_stagewise_training():
    runs = pd.DataFrame([
        run({"c": "none"}, 0, **{"data.name": "flying_mnist", "data.objects": "2", "model.k": "2",
                                 "data.curriculum": "None"}, test_ami=0.82,
            evaluations=evals((3, 3, 20, False, 0.73), (2, 2, 50, True, 0.6), (2, 2, 20, True, 0.1))),
        run({"c": "stages"}, 0, **{"data.name": "flying_mnist", "data.objects": "2", "model.k": "2",
                                   "data.curriculum": "[20, 500, 50000]"}, test_ami=0.5),
    ])
    rows = [dict(zip(t.columns, r)) for t in [flying_mnist_table(runs, published())] for r in t.rows]
    assert [r["training"] for r in rows] == ["direct", "stage-wise"]
    direct, stagewise = rows
    assert direct["2 digits (ours)"].mean == 0.82 and direct["2 digits within"] is True
    assert direct["3 digits, K=3 (ours)"].mean == 0.73 and direct["3 digits (paper)"].mean == 0.729
    assert direct["static (ours)"].mean == 0.6            # the 50-step static evaluation
    assert stagewise["2 digits (paper)"] == Stat(0.917, 0.005, None) and stagewise["2 digits within"] is False
    assert stagewise["static (ours)"].missing


def test_published_values_are_those_of_the_spec():
    spec = (ROOT.parent / "shared" / "NEM_SPEC.md")
    paper = published()
    assert paper["static_shapes"]["rnn_em"] == {"mean": 0.826, "std": 0.005}
    assert [(r["objects"], r["k"], r["generalisation"]["objects"], r["generalisation"]["k"])
            for r in paper["flying_shapes"]] == [(3, 3, 3, 5), (3, 5, 3, 3), (5, 3, 3, 3), (5, 5, 3, 5)]
    if spec.is_file():   # every published number appears in §6 as "mean +- std"
        text = spec.read_text().split("## 6.")[1]
        values = [paper["static_shapes"][m] for m in ("rnn_em", "nem")]
        values += [row[c] for row in paper["flying_shapes"] for c in ("train", "test", "generalisation")]
        values += [v for way in paper["flying_mnist"].values() for v in way.values()]
        for v in values:
            assert f"{v['mean']:.3f} +- {v['std']:.3f}" in text, v


# ----------------------------------------------------------------------------------------
# A real tiny study: 2 grid cells x 2 seeds, one epoch each; one run then marked FAILED


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("ray")
    mlflow = pytest.importorskip("mlflow")
    from nem_study.study_config import StudyConfig
    from nem_study.study import run_study

    tmp = tmp_path_factory.mktemp("report_study")
    raw = {
        "name": "tiny-report",
        "base": {"data": {"name": "flying_shapes", "train": 64, "valid": 32, "test": 32, "frames": 6},
                 "train": {"batch_size": 32, "valid_samples": 32}},
        "grid": {"model.k": [2, 3]}, "seeds": 2, "stop": {"max_epochs": 1}, "resources": {"cpu": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_location": str(tmp / "mlartifacts")},
        "storage": str(tmp / "ray"), "max_failures": 0,
        "evaluations": [{"k": 5}],    # k5: Table 1's generalisation of (3 objects, K 3)
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:   # a private data cache, as conftest gives each test
        mp.setenv("NEM_DATA_DIR", str(tmp / "nem_data"))
        result = run_study(StudyConfig.model_validate(raw), path, num_cpus=int(os.environ.get("NEM_RAY_CPUS", 2)),
                           verbose=0)
    assert len(result.finished) == 4, result.failed
    uri = raw["tracking"]["uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    children = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")}
    failed = children["k=3,seed=1"].info.run_id
    client.set_tag(failed, "failure_reason", "RuntimeError: marked failed by the test")
    client.set_terminated(failed, "FAILED")
    first = children["k=2,seed=0"].info.run_id
    if "groupings.png" not in {a.path for a in client.list_artifacts(first)}:   # until trials draw their own
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(2, 1))
        fig.savefig(tmp / "groupings.png")
        plt.close(fig)
        client.log_artifact(first, str(tmp / "groupings.png"))
    return {"tmp": tmp, "yaml": path, "uri": uri, "parent": result.parent_run_id, "client": client,
            "children": children, "failed": failed}


def test_collect_gives_one_row_per_run_and_the_grid_table_one_row_per_cell(study):
    from analysis.collect import collect_runs, find_study
    from analysis.tables import grid_table as table_of

    found, client = find_study("tiny-report", tracking_uri=study["uri"])   # by name, in any experiment
    assert found.parent_run_id == study["parent"] and found.grid == {"model.k": [2, 3]}
    runs = collect_runs(found, client)
    assert list(runs["trial"]) == ["k=2,seed=0", "k=2,seed=1", "k=3,seed=0", "k=3,seed=1"]
    assert list(runs["status"]) == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert runs["data.name"].eq("flying_shapes").all() and list(runs["model.k"]) == ["2", "2", "3", "3"]
    assert all(len(a) == 5 for a in runs["ami_per_step"])     # frames 6: T = 5 steps
    assert all(set(c) == {"valid_loss", "valid_ami"} for c in runs["curves"])

    table = table_of(runs, found.grid)
    assert len(table.rows) == 2
    rows = {r[0]: dict(zip(table.columns, r)) for r in table.rows}
    # The same numbers straight from MLflow, without the analysis code.
    ami = {name: r.data.metrics["test_ami"] for name, r in study["children"].items()}
    k2 = rows[2]["test AMI"]
    assert (k2.mean, k2.std, k2.n) == (pytest.approx(np.mean([ami["k=2,seed=0"], ami["k=2,seed=1"]])),
                                       pytest.approx(np.std([ami["k=2,seed=0"], ami["k=2,seed=1"]], ddof=1)), 2)
    assert (rows[3]["finished"], rows[3]["failed"], rows[3]["stopped"], rows[3]["unfinished"]) == (1, 1, 0, 0)
    assert rows[3]["test AMI"].mean == pytest.approx(ami["k=3,seed=0"]) and rows[3]["test AMI"].n == 1
    gen = {name: r.data.metrics["eval/k5/ami"] for name, r in study["children"].items()}
    assert rows[2]["k5 AMI"].mean == pytest.approx(np.mean([gen["k=2,seed=0"], gen["k=2,seed=1"]]))
    # the budget: training sequences seen, as the trainer logged it, against the paper's 25 million
    seen = np.mean([study["children"][f"k=2,seed={s}"].data.metrics["sequences_seen"] for s in (0, 1)])
    assert seen > 0 and rows[2][SEEN] == f"{seen:,.0f} ({100 * seen / 25_000_000:.2g} %)"

    table1 = flying_shapes_table(runs, published())
    (row33,) = [dict(zip(table1.columns, r)) for r in table1.rows if r[:2] == [3, 3]]
    assert row33["grid cell"] == "k=3" and row33["n"] == 1
    assert row33["test AMI (ours)"].mean == pytest.approx(ami["k=3,seed=0"])
    assert row33["gen. AMI (ours)"].mean == pytest.approx(gen["k=3,seed=0"])


def test_nem_study_report_writes_the_folder_and_logs_it_on_the_parent_run(study):
    out = study["tmp"] / "report"
    r = cli("report", str(study["yaml"]), "--out", str(out), cwd=study["tmp"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report written to {out}/" in r.stdout
    assert "collected 4 run(s) in 2 grid cell(s): 3 finished, 1 failed, 0 stopped, 0 unfinished" in r.stderr
    assert "figures: ami_per_step, training_curves" in r.stderr

    index = (out / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    for name in ("ami_per_step", "training_curves"):
        assert f"figures/{name}.png" in links and f"figures/{name}.pdf" in links
    assert "groupings/k-2.png" in links and "tables/grid.csv" in links and "runs.csv" in links
    for link in links:
        assert (out / link).is_file() and (out / link).stat().st_size > 0, link
    assert "runs: 4 (3 finished, 1 failed, 0 stopped, 0 unfinished)" in index
    assert "| k=3,seed=1 | FAILED | RuntimeError: marked failed by the test |" in index
    assert "| 3 | 1 | 1 | 0 | 0 |" in index                  # the grid row of K = 3
    # flying shapes: Table 1 is written (only its row (3 objects, K 3) has runs here)
    assert "Flying shapes (the paper's Table 1)" in index and (out / "tables" / "table1_flying_shapes.tex").is_file()
    assert "Static shapes" not in index and "Flying MNIST" not in index

    client = study["client"]

    def artifacts(path: str) -> set[str]:
        return {a.path for a in client.list_artifacts(study["parent"], path)}

    assert {"report/index.md", "report/runs.csv", "report/figures", "report/tables", "report/groupings"} \
        <= artifacts("report")
    assert {"report/figures/ami_per_step.png", "report/figures/ami_per_step.pdf"} <= artifacts("report/figures")
    assert "report/tables/grid.csv" in artifacts("report/tables")


def test_the_report_code_imports_neither_torch_nor_ray(study):
    """Of nem_study it imports only the MLflow contract (standard library only)."""
    code = ("import sys, analysis, analysis.report\n"
            "from analysis.report import make_report\n"
            f"make_report({study['parent']!r}, tracking_uri={study['uri']!r}, out={str(study['tmp'] / 'by_id')!r},"
            " echo=lambda line: None)\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')\n"
            "         or m.startswith('nem_study.') and m != 'nem_study.contract']\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=study["tmp"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (study["tmp"] / "by_id" / "index.md").is_file()   # by parent run id


def test_bad_input_is_one_line_and_exit_code_2(study):
    tmp, uri = study["tmp"], study["uri"]
    cases = [
        (["nope", "--tracking-uri", uri], "no study 'nope' in any of 2 experiment(s)"),
        ([study["failed"], "--tracking-uri", uri], f"is not a study's parent run (its study's parent run is "
                                                     f"{study['parent']})"),
        (["0" * 32, "--tracking-uri", uri], f"no run {'0' * 32}"),
        (["tiny-report", "--tracking-uri", f"sqlite:///{tmp / 'none.db'}"], "no MLflow database at"),
        (["tiny-report", "--tracking-uri", "http://127.0.0.1:9"], "the MLflow server is not reachable"),
        ([str(tmp / "missing.yaml")], "cannot read the study file"),
    ]
    for args, needle in cases:
        r = cli("report", *args, cwd=tmp)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])
        assert r.stderr.startswith("nem-study: error: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert needle in r.stderr, (needle, r.stderr)
    assert not (tmp / "none.db").exists()   # a report never creates a store


def test_report_has_help_with_an_example():
    r = cli("report", "--help", cwd=ROOT)
    assert r.returncode == 0 and "--tracking-uri" in r.stdout and "parent run id" in r.stdout
    assert "nem-study report studies/" in cli("--help", cwd=ROOT).stdout


def test_figure5_compares_k1_and_k5_per_object_count(tmp_path):
    from analysis import figures
    from analysis.aggregate import bce_by_objects

    rows = [run({"k": k, "o": o}, s, **{"model.k": str(k), "data.objects": str(o)}, test_bce_bound=100.0 * k + s)
            for k in (1, 5) for o in (3, 5) for s in (0, 1)]
    bce = bce_by_objects(pd.DataFrame(rows))
    assert list(bce) == ["3", "5"] and sorted(bce["3"]) == [1, 5] and bce["5"][5] == Stat.of([500.0, 501.0])
    assert bce_by_objects(pd.DataFrame([r for r in rows if r["model.k"] == "1"])) == {}   # no K = 5: no figure
    for path in figures.bce_bars(bce, tmp_path / "bce"):
        assert path.stat().st_size > 1000
