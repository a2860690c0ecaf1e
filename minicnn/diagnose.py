"""Events and a run diagnosis: pure functions over a run's trace (``minicnn.load_run``).

    run = load_run("runs/x")
    d = diagnose(run)            # d.verdict, d.decisive_step, d.text, d.events

Events are episodes: a condition that holds from ``step`` to ``end`` (``count`` steps flagged),
with the evidence of its first step. A verdict names what happened to the run as a whole and the
mechanism, in numbers. Every threshold is a named constant with the reason beside it.
"""
import math
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------- thresholds (and why)
# Overshoot: the loss on the SAME batch rose after the step. A small enough step always lowers it
# (to first order by lr*|g|^2), so a rise means the step went past the valley along its own
# direction. Float32 rounding and tiny losses make very small rises meaningless: require both.
OVERSHOOT_ABS = 0.01
OVERSHOOT_REL = 0.02
# ... but a rise alone is not an event: healthy runs overshoot now and then. Measured on the
# built-in data (small net, 564 steps of batch 64): 4% of steps at lr 0.1 and 5% at lr 0.05 raised
# their own batch's loss, isolated, by at most +1.0 nats (0.40 -> 1.41), and the run carried on
# learning (98.5% / 96.4% val acc). An overshoot EVENT is either one step that threw the loss far
# up (a catapult: +OVERSHOOT_BIG_ABS nats and OVERSHOOT_BIG_FACTOR x its value -- the injected
# lr-10 step went 0.35 -> 806), or overshooting that is the rule rather than the exception: at
# least OVERSHOOT_SHARE of the OVERSHOOT_WINDOW steps around it rose (healthy: 4-5% of steps,
# never clustered; a run that jumps around: most of them).
OVERSHOOT_BIG_ABS = 1.5
OVERSHOOT_BIG_FACTOR = 3.0
OVERSHOOT_WINDOW = 20
OVERSHOOT_SHARE = 0.3
# Spike: the batch loss jumps far above its recent level. SGD noise moves the batch loss by tens of
# percent; healthy runs above showed isolated batches at 3-5x the running median but never more than
# +0.65 nats above it (0.82 vs 0.15-0.27), so a spike must be 3x AND a full nat above.
SPIKE_WINDOW = 50
SPIKE_FACTOR = 3.0
SPIKE_ABS = 1.0
# Oscillation: consecutive gradients pointing against each other (cosine < 0) means bouncing
# across a valley. But mini-batch gradients of a healthy run do that too: the mean cosine over the
# whole run was -0.26 at lr 0.1 and -0.40 at lr 0.05, with 20-step stretches down to -0.72, while
# the loss kept falling (the bounce is across the sharpest direction; progress is along the others).
# Over 20 steps the smoothed loss of those runs sometimes stood still too (noise), but over 100
# steps it always fell by a third or more. So oscillation is strong anti-alignment over OSC_WINDOW
# steps while the loss made no progress over the OSC_PROGRESS_WINDOW steps before.
OSC_WINDOW = 20
OSC_MEAN_COS = -0.5
OSC_PROGRESS_WINDOW = 100
OSC_PROGRESS = 0.05       # the smoothed loss fell by less than this share across that window
# Dead layer: a ReLU layer with this share of its units zero for every sample of the batch passes
# (almost) no gradient to the layers below.
DEAD_LAYER = 0.9
# Collapse: (nearly) the whole batch predicted as one class and the loss within this of the
# label entropy (ln 10 for 10 balanced classes): the network outputs a constant.
COLLAPSE_SHARE = 0.9
COLLAPSE_LOSS_TOL = 0.1
# ... for at least this many steps: a fresh network often predicts one class for its first few
# steps (tiny logits, loss ln 10) and then moves on; that is not a collapse.
COLLAPSE_MIN_STEPS = 50
# Stall: for this many steps the gradient is below this fraction of its typical early size and
# the smoothed loss is flat, while far above the best (smoothed) loss seen.
STALL_WINDOW = 100
STALL_GRAD_FRAC = 0.1
STALL_FLAT = 0.05
STALL_ABOVE_BEST = 0.5
# Divergence: NaN/inf, or the smoothed loss this many times its starting value.
DIVERGE_FACTOR = 10.0
# Edge of stability: lr * lambda_max >= 2 (gradient descent on a quadratic with curvature lambda
# is stable only for lr < 2/lambda).
EOS_RATIO = 2.0
# Run-level: "learned" means the smoothed loss fell by this share of its start (0.35 nats from
# ln 10) -- or of the label entropy when it started higher; "never learned" means it never fell by
# more than 1 - NEVER_LEARNED_FRAC of it.
LEARNED_DROP_FRAC = 0.15
NEVER_LEARNED_FRAC = 0.95
# Unstable: the share of steps that overshoot (or the loss's relative jitter) above which a run is
# "jumping around" rather than descending.
UNSTABLE_OVERSHOOT_SHARE = 0.3
# Collapse verdict: after learning, the loss ends this far above its best (nats, and as a share of
# what had been learned): SGD noise around a converged level stays well inside both.
PLATEAU_RISE = 0.25
PLATEAU_RISE_FRAC = 0.3
# Overfitting: validation loss this far (relative) above its minimum while training loss kept falling.
OVERFIT_REL = 0.1
SMOOTH = 20          # steps in the moving average used for run-level levels
# Collapse's decisive step: steps just before the largest update that moved the weights at least this
# share as much belong to the same outsized move; the first of them is named.
CHAIN_FRAC = 0.5


