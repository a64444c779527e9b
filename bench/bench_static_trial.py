"""Where a static-shapes trial's time goes, for two checkouts side by side (issue 27).

    git worktree add /tmp/nem-base <commit>          # the code to compare against
    .venv/bin/python bench/bench_static_trial.py --baseline /tmp/nem-base [--train 50000 --epochs 2]

Each checkout runs its own ``studies/cpu/static_shapes_full.yaml`` (RNN-EM and N-EM, one core
each, both at once, as the study runs them), cut to ``--train`` training images, ``--epochs``
epochs and a 1,000-image final test, in three ways:

1. step:  the bare training step (``bench_train.Step``, the trial's path: compiled when its
   ``train.compile`` is), ``--steps`` timed steps after warm-up, median sequences / s;
2. parts: ``train.fit`` called directly, with timers around the training step, data gathering
   (``Split.batch``, steps, noise), the per-epoch evaluations and the checkpoint writes; the last
   epoch's seconds (the first compiles and warms up);
3. study: ``nem-study run`` (local Ray, MLflow on SQLite in a temporary folder). The trial's rate
   is one epoch's images over the time between its last two epochs' MLflow records, so it holds
   everything a study does between epochs; logging is ``trial_report_seconds`` per epoch (Tune's
   report with its checkpoint, and MLflow), idle the rest of that interval.

Run on a quiet machine: the two checkouts are timed one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

KINDS = ("rnn_em", "nem")
STUDY = "studies/cpu/static_shapes_full.yaml"


def run_config(code: Path, kind: str, train: int, epochs: int, folder: str | None = None):
    """The study's run config for one model, cut to the benchmark's size."""
    from nem_study.config import RunConfig

    base = yaml.safe_load((code / STUDY).read_text())["base"]
    base["data"]["train"] = train
    base["model"]["kind"] = kind
    base["train"] |= {"max_epochs": epochs, "threads": 1, "checkpoint_dir": folder, "test_samples": 1000}
    return RunConfig.model_validate(base)


# ----------------------------------------------------------------------------------------
# Workers: run inside one checkout (PYTHONPATH), one thread each, and print one JSON line.


def worker_step(code: Path, kind: str, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(code / "bench"))
    from bench_train import Step

    torch.set_num_threads(1)
    cfg = run_config(code, kind, 1000, 1)
    step = Step(cfg, cfg.train.batch_size, "default" if cfg.train.compile else None)
    for _ in range(3):
        step.run()  # warm-up (and compiling)
    times = [step.run() for _ in range(steps)]
    return {"sequences_per_second": cfg.train.batch_size / statistics.median(times)}


def worker_parts(code: Path, kind: str, train: int, epochs: int) -> dict:
    import nem_study.members as members
    import nem_study.train as training
    from nem_study import data

    seconds: dict[str, float] = dict.fromkeys(("step", "data", "evaluation", "checkpointing"), 0.0)
    inside = [False]

    def timed(part, fn):
        def wrapper(*args, **kwargs):
            if inside[0]:  # counted by the outer timer (evaluation reads batches too)
                return fn(*args, **kwargs)
            inside[0], t0 = True, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - t0
                inside[0] = False
        return wrapper

    with tempfile.TemporaryDirectory() as folder:
        cfg = run_config(code, kind, train, epochs, folder)
        splits = {s: data.load(cfg.data, s, progress=False) for s in ("train", "valid")}
        members.Single.step = timed("step", members.Single.step)
        for name in ("to_steps", "corrupt", "gamma0_noise"):
            setattr(training, name, timed("data", getattr(training, name)))
        split_type = type(splits["train"])
        split_type.batch = timed("data", split_type.batch)
        training.evaluate = timed("evaluation", training.evaluate)
        training.save_checkpoint = timed("checkpointing", training.save_checkpoint)
        if cfg.train.test_each_epoch:
            splits["test"] = data.load(cfg.data, "test", progress=False)
        epochs_seen: list[dict] = []
        mark = [time.perf_counter()]

        def report(metrics, _):
            now = time.perf_counter()
            epochs_seen.append({"wall": now - mark[0], **seconds})
            seconds.update(dict.fromkeys(seconds, 0.0))
            mark[0] = now

        training.fit(cfg, splits, report=report, test=False)
    last = epochs_seen[-1]
    return {"images": len(splits["train"]) // cfg.train.batch_size * cfg.train.batch_size, **last}


# ----------------------------------------------------------------------------------------
# The driver


def in_checkout(code: Path, *args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, __file__, "--worker", *args], cwd=code, env=env,
                            stdout=subprocess.PIPE, text=True)


def both_kinds(code: Path, *args: str) -> dict[str, dict]:
    """One worker per model, at once (two cores); their JSON results by model."""
    procs = {kind: in_checkout(code, args[0], str(code), kind, *args[1:]) for kind in KINDS}
    out = {}
    for kind, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{args[0]} worker for {kind} in {code} failed ({proc.returncode})")
        out[kind] = json.loads(stdout.strip().splitlines()[-1])
    return out


def study(code: Path, train: int, epochs: int) -> dict[str, dict]:
    """The study itself, cut to size, in a temporary folder; per model: the last epoch interval's
    images / s and the seconds handing one epoch to Tune and MLflow."""
    from mlflow.tracking import MlflowClient

    spec = yaml.safe_load((code / STUDY).read_text())
    spec["name"] = "bench-static-trial"
    spec["seeds"] = 1
    spec["base"]["data"]["train"] = train
    spec["base"]["train"] |= {"max_epochs": epochs, "test_samples": 1000}
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "study.yaml").write_text(yaml.safe_dump(spec))
        env = os.environ | {"PYTHONPATH": str(code), "OMP_WAIT_POLICY": "PASSIVE"}
        subprocess.run([sys.executable, "-m", "nem_study.cli", "run", "study.yaml"], cwd=folder, env=env,
                       check=True, stdout=subprocess.DEVNULL)
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        out = {}
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id]):
                kind = run.data.params.get("model.kind")
                if kind not in KINDS or "mlflow.parentRunId" not in run.data.tags:
                    continue
                history = sorted(client.get_metric_history(run.info.run_id, "valid_loss"), key=lambda m: m.step)
                interval = (history[-1].timestamp - history[-2].timestamp) / 1000
                images = run.data.metrics["sequences_seen"] / len(history)
                report = run.data.metrics.get("trial_report_seconds", float("nan")) / len(history)
                out[kind] = {"images_per_second": images / interval, "interval": interval, "logging": report}
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare against")
    p.add_argument("--train", type=int, default=50_000, help="training images (the study: 50,000)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (at least 2: the last is timed)")
    p.add_argument("--steps", type=int, default=15, help="timed bare steps")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, code, model, *rest = args.worker
        fn = {"step": worker_step, "parts": worker_parts}[kind]
        print(json.dumps(fn(Path(code), model, *map(int, rest))))
        return
    if args.baseline is None:
        p.error("--baseline: a checkout of the code to compare against is required")
    codes = {"baseline": args.baseline.resolve(), "this": Path(__file__).resolve().parents[1]}
    rows = {}
    for name, code in codes.items():
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
        print(f"{name}: {code} at {rev}", flush=True)
        step = both_kinds(code, "step", str(args.steps))
        parts = both_kinds(code, "parts", str(args.train), str(args.epochs))
        trial = study(code, args.train, args.epochs)
        rows[name] = {kind: {"step": step[kind], "parts": parts[kind], "study": trial[kind]} for kind in KINDS}
        print(json.dumps(rows[name]), flush=True)
    print("\n| model | code | bare step seq / s | trial images / s | trial / step | epoch s | "
          "step | data | evaluation | checkpointing | logging | idle |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        for name in codes:
            r = rows[name][kind]
            s, parts, trial = r["step"]["sequences_per_second"], r["parts"], r["study"]
            interval = trial["interval"]
            shares = {k: parts[k] for k in ("step", "data", "evaluation", "checkpointing")}
            shares["logging"] = trial["logging"]
            shares["idle"] = interval - sum(shares.values())
            cells = " | ".join(f"{v:.1f} ({100 * v / interval:.0f} %)" for v in shares.values())
            print(f"| {kind} | {name} | {s:.1f} | {trial['images_per_second']:.1f} | "
                  f"{trial['images_per_second'] / s:.2f} | {interval:.1f} | {cells} |")
    for kind in KINDS:
        a, b = (rows[n][kind]["study"]["images_per_second"] for n in codes)
        print(f"{kind}: trial images / s, this / baseline = {b / a:.2f}x")


if __name__ == "__main__":
    main()
