"""Ray Tune + MLflow overhead per trial: a study of N trials against the same trials run directly.

    python bench/bench_study_overhead.py                  # 4 trials of ~1 minute, 2 at a time
    python bench/bench_study_overhead.py --trials 4 --epochs 2 --processes 2 --repeats 3
    python bench/bench_study_overhead.py --repeats 4 --worker-env MALLOC_ARENA_MAX=1 --alternate

Both sides run the same N run configs (flying shapes, K = 3, small data, fixed epochs, one
thread each) with the same number of processes at a time:

- direct: ``fit_curriculum`` in a process pool of ``--processes`` workers, nothing else;
- study:  ``nem-study run`` semantics (``run_study``): a local Ray with ``--processes`` CPUs,
  one CPU per trial, every epoch reported to Tune with its checkpoint and logged to MLflow
  (SQLite), evaluations none, final artifacts (checkpoint, tables, the groupings panel).

What a study pays once, whatever its size, is timed apart: Ray's start and stop, and the
driver's and Tune's work before the first trial begins and after the last one ends (the
tracking store check, the parent run, the data check, Tune's start). The per-trial overhead
is the span from the first trial's begin to the last one's end, study against direct pool,
times processes / trials. A study trial's begin is its MLflow child run's start minus its
setup (``trial_setup_seconds``); the medians of its setup and fit phases are printed beside
the direct trials' fit. ``--repeats`` runs several direct/study pairs and adds their median. ``--worker-env`` sets
variables in the Ray workers only (``runtime_env``); with ``--alternate`` every second repeat
runs without them, and each arm gets its own median.

The span comparison carries the run-to-run drift of the training speed (several seconds per
minute on these machines). So each trial is also split in-process: pure training (the fit and
test, less ``trial_report_seconds``, the time handing epochs to MLflow and Tune) and the rest.
"Added in-trial" is what the study adds to the rest, median study trial against median direct
trial; "training, study / direct" shows whether training itself runs slower in a Ray worker.

``--side-by-side`` removes that drift from the span comparison too: the direct side (a pool of
one process) and the study (a local Ray with one CPU) run at the same time, each its N trials
one after the other, one core each. Both sides then see the same machine at the same moment.
Ray's own processes and Tune's driver (about 2 % of the machine) run at niceness 0 and Ray's
workers at 15, so that work takes its CPU from the study's trial first: the study's one trial
bears all of it, where in a study on all cores each trial bears its share. ``--direct-nice 15``
runs the direct trials at the workers' niceness, and that work falls on both sides alike.

    python bench/bench_study_overhead.py --side-by-side --trials 4 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def study_dict(root: Path, trials: int, epochs: int) -> dict:
    return {
        "name": "overhead",
        "base": {"data": {"name": "flying_shapes", "train": 512, "valid": 128, "test": 256},
                 "train": {"valid_samples": 128, "patience": 1000, "threads": 1}},
        "grid": {"train.lr": [1e-3 * (1 + i / 10) for i in range(trials)]},
        "seeds": 1,
        "stop": {"max_epochs": epochs},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": str(root / "mlartifacts")},
        "storage": str(root / "ray_results"),
        "max_failures": 0,
    }


def direct_trial(config_json: dict) -> tuple[float, float, float]:
    """One trial in a pool worker: (fit seconds, wall-clock begin, end); begin is before imports."""
    begin = time.time()
    import torch

    from nem_study import data
    from nem_study.config import RunConfig
    from nem_study.curriculum import fit_curriculum

    torch.set_num_threads(1)
    cfg = RunConfig.model_validate(config_json)
    t0 = time.perf_counter()
    fit_curriculum(cfg, lambda spec, split: data.load(spec, split, progress=False))
    return time.perf_counter() - t0, begin, time.time()


def measure(root: Path, args: argparse.Namespace, worker_env: dict[str, str]) -> dict[str, float]:
    """One direct run and one study of the same trials, in fresh folders under ``root``."""
    from nem_study import data
    from nem_study.config import replace
    from nem_study.study_config import StudyConfig
    from nem_study.trials import expand_trials
    from nem_study.study import run_study

    import mlflow
    import ray

    root.mkdir()
    study = StudyConfig.model_validate(study_dict(root, args.trials, args.epochs))
    trials = expand_trials(study)
    for t in trials:  # data generated once, outside both timings
        data.ensure(t.config.data, progress=False)

    configs = []
    for t in trials:
        cfg = replace(t.config, {"train.checkpoint_dir": str(root / "direct" / t.name)})  # both sides write checkpoints
        configs.append(cfg.model_dump(mode="json"))
    processes = 1 if args.side_by_side else args.processes

    def run_direct() -> tuple[float, tuple]:
        """The direct trials in a fresh pool, timed from its start; the pool ends with them."""
        t0, w0 = time.perf_counter(), time.time()
        with mp.get_context("spawn").Pool(processes, initializer=os.nice, initargs=(args.direct_nice,)) as pool:
            direct_fit, begins_direct, ends = zip(*pool.map(direct_trial, configs, chunksize=1))
        return time.perf_counter() - t0, (direct_fit, begins_direct, ends, w0, time.time())

    if not args.side_by_side:  # first the direct trials, then the study
        direct, (direct_fit, begins_direct, ends, w0, w1) = run_direct()
        direct_span = (w0, min(begins_direct), max(ends), w1)

    yaml_path = root / "study.yaml"
    yaml_path.write_text("# written by bench_study_overhead.py\n")
    t0 = time.perf_counter()
    ray.init(num_cpus=processes, include_dashboard=False, log_to_driver=False,  # timed apart
             runtime_env={"env_vars": worker_env} if worker_env else None)
    ray_start = time.perf_counter() - t0
    if args.side_by_side:  # the direct trials in a thread of this process, beside the study
        with ThreadPoolExecutor(1) as ex:
            direct_future = ex.submit(run_direct)
            w0 = time.time()
            result = run_study(study, yaml_path, num_cpus=processes, verbose=0)
            t1, w1 = time.perf_counter(), time.time()
            direct, (direct_fit, begins_direct, ends, dw0, dw1) = direct_future.result()
        direct_span = (dw0, min(begins_direct), max(ends), dw1)
    else:
        w0 = time.time()
        result = run_study(study, yaml_path, num_cpus=processes, verbose=0)
        t1, w1 = time.perf_counter(), time.time()
    t2 = time.perf_counter()
    ray.shutdown()
    ray_stop = time.perf_counter() - t2
    studied = t1 - t0 + ray_stop
    assert len(result.finished) == args.trials, result
    client = mlflow.MlflowClient(study.tracking.uri)
    children = client.search_runs([client.get_experiment_by_name(study.experiment).experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    # A trial began (run_trial entered) its setup before its child run was created.
    begins = [r.info.start_time / 1000 - r.data.metrics["trial_setup_seconds"] for r in children]
    study_span = (w0, min(begins), max(r.info.end_time / 1000 for r in children), w1)
    # Measured inside each trial, free of the run-to-run drift of the training speed: the time
    # a trial spends outside pure training (setup, reporting epochs, final logging), study
    # trial against direct trial (process start and imports).
    m = [r.data.metrics for r in children]
    study_training = [x["trial_fit_seconds"] - x["trial_report_seconds"] for x in m]
    study_added = [r.info.end_time / 1000 - b - t for r, b, t in zip(children, begins, study_training)]
    direct_added = [e - b - f for f, b, e in zip(direct_fit, begins_direct, ends)]
    fixed = ray_start + ray_stop
    study_trials, direct_trials = study_span[2] - study_span[1], direct_span[2] - direct_span[1]
    return {"direct": direct, "study": studied, "ray": fixed,
            "once": study_span[1] - study_span[0] + study_span[3] - study_span[2] + fixed,
            "trial": direct * processes / args.trials,
            "per_trial": (study_trials - direct_trials) * processes / args.trials,
            "direct_fit": statistics.median(direct_fit),
            "added": statistics.median(study_added) - statistics.median(direct_added),
            "training": statistics.median(study_training)} | \
        {k: statistics.median(r.data.metrics[f"trial_{k}_seconds"] for r in children) for k in ("setup", "fit", "report")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (~35 s each on one core)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="direct/study pairs, one after the other")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the study's Ray workers only (repeatable)")
    p.add_argument("--side-by-side", action="store_true",
                   help="run the direct trials and the study at the same time, one process each "
                   "(--processes is ignored)")
    p.add_argument("--direct-nice", type=int, default=0, metavar="N",
                   help="run the direct trials at niceness N (Ray runs its workers at 15)")
    p.add_argument("--alternate", action="store_true",
                   help="every second repeat without --worker-env (the first one without), a median per arm")
    args = p.parse_args()
    try:
        worker_env = dict(item.split("=", 1) for item in args.worker_env)
    except ValueError:
        p.error(f"--worker-env {args.worker_env}: expected KEY=VALUE")

    import mlflow
    import ray
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"ray {ray.__version__}, mlflow {mlflow.__version__}, python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NEM_DATA_DIR"] = str(Path(tmp) / "data")
        for r in range(args.repeats):
            env = {} if args.alternate and r % 2 == 0 else worker_env
            rows.append(measure(Path(tmp) / f"repeat{r}", args, env) | {"env": env})
            m = rows[-1]
            print(f"repeat {r + 1} (workers: {_env_label(env)}): direct {m['direct']:.1f} s, study {m['study']:.1f} s; per trial "
                  f"{m['per_trial']:+.1f} s of {m['trial']:.0f} s ({100 * m['per_trial'] / m['trial']:+.1f} %)",
                  flush=True)

    at_a_time = "side by side, one process each" if args.side_by_side else f"{args.processes} at a time"
    print(f"\n{args.trials} trials of {args.epochs} epochs, {at_a_time}; one row per repeat, "
          "then the median. Per study: Ray start/stop, and the driver's and Tune's work before the first trial "
          "begins and after the last ends. Per trial: the span from the first trial's begin to the last one's "
          "end, against the direct pool's, times processes / trials.")
    print("In-trial: the median study trial's time outside pure training (setup, reporting, final logging) "
          "minus the median direct trial's (process start, imports), against the direct fit; and the pure "
          "training time (fit + test less reporting) of the study trials against the direct ones.")
    print("| repeat | Ray workers' env | direct | study | once per study | setup (median) | reporting (median) | study fit + test "
          "(median) | direct fit + test (median) | per trial (spans) | added in-trial | training, study / direct |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    arms = {_env_label(r["env"]): [x for x in rows if x["env"] == r["env"]] for r in rows}
    medians = [{k: statistics.median(r[k] for r in arm) for k in arm[0] if k != "env"} | {"env": arm[0]["env"]}
               for arm in arms.values()]
    for i, m in enumerate(rows + medians):
        name = str(i + 1) if i < len(rows) else "**median**"
        print(f"| {name} | {_env_label(m['env'])} | {m['direct']:.1f} s | {m['study']:.1f} s | {m['once']:.1f} s (Ray {m['ray']:.1f} s) | "
              f"{m['setup']:.1f} s | {m['report']:.2f} s | {m['fit']:.1f} s | {m['direct_fit']:.1f} s | "
              f"{m['per_trial']:+.1f} s of {m['trial']:.0f} s ({100 * m['per_trial'] / m['trial']:+.1f} %) | "
              f"{m['added']:+.1f} s ({100 * m['added'] / m['direct_fit']:+.1f} %) | "
              f"{m['training'] / m['direct_fit']:.3f} |")


def _env_label(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "as the driver's"


if __name__ == "__main__":
    main()
