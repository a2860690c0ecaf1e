"""The verdict: one name for what happened to a run as a whole, its decisive step (the onset), the
mechanism in numbers, and the most likely cause with what to try. ``diagnose`` tries the verdicts in
order of severity; each is a function of the run's Levels and its events."""
import math
from dataclasses import dataclass, field

import numpy as np

from .causes import NO_CAUSE, Cause, Signs, find_cause, lr_spike
from .events import Trace, find_events, overshoot_flags
from .onset import onset, step_sizes
from .story import after_story, layer_crossing_lines, step_story
from .thresholds import (
    COLLAPSE_MIN_STEPS,
    EARLY_STEPS,
    GRAD_FALLEN,
    LEARNED_DROP_FRAC,
    NEVER_LEARNED_FRAC,
    OUTSIZED_UPDATE,
    PLATEAU_END_SLACK,
    PLATEAU_RISE,
    PLATEAU_RISE_FRAC,
    START_STEPS,
    UNSTABLE_OVERSHOOT_SHARE,
    WD_SHRINK,
)

VERDICTS = ("healthy", "slow", "unstable", "collapse", "diverged", "stuck", "overfitting", "empty")


@dataclass
class Diagnosis:
    verdict: str                 # one of VERDICTS
    title: str                   # one line
    decisive_step: int = None    # the onset: the first step of what went wrong
    lines: list = field(default_factory=list)     # the mechanism, in numbers
    events: list = field(default_factory=list)
    cause: Cause = field(default_factory=lambda: NO_CAUSE)   # the most likely cause, its evidence, what to try

    @property
    def text(self):
        lines = [self.title] + ["  " + line for line in self.lines]
        if self.cause.name != "none" or self.verdict not in ("healthy", "empty"):
            lines += ["  " + line for line in self.cause.text.splitlines()]
        return "\n".join(lines)

    def __str__(self):
        return self.text


@dataclass
class Levels:
    """The run-level numbers every verdict reads."""
    t: Trace
    events: list
    start: float                 # mean loss of the first START_STEPS steps
    best_i: int                  # index of the best smoothed loss
    best: float
    final: float                 # smoothed loss at the end
    base: float                  # what "learned" is measured against: min(start, label entropy)
    learned: bool
    never: bool
    over_share: float            # share of steps that raised their own batch's loss (full trace)
    by_kind: dict
    t_evals: dict = None         # the run's evaluations (evals.csv)

    @classmethod
    def of(cls, t, events, evals=None):
        loss, sm = t("loss"), t.smoothed_loss
        head = loss[:min(t.n, START_STEPS)]
        start = float(np.mean(head[np.isfinite(head)])) if np.isfinite(head).any() else math.nan
        finite = np.isfinite(sm)
        best_i = int(np.nanargmin(np.where(finite, sm, np.inf)))
        after = t("loss_after")
        over_share = (float(np.mean(overshoot_flags(loss, after)[np.isfinite(after)]))
                      if np.isfinite(after).any() else math.nan)
        # learning is measured against the better of the starting loss and the constant predictor's
        # loss (the label entropy): a network that starts at loss 300 and falls to ln 10 learned nothing
        base = min(start, t.label_entropy) if np.isfinite(start) else t.label_entropy
        best = float(sm[best_i])
        by_kind = {}
        for ev in events:
            by_kind.setdefault(ev.kind, []).append(ev)
        return cls(t, events, start, best_i, best, float(sm[-1]) if finite[-1] else math.nan, base,
                   best < (1 - LEARNED_DROP_FRAC) * base, best > NEVER_LEARNED_FRAC * base, over_share, by_kind,
                   evals)

    def index(self, step):
        return int(np.flatnonzero(self.t.step == step)[0])

    def plateau(self):
        """Dead-layer and constant-prediction episodes (on the probe) that last to the end of the run."""
        last = self.t.step[-1]
        slack = max(PLATEAU_END_SLACK, self.t.state_gap())
        return [e for e in self.events if e.kind in ("dead", "collapse") and e.end >= last - slack]

    def grad_fallen(self, i):
        """(fallen, before, after): the gradient reaching the first layer after index i against before it."""
        layers = self.t.param_layers()
        if not layers:
            return True, math.nan, math.nan
        g = self.t(f"grad_norm.{layers[0]}")
        g0 = np.nanmedian(g[max(0, i - EARLY_STEPS):max(1, i)]) if np.isfinite(g[:max(1, i)]).any() else math.nan
        tail = g[min(i + 1, self.t.n - 1):]
        g1 = np.nanmedian(tail) if np.isfinite(tail).any() else math.nan
        if not (np.isfinite(g0) and np.isfinite(g1)):
            return True, g0, g1
        return bool(g1 < GRAD_FALLEN * g0 or g0 == 0), float(g0), float(g1)

    def plateau_above_best(self, plateau):
        """The loss on the plateau (its median, from where the plateau began) is well above the best:
        a collapse whose plateau is too recent for the moving average to have caught up."""
        i = self.index(min(e.step for e in plateau))
        level = self.t("loss")[i:]
        level = float(np.nanmedian(level)) if np.isfinite(level).any() else math.nan
        return bool(np.isfinite(level) and level > self.best + max(
            PLATEAU_RISE, PLATEAU_RISE_FRAC * (self.base - self.best)))

    def rose(self):
        """The loss ended well above its best: the smoothed training loss, or the held-out loss of the
        evaluations (while the training loss did not keep falling: that is overfitting). The held-out
        loss is the better witness at tiny batches, where even a long average of batch losses is noise."""
        def above(final, best, base):
            return bool(np.isfinite(final) and final > best + max(PLATEAU_RISE, PLATEAU_RISE_FRAC * (base - best)))
        if above(self.final, self.best, self.base):
            return True
        vl = np.asarray((self.t_evals or {}).get("val_loss", []), dtype=np.float64)
        if len(vl) < 2 or not np.isfinite(vl).any() or "overfit" in self.by_kind:
            return False
        best = float(np.nanmin(vl))
        return above(float(vl[-1]), best, self.t.label_entropy) and self.final > self.best

    def unstable_evidence(self):
        return ((np.isfinite(self.over_share) and self.over_share >= UNSTABLE_OVERSHOOT_SHARE)
                or "spike" in self.by_kind or "oscillation" in self.by_kind)


