"""Evaluation metrics of NEM_SPEC.md §5, batched.

Grouping quality is the adjusted mutual information (AMI) between the true label map and
argmax_k gamma, over the pixels that are neither background nor overlap. The definition is
scikit-learn's (``sklearn.metrics.adjusted_mutual_info_score``), reproduced here exactly,
special cases included, but for a whole batch of images at once: a test set of 10,000
sequences x 20 steps is 200,000 AMIs, and scikit-learn spends milliseconds on each.

For one image with N counted pixels, true clusters of sizes a_i, predicted clusters of sizes
b_j and contingency table n_ij,

    MI  = sum_ij (n_ij / N) log(N n_ij / (a_i b_j))
    EMI = E[MI] when both labelings are drawn at random with the same cluster sizes
        = sum_ij sum_n (n / N) log(N n / (a_i b_j)) P(n | N, a_i, b_j)      P hypergeometric
    AMI = (MI - EMI) / (mean(H(true), H(pred)) - EMI)

where "mean" is the maximum by default (what the authors' scikit-learn used; scikit-learn now
defaults to the arithmetic mean, selectable here). The EMI sum dominates the cost: every pair
(i, j) contributes up to min(a_i, b_j) hypergeometric terms. We lay all those terms of a batch
out as a few dense rectangles and evaluate them with a table of log n!.

The next-step prediction loss (``bce_upper_bound``) is at the end of the file.
"""

from __future__ import annotations

import math

import numpy as np
import torch

AVERAGE_METHODS = ("max", "arithmetic", "min", "geometric")

_EPS = np.finfo(np.float64).eps  # scikit-learn's floor for |numerator| and |denominator|

# Work sizes: pixels per chunk of images, and elements per rectangle of EMI terms. They bound
# memory (a few arrays of this many float64) and leave the results unchanged.
_PIXELS_PER_CHUNK = 1 << 20
_TERMS_PER_BLOCK = 1 << 16
# Largest key range counted with a dense histogram (np.bincount) rather than a sort.
_MAX_DENSE_KEYS = 1 << 24


# ----------------------------------------------------------------------------------------
# Adjusted mutual information
# ----------------------------------------------------------------------------------------


