"""Benchmark the data pipeline: generation speed and memory-mapped batch reads.

    python bench/bench_data.py                       # 50,000 flying-shapes sequences
    python bench/bench_data.py --mnist ~/mnist.npz   # also 50,000 flying-MNIST sequences

Times (1) generating N flying-shapes sequences of 21 frames in memory, (2) the same for flying
MNIST when --mnist is given (MNIST loading and digit down-sampling included), (3) writing a
flying-shapes set with N training sequences to the Arrow store (generation + write + sha256),
opening it (memory map + sha256 check) and reading random batches of 64 sequences from it.
The store goes to a temporary NEM_DATA_DIR that is deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="sequences to generate (default 50,000)")
    ap.add_argument("--frames", type=int, default=21, help="frames per sequence (default 21)")
    ap.add_argument("--mnist", default=None, help="MNIST .npz or IDX directory (flying MNIST is skipped without)")
    ap.add_argument("--batches", type=int, default=500, help="random batches to read (default 500)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="nem-bench-data-"))
    os.environ["NEM_DATA_DIR"] = str(tmp)
    from nem_study import data
    from nem_study.config import DataConfig

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}), load average {load:.2f}; "
          f"python {platform.python_version()}, numpy {np.__version__}, pyarrow {pa.__version__}")
    try:
        shapes = DataConfig(name="flying_shapes", frames=args.frames, train=args.n, valid=1000, test=1000)
        t0 = time.perf_counter()
        images, labels = data.generate(shapes, "train")
        dt = time.perf_counter() - t0
        print(f"flying_shapes generate: {args.n} x {args.frames} x 28 x 28 in {dt:.2f} s "
              f"({args.n / dt:,.0f} seq/s; {images.nbytes * 2 / 2**20:,.0f} MiB images + labels)")
        del images, labels

        if args.mnist:
            t0 = time.perf_counter()
            mnist = data.load_mnist(args.mnist)
            t_load = time.perf_counter() - t0
            spec = DataConfig(name="flying_mnist", frames=args.frames, train=args.n)
            t0 = time.perf_counter()
            images, labels = data.generate(spec, "train", mnist=mnist)
            dt = time.perf_counter() - t0
            print(f"flying_mnist generate: {args.n} x {args.frames} x 24 x 24 in {dt:.2f} s "
                  f"({args.n / dt:,.0f} seq/s; incl. down-sampling the digit pool; MNIST load {t_load:.2f} s)")
            del images, labels, mnist

        t0 = time.perf_counter()
        d = data.ensure(shapes, progress=False)
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"store write: flying_shapes {args.n}+1000+1000 sequences -> {size / 2**20:,.0f} MiB in {dt:.2f} s "
              f"(generate + Arrow write + sha256)")
        rss0 = rss_mb()
        t0 = time.perf_counter()
        split = data.load(shapes, "train", progress=False)
        dt = time.perf_counter() - t0
        print(f"store open: train split ({len(split)} sequences) memory-mapped + sha256 verified in {dt:.2f} s; "
              f"RSS +{rss_mb() - rss0:,.0f} MiB")
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(split), size=(args.batches, args.batch_size))
        split.batch(idx[0])
        t0 = time.perf_counter()
        for b in idx:
            x, y = split.batch(b)
        dt = time.perf_counter() - t0
        print(f"store read: {args.batches} random batches of {args.batch_size} -> float32 {tuple(x.shape)}: "
              f"{args.batches / dt:,.0f} batches/s ({args.batches * args.batch_size / dt:,.0f} seq/s; "
              f"files in the page cache)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