@dataclass
class Event:
    kind: str              # overshoot, spike, oscillation, eos, dead, collapse, stall, diverged, overfit
    step: int              # first step of the episode
    end: int               # last step of the episode
    count: int             # steps flagged in the episode
    evidence: str          # numbers at the first step

    def __str__(self):
        span = f"{self.step}" if self.end == self.step else f"{self.step}-{self.end}"
        return f"{self.kind:<11} steps {span:<13} ({self.count}x)  {self.evidence}"


@dataclass
class Diagnosis:
    verdict: str                 # healthy, slow, unstable, collapse, diverged, stuck, overfitting, empty
    title: str                   # one line
    decisive_step: int = None
    lines: list = field(default_factory=list)     # the mechanism, in numbers
    events: list = field(default_factory=list)

    @property
    def text(self):
        return "\n".join([self.title] + ["  " + l for l in self.lines])

    def __str__(self):
        return self.text


# ---------------------------------------------------------------- helpers
def _col(steps, name, n):
    v = steps.get(name)
    return np.asarray(v, dtype=np.float64) if v is not None and len(v) == n else np.full(n, np.nan)


def _smooth(v, w):
    from .plots import smooth
    return smooth(v, w)


def _centred_mean(v, w):
    """Mean of v over the w steps centred on each step (shorter windows at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo = np.maximum(i - w // 2, 0)
    hi = np.minimum(i - w // 2 + w, len(v))
    return (c[hi] - c[lo]) / (hi - lo)


def overshoot_flags(loss, after):
    """Steps whose own batch's loss rose after the step by more than float noise (arrays)."""
    with np.errstate(invalid="ignore"):
        rise = after - loss
        return np.isfinite(rise) & (rise > np.maximum(OVERSHOOT_ABS, OVERSHOOT_REL * np.abs(loss)))


def _trailing_median(v, w):
    out = np.full(len(v), np.nan)
    for i in range(1, len(v)):
        win = v[max(0, i - w):i]
        win = win[np.isfinite(win)]
        if len(win):
            out[i] = np.median(win)
    return out


def _episodes(kind, flags, evidence_fn, gap=1):
    """Group flagged steps into episodes (consecutive, or within ``gap`` steps of each other)."""
    idx = np.flatnonzero(flags)
    events = []
    if not len(idx):
        return events
    start = prev = idx[0]
    count = 1
    for i in idx[1:]:
        if i - prev <= gap:
            prev, count = i, count + 1
            continue
        events.append(Event(kind, int(start), int(prev), count, evidence_fn(start)))
        start = prev = i
        count = 1
    events.append(Event(kind, int(start), int(prev), count, evidence_fn(start)))
    return events


