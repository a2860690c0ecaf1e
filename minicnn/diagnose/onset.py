"""The decisive step of a run that went wrong: the onset of the outsized move that did it."""
import numpy as np

from .events import Spike
from .thresholds import ONSET_FACTOR, ONSET_WINDOW, OUTSIZED_UPDATE


def step_sizes(t, window):
    """(size of each step in the window, whether they are update ratios). The size is the update
    relative to the weights, max over the layers; without update ratios in the trace (trace off)
    the same-batch loss rise, else the batch loss."""
    ratios = [t(f"update_ratio.{name}")[window] for name in t.param_layers()]
    if ratios and np.isfinite(np.vstack(ratios)).any():
        r = np.vstack(ratios)
        return np.where(np.isfinite(r), r, -np.inf).max(axis=0), True
    loss, after = t("loss")[window], t("loss_after")[window]
    jump = (after - loss) if np.isfinite(after).any() else loss
    return np.where(np.isfinite(jump), jump, np.inf), False


def onset(t, lo, hi):
    """The index of the decisive step in [lo, hi): the largest step there, walked back to the first
    of the run of outsized steps that ends at it (see ONSET_FACTOR): a step is outsized when it
    moved the weights ONSET_FACTOR times the median update of the ONSET_WINDOW steps before the
    largest (or OUTSIZED_UPDATE of a layer's norm), or ran at ONSET_FACTOR times their median lr.
    With the batch loss alone (a plain log, trace off) the walk goes back over loss spikes and
    non-finite losses."""
    hi = max(hi, lo + 1)
    size, by_update = step_sizes(t, slice(lo, hi))
    k = int(np.argmax(size))
    if by_update:
        before = slice(max(0, lo + k - ONSET_WINDOW), lo + k)
        usual, _ = step_sizes(t, before)
        usual = usual[np.isfinite(usual)]
        lr = t("lr")
        lr_usual = np.nanmedian(lr[before]) if lo + k > 0 else np.nan
        typical = float(np.median(usual)) if len(usual) else np.nan

        def outsized(j):
            relative = np.isfinite(typical) and size[j] >= ONSET_FACTOR * max(typical, 1e-12)
            big_update = size[j] >= OUTSIZED_UPDATE or relative
            big_lr = np.isfinite(lr_usual) and lr_usual > 0 and lr[lo + j] >= ONSET_FACTOR * lr_usual
            return big_update or big_lr
        while k > 0 and outsized(k - 1):
            k -= 1
    elif not t.has("loss_after"):      # the batch loss alone: back to the first of the spikes that led here
        flagged = Spike().flags(t) | ~np.isfinite(t("loss"))
        while k > 0 and flagged[lo + k - 1]:
            k -= 1
    return lo + k
