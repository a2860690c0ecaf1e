"""Small helpers over per-step series (NumPy arrays, NaN-aware), shared by diagnose and plots."""
import numpy as np


def smooth(values, window):
    """Trailing moving average (NaN-aware) over ``window`` steps.

    Each window is summed on its own (a convolution), not as a difference of running sums: after a
    loss of 1e24 a running sum has no digits left for the 6e4 that follows (measured: an lr-1e6
    step's run smoothed to 0.000 with cumsum)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    ok = np.isfinite(v)
    ones = np.ones(window)
    total = np.convolve(np.where(ok, v, 0.0), ones)[:len(v)]
    cnt = np.convolve(ok.astype(np.float64), ones)[:len(v)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)


def centred_mean(v, w):
    """Mean of v over the w steps centred on each step (shorter windows at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo = np.maximum(i - w // 2, 0)
    hi = np.minimum(i - w // 2 + w, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def trailing_median(v, w):
    """Median of the finite values among the w steps before each step (NaN at step 0)."""
    out = np.full(len(v), np.nan)
    for i in range(1, len(v)):
        win = v[max(0, i - w):i]
        win = win[np.isfinite(win)]
        if len(win):
            out[i] = np.median(win)
    return out


def runs_of(flags, gap=1):
    """[(first, last, count)] of the flagged indices, grouped: consecutive, or within ``gap``
    indices of each other."""
    idx = np.flatnonzero(flags)
    if not len(idx):
        return []
    out = []
    start = prev = int(idx[0])
    count = 1
    for i in idx[1:]:
        i = int(i)
        if i - prev <= gap:
            prev, count = i, count + 1
            continue
        out.append((start, prev, count))
        start = prev = i
        count = 1
    out.append((start, prev, count))
    return out


def column(steps, name, n):
    """Column ``name`` of a trace dict as float64 of length n (all NaN when absent)."""
    v = steps.get(name)
    return np.asarray(v, dtype=np.float64) if v is not None and len(v) == n else np.full(n, np.nan)