def relu_layers(steps):
    return [k[len("dead."):] for k in steps if k.startswith("dead.")]


def param_layers(steps):
    return [k[len("grad_norm."):] for k in steps if k.startswith("grad_norm.")]


def label_entropy(run):
    return float(run.config.get("label_entropy") or math.log(max(2, run.config.get("num_classes", 10))))


# ---------------------------------------------------------------- events
def find_events(run):
    """All events of a run, sorted by step."""
    s = run.steps
    n = len(s.get("step", []))
    if n == 0:
        return []
    step = s["step"].astype(int)
    loss = _col(s, "loss", n)
    lr = _col(s, "lr", n)
    events = []

    # divergence
    bad = ~np.isfinite(loss)
    sm = _smooth(loss, SMOOTH)
    start = loss[0] if np.isfinite(loss[0]) else np.nan
    # exploded: the smoothed loss crossed DIVERGE_FACTOR x start and stayed there to the end
    # (a single huge step that comes back down is a spike, not a divergence)
    over = np.isfinite(sm) & (sm > DIVERGE_FACTOR * start)
    exploded = np.zeros(n, bool)
    if over[-1]:
        k = n - 1
        while k > 0 and over[k - 1]:
            k -= 1
        exploded[k:] = True
    first_bad = np.flatnonzero(bad | exploded)
    if len(first_bad):
        i = int(first_bad[0])
        ev = (f"loss = {loss[i]:.4g}" if bad[i] else
              f"smoothed loss {sm[i]:.4g} > {DIVERGE_FACTOR:g} x start {start:.3g}")
        events.append(Event("diverged", int(step[i]), int(step[-1]), int((bad | exploded).sum()), ev))

    # overshoot (full trace only): one catapult step, or overshooting as the rule in a window
    after = _col(s, "loss_after", n)
    if np.isfinite(after).any():
        rose = overshoot_flags(loss, after)
        big = rose & (after - loss > OVERSHOOT_BIG_ABS) & (after > OVERSHOOT_BIG_FACTOR * loss)
        share = _centred_mean(rose.astype(np.float64), OVERSHOOT_WINDOW)
        flags = big | (rose & (share >= OVERSHOOT_SHARE))
        alpha = _col(s, "alpha", n)
        events += _episodes("overshoot", flags, lambda i: (
            f"same-batch loss {loss[i]:.4g} -> {after[i]:.4g} (predicted change "
            f"{_col(s, 'predicted_change', n)[i]:+.3g}), lr {lr[i]:g}"
            + (f", alpha {alpha[i]:.2f}" if np.isfinite(alpha[i]) else "")
            + ("" if big[i] else f"; {100 * share[i]:.0f}% of the {OVERSHOOT_WINDOW} steps around rose")), gap=3)

    # spikes
    med = _trailing_median(loss, SPIKE_WINDOW)
    flags = np.isfinite(loss) & np.isfinite(med) & (loss > SPIKE_FACTOR * med) & (loss > med + SPIKE_ABS)
    events += _episodes("spike", flags, lambda i: f"loss {loss[i]:.4g} vs recent median {med[i]:.3g}, lr {lr[i]:g}",
                        gap=3)

    # oscillation
    cos = _col(s, "grad_cos", n)
    if np.isfinite(cos).any():
        mcos = _smooth(cos, OSC_WINDOW)
        w = min(OSC_PROGRESS_WINDOW, n)
        prev = np.concatenate([np.full(w, np.nan), sm[:n - w]])
        stalled = np.isfinite(prev) & (sm > (1 - OSC_PROGRESS) * prev)
        flags = np.isfinite(mcos) & (mcos < OSC_MEAN_COS) & (np.arange(n) >= OSC_WINDOW) & stalled
        events += _episodes("oscillation", flags,
                            lambda i: (f"mean gradient cosine over {OSC_WINDOW} steps {mcos[i]:+.2f}; smoothed loss "
                                       f"{prev[i]:.3g} -> {sm[i]:.3g} over {w} steps"), gap=5)

    # edge of stability
    lam = _col(s, "lambda_max", n)
    if np.isfinite(lam).any():
        flags = np.isfinite(lam) & (lr * lam >= EOS_RATIO)
        events += _episodes("eos", flags, lambda i: f"lr*lambda_max = {lr[i] * lam[i]:.2f} >= 2 "
                                                    f"(lambda_max {lam[i]:.3g}, 2/lr {2 / lr[i]:.3g})",
                            gap=2 * max(1, run.config.get("config", {}).get("sharpness_every") or 1))

    # dead ReLU layers
    for name in relu_layers(s):
        dead = _col(s, f"dead.{name}", n)
        flags = np.isfinite(dead) & (dead >= DEAD_LAYER)
        events += _episodes("dead", flags, lambda i, name=name, dead=dead:
                            f"{name}: {100 * dead[i]:.0f}% of units dead on the batch", gap=5)

    # collapse to a constant prediction
    share = _col(s, "top_class_share", n)
    h = label_entropy(run)
    if np.isfinite(share).any():
        flags = np.isfinite(share) & (share >= COLLAPSE_SHARE) & (np.abs(loss - h) < COLLAPSE_LOSS_TOL * 3)
        events += [e for e in _episodes("collapse", flags, lambda i: (
            f"{100 * share[i]:.0f}% of the batch predicted as one class, loss {loss[i]:.3f} "
            f"(label entropy {h:.3f})"), gap=5) if e.end - e.step + 1 >= COLLAPSE_MIN_STEPS]

    # stall / plateau
    g = _col(s, "grad_norm", n)
    if np.isfinite(g).any() and n > STALL_WINDOW:
        g_ref = np.nanmedian(g[:min(n, 50)])
        best = np.fmin.accumulate(np.where(np.isfinite(sm), sm, np.inf))
        flags = np.zeros(n, bool)
        for i in range(STALL_WINDOW, n):
            w = slice(i - STALL_WINDOW, i + 1)
            gw, lw = g[w], sm[w]
            if (np.nanmedian(gw) < STALL_GRAD_FRAC * g_ref and np.nanmax(lw) - np.nanmin(lw) < STALL_FLAT
                    and sm[i] > best[i] + STALL_ABOVE_BEST):
                flags[i] = True
        events += _episodes("stall", flags, lambda i: (
            f"gradient norm {np.nanmedian(g[i - STALL_WINDOW:i + 1]):.2g} (early {g_ref:.2g}), loss flat at "
            f"{sm[i]:.3f}, best {best[i]:.3f}"), gap=5)

    # overfitting (evaluations)
    e = run.evals
    if len(e.get("step", [])) >= 3:
        vl, tl = np.asarray(e["val_loss"]), np.asarray(e["train_loss"])
        j = int(np.nanargmin(vl))
        k = len(vl) - 1
        if j < k and vl[k] > vl[j] * (1 + OVERFIT_REL) and tl[k] < tl[j]:
            events.append(Event("overfit", int(e["step"][j]), int(e["step"][k]), k - j,
                                f"val loss {vl[j]:.3f} -> {vl[k]:.3f} while train loss {tl[j]:.3f} -> {tl[k]:.3f}"))
    return sorted(events, key=lambda ev: (ev.step, ev.kind))


