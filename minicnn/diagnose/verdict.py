"""The verdict: one name for what happened to a run as a whole, its decisive step, and the
mechanism in numbers. ``diagnose`` tries the verdicts in order of severity; each is a function
of the run's Levels (start, best and final loss, what it learned) and its events."""
import math
from dataclasses import dataclass, field

import numpy as np

from .events import Trace, find_events, overshoot_flags
from .story import after_story, step_story
from .thresholds import (
    CHAIN_FRAC,
    COLLAPSE_MIN_STEPS,
    LEARNED_DROP_FRAC,
    NEVER_LEARNED_FRAC,
    PLATEAU_END_SLACK,
    PLATEAU_RISE,
    PLATEAU_RISE_FRAC,
    SMOOTH,
    START_STEPS,
    UNSTABLE_OVERSHOOT_SHARE,
)

VERDICTS = ("healthy", "slow", "unstable", "collapse", "diverged", "stuck", "overfitting", "empty")


@dataclass
class Diagnosis:
    verdict: str                 # one of VERDICTS
    title: str                   # one line
    decisive_step: int = None
    lines: list = field(default_factory=list)     # the mechanism, in numbers
    events: list = field(default_factory=list)

    @property
    def text(self):
        return "\n".join([self.title] + ["  " + line for line in self.lines])

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

    @classmethod
    def of(cls, t, events):
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
                   best < (1 - LEARNED_DROP_FRAC) * base, best > NEVER_LEARNED_FRAC * base, over_share, by_kind)

    def index(self, step):
        return int(np.flatnonzero(self.t.step == step)[0])

    def plateau(self):
        """Dead-layer and constant-prediction episodes that last to the end of the run."""
        last = self.t.step[-1]
        return [e for e in self.events if e.kind in ("dead", "collapse") and e.end >= last - PLATEAU_END_SLACK]

    def rose(self):
        """The loss ended well above its best."""
        return bool(np.isfinite(self.final) and self.final > self.best + max(
            PLATEAU_RISE, PLATEAU_RISE_FRAC * (self.base - self.best)))

    def unstable_evidence(self):
        return ((np.isfinite(self.over_share) and self.over_share >= UNSTABLE_OVERSHOOT_SHARE)
                or "spike" in self.by_kind or "oscillation" in self.by_kind)


def diagnose(run):
    """One verdict for a run (``minicnn.load_run``), with its decisive step and the mechanism in numbers."""
    events = find_events(run)
    t = Trace.of_run(run)
    if t.n == 0:
        return Diagnosis("empty", "no steps recorded", events=events)
    lv = Levels.of(t, events)
    for verdict in (_diverged, _stuck, _collapse, _unstable, _overfitting, _slow):
        d = verdict(lv)
        if d is not None:
            return d
    return _healthy(lv)


def _diverged(lv):
    if "diverged" not in lv.by_kind:
        return None
    ev = lv.by_kind["diverged"][0]
    if ev.step == int(lv.t.step[0]) and not np.isfinite(lv.t("loss")[0]):
        return _nonfinite_from_start(lv, ev)
    first_spike = next((e for e in lv.events if e.kind in ("spike", "overshoot") and e.step <= ev.step), None)
    d = Diagnosis("diverged", f"diverged at step {ev.step}: {ev.evidence}", ev.step, events=lv.events)
    if first_spike:
        d.lines.append(f"it started at step {first_spike.step} ({first_spike.kind}): "
                       f"{step_story(lv.t, lv.index(first_spike.step))}")
    d.lines.append(f"at step {ev.step}: {step_story(lv.t, lv.index(ev.step))}")
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
    """Dead from the initialisation, before any step: a plateau no lr leaves."""
    plateau = lv.plateau()
    dead0 = sorted({e.evidence.split(":")[0] for e in plateau if e.kind == "dead" and e.step == 0})
    if not (lv.never and min((e.step for e in plateau), default=None) == 0 and dead0):
        return None
    d = Diagnosis("stuck", f"stuck from the start: initialised on a plateau (loss {lv.start:.3f}, best {lv.best:.3f})",
                  0, events=lv.events)
    d.lines.append(f"{', '.join(dead0)} dead from step 0: no gradient flows below them, so the weights "
                   "under a dead layer never change, whatever the learning rate")
    d.lines += after_story(lv.t, 0)
    d.lines.append("mechanism: the gradient is (near) zero on this plateau, so SGD has nothing to follow; "
                   "a smaller learning rate does not help, a different initialisation does")
    return d


def _relapse(lv):
    """Risen again without a plateau at the end while jumping around: instability, not a collapse."""
    return lv.learned and lv.rose() and not lv.plateau() and lv.unstable_evidence()


def _collapse(lv):
    """Thrown onto a plateau: after learning (the loss rose and stayed up), or before it could learn."""
    plateau = lv.plateau()
    if not ((lv.learned and lv.rose() and not _relapse(lv)) or (plateau and not lv.learned)):
        return None
    T = _decisive_step(lv, plateau)
    if lv.learned:
        title = (f"progress, then collapse onto a plateau at step {T} (best smoothed loss {lv.best:.3f} "
                 f"at step {int(lv.t.step[lv.best_i])}, final {lv.final:.3f})")
    else:
        title = f"thrown onto a plateau at step {T} before it could learn (loss {lv.start:.3f} -> {lv.final:.3f})"
    d = Diagnosis("collapse", title, T, events=lv.events)
    d.lines.append(f"step {T}: {step_story(lv.t, lv.index(T))}")
    d.lines += after_story(lv.t, lv.index(T))
    d.lines.append("mechanism: one large step threw the weights off the valley onto a flat region "
                   "(dead ReLUs / a constant prediction) where the gradient is near zero, so nothing "
                   "pulls them back")
    return d