def diagnose(run):
    """One verdict for a run (``minicnn.load_run``), with its decisive step, the mechanism in numbers
    and the most likely cause."""
    events = find_events(run)
    t = Trace.of_run(run)
    if t.n == 0:
        return Diagnosis("empty", "no steps recorded", events=events)
    lv = Levels.of(t, events, run.evals)
    for verdict in (_diverged, _stuck, _collapse, _unstable, _overfitting, _slow):
        d = verdict(lv)
        if d is not None:
            break
    else:
        d = _healthy(lv)
    if d.verdict != "healthy":
        T = lv.index(d.decisive_step) if d.decisive_step is not None else None
        d.cause = find_cause(lv, d.verdict, T, run.config, onset_is_a_step=not d.title.startswith("unstable after"))
    if not measured(t):
        d.lines = [line.replace("mechanism:", "likely mechanism (nothing in this record measures it):", 1)
                   for line in d.lines]
    return d


def measured(t):
    """Whether the trace holds any measurement of the steps themselves (update sizes, the loss after
    a step, the probe) rather than the loss (and lr) alone."""
    return (any(t.has(f"update_ratio.{name}") for name in t.param_layers()) or t.has("loss_after")
            or t.probed)


def _diverged(lv):
    if "diverged" not in lv.by_kind:
        return None
    ev = lv.by_kind["diverged"][0]
    i = lv.index(ev.step)
    if ev.step == int(lv.t.step[0]) and not np.isfinite(lv.t("loss")[0]):
        return _nonfinite_from_start(lv, ev)
    T = lv.t.step[onset(lv.t, 0, i + 1)]
    d = Diagnosis("diverged", f"diverged at step {ev.step}: {ev.evidence}", int(T), events=lv.events)
    d.lines.append(f"it started at step {T}: {step_story(lv.t, lv.index(T))}")
    if T != ev.step:
        d.lines.append(f"at step {ev.step}: {step_story(lv.t, i)}")
    d.lines += layer_crossing_lines(lv.t, lv.index(T))
    d.lines.append("mechanism: each step overshot by more than the last (lr x curvature > 2), so the "
                   "weights and the loss grew geometrically until they overflowed")
    return d


def _nonfinite_from_start(lv, ev):
    """The first loss is already NaN/inf: no update was taken, so nothing overshot."""
    d = Diagnosis("diverged", f"non-finite from step {ev.step}: the loss was {lv.t('loss')[0]} before any update; "
                  "nothing was learned", ev.step, events=lv.events)
    d.lines.append("mechanism: the forward pass already overflows: the inputs or the initial weights are too large "
                   "for the dtype (see --input-scale, --init-scale and the data's range); the learning rate plays "
                   "no part")
    return d