# ---------------------------------------------------------------- the verdict
def _step_story(run, i):
    """The mechanism at step index i, in numbers: lr, lambda, update ratios, same-batch losses."""
    s = run.steps
    n = len(s["step"])
    parts = []
    lr = _col(s, "lr", n)[i]
    lam = _col(s, "lambda_max", n)
    near = np.flatnonzero(np.isfinite(lam[:i + 1]))
    if len(near):
        j = near[-1]
        parts.append(f"lr*lambda_max = {lr * lam[j]:.2f} {'>' if lr * lam[j] >= 2 else '<'} 2 "
                     f"(lambda_max {lam[j]:.3g} measured at step {int(s['step'][j])})")
    ratios = {name: _col(s, f"update_ratio.{name}", n)[i] for name in param_layers(s)}
    ratios = {k: v for k, v in ratios.items() if np.isfinite(v)}
    if ratios:
        name = max(ratios, key=ratios.get)
        parts.append(f"the update moved {name} by {100 * ratios[name]:.0f}% of its norm")
    after = _col(s, "loss_after", n)[i]
    if np.isfinite(after):
        parts.append(f"the same-batch loss went {s['loss'][i]:.3g} -> {after:.3g}")
    else:
        parts.append(f"batch loss {s['loss'][i]:.3g} at lr {lr:g}")
    return "; ".join(parts)