def _decisive_step(lv, plateau):
    """The step that threw the run onto its plateau: the largest update relative to the weights (max
    over layers) between the best point (or the start) and where the last of the plateau's conditions
    set in; without update ratios in the trace, the largest same-batch rise (or batch loss).

    Not the same-batch rise first: the step that kills every ReLU often LOWERS its own batch's loss
    (one image at loss 14 -> a constant prediction at ln 10), measured on a batch-2 run whose largest
    rise in the window came 400 steps early. A fresh network often predicts one class from step 0;
    the step that killed its ReLUs comes after, hence the window's end."""
    t = lv.t
    lo_i = max(0, lv.best_i - SMOOTH) if lv.learned else 0
    T1 = max((e.step for e in plateau), default=None)
    hi_i = int(np.flatnonzero(t.step >= T1)[0]) + 1 if T1 is not None else t.n - 1
    window = slice(lo_i, max(hi_i, lo_i + 1))
    ratios = [t(f"update_ratio.{name}")[window] for name in t.param_layers()]
    by_update = bool(ratios) and np.isfinite(np.vstack(ratios)).any()
    if by_update:
        with np.errstate(invalid="ignore"):
            jump = np.nan_to_num(np.nanmax(np.vstack(ratios), axis=0), nan=-np.inf)
    else:
        loss, after = t("loss"), t("loss_after")
        jump = (after - loss)[window] if np.isfinite(after[window]).any() else loss[window]
        jump = np.where(np.isfinite(jump), jump, np.inf)
    k = int(np.argmax(jump))
    if by_update:   # the first of a chain of outsized steps (an lr-10 step, then the lr-0.1 step on
        while k > 0 and jump[k - 1] >= CHAIN_FRAC * jump[k]:     # its huge gradient): the cause
            k -= 1
    return int(t.step[lo_i + k])


def _unstable(lv):
    if not ((lv.never or _relapse(lv)) and lv.unstable_evidence()):
        return None
    osc = lv.by_kind.get("oscillation", [])
    title = (f"unstable from the start: the loss jumps around and never learns (start {lv.start:.3f}, "
             f"best smoothed {lv.best:.3f}, final {lv.final:.3f})" if lv.never else
             f"unstable: the loss jumps around; it fell to {lv.best:.3f} (smoothed, step {int(lv.t.step[lv.best_i])}) "
             f"and is back at {lv.final:.3f}")
    d = Diagnosis("unstable", title, 0, events=lv.events)
    if np.isfinite(lv.over_share):
        d.lines.append(f"{100 * lv.over_share:.0f}% of steps raised the loss on their own batch (overshoot)")
    if osc:
        d.lines.append(f"consecutive gradients point against each other: {osc[0].evidence}")
    spikes = lv.by_kind.get("spike", [])
    if spikes:
        d.lines.append(f"{sum(e.count for e in spikes)} loss spikes, the first at step {spikes[0].step}: "
                       f"{spikes[0].evidence}")
    d.lines.append(f"step 0: {step_story(lv.t, 0)}")
    d.lines.append("mechanism: the step is too large for the curvature (lr x sharpness > 2), so each step "
                   "overshoots the valley it is in and lands somewhere no better")
    return d


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
    return Diagnosis("slow", f"learning slowly: loss {lv.start:.3f} -> {lv.final:.3f} (best {lv.best:.3f})", None,
                     [f"step 0: {step_story(lv.t, 0)}",
                      "no instability: the steps are simply small; a larger lr or more steps would help"],
                     lv.events)


def _healthy(lv):
    t = lv.t
    lines = ["no same-batch test (trace light/off)"]
    if np.isfinite(lv.over_share):
        loss, after = t("loss"), t("loss_after")
        rise = np.where(np.isfinite(after), after - loss, -np.inf)
        j = int(np.argmax(rise))
        lines = [f"{100 * lv.over_share:.0f}% of steps raised their own batch's loss"
                 + (f", isolated (largest: step {int(t.step[j])}, {loss[j]:.3g} -> {after[j]:.3g}): SGD noise at "
                    f"this lr, from which the next steps recover" if rise[j] > 0 and "overshoot" not in lv.by_kind
                    else "")]
    # a plateau the run fell onto and later left (e.g. a few ReLUs survived a catapult and pulled it out)
    left = [e for e in lv.events if e.kind in ("dead", "collapse") and e.end < t.step[-1] - PLATEAU_END_SLACK
            and e.end - e.step + 1 >= COLLAPSE_MIN_STEPS]
    if left:
        e = max(left, key=lambda e: e.end - e.step)
        lines.append(f"it sat on a plateau from step {e.step} to {e.end} ({e.kind}: {e.evidence}) and climbed "
                     f"off it: a few units still passed gradient")
    return Diagnosis("healthy", f"healthy: loss {lv.start:.3f} -> {lv.final:.3f} (best smoothed {lv.best:.3f})", None,
                     lines, lv.events)
