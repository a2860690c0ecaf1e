"""The sentences under a verdict: what happened at one step, and what the network looked like after."""
import math

import numpy as np

from .thresholds import COLLAPSE_LOSS_TOL, DEAD_LAYER, EARLY_STEPS, EOS_RATIO


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


def layer_crossing_lines(t, i):
    """Which parameter layer's own lambda_max (its block of the Hessian, ``--sharpness layers``)
    crossed 2/lr first, by step index i (the decisive step); [] when the trace has no per-layer
    lambda_max. A block's lambda_max is at most the whole Hessian's, so the whole network crosses
    first or with it; the layer that crosses is where the sharp curvature sits. When no layer had
    crossed by then: the largest layer before it, whether the whole network had crossed (the sharp
    direction then spans layers), and a layer's later crossing."""
    layers = [k[len("lambda_max."):] for k in t.steps if k.startswith("lambda_max.") and t.has(k)]
    if not layers:
        return []
    lr = t("lr")
    ratio = {n: lr * t(f"lambda_max.{n}") for n in layers}
    first = {}
    for n, r in ratio.items():
        at = np.flatnonzero(np.isfinite(r) & (r >= EOS_RATIO))
        if len(at):
            first[n] = int(at[0])
    before = {n: j for n, j in first.items() if j <= i}
    if before:
        order = sorted(first, key=lambda k: (first[k], -ratio[k][first[k]]))
        n, j = order[0], first[order[0]]
        line = (f"{n} crossed 2/lr first: its own lr x lambda_max = {ratio[n][j]:.2f} at step {int(t.step[j])} "
                f"({'before' if j < i else 'at'} the decisive step {int(t.step[i])})")
        if order[1:]:
            line += "; then " + ", ".join(f"{k} at step {int(t.step[first[k]])}" for k in order[1:])
        never = [k for k in layers if k not in first]
        return [line + ("; never: " + ", ".join(never) if never else "")]
    upto = i + 1 if any(np.isfinite(ratio[n][:i + 1]).any() for n in layers) else t.n
    n = max(layers, key=lambda k: np.nanmax(np.r_[ratio[k][:upto], -np.inf]))
    j = int(np.nanargmax(np.where(np.isfinite(ratio[n][:upto]), ratio[n][:upto], -np.inf)))
    line = (f"no layer's own lambda_max had crossed 2/lr by the decisive step {int(t.step[i])} (the largest: {n}, "
            f"lr x lambda_max = {ratio[n][j]:.2f} at step {int(t.step[j])})" + _whole(t, lr, upto))
    if first:
        k = min(first, key=first.get)
        line += f"; later {k}'s did, at step {int(t.step[first[k]])}"
    return [line]


def _whole(t, lr, upto):
    """Whether the whole network's lambda_max had crossed (by index upto) when no layer's own had."""
    lam = t("lambda_max")[:upto]
    at = np.flatnonzero(np.isfinite(lam) & (lr[:upto] * lam >= EOS_RATIO))
    if not len(at):
        return ", nor had the whole network's"
    return (f"; the whole network's had, at step {int(t.step[at[0]])} (lr x lambda_max {lr[at[0]] * lam[at[0]]:.2f}): "
            f"the sharp direction spans layers")
