"""Is a training step slower inside a Ray Tune trial? The same step, timed in five places.

    python bench/bench_trial_step.py [--seconds 20] [--repeats 3]

bench_study_overhead.py found training about 1.1x slower in a study trial than in a plain
process, with the study's own bookkeeping timed apart. This isolates the step: the flying-shapes
network (K = 3, T = 20, batch 16, one thread, fp32), trained for ``--seconds`` after warm-up
steps, as sequences / s, in

- ``process``: the main thread of a fresh process (``multiprocessing`` spawn);
- ``thread``: a second thread of a fresh process, as Tune runs a function trainable;
- ``ray task``: a Ray task (Ray's worker niceness, 15 by default, kept);
- ``ray task nice 0``: the same task after ``os.setpriority`` back to 0;
- ``tune trial``: a one-trial ``Tuner`` whose trainable runs the loop and reports once.

The places take turns, one at a time, ``--repeats`` times, so that the machine's drift hits
all alike; medians and their ratio to ``process`` are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_rate(seconds: float) -> float:
    """Sequences / s of the flying-shapes training step, one thread, after 3 warm-up steps."""
    import time

    import torch

    from bench.bench_train import Step
    from nem_study.config import RunConfig

    torch.set_num_threads(1)
    step = Step(RunConfig.model_validate({"data": {"name": "flying_shapes"}}), 16)
    for _ in range(3):
        step.run()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step.run()
        n += 1
    return n * 16 / (time.perf_counter() - t0)


def in_thread(seconds: float) -> float:
    out = []
    t = threading.Thread(target=lambda: out.append(train_rate(seconds)))
    t.start()
    t.join()
    return out[0]


def niced_zero(seconds: float) -> float:
    os.setpriority(os.PRIO_PROCESS, 0, 0)
    return train_rate(seconds)


def tune_trial(seconds: float, storage: str) -> float:
    from ray import tune

    def trainable(config):
        tune.report({"rate": train_rate(config["seconds"])})

    result = tune.Tuner(trainable, param_space={"seconds": seconds},
                        run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
    return result[0].metrics["rate"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import ray
    import torch

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    task = ray.remote(num_cpus=1)(train_rate)
    task_nice0 = ray.remote(num_cpus=1)(niced_zero)
    ctx = mp.get_context("spawn")
    storage = tempfile.mkdtemp(prefix="trial-step-")

    def fresh_process(fn) -> float:
        with ctx.Pool(1) as pool:
            return pool.apply(fn, (args.seconds,))

    places = {
        "process": lambda: fresh_process(train_rate),
        "thread": lambda: fresh_process(in_thread),
        "ray task": lambda: ray.get(task.remote(args.seconds)),
        "ray task nice 0": lambda: ray.get(task_nice0.remote(args.seconds)),
        "tune trial": lambda: tune_trial(args.seconds, storage),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}, ray {ray.__version__}; {args.seconds:.0f} s per point, {args.repeats} repeats")
    rates: dict[str, list[float]] = {name: [] for name in places}
    for r in range(args.repeats):
        for name, run in places.items():
            rates[name].append(run())
            print(f"  repeat {r + 1}: {name}: {rates[name][-1]:.2f} seq / s", flush=True)
    base = statistics.median(rates["process"])
    print("\n| place | sequences / s (median) | all | / process |")
    print("|---|---|---|---|")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):.2f} | {', '.join(f'{x:.2f}' for x in rs)} | "
              f"{statistics.median(rs) / base:.3f} |")


if __name__ == "__main__":
    main()