def _after_story(run, i):
    """What the network looks like in the steps after index i: dead layers, gradients, loss level."""
    s = run.steps
    n = len(s["step"])
    tail = slice(min(i + 1, n - 1), n)
    lines = []
    for name in relu_layers(s):
        d = _col(s, f"dead.{name}", n)[tail]
        if np.isfinite(d).any() and np.nanmedian(d) >= DEAD_LAYER:
            since = i + 1 + int(np.argmax(d >= DEAD_LAYER))
            lines.append(f"{100 * np.nanmedian(d):.0f}% of {name} units have been dead since step {int(s['step'][min(since, n - 1)])}")
    layers = param_layers(s)
    if layers:
        first = layers[0]
        g = _col(s, f"grad_norm.{first}", n)
        g0 = np.nanmedian(g[:max(1, min(i, 50))])
        gt = np.nanmedian(g[tail])
        if np.isfinite(gt) and np.isfinite(g0):
            lines.append(f"the gradient reaching {first} is {gt:.2g} (it was {g0:.2g} before)")
    loss = s["loss"][tail]
    level = float(np.nanmedian(loss)) if np.isfinite(loss).any() else math.nan
    h = label_entropy(run)
    share = _col(s, "top_class_share", n)[tail]
    if np.isfinite(level):
        msg = f"loss has sat at {level:.2f}"
        if abs(level - h) < COLLAPSE_LOSS_TOL * 3:
            msg += f" = ln {math.exp(h):.0f} (constant prediction)" if abs(math.exp(h) - round(math.exp(h))) < 0.05 \
                else f" ~ the label entropy {h:.2f} (constant prediction)"
        msg += f" for the {n - 1 - i:,} steps since"
        if np.isfinite(share).any():
            msg += f"; {100 * np.nanmedian(share):.0f}% of each batch gets the same class"
        lines.append(msg)
    return lines


