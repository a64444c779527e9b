"""Tests of nem_study.metrics (NEM_SPEC.md §5): the batched AMI against scikit-learn's
``adjusted_mutual_info_score`` item by item, per-step AMI of sequences, and the BCE bound."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from nem_study import metrics
from nem_study.metrics import adjusted_mutual_info, ami_matrix, ami_per_step, bce_upper_bound

sklearn_metrics = pytest.importorskip("sklearn.metrics")

TOL = 1e-9
BACKGROUND, OVERLAP = 0, 255


def sklearn_ami(true, pred, valid, average_method):
    """scikit-learn, one item at a time; NaN where an item has no valid pixel (the spec's skip)."""
    out = []
    flat = [x.reshape(len(x), -1) for x in (true, pred, valid)]
    for t, p, v in zip(*flat):
        if not v.any():
            out.append(np.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's "continuous labels" guess on tiny inputs
            out.append(sklearn_metrics.adjusted_mutual_info_score(t[v], p[v], average_method=average_method))
    return np.array(out)


def assert_matches_sklearn(true, pred, valid, average_method, ours=None):
    ref = sklearn_ami(true, pred, valid, average_method)
    ours = adjusted_mutual_info(true, pred, valid, average_method) if ours is None else ours
    assert ours.shape == ref.shape and ours.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    diff = np.abs(ours - ref)[~np.isnan(ref)]
    worst = np.nanargmax(np.abs(ours - ref)) if diff.size else None
    assert diff.size == 0 or diff.max() <= TOL, f"max |diff| {diff.max():.3g} at item {worst}"


def random_label_maps(rng, n_items, n_pixels, max_true, max_pred, p_valid):
    true = rng.integers(0, rng.integers(1, max_true + 1, (n_items, 1)), (n_items, n_pixels))
    pred = rng.integers(0, rng.integers(1, max_pred + 1, (n_items, 1)), (n_items, n_pixels))
    valid = rng.random((n_items, n_pixels)) < p_valid
    return true, pred, valid


def blocky_label_maps(rng, n_items, size=28):
    """Shapes-like maps: 3-5 rectangles on a 0 background, 255 where they overlap; predictions
    from 3-5 clusters: each object to a cluster, then noise and sometimes a one-pixel shift."""
    n_objects, k = rng.integers(3, 6, 2)
    yy, xx = np.mgrid[:size, :size]
    true = np.zeros((n_items, size, size), dtype=np.uint8)
    cover = np.zeros((n_items, size, size), dtype=np.int64)
    for obj in range(1, n_objects + 1):
        h, w = rng.integers(3, min(16, size + 1), (2, n_items, 1, 1))
        y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        true = np.where(inside, obj, true).astype(np.uint8)
        cover += inside
    true[cover > 1] = OVERLAP
    valid = (true != BACKGROUND) & (true != OVERLAP)
    assign = rng.integers(0, k, (n_items, n_objects + 1))
    source = np.where(true == OVERLAP, BACKGROUND, true).astype(np.int64).reshape(n_items, -1)
    pred = np.take_along_axis(assign, source, axis=1).reshape(true.shape)
    shift = rng.random(n_items) < 0.3
    pred[shift] = np.roll(pred[shift], 1, axis=2)
    flip = rng.random(true.shape) < rng.uniform(0.0, 0.4, (n_items, 1, 1))
    pred = np.where(flip, rng.integers(0, k, true.shape), pred)
    return true, pred, valid


# ---------------------------------------------------------------------------------------
# AMI against scikit-learn
# ---------------------------------------------------------------------------------------

# (items, pixels, max true labels, max predicted labels, P(valid)): 1,000 random maps per
# average method.
RANDOM_CASES = [
    (200, 4, 3, 3, 0.9),
    (200, 12, 6, 6, 0.7),
    (150, 50, 10, 4, 0.8),
    (150, 200, 3, 10, 0.95),
    (100, 784, 10, 10, 0.3),
    (100, 30, 40, 40, 0.9),  # many labels of one or two pixels each
    (100, 784, 5, 5, 1.0),
]


@pytest.mark.parametrize("average_method", ["max", "arithmetic"])
def test_random_label_maps_match_sklearn(average_method):
    rng = np.random.default_rng(0)
    for case in RANDOM_CASES:
        assert_matches_sklearn(*random_label_maps(rng, *case), average_method)


@pytest.mark.parametrize("average_method", ["max", "arithmetic"])
def test_blocky_label_maps_match_sklearn(average_method):
    rng = np.random.default_rng(1)
    for _ in range(2):  # a batch draws its numbers of objects and clusters (3-5 each)
        true, pred, valid = blocky_label_maps(rng, 150)
        assert_matches_sklearn(true, pred, valid, average_method)


def set_partitions(n):
    """Every labeling of n pixels up to renaming the labels (restricted growth strings)."""
    out = [[]]
    for _ in range(n):
        out = [x + [v] for x in out for v in range(max(x, default=-1) + 2)]
    return np.array(out)


@pytest.mark.parametrize("average_method", ["max", "arithmetic", "min", "geometric"])
def test_every_labeling_of_up_to_four_pixels(average_method):
    """All pairs of labelings of 1-4 pixels (AMI ignores label names), and 1-3 of 4 valid."""
    for n in (1, 2, 3, 4):
        labelings = set_partitions(n)
        true = np.repeat(labelings, len(labelings), axis=0)
        pred = np.tile(labelings, (len(labelings), 1))
        valid = np.ones_like(true, dtype=bool)
        if average_method == "min":
            # One side with every pixel its own cluster makes "min" 0/0 (see the docstring).
            keep = ~(_all_distinct(true) ^ _all_distinct(pred))
            true, pred, valid = true[keep], pred[keep], valid[keep]
        assert_matches_sklearn(true, pred, valid, average_method)
    if average_method in ("max", "arithmetic"):
        rng = np.random.default_rng(2)
        true, pred = rng.integers(0, 3, (2, 200, 4))
        valid = rng.random((200, 4)) < 0.5
        assert_matches_sklearn(true, pred, valid, average_method)


@pytest.mark.parametrize("average_method", ["min", "geometric"])
def test_other_average_methods_match_sklearn(average_method):
    rng = np.random.default_rng(3)
    true, pred, valid = random_label_maps(rng, 150, 40, 6, 6, 0.8)
    keep = ~(_all_distinct(true, valid) | _all_distinct(pred, valid))
    assert_matches_sklearn(true[keep], pred[keep], valid[keep], average_method)
    true, pred, valid = blocky_label_maps(rng, 100)
    assert_matches_sklearn(true, pred, valid, average_method)


def _all_distinct(labels, valid=None):
    """Items whose (valid) pixels all carry different labels."""
    valid = np.ones(labels.shape, dtype=bool) if valid is None else valid
    return np.array([len(np.unique(x[v])) == v.sum() for x, v in zip(labels, valid)])


@pytest.mark.parametrize("average_method", ["max", "arithmetic"])
def test_degenerate_items(average_method):
    n = 784
    rng = np.random.default_rng(4)
    distinct = np.arange(n)
    items = [
        (np.zeros(n), np.zeros(n)),  # one cluster on both sides -> 1
        (np.zeros(n), rng.integers(0, 4, n)),  # one cluster on one side -> 0
        (rng.integers(0, 4, n), np.full(n, 7)),
        (distinct, rng.permutation(n)),  # every pixel its own cluster on both sides -> 1
        (distinct, rng.integers(0, 5, n)),  # ... on one side only
        (rng.integers(0, 5, n), distinct[::-1]),
        (distinct, distinct // 2),
        (rng.integers(0, 3, n), rng.integers(0, 3, n)),
    ]
    true = np.stack([t for t, _ in items]).astype(np.int64)
    pred = np.stack([p for _, p in items]).astype(np.int64)
    valid = np.ones_like(true, dtype=bool)
    with np.errstate(divide="raise", invalid="raise"):  # no 0/0 on the way to these values
        ours = adjusted_mutual_info(true, pred, valid, average_method)
    assert ours[0] == 1.0 and ours[1] == 0.0 and ours[2] == 0.0 and ours[3] == 1.0
    assert_matches_sklearn(true, pred, valid, average_method, ours)
    # Mixed with ordinary items in one batch: many labels in one item must not disturb others.
    more = random_label_maps(rng, 50, n, 5, 5, 0.9)
    mixed = [np.concatenate([x, y]) for x, y in zip((true, pred, valid), more)]
    assert_matches_sklearn(*mixed, average_method)


def test_no_valid_pixel_gives_nan():
    rng = np.random.default_rng(5)
    true, pred = rng.integers(0, 3, (2, 6, 5, 5))
    valid = rng.random((6, 5, 5)) < 0.5
    valid[[1, 4]] = False
    ours = adjusted_mutual_info(true, pred, valid)
    assert np.isnan(ours[[1, 4]]).all() and not np.isnan(ours[[0, 2, 3, 5]]).any()
    assert np.isnan(adjusted_mutual_info(true, pred, np.zeros_like(valid))).all()
    assert adjusted_mutual_info(np.zeros((0, 5, 5), int), np.zeros((0, 5, 5), int)).shape == (0,)


def test_arbitrary_label_values_and_types():
    """Labels are relabelled per image: negative, huge, uint8 and bool values, torch tensors."""
    rng = np.random.default_rng(6)
    true, pred, valid = random_label_maps(rng, 150, 60, 6, 5, 0.9)
    reference = adjusted_mutual_info(true, pred, valid)
    values = rng.permutation(np.array([-7, 3, 255, 10**12, -(10**15), 42]))
    same = dict(rtol=0, atol=1e-13)  # renaming labels may reorder sums
    np.testing.assert_allclose(adjusted_mutual_info(values[true], pred, valid), reference, **same)
    assert_matches_sklearn(values[true], pred - 3, valid, "max")
    narrow = adjusted_mutual_info(true.astype(np.uint8), pred.astype(np.int16), valid)
    np.testing.assert_allclose(narrow, reference, **same)
    tensors = (torch.from_numpy(true), torch.from_numpy(pred), torch.from_numpy(valid))
    np.testing.assert_allclose(adjusted_mutual_info(*tensors), reference, **same)
    assert_matches_sklearn(true % 2 == 0, pred, valid, "arithmetic")


def test_chunks_blocks_and_sparse_counting_do_not_change_results(monkeypatch):
    rng = np.random.default_rng(7)
    true, pred, valid = blocky_label_maps(rng, 150)
    true[:5] = rng.integers(0, 10**6, (5, 28, 28))  # wide label range: the lookup-table path
    reference = adjusted_mutual_info(true, pred, valid)
    assert_matches_sklearn(true, pred, valid, "max", reference)
    monkeypatch.setattr(metrics, "_PIXELS_PER_CHUNK", 28 * 28 * 7)
    monkeypatch.setattr(metrics, "_TERMS_PER_BLOCK", 64)
    monkeypatch.setattr(metrics, "_MAX_DENSE_KEYS", 16)  # np.unique instead of np.bincount
    np.testing.assert_allclose(adjusted_mutual_info(true, pred, valid), reference, rtol=0, atol=1e-12)


def test_argument_checks():
    x = np.zeros((2, 3, 3), dtype=int)
    with pytest.raises(ValueError):
        adjusted_mutual_info(x, np.zeros((2, 9), dtype=int))
    with pytest.raises(ValueError):
        adjusted_mutual_info(x, x, np.ones((2, 9), dtype=bool))
    with pytest.raises(ValueError):
        adjusted_mutual_info(x, x, average_method="mean")


# ---------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------


def test_ami_per_step_matches_a_loop():
    rng = np.random.default_rng(8)
    n, steps = 6, 4
    true, pred, valid = blocky_label_maps(rng, n * steps, size=12)
    true, pred, valid = (x.reshape(n, steps, 12, 12) for x in (true, pred, valid))
    valid[2, 1] = False  # a frame without valid pixels is skipped at its step
    valid[:, 3] = False  # a step without any is NaN

    matrix = ami_matrix(true, pred, valid, "arithmetic")
    assert matrix.shape == (n, steps)
    for i, t in itertools.product(range(n), range(steps)):
        expected = sklearn_ami(true[i, t][None], pred[i, t][None], valid[i, t][None], "arithmetic")[0]
        assert (np.isnan(expected) and np.isnan(matrix[i, t])) or abs(matrix[i, t] - expected) <= TOL

    per_step = ami_per_step(true, pred, valid, "arithmetic")
    assert per_step.shape == (steps,)
    for t in range(steps):
        scores = [matrix[i, t] for i in range(n) if valid[i, t].any()]
        if scores:
            assert per_step[t] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
        else:
            assert np.isnan(per_step[t])
    assert not np.isnan(per_step[:3]).any()


# ---------------------------------------------------------------------------------------
# Next-step prediction
# ---------------------------------------------------------------------------------------


def test_bce_upper_bound_by_hand():
    # B = 2, K = 3, C = 1, H = 1, W = 3.
    psi = torch.tensor(
        [
            [[[[0.2, 0.9, 0.0]]], [[[0.6, 0.1, 0.3]]], [[[0.4, 0.5, 0.1]]]],
            [[[[1.0, 0.5, 0.25]]], [[[0.0, 0.5, 0.75]]], [[[0.5, 0.5, 0.5]]]],
        ],
        dtype=torch.float64,
    )
    target = torch.tensor([[[[1.0, 0.0, 0.5]]], [[[0.0, 1.0, 1.0]]]], dtype=torch.float64)

    def bce(p, y):
        p = min(max(p, 1e-6), 1 - 1e-6)
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    # max_k psi per pixel: item 0: 0.6, 0.9, 0.3; item 1: 1.0 (clipped), 0.5, 0.75.
    expected = [bce(0.6, 1.0) + bce(0.9, 0.0) + bce(0.3, 0.5), bce(1.0, 0.0) + bce(0.5, 1.0) + bce(0.75, 1.0)]
    got = bce_upper_bound(psi, target)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert got[1] > 13.8  # the clipped 1.0 against a 0 costs -log(1e-6)

    # K = 1 (the recurrent autoencoder): the plain BCE of its prediction.
    one = bce_upper_bound(psi[:, :1], target)
    assert one[0].item() == pytest.approx(bce(0.2, 1.0) + bce(0.9, 0.0) + bce(0.0, 0.5), rel=1e-12)

    with pytest.raises(ValueError):
        bce_upper_bound(psi, target[:, 0])
