"""Benchmark: batched AMI (nem_study.metrics) against scikit-learn, one call per image.

The label maps look like the shapes data of NEM_SPEC.md §4: 28x28, three blocky objects on a
0 background, 255 where objects overlap; both are excluded from the AMI (§5). Predictions are
K = 3 cluster maps: each object (and the background) goes to a random cluster, then a random
fraction of pixels (0-30 % per image) is reassigned at random.

    .venv/bin/python bench/bench_ami.py [--n 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import sklearn
from sklearn.metrics import adjusted_mutual_info_score

from nem_study.metrics import adjusted_mutual_info, ami_per_step

BACKGROUND, OVERLAP = 0, 255


def blocky_label_maps(rng: np.random.Generator, n: int, size: int = 28, objects: int = 3, k: int = 3):
    """(true, pred, valid), each (n, size, size), labels uint8: rectangles of side 5-14 as
    objects 1..objects."""
    yy, xx = np.mgrid[:size, :size]
    true = np.zeros((n, size, size), dtype=np.uint8)
    cover = np.zeros((n, size, size), dtype=np.uint8)
    for obj in range(1, objects + 1):
        h, w = rng.integers(5, 15, (2, n, 1, 1))
        y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        true[inside] = obj
        cover += inside
    true[cover > 1] = OVERLAP
    valid = (true != BACKGROUND) & (true != OVERLAP)

    # Object (or background) -> cluster, then per-image noise.
    assign = rng.integers(0, k, (n, objects + 1), dtype=np.uint8)
    source = np.where(true == OVERLAP, BACKGROUND, true).reshape(n, -1)
    pred = np.take_along_axis(assign, source.astype(np.intp), axis=1).reshape(true.shape)
    flip = rng.random(true.shape) < rng.uniform(0.0, 0.3, (n, 1, 1))
    pred[flip] = rng.integers(0, k, int(flip.sum()), dtype=np.uint8)
    return true, pred, valid


def sklearn_loop(true, pred, valid, average_method):
    return np.array(
        [
            adjusted_mutual_info_score(t[v], p[v], average_method=average_method) if v.any() else np.nan
            for t, p, v in zip(true, pred, valid)
        ]
    )


def median_times(fns, repeats: int):
    """Median wall time of each function, the functions taking turns (fair under varying load)."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method; the median is reported")
    parser.add_argument("--average-method", default="max", choices=["max", "arithmetic", "min", "geometric"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-large", action="store_true", help="skip the 10,000 x 20 batched run")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    true, pred, valid = blocky_label_maps(rng, args.n)
    m = args.average_method
    adjusted_mutual_info(true[:8], pred[:8], valid[:8], m)  # warm-up (log-factorial table)

    def batched():
        return adjusted_mutual_info(true, pred, valid, m)

    def one_by_one():
        return sklearn_loop(true, pred, valid, m)

    (t_batched, t_sklearn), (ours, ref) = median_times([batched, one_by_one], args.repeats)
    max_diff = float(np.nanmax(np.abs(ours - ref)))
    same_nan = bool(np.array_equal(np.isnan(ours), np.isnan(ref)))
    speedup = t_sklearn / t_batched

    print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, python {platform.python_version()}")
    print(f"images: {args.n} (28x28, 3 objects, K=3), average_method={m}, repeats={args.repeats}")
    mean_valid = valid.reshape(args.n, -1).sum(1).mean()
    print(f"mean valid pixels per image: {mean_valid:.1f}, mean AMI: {np.nanmean(ours):.4f}")
    print(f"batched: {t_batched:.4f} s ({t_batched / args.n * 1e6:.1f} us/image)")
    print(f"sklearn: {t_sklearn:.4f} s ({t_sklearn / args.n * 1e6:.1f} us/image)")
    print(f"speed-up: {speedup:.1f}x, max |diff|: {max_diff:.3g}, NaNs agree: {same_nan}")
    print("| images | batched s | sklearn s | speed-up | max abs diff | numpy | scikit-learn |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.n} | {t_batched:.4f} | {t_sklearn:.3f} | {speedup:.0f}x | {max_diff:.1e} "
        f"| {np.__version__} | {sklearn.__version__} |"
    )

    if not args.no_large:
        # A full test set: 10,000 sequences x 20 steps, batched only (sklearn would take minutes).
        per_image = t_batched / args.n
        if per_image * 200_000 < 60:
            big_rng = np.random.default_rng(args.seed + 1)
            parts = [blocky_label_maps(big_rng, 20_000) for _ in range(10)]
            seqs = [np.concatenate(x).reshape(10_000, 20, 28, 28) for x in zip(*parts)]
            start = time.perf_counter()
            per_step = ami_per_step(*seqs, average_method=m)
            elapsed = time.perf_counter() - start
            print(
                f"10,000 sequences x 20 steps (200,000 images), batched ami_per_step: {elapsed:.2f} s "
                f"({elapsed / 200_000 * 1e6:.1f} us/image), mean AMI {per_step.mean():.4f}"
            )
        else:
            print(f"skipped the 200,000-image run (estimated {per_image * 200_000:.0f} s)")


if __name__ == "__main__":
    main()