def diagnose(run):
    """One verdict for a run, with its decisive step and the mechanism in numbers."""
    events = find_events(run)
    s = run.steps
    n = len(s.get("step", []))
    if n == 0:
        return Diagnosis("empty", "no steps recorded", events=events)
    loss = np.asarray(s["loss"], dtype=np.float64)
    step = s["step"].astype(int)
    sm = _smooth(loss, SMOOTH)
    head = loss[:min(n, 5)]
    start = float(np.mean(head[np.isfinite(head)])) if np.isfinite(head).any() else math.nan
    finite = np.isfinite(sm)
    best_i = int(np.nanargmin(np.where(finite, sm, np.inf)))
    best = float(sm[best_i])
    final = float(sm[-1]) if finite[-1] else math.nan
    by_kind = {}
    for ev in events:
        by_kind.setdefault(ev.kind, []).append(ev)
    h = label_entropy(run)
    after = _col(s, "loss_after", n)
    over_share = (float(np.mean(overshoot_flags(loss, after)[np.isfinite(after)]))
                  if np.isfinite(after).any() else math.nan)
    # learning is measured against the better of the starting loss and the constant predictor's
    # loss (the label entropy): a network that starts at loss 300 and falls to ln 10 learned nothing
    base = min(start, h) if np.isfinite(start) else h
    learned = best < (1 - LEARNED_DROP_FRAC) * base
    never = best > NEVER_LEARNED_FRAC * base

    if "diverged" in by_kind:
        ev = by_kind["diverged"][0]
        i = int(np.flatnonzero(step == ev.step)[0])
        first_spike = next((e for e in events if e.kind in ("spike", "overshoot") and e.step <= ev.step), None)
        d = Diagnosis("diverged", f"diverged at step {ev.step}: {ev.evidence}", ev.step, events=events)
        if first_spike:
            j = int(np.flatnonzero(step == first_spike.step)[0])
            d.lines.append(f"it started at step {first_spike.step} ({first_spike.kind}): {_step_story(run, j)}")
        d.lines.append(f"at step {ev.step}: {_step_story(run, i)}")
        d.lines.append("mechanism: each step overshot by more than the last (lr x curvature > 2), so the "
                       "weights and the loss grew geometrically until they overflowed")
        return d

    # a plateau that lasts to the end of the run: dead layers or a constant prediction
    plateau = [e for e in events if e.kind in ("dead", "collapse") and e.end >= step[-1] - 5]
    T0 = min((e.step for e in plateau), default=None)
    dead0 = sorted({e.evidence.split(":")[0] for e in plateau if e.kind == "dead" and e.step == 0})
    if never and T0 == 0 and dead0:     # dead from the initialisation, before any step
        d = Diagnosis("stuck", f"stuck from the start: initialised on a plateau (loss {start:.3f}, best {best:.3f})",
                      0, events=events)
        d.lines.append(f"{', '.join(dead0)} dead from step 0: no gradient flows below them, so the weights "
                       "under a dead layer never change, whatever the learning rate")
        d.lines += _after_story(run, 0)
        d.lines.append("mechanism: the gradient is (near) zero on this plateau, so SGD has nothing to follow; "
                       "a smaller learning rate does not help, a different initialisation does")
        return d

    rose = np.isfinite(final) and final > best + max(PLATEAU_RISE, PLATEAU_RISE_FRAC * (base - best))
    unstable_evidence = ((np.isfinite(over_share) and over_share >= UNSTABLE_OVERSHOOT_SHARE)
                         or "spike" in by_kind or "oscillation" in by_kind)
    # risen again without a plateau (no dead layer / constant prediction at the end) while jumping
    # around: that is instability, not a collapse
    relapse = learned and rose and T0 is None and unstable_evidence
    if (learned and rose and not relapse) or (T0 is not None and not learned):
        # thrown onto a plateau: after learning (the loss rose and stayed up), or before it could learn
        # the decisive step: the largest update relative to the weights (max over layers) between the
        # best point (or the start) and the plateau's start; without update ratios in the trace, the
        # largest same-batch rise (or batch loss). Not the same-batch rise first: the step that kills
        # every ReLU often LOWERS its own batch's loss (one image at loss 14 -> a constant prediction
        # at ln 10), measured on a batch-2 run whose largest rise in the window came 400 steps early.
        lo_i = max(0, best_i - SMOOTH) if learned else 0
        # ... up to where the last of the plateau's conditions set in (a fresh network often predicts
        # one class from step 0; the step that killed its ReLUs comes after)
        T1 = max((e.step for e in plateau), default=None)
        hi_i = int(np.flatnonzero(step >= T1)[0]) + 1 if T1 is not None else n - 1
        window = slice(lo_i, max(hi_i, lo_i + 1))
        ratios = [_col(s, f"update_ratio.{name}", n)[window] for name in param_layers(s)]
        by_update = bool(ratios) and np.isfinite(np.vstack(ratios)).any()
        if by_update:
            with np.errstate(invalid="ignore"):
                jump = np.nan_to_num(np.nanmax(np.vstack(ratios), axis=0), nan=-np.inf)
        else:
            jump = (after - loss)[window] if np.isfinite(after[window]).any() else loss[window]
            jump = np.where(np.isfinite(jump), jump, np.inf)
        k = int(np.argmax(jump))
        if by_update:   # the first of a chain of outsized steps (an lr-10 step, then the lr-0.1 step on
            while k > 0 and jump[k - 1] >= CHAIN_FRAC * jump[k]:     # its huge gradient): the cause
                k -= 1
        T = int(step[lo_i + k])
        t_i = int(np.flatnonzero(step == T)[0])
        if learned:
            title = (f"progress, then collapse onto a plateau at step {T} (best smoothed loss {best:.3f} "
                     f"at step {int(step[best_i])}, final {final:.3f})")
        else:
            title = f"thrown onto a plateau at step {T} before it could learn (loss {start:.3f} -> {final:.3f})"
        d = Diagnosis("collapse", title, T, events=events)
        d.lines.append(f"step {T}: {_step_story(run, t_i)}")
        d.lines += _after_story(run, t_i)
        d.lines.append("mechanism: one large step threw the weights off the valley onto a flat region "
                       "(dead ReLUs / a constant prediction) where the gradient is near zero, so nothing "
                       "pulls them back")
        return d

    if (never or relapse) and unstable_evidence:
        osc = by_kind.get("oscillation", [])
        title = (f"unstable from the start: the loss jumps around and never learns (start {start:.3f}, "
                 f"best smoothed {best:.3f}, final {final:.3f})" if never else
                 f"unstable: the loss jumps around; it fell to {best:.3f} (smoothed, step {int(step[best_i])}) "
                 f"and is back at {final:.3f}")
        d = Diagnosis("unstable", title, 0, events=events)
        if np.isfinite(over_share):
            d.lines.append(f"{100 * over_share:.0f}% of steps raised the loss on their own batch (overshoot)")
        if osc:
            d.lines.append(f"consecutive gradients point against each other: {osc[0].evidence}")
        spikes = by_kind.get("spike", [])
        if spikes:
            d.lines.append(f"{sum(e.count for e in spikes)} loss spikes, the first at step {spikes[0].step}: "
                           f"{spikes[0].evidence}")
        d.lines.append(f"step 0: {_step_story(run, 0)}")
        d.lines.append("mechanism: the step is too large for the curvature (lr x sharpness > 2), so each step "
                       "overshoots the valley it is in and lands somewhere no better")
        return d

    if "overfit" in by_kind:
        ev = by_kind["overfit"][0]
        return Diagnosis("overfitting", f"overfitting from step {ev.step}: {ev.evidence}", ev.step,
                         ["training keeps improving on the training set while the validation loss rises: "
                          "the network memorises rather than generalises"], events)

    if not learned:
        return Diagnosis("slow", f"learning slowly: loss {start:.3f} -> {final:.3f} (best {best:.3f})", None,
                         [f"step 0: {_step_story(run, 0)}",
                          "no instability: the steps are simply small; a larger lr or more steps would help"],
                         events)
    lines = ["no same-batch test (trace light/off)"]
    if np.isfinite(over_share):
        rise = np.where(np.isfinite(after), after - loss, -np.inf)
        j = int(np.argmax(rise))
        lines = [f"{100 * over_share:.0f}% of steps raised their own batch's loss"
                 + (f", isolated (largest: step {int(step[j])}, {loss[j]:.3g} -> {after[j]:.3g}): SGD noise at "
                    f"this lr, from which the next steps recover" if rise[j] > 0 and "overshoot" not in by_kind
                    else "")]
    # a plateau the run fell onto and later left (e.g. a few ReLUs survived a catapult and pulled it out)
    left = [e for e in events if e.kind in ("dead", "collapse") and e.end < step[-1] - 5
            and e.end - e.step + 1 >= COLLAPSE_MIN_STEPS]
    if left:
        e = max(left, key=lambda e: e.end - e.step)
        lines.append(f"it sat on a plateau from step {e.step} to {e.end} ({e.kind}: {e.evidence}) and climbed "
                     f"off it: a few units still passed gradient")
    return Diagnosis("healthy", f"healthy: loss {start:.3f} -> {final:.3f} (best smoothed {best:.3f})", None,
                     lines, events)