def adjusted_mutual_info(labels_true, labels_pred, valid=None, average_method: str = "max") -> np.ndarray:
    """AMI per image, as scikit-learn defines it (NEM_SPEC.md §5).

    Args:
        labels_true, labels_pred: integer arrays (or tensors) of the same shape (B, ...): the
            leading axis is the batch, all others are flattened into pixels. Labels are
            arbitrary values, relabelled per image.
        valid: optional bool array of the same shape; only pixels where it is True count
            (NEM_SPEC.md §5: neither background nor overlap).
        average_method: how H(true) and H(pred) are combined in the normaliser: "max" (the
            paper's), "arithmetic" (scikit-learn's default), "min" or "geometric".

    Returns:
        float64 array (B,). Item b equals
        ``adjusted_mutual_info_score(labels_true[b][valid[b]], labels_pred[b][valid[b]],
        average_method=average_method)`` to about 1e-11 (rounding of log-gamma values), except
        that an item without a valid pixel gives NaN (scikit-learn says 1.0; the spec skips
        such images).

    Two degenerate cases are 0/0 in exact arithmetic. (1) Both labelings put every pixel in its
    own cluster: scikit-learn returns 1.0 (MI, H and EMI coincide and its floating-point MI
    equals H to the bit), and so do we. (2) With ``average_method="min"``, one labeling puts
    every pixel in its own cluster: the AMI is rounding noise in scikit-learn and here alike,
    and the two noises differ.
    """
    t, p = _as_numpy(labels_true), _as_numpy(labels_pred)
    if t.shape != p.shape or t.ndim == 0:
        raise ValueError(f"labels_true {t.shape} and labels_pred {p.shape} must share a shape (B, ...)")
    if average_method not in AVERAGE_METHODS:
        raise ValueError(f"average_method must be one of {AVERAGE_METHODS}, got {average_method!r}")
    if valid is None:
        v = np.ones(t.shape, dtype=bool)
    else:
        v = _as_numpy(valid).astype(bool, copy=False)
        if v.shape != t.shape:
            raise ValueError(f"valid {v.shape} must have the labels' shape {t.shape}")
    n_items, n_pixels = t.shape[0], math.prod(t.shape[1:])
    t, p, v = (x.reshape(n_items, n_pixels) for x in (t, p, v))

    out = np.empty(n_items)
    step = max(1, _PIXELS_PER_CHUNK // max(1, n_pixels))
    for s in range(0, n_items, step):
        out[s : s + step] = _ami_chunk(t[s : s + step], p[s : s + step], v[s : s + step], average_method)
    return out


def ami_matrix(labels_true, labels_pred, valid=None, average_method: str = "max") -> np.ndarray:
    """AMI of every frame of every sequence: (N, T, ...) label maps -> (N, T); NaN where a
    frame has no valid pixel (NEM_SPEC.md §5)."""
    t = _as_numpy(labels_true)
    if t.ndim < 2:
        raise ValueError(f"expected (N, T, ...) label maps, got shape {t.shape}")
    n, steps = t.shape[:2]

    def frames(x):  # (N, T, ...) -> (N * T, ...)
        return None if x is None else _as_numpy(x).reshape(n * steps, *t.shape[2:])

    scores = adjusted_mutual_info(frames(t), frames(labels_pred), frames(valid), average_method)
    return scores.reshape(n, steps)


def ami_per_step(labels_true, labels_pred, valid=None, average_method: str = "max") -> np.ndarray:
    """Mean AMI at each time step over the sequences: (N, T, ...) -> (T,).

    Frames without a valid pixel are skipped (NEM_SPEC.md §5); a step where every frame is
    skipped is NaN. The reported score of a run is the mean of this over the steps.
    """
    return _nanmean_axis0(ami_matrix(labels_true, labels_pred, valid, average_method))


def _nanmean_axis0(x: np.ndarray) -> np.ndarray:
    counted = ~np.isnan(x)
    n = counted.sum(axis=0)
    total = np.where(counted, x, 0.0).sum(axis=0)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ami_chunk(t: np.ndarray, p: np.ndarray, v: np.ndarray, average_method: str) -> np.ndarray:
    """AMI for (B, P) label arrays; the work of ``adjusted_mutual_info`` on one chunk."""
    n_items = t.shape[0]
    pixel_item = np.repeat(np.arange(n_items, dtype=np.int64), v.sum(axis=1))
    t, n_true = _codes(t[v])
    p, n_pred = _codes(p[v])

    # The non-zero contingency cells of all items: one histogram over (item, true, pred).
    # Cell keys come out sorted, hence grouped by item, then by true label.
    cell_key, n = _count_keys((pixel_item * n_true + t) * n_pred + p, n_items * n_true * n_pred)
    cell_item = cell_key // (n_true * n_pred)
    # Cluster sizes a_i (true) and b_j (predicted) are the cells' row and column sums.
    row_key, a, cell_row = _sum_by_key(cell_key // n_pred, n)
    col_key, b, cell_col = _sum_by_key(cell_item * n_pred + cell_key % n_pred, n)
    row_item, col_item = row_key // n_true, col_key // n_pred
    size = np.bincount(cell_item, weights=n, minlength=n_items).astype(np.int64)  # N
    n_rows = np.bincount(row_item, minlength=n_items)
    n_cols = np.bincount(col_item, minlength=n_items)

    mi = _mutual_info(cell_item, n, a[cell_row], b[cell_col], size, n_items)
    emi = _expected_mutual_info(row_item, a, col_item, b, size, n_items)
    h_true = _entropy(row_item, a, size, n_items)
    h_pred = _entropy(col_item, b, size, n_items)

    # scikit-learn keeps numerator and denominator at least eps away from 0, with their sign:
    # their exact values can be 0 while rounding makes them tiny of either sign.
    denominator = _away_from_zero(_generalized_average(h_true, h_pred, average_method) - emi)
    numerator = _away_from_zero(mi - emi)
    ami = numerator / denominator

    # Special cases, in scikit-learn's order: no split on either side is a perfect match,
    # no split on one side scores 0.
    ami = np.where((n_rows == 1) | (n_cols == 1), 0.0, ami)
    ami = np.where((n_rows == 1) & (n_cols == 1), 1.0, ami)
    # Every pixel its own cluster on both sides: 0/0, which scikit-learn's arithmetic turns
    # into exactly 1 (see the docstring). Ours does too; this line only makes it explicit.
    ami = np.where((n_rows == size) & (n_cols == size) & (size >= 2), 1.0, ami)
    return np.where(size == 0, np.nan, ami)


def _codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Map label values to codes 0..U-1 (int64), distinct values to distinct codes; returns
    (codes, U). Codes need not all be used: unused ones only add empty histogram bins."""
    if x.size == 0:  # no valid pixel in the chunk; U = 1 keeps the key arithmetic defined
        return np.zeros(0, dtype=np.int64), 1
    if x.dtype.kind in "biu":
        x = x.astype(np.int64, copy=False)
        lo, hi = int(x.min()), int(x.max())
        if hi - lo < 64:  # a few values: the offset from the smallest is code enough
            return x - lo, hi - lo + 1
        if hi - lo < _MAX_DENSE_KEYS:  # a lookup table of the values present beats sorting
            present = np.bincount(x - lo, minlength=hi - lo + 1) > 0
            code = np.cumsum(present) - 1
            return code[x - lo], int(code[-1]) + 1
    uniq, inverse = np.unique(x, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False), len(uniq)


def _count_keys(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys (< n_keys) in increasing order and how often each occurs."""
    if n_keys <= _MAX_DENSE_KEYS:
        counts = np.bincount(keys, minlength=n_keys)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(keys, return_counts=True)


def _sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct keys in increasing order, the sum of values per key, and each entry's group."""
    uniq, group = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(group, weights=values, minlength=len(uniq)).astype(np.int64), group


def _entropy(item: np.ndarray, counts: np.ndarray, size: np.ndarray, n_items: int) -> np.ndarray:
    """H = -sum_i (a_i / N) log(a_i / N) per item, with log(a/N) as log a - log N (as sklearn)."""
    total = size[item].astype(np.float64)
    counts = counts.astype(np.float64)
    return -np.bincount(item, weights=(counts / total) * (np.log(counts) - np.log(total)), minlength=n_items)


def _mutual_info(item, n, a, b, size, n_items) -> np.ndarray:
    """MI per item from its non-zero contingency cells (n, with margins a, b)."""
    total = size[item].astype(np.float64)
    log_total = np.log(total)
    p = n / total
    # scikit-learn's grouping of the logs (it decides the last bits, which matter for 0/0).
    log_outer = -np.log((a * b).astype(np.float64)) + log_total + log_total
    terms = p * (np.log(n.astype(np.float64)) - log_total) + p * log_outer
    terms = np.where(np.abs(terms) < _EPS, 0.0, terms)
    return np.clip(np.bincount(item, weights=terms, minlength=n_items), 0.0, None)


def _expected_mutual_info(row_item, a, col_item, b, size, n_items) -> np.ndarray:
    """EMI per item: a sum over every pair (i, j) of the item's true and predicted clusters.

    Splitting log(N n / (a b)) into log(N / (a b)) + log n, and using E[n] = a b / N for the
    hypergeometric n, each pair contributes

        (a b / N^2) log(N / (a b)) + E[n log n] / N,

    so only E[n log n] needs the sum over n.
    """
    # All pairs of one item: repeat each row once per column of its item, and walk the columns.
    n_cols = np.bincount(col_item, minlength=n_items)
    first_col = np.cumsum(n_cols) - n_cols
    reps = n_cols[row_item]
    pair_row = np.repeat(np.arange(len(a)), reps)
    within = np.arange(len(pair_row)) - np.repeat(np.cumsum(reps) - reps, reps)
    pair_col = np.repeat(first_col[row_item], reps) + within

    item = row_item[pair_row]
    ai, bj, total = a[pair_row], b[pair_col], size[item]
    af, bf, nf = ai.astype(np.float64), bj.astype(np.float64), total.astype(np.float64)
    pair = (af * bf / nf**2) * (np.log(nf) - np.log(af) - np.log(bf)) + _mean_n_log_n(ai, bj, total) / nf
    return np.bincount(item, weights=pair, minlength=n_items)


def _mean_n_log_n(a: np.ndarray, b: np.ndarray, total: np.ndarray) -> np.ndarray:
    """E[n log n] for n ~ Hypergeometric(population N, a successes, b draws), per pair.

    n runs over max(1, a + b - N) .. min(a, b) (n = 0 adds nothing), and
    log P(n) = log a! + log b! + log (N-a)! + log (N-b)! - log N!
               - log n! - log (a-n)! - log (b-n)! - log (N-a-b+n)!.
    Pairs are sorted by their number of terms and evaluated in rectangles of similar width.
    A padded entry has n past min(a, b), so a - n or b - n is negative: the log-factorial
    table says +inf there, which makes P(n) = 0 without a mask.
    """
    out = np.zeros(len(a))
    if len(a) == 0:
        return out
    first = np.maximum(1, a + b - total)
    width = np.minimum(a, b) - first + 1
    order = np.argsort(width, kind="stable")
    sorted_width = width[order]

    # log n! at index n + pad, +inf for n < 0 and n > N_max; n log n (finite) at index n.
    # No rectangle is wider than the widest pair, so indices stay within pad of 0..N_max.
    pad, n_max = int(sorted_width[-1]), int(total.max())
    log_fact = np.full(n_max + 2 * pad + 1, np.inf)
    log_fact[pad : pad + n_max + 1] = _log_factorials(n_max)[: n_max + 1]
    n_range = np.arange(n_max + pad + 1, dtype=np.float64)
    n_log_n = n_range * np.log(np.maximum(n_range, 1.0))

    log_norm = log_fact[pad + a] + log_fact[pad + b] + log_fact[pad + total - a] + log_fact[pad + total - b]
    log_norm -= log_fact[pad + total]

    start = 0
    while start < len(order):
        # Pairs up to 1.25x as wide as the narrowest (plus a little) share a rectangle.
        stop = int(np.searchsorted(sorted_width, int(sorted_width[start] * 1.25) + 8, side="right"))
        stop = min(stop, start + max(1, _TERMS_PER_BLOCK // int(sorted_width[stop - 1])))
        rows = order[start:stop]
        n = first[rows, None] + np.arange(int(sorted_width[stop - 1]))
        ai, bi, rest = a[rows, None] + pad, b[rows, None] + pad, (total - a - b)[rows, None] + pad
        log_p = log_norm[rows, None] - log_fact[n + pad]
        log_p -= log_fact[ai - n]
        log_p -= log_fact[bi - n]
        log_p -= log_fact[rest + n]
        out[rows] = np.einsum("ij,ij->i", np.exp(log_p), n_log_n[n])
        start = stop
    return out


_LOG_FACTORIALS = np.zeros(1)


def _log_factorials(m: int) -> np.ndarray:
    """log n! for n = 0..m (at least), from math.lgamma (within a few ulp); cached, grown on demand."""
    global _LOG_FACTORIALS
    if len(_LOG_FACTORIALS) <= m:
        m = max(m, 2 * len(_LOG_FACTORIALS))
        _LOG_FACTORIALS = np.array([math.lgamma(n + 1.0) for n in range(m + 1)])
    return _LOG_FACTORIALS


def _generalized_average(u: np.ndarray, v: np.ndarray, method: str) -> np.ndarray:
    if method == "max":
        return np.maximum(u, v)
    if method == "arithmetic":
        return (u + v) / 2
    if method == "min":
        return np.minimum(u, v)
    return np.sqrt(u * v)  # geometric


def _away_from_zero(x: np.ndarray) -> np.ndarray:
    return np.where(x < 0, np.minimum(x, -_EPS), np.maximum(x, _EPS))


# ----------------------------------------------------------------------------------------
# Next-step prediction
# ----------------------------------------------------------------------------------------


def bce_upper_bound(psi: torch.Tensor, target: torch.Tensor, clip: float = 1e-6) -> torch.Tensor:
    """Next-step prediction loss of NEM_SPEC.md §5, per item.

    The binary cross-entropy of max_k psi_k against the next frame, summed over pixels. The
    spec (after the paper) uses it as an upper bound on the BCE of the model's prediction;
    the caller averages over the batch and compares K = 1 with K = 5.

    Args:
        psi: (B, K, C, H, W) Bernoulli means of the K components, predicted at step t.
        target: (B, C, H, W) frame t + 1, values in [0, 1].
        clip: means are clipped to [clip, 1 - clip] so the logs stay finite.

    Returns:
        (B,) tensor.
    """
    if psi.dim() != target.dim() + 1 or psi.shape[0] != target.shape[0] or psi.shape[2:] != target.shape[1:]:
        raise ValueError(f"psi {tuple(psi.shape)} must be (B, K, C, H, W) for target {tuple(target.shape)}")
    mean = psi.amax(dim=1).clamp(clip, 1.0 - clip)
    bce = -(target * torch.log(mean) + (1.0 - target) * torch.log1p(-mean))
    return bce.flatten(1).sum(dim=1)
