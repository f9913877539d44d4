"""Rank correlation for the report: Spearman's rho with average ranks for ties.

Used for per-sample conditional MACs against the loss (bench/sweep_report.py)
or against the difficulty level (`bs_keras.report`, `fashion_mnist_levels`),
where ties are the rule: four levels for thousands of samples.
"""

import math

import numpy as np


def average_ranks(values):
    """1-based ranks of `values`; tied values share their average rank."""
    a = np.asarray(values, np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts_group = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(s)]
    mean_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(len(a))
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x, y):
    """Spearman rank correlation (average ranks for ties).

    Returns nan when there are fewer than 2 samples or either side is constant.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    rx = average_ranks(x)
    ry = average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float(np.dot(rx, ry) / math.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))