def _stuck(lv):
    """On a plateau from the start and never off it: dead from the initialisation, or held there
    (e.g. by weight decay) without one large step throwing it there."""
    plateau = lv.plateau()
    if not (lv.never and plateau):
        return None
    dead0 = sorted({e.evidence.split(":")[0] for e in plateau if e.kind == "dead" and e.step == 0})
    if dead0:
        d = Diagnosis("stuck", f"stuck from the start: initialised on a plateau (loss {lv.start:.3f}, "
                      f"best {lv.best:.3f})", 0, events=lv.events)
        d.lines.append(f"{', '.join(dead0)} dead from step 0: no gradient flows below them, so the weights "
                       "under a dead layer never change, whatever the learning rate")
    elif not _thrown(lv, plateau) and lv.grad_fallen(lv.index(min(e.step for e in plateau)))[0]:
        T = min(e.step for e in plateau)
        d = Diagnosis("stuck", f"stuck on a plateau from step {T}, never learning (loss {lv.start:.3f} -> "
                      f"{lv.final:.3f})", T, events=lv.events)
        d.lines.append("no single step threw it there: the weights were pulled onto the plateau step by step")
    else:
        return None
    d.lines += after_story(lv.t, lv.index(d.decisive_step))
    d.lines.append("mechanism: the gradient is (near) zero on this plateau, so SGD has nothing to follow; "
                   "a smaller learning rate does not help, a different initialisation or setup does")
    return d


def _thrown(lv, plateau):
    """Whether an outsized step (see onset) led onto the plateau while the weights still had their
    size: as weight decay pulls the weights towards 0, each step is large next to what is left."""
    T1 = max(e.step for e in plateau)
    hi = int(np.flatnonzero(lv.t.step >= T1)[0]) + 1
    size, by_update = step_sizes(lv.t, slice(0, hi))
    if not by_update:
        return True
    wn = lv.t("weight_norm")[:hi]
    w0 = wn[np.isfinite(wn)][0] if np.isfinite(wn).any() else np.nan
    intact = ~(wn < WD_SHRINK * w0) if np.isfinite(w0) else np.ones(hi, bool)
    return bool(np.any((size >= OUTSIZED_UPDATE) & intact))


def _collapse(lv):
    """Thrown onto a plateau (dead layers / a constant prediction on the probe, the gradient reaching
    the first layer fallen): after learning (the loss rose and stayed up), or before it could learn."""
    plateau = lv.plateau()
    if not plateau or not (lv.rose() or lv.plateau_above_best(plateau) or not lv.learned):
        return None
    lo = max(0, lv.best_i - lv.t.smooth_window) if lv.learned else 0
    T1 = max(e.step for e in plateau)
    hi = int(np.flatnonzero(lv.t.step >= T1)[0]) + 1
    i = onset(lv.t, lo, hi)
    fallen, g0, g1 = lv.grad_fallen(i)
    if not fallen:
        return None
    T = int(lv.t.step[i])
    if lv.learned:
        title = (f"progress, then collapse onto a plateau at step {T} (best smoothed loss {lv.best:.3f} "
                 f"at step {int(lv.t.step[lv.best_i])}, final {lv.final:.3f})")
    else:
        title = f"thrown onto a plateau at step {T} before it could learn (loss {lv.start:.3f} -> {lv.final:.3f})"
    d = Diagnosis("collapse", title, T, events=lv.events)
    d.lines.append(f"step {T}: {step_story(lv.t, i)}")
    d.lines += after_story(lv.t, i)
    d.lines += layer_crossing_lines(lv.t, i)
    d.lines.append("mechanism: one large step threw the weights off the valley onto a flat region "
                   "(dead ReLUs / a constant prediction) where the gradient is near zero, so nothing "
                   "pulls them back")
    return d


def _unstable(lv):
    """Jumping around and never learning, or learned and then worse again while the loss keeps moving."""
    after_learning = lv.learned and lv.rose()
    if not ((lv.never and lv.unstable_evidence()) or after_learning):
        return None
    if lv.never:
        title = (f"unstable from the start: the loss jumps around and never learns (start {lv.start:.3f}, "
                 f"best smoothed {lv.best:.3f}, final {lv.final:.3f})")
        T = 0
    else:
        title = (f"unstable after learning: it fell to {lv.best:.3f} (smoothed, step {int(lv.t.step[lv.best_i])}) "
                 f"and is back at {lv.final:.3f}")
        T = int(lv.t.step[lv.best_i])
    d = Diagnosis("unstable", title, T, events=lv.events)
    d.lines += _instability_lines(lv)
    if after_learning:
        d.lines += _degraded_lines(lv)
    else:
        d.lines.append(f"step 0: {step_story(lv.t, 0)}")
    d.lines += layer_crossing_lines(lv.t, lv.index(T))
    d.lines.append("mechanism: the steps are too large for where the weights are: each overshoots the valley "
                   "it is in (lr x sharpness > 2) or follows a few images' noisy gradient, and lands somewhere "
                   "no better")
    return d


