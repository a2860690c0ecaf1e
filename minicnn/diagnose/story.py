"""The sentences under a verdict: what happened at one step, and what the network looked like after."""
import math

import numpy as np

from .thresholds import COLLAPSE_LOSS_TOL, DEAD_LAYER, EARLY_STEPS


def step_story(t, i):
    """The mechanism at step index i of a Trace, in numbers: lr x lambda_max, the largest update
    ratio, and the same-batch losses (or the batch loss)."""
    parts = []
    lr = t("lr")[i]
    lam = t("lambda_max")
    near = np.flatnonzero(np.isfinite(lam[:i + 1]))
    if len(near):
        j = near[-1]
        parts.append(f"lr*lambda_max = {lr * lam[j]:.2f} {'>' if lr * lam[j] >= 2 else '<'} 2 "
                     f"(lambda_max {lam[j]:.3g} measured at step {int(t.step[j])})")
    ratios = {name: t(f"update_ratio.{name}")[i] for name in t.param_layers()}
    ratios = {k: v for k, v in ratios.items() if np.isfinite(v)}
    if ratios:
        name = max(ratios, key=ratios.get)
        parts.append(f"the update moved {name} by {100 * ratios[name]:.0f}% of its norm")
    loss, after = t("loss")[i], t("loss_after")[i]
    if np.isfinite(after):
        parts.append(f"the same-batch loss went {loss:.3g} -> {after:.3g}")
    else:
        parts.append(f"batch loss {loss:.3g}" + (f" at lr {lr:g}" if np.isfinite(lr) else ""))
    return "; ".join(parts)


def after_story(t, i):
    """What the network looks like in the steps after index i: dead layers, the gradient reaching
    the first layer against before, the loss level (and whether it is a constant prediction's)."""
    n = t.n
    tail = slice(min(i + 1, n - 1), n)
    lines = []
    src = t.unit_source()
    for name in t.relu_layers() if src else ():
        d = t(src + name)[tail]
        if np.isfinite(d).any() and np.nanmedian(d) >= DEAD_LAYER:
            with np.errstate(invalid="ignore"):
                since = i + 1 + int(np.argmax(d >= DEAD_LAYER))
            lines.append(f"{100 * np.nanmedian(d):.0f}% of {name} units have been dead {t.where()} since step "
                         f"{int(t.step[min(since, n - 1)])}")
    layers = t.param_layers()
    if layers:
        first = layers[0]
        g = t(f"grad_norm.{first}")
        g0 = np.nanmedian(g[:max(1, min(i, EARLY_STEPS))])
        gt = np.nanmedian(g[tail])
        if np.isfinite(gt) and np.isfinite(g0):
            lines.append(f"the gradient reaching {first} is {gt:.2g} (it was {g0:.2g} before)")
    loss = t("loss")[tail]
    level = float(np.nanmedian(loss)) if np.isfinite(loss).any() else math.nan
    if np.isfinite(level):
        source = t.prediction_source()
        lines.append(_level_line(t, level, n - 1 - i, t(source[0])[tail] if source else np.full(1, np.nan)))
    return lines


def _level_line(t, level, steps_since, share):
    h = t.label_entropy
    msg = f"loss has sat at {level:.2f}"
    if abs(level - h) < COLLAPSE_LOSS_TOL:
        msg += (f" = ln {math.exp(h):.0f} (constant prediction)" if abs(math.exp(h) - round(math.exp(h))) < 0.05
                else f" ~ the label entropy {h:.2f} (constant prediction)")
    msg += f" for the {steps_since:,} steps since"
    if np.isfinite(share).any():
        msg += f"; {100 * np.nanmedian(share):.0f}% of the {t.images()} get the same class"
    return msg
