"""Width fitting for conditional execution: the precompiled widths per gated block.

`bucket_widths` rounds fixed fractions of a block's gated width;
`calibrated_widths` fits at most `max_widths` widths to the widths the
calibration samples need (an exact dynamic programme). Both keep the full
width, so every gate mask is covered.
"""

import math

import numpy as np


def _width_step(multiple_of, group_size):
    """Widths are multiples of both `multiple_of` and the gate group size."""
    step = int(multiple_of or 1)
    return step * group_size // math.gcd(step, group_size)


def bucket_widths(channels, widths, multiple_of=8, group_size=1):
    """Precompiled widths in channels: fractions of `channels` rounded up.

    Each width is rounded up to a multiple of `multiple_of` (and of
    `group_size`) and capped at `channels`; the full width is always
    included, so every mask is covered. Sorted, unique.
    """
    step = _width_step(multiple_of, group_size)
    out = set()
    for f in widths:
        if not 0 < f <= 1:
            raise ValueError(f"widths are fractions in (0, 1]. Received: {f}")
        out.add(min(channels, int(math.ceil(f * channels / step)) * step))
    out.add(channels)
    return sorted(out)


def calibrated_widths(needed, channels, max_widths=6, multiple_of=8, group_size=1):
    """Precompiled widths fitted to the widths calibration samples need.

    Args:
        needed: `(N,)` channels each calibration sample needs in this block
            (end of its last open channel in the reordered block).
        channels: the block's gated width (always a width: the fallback for
            inputs that need more than any calibration sample did).
        max_widths: at most this many widths besides `channels`.
        multiple_of, group_size: as `bucket_widths`.

    Returns the sorted widths minimising the calibration samples' total
    executed channels (each sample runs the smallest width covering it);
    an exact dynamic programme over the distinct rounded needs.
    """
    if max_widths < 1:
        raise ValueError(f"max_widths must be >= 1. Received: {max_widths}")
    step = _width_step(multiple_of, group_size)
    rounded = np.minimum(channels, np.maximum(step, np.ceil(np.asarray(needed) / step) * step)).astype(int)
    values, counts = np.unique(rounded, return_counts=True)
    m, k_max = len(values), min(max_widths, len(values))
    if m == 0:
        return [channels]
    # cost[k][j]: least executed channels for values[:j+1] with k+1 widths, the last values[j].
    inf = float("inf")
    cost = np.full((k_max, m), inf)
    back = np.zeros((k_max, m), int)
    csum = np.concatenate([[0], np.cumsum(counts)])
    for j in range(m):
        cost[0, j] = values[j] * csum[j + 1]
    for k in range(1, k_max):
        for j in range(k, m):
            cands = [cost[k - 1, i] + values[j] * (csum[j + 1] - csum[i + 1]) for i in range(k - 1, j)]
            best = int(np.argmin(cands))
            cost[k, j], back[k, j] = cands[best], best + k - 1
    # The full width is free: values[j+1:] may fall through to it.
    best, k, j = channels * csum[m], -1, -1
    for kk in range(k_max):
        for jj in range(kk, m):
            total = cost[kk, jj] + channels * (csum[m] - csum[jj + 1])
            if total < best:
                best, k, j = total, kk, jj
    chosen = []
    while k >= 0:
        chosen.append(int(values[j]))
        j, k = back[k, j], k - 1
    return sorted(set(chosen) | {channels})