def _instability_lines(lv):
    lines = []
    if np.isfinite(lv.over_share):
        lines.append(f"{100 * lv.over_share:.0f}% of steps raised the loss on their own batch (overshoot)")
    osc = lv.by_kind.get("oscillation", [])
    if osc:
        lines.append(f"consecutive gradients point against each other: {osc[0].evidence}")
    spikes = lv.by_kind.get("spike", [])
    if spikes:
        lines.append(f"{sum(e.count for e in spikes)} loss spikes, the first at step {spikes[0].step}: "
                     f"{spikes[0].evidence}")
    return lines


def _degraded_lines(lv):
    """After learning: not a plateau -- the numbers that say the network is still there, and moving."""
    lines = []
    e = lv.t_evals or {}
    if len(e.get("val_acc", [])):
        va = np.asarray(e["val_acc"], dtype=np.float64)
        lines.append(f"validation accuracy: best {100 * np.nanmax(va):.0f}%, final {100 * va[-1]:.0f}%")
    fallen, g0, g1 = lv.grad_fallen(lv.best_i)
    if np.isfinite(g0) and np.isfinite(g1) and not fallen:
        lines.append(f"not a plateau: the gradient reaching the first layer is {g1:.2g} (it was {g0:.2g} before), "
                     f"the loss keeps moving")
    elif np.isfinite(g0) and np.isfinite(g1):
        lines.append(f"the gradient reaching the first layer fell to {g1:.2g} (it was {g0:.2g} before), but "
                     f"nothing measured whether units died or the prediction is constant: "
                     + ("the batch is too small to tell" if lv.t.unit_source() is None else "no plateau seen")
                     + (" (train with --probe-every K to measure it)" if not lv.t.probed else ""))
    return lines


def _overfitting(lv):
    if "overfit" not in lv.by_kind:
        return None
    ev = lv.by_kind["overfit"][0]
    return Diagnosis("overfitting", f"overfitting from step {ev.step}: {ev.evidence}", ev.step,
                     ["training keeps improving on the training set while the validation loss rises: "
                      "the network memorises rather than generalises"], lv.events)


def _slow(lv):
    if lv.learned:
        return None
    small = ("no instability: the steps are simply small; a larger lr or more steps would help"
             if measured(lv.t) else "no instability in the loss; the size of the steps is not in this record, so "
             "a learning rate too small cannot be told from a network that cannot learn")
    return Diagnosis("slow", f"learning slowly: loss {lv.start:.3f} -> {lv.final:.3f} (best {lv.best:.3f})", None,
                     [f"step 0: {step_story(lv.t, 0)}", small], lv.events)


def _recovered_lines(lv):
    """The largest loss spike a healthy run recovered from, and an lr spike that caused it."""
    spikes = lv.by_kind.get("spike", [])
    if not spikes:
        return []
    loss = lv.t("loss")
    e = max(spikes, key=lambda e: loss[lv.index(e.step)])
    line = (f"the run recovered from {sum(x.count for x in spikes)} loss spike(s); the largest at step {e.step}: "
            f"{e.evidence}")
    i = lv.index(e.step)
    if i > 0:
        cause = lr_spike(Signs(lv, {}), onset(lv.t, max(0, i - 2), i + 1))
        if cause is not None:
            line += f", after {cause.title}"
    return [line]


def _healthy(lv):
    t = lv.t
    lines = ["no same-batch test in this record (trace light or off, or a plain log)"]
    if np.isfinite(lv.over_share):
        loss, after = t("loss"), t("loss_after")
        rise = np.where(np.isfinite(after), after - loss, -np.inf)
        j = int(np.argmax(rise))
        lines = [f"{100 * lv.over_share:.0f}% of steps raised their own batch's loss"
                 + (f", isolated (largest: step {int(t.step[j])}, {loss[j]:.3g} -> {after[j]:.3g}): SGD noise at "
                    f"this lr, from which the next steps recover" if rise[j] > 0 and "overshoot" not in lv.by_kind
                    else "")]
    lines += _recovered_lines(lv)
    # a plateau the run fell onto and later left (e.g. a few ReLUs survived a catapult and pulled it out)
    plateau = lv.plateau()
    left = [e for e in lv.events if e.kind in ("dead", "collapse") and e not in plateau
            and e.end - e.step + 1 >= COLLAPSE_MIN_STEPS]
    if left:
        e = max(left, key=lambda e: e.end - e.step)
        lines.append(f"it sat on a plateau from step {e.step} to {e.end} ({e.kind}: {e.evidence}) and climbed "
                     f"off it: a few units still passed gradient")
    return Diagnosis("healthy", f"healthy: loss {lv.start:.3f} -> {lv.final:.3f} (best smoothed {lv.best:.3f})", None,
                     lines, lv.events)