# ---------------------------------------------------------------- one step at a time (the debugger)
STEP_EVENTS = ("overshoot", "spike", "dead", "collapse", "nan", "eos")


def step_events(rec, previous=(), label_entropy=math.log(10)):
    """The events one step's record shows, as {kind: evidence}: find_events' definitions and
    thresholds applied to a single step, for a debugger that stops when one happens.

    overshoot here is any step that raised its own batch's loss (overshoot_flags), the single
    step a debugger wants to stop at; find_events makes an event of it only for a catapult or
    when it is the rule over a window.
    rec: a step record (minicnn.trace columns); previous: the records of the steps before it,
    oldest first (a spike is judged against the median of the last SPIKE_WINDOW losses; a collapse
    is reported once its episode has lasted COLLAPSE_MIN_STEPS steps, as find_events requires).
    """
    out = {}
    loss = float(rec.get("loss", math.nan))
    after = float(rec.get("loss_after", math.nan))
    lr = float(rec.get("lr", math.nan))
    if not math.isfinite(loss) or ("loss_after" in rec and not math.isfinite(after)):
        out["nan"] = f"loss = {loss:.4g}" + (f", loss after the step = {after:.4g}" if "loss_after" in rec else "")
    if overshoot_flags(np.array([loss]), np.array([after]))[0]:
        a = rec.get("alpha", math.nan)
        big = after - loss > OVERSHOOT_BIG_ABS and after > OVERSHOOT_BIG_FACTOR * loss
        out["overshoot"] = (f"same-batch loss {loss:.4g} -> {after:.4g} (predicted change "
                            f"{rec.get('predicted_change', math.nan):+.3g}), lr {lr:g}"
                            + (f", alpha {a:.2f}" if math.isfinite(a) else "") + ("; a catapult" if big else ""))
    recent = np.array([p.get("loss", math.nan) for p in list(previous)[-SPIKE_WINDOW:]], dtype=np.float64)
    recent = recent[np.isfinite(recent)]
    if len(recent) and math.isfinite(loss):
        med = float(np.median(recent))
        if loss > SPIKE_FACTOR * med and loss > med + SPIKE_ABS:
            out["spike"] = f"loss {loss:.4g} vs recent median {med:.3g}, lr {lr:g}"
    dead = [(k[len("dead."):], v) for k, v in rec.items() if k.startswith("dead.") and v >= DEAD_LAYER]
    if dead:
        out["dead"] = "; ".join(f"{name}: {100 * v:.0f}% of units dead on the batch" for name, v in dead)
    window = list(previous)[-(COLLAPSE_MIN_STEPS - 1):] + [rec]

    def collapsed(r):
        share, l = r.get("top_class_share", math.nan), r.get("loss", math.nan)
        return share >= COLLAPSE_SHARE and abs(l - label_entropy) < COLLAPSE_LOSS_TOL * 3
    flags = np.array([collapsed(r) for r in window])
    if len(window) >= COLLAPSE_MIN_STEPS and flags[-1]:
        ep = _episodes("collapse", flags, lambda i: "", gap=5)[-1]
        if ep.step == 0 and ep.end == len(window) - 1:
            out["collapse"] = (f"{100 * rec['top_class_share']:.0f}% of the batch predicted as one class for "
                               f"{COLLAPSE_MIN_STEPS} steps, loss {loss:.3f} (label entropy {label_entropy:.3f})")
    lam = rec.get("lambda_max", math.nan)
    if math.isfinite(lam) and lr * lam >= EOS_RATIO:
        out["eos"] = f"lr*lambda_max = {lr * lam:.2f} >= 2 (lambda_max {lam:.3g}, 2/lr {2 / lr:.3g})"
    return out
