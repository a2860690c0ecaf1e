"""Events: one rule per kind, shared by the whole-run view (``find_events``) and the debugger's
one-step view (``step_events``).

An event is an episode: a condition that holds from ``step`` to ``end`` (``count`` steps flagged,
gaps of a few steps merged), with the evidence of its first step. Each rule says which steps it
flags on a ``Trace`` (columns of equal length) and what the evidence at a step is; the whole-run
view groups the flags into episodes, the one-step view asks about the last step of the recent
records.
"""
import math
from dataclasses import dataclass

import numpy as np

from ..series import centred_mean, column, runs_of, smooth, trailing_median
from .thresholds import (
    BATCH_EVIDENCE_MIN,
    COLLAPSE_LOSS_TOL,
    COLLAPSE_MIN_STEPS,
    COLLAPSE_SHARE,
    DEAD_LAYER,
    DIVERGE_FACTOR,
    EARLY_STEPS,
    EOS_RATIO,
    EVENT_ROWS,
    EXPLODED_NEAR_PEAK,
    OSC_MEAN_COS,
    OSC_PROGRESS,
    OSC_PROGRESS_WINDOW,
    OSC_WINDOW,
    OVERFIT_REL,
    OVERSHOOT_ABS,
    OVERSHOOT_BIG_ABS,
    OVERSHOOT_BIG_FACTOR,
    OVERSHOOT_GAP,
    OVERSHOOT_REL,
    OVERSHOOT_SHARE,
    OVERSHOOT_WINDOW,
    SMOOTH,
    SMOOTH_IMAGES,
    SPIKE_ABS,
    SPIKE_FACTOR,
    SPIKE_GAP,
    SPIKE_WINDOW,
    STALL_ABOVE_BEST,
    STALL_FLAT,
    STALL_GRAD_FRAC,
    STALL_WINDOW,
    STATE_GAP,
)

# the label entropy of 10 balanced classes: what a constant prediction scores when nothing else is known
TEN_CLASSES = math.log(10)
# what the debugger can stop at (``until EVENT``)
STEP_EVENTS = ("overshoot", "spike", "dead", "collapse", "nan", "eos")


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


class Trace:
    """Per-step columns (name -> float64 array, NaN where a step has no value) of a run, or of the
    debugger's recent records, plus what the rules need to know about the run."""

    def __init__(self, steps, label_entropy=TEN_CLASSES, sharpness_every=None, last_keys=None, batch_size=None):
        self.steps = steps
        self.n = len(steps.get("step", []))
        self.label_entropy = label_entropy
        self.sharpness_every = sharpness_every
        self.batch_size = batch_size
        self.last_keys = set(steps) if last_keys is None else last_keys   # what the last record holds
        self._cols = {}

    @classmethod
    def of_run(cls, run):
        cfg = run.config.get("config", {})
        return cls(run.steps, run.label_entropy, cfg.get("sharpness_every"), batch_size=cfg.get("batch_size"))

    @classmethod
    def of_records(cls, records, label_entropy, batch_size=None):
        keys = list(dict.fromkeys(k for r in records for k in r if k != "events"))
        steps = {k: np.array([_number(r.get(k, math.nan)) for r in records]) for k in keys}
        return cls(steps, label_entropy, last_keys=set(records[-1]) if records else set(), batch_size=batch_size)

    # ---- where units and predictions are read: the probe, else a large enough training batch
    @property
    def probed(self):
        return "probe_loss" in self.steps

    def batch_is_evidence(self):
        return self.batch_size is not None and self.batch_size >= BATCH_EVIDENCE_MIN

    def unit_source(self):
        """The prefix of the dead-fraction columns to read ('probe_dead.' or 'dead.'), or None."""
        return "probe_dead." if self.probed else ("dead." if self.batch_is_evidence() else None)

    def prediction_source(self):
        """(top-class share column, loss column) to read a constant prediction from, or None."""
        if self.probed:
            return "probe_top_class_share", "probe_loss"
        return ("top_class_share", "loss") if self.batch_is_evidence() else None

    def every(self):
        """Steps between measurements of the unit/prediction source: the probe's interval, else 1."""
        if not self.probed:
            return 1
        at = np.flatnonzero(np.isfinite(self("probe_loss")))
        return int(np.median(np.diff(at))) if len(at) > 1 else 1

    def state_gap(self):
        """Episodes of a persistent condition merge across one measurement interval plus STATE_GAP."""
        return STATE_GAP + (self.every() if self.probed else 0)

    def where(self):
        return "on the probe" if self.probed else "on the batch"

    def images(self):
        return "probe's images" if self.probed else "batch"

    def __call__(self, name):
        """Column ``name`` (all NaN when the trace does not have it)."""
        return self.cached(("column", name), lambda: column(self.steps, name, self.n))

    def cached(self, key, compute):
        """A derived series, computed once per trace (e.g. the spike rule's trailing median)."""
        if key not in self._cols:
            self._cols[key] = compute()
        return self._cols[key]

    def has(self, name):
        return bool(np.isfinite(self(name)).any())

    @property
    def step(self):
        return self.steps["step"].astype(int)

    @property
    def smoothed_loss(self):
        return self.cached("smoothed loss", lambda: smooth(self("loss"), self.smooth_window))

    @property
    def smooth_window(self):
        """Steps in the run-level moving average: SMOOTH, or enough for SMOOTH_IMAGES images."""
        return max(SMOOTH, -(-SMOOTH_IMAGES // self.batch_size)) if self.batch_size else SMOOTH

    def relu_layers(self):
        names = [k.split("dead.", 1)[1] for k in self.steps if k.startswith(("dead.", "probe_dead."))]
        return list(dict.fromkeys(names))

    def param_layers(self):
        return [k[len("grad_norm."):] for k in self.steps if k.startswith("grad_norm.")]


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def episodes(kind, t, flags, evidence, gap, min_steps=1, extent=1):
    """Flagged steps grouped into Events (see series.runs_of); episodes shorter than min_steps dropped
    (extent: the steps one flagged measurement stands for -- a probe's interval)."""
    step = t.step
    return [Event(kind, int(step[a]), int(step[b]), count, evidence(a)) for a, b, count in runs_of(flags, gap)
            if b - a + extent >= min_steps]


# ---------------------------------------------------------------- the rules
def overshoot_flags(loss, after):
    """Steps whose own batch's loss rose after the step by more than float noise (arrays)."""
    with np.errstate(invalid="ignore"):
        rise = after - loss
        return np.isfinite(rise) & (rise > np.maximum(OVERSHOOT_ABS, OVERSHOOT_REL * np.abs(loss)))


class Overshoot:
    """The loss on the step's own batch rose (full trace). An event: one catapult step, or rises
    as the rule in a window; the debugger stops at any rise."""
    kind = "overshoot"

    def applies(self, t):
        return t.has("loss_after")

    def rose(self, t):
        return overshoot_flags(t("loss"), t("loss_after"))

    def big(self, t):
        loss, after = t("loss"), t("loss_after")
        with np.errstate(invalid="ignore"):
            return self.rose(t) & (after - loss > OVERSHOOT_BIG_ABS) & (after > OVERSHOOT_BIG_FACTOR * loss)

    def share(self, t):
        return centred_mean(self.rose(t).astype(np.float64), OVERSHOOT_WINDOW)

    def flags(self, t):
        return self.big(t) | (self.rose(t) & (self.share(t) >= OVERSHOOT_SHARE))

    def evidence(self, t, i):
        loss, after, alpha = t("loss"), t("loss_after"), t("alpha")
        return (f"same-batch loss {loss[i]:.4g} -> {after[i]:.4g} (predicted change "
                f"{t('predicted_change')[i]:+.3g}), lr {t('lr')[i]:g}"
                + (f", alpha {alpha[i]:.2f}" if np.isfinite(alpha[i]) else ""))

    def events(self, t):
        big, share = self.big(t), self.share(t)
        return episodes(self.kind, t, self.flags(t), lambda i: self.evidence(t, i) + (
            "" if big[i] else f"; {100 * share[i]:.0f}% of the {OVERSHOOT_WINDOW} steps around rose"), OVERSHOOT_GAP)

    def at_last(self, t):
        i = t.n - 1
        if not self.rose(t)[i]:
            return None
        return self.evidence(t, i) + ("; a catapult" if self.big(t)[i] else "")


class Spike:
    """The batch loss far above the median of the SPIKE_WINDOW steps before it."""
    kind = "spike"

    def applies(self, t):
        return True

    def flags(self, t):
        loss, med = t("loss"), self.median(t)
        with np.errstate(invalid="ignore"):
            return np.isfinite(loss) & np.isfinite(med) & (loss > SPIKE_FACTOR * med) & (loss > med + SPIKE_ABS)

    def median(self, t):
        return t.cached("spike median", lambda: trailing_median(t("loss"), SPIKE_WINDOW))

    def evidence(self, t, i):
        lr = t("lr")[i]
        return f"loss {t('loss')[i]:.4g} vs recent median {self.median(t)[i]:.3g}" + (f", lr {lr:g}" if np.isfinite(lr)
                                                                                    else "")

    def events(self, t):
        return episodes(self.kind, t, self.flags(t), lambda i: self.evidence(t, i), SPIKE_GAP)

    def at_last(self, t):
        return self.evidence(t, t.n - 1) if self.flags(t)[-1] else None


class Oscillation:
    """Consecutive gradients strongly anti-aligned while the smoothed loss makes no progress."""
    kind = "oscillation"

    def applies(self, t):
        return t.has("grad_cos")

    def events(self, t):
        n, sm = t.n, t.smoothed_loss
        mcos = smooth(t("grad_cos"), OSC_WINDOW)
        w = min(OSC_PROGRESS_WINDOW, n)
        prev = np.concatenate([np.full(w, np.nan), sm[:n - w]])
        with np.errstate(invalid="ignore"):
            stalled = np.isfinite(prev) & (sm > (1 - OSC_PROGRESS) * prev)
            flags = np.isfinite(mcos) & (mcos < OSC_MEAN_COS) & (np.arange(n) >= OSC_WINDOW) & stalled
        return episodes(self.kind, t, flags, lambda i: (
            f"mean gradient cosine over {OSC_WINDOW} steps {mcos[i]:+.2f}; smoothed loss "
            f"{prev[i]:.3g} -> {sm[i]:.3g} over {w} steps"), STATE_GAP)


class EdgeOfStability:
    """lr * lambda_max >= 2: gradient descent on a quadratic of that curvature is unstable."""
    kind = "eos"

    def applies(self, t):
        return t.has("lambda_max")

    def flags(self, t):
        lam = t("lambda_max")
        with np.errstate(invalid="ignore"):
            return np.isfinite(lam) & (t("lr") * lam >= EOS_RATIO)

    def evidence(self, t, i):
        lr, lam = t("lr")[i], t("lambda_max")[i]
        return f"lr*lambda_max = {lr * lam:.2f} >= 2 (lambda_max {lam:.3g}, 2/lr {2 / lr:.3g})"

    def events(self, t):
        gap = 2 * max(1, t.sharpness_every or 1)
        return episodes(self.kind, t, self.flags(t), lambda i: self.evidence(t, i), gap)

    def at_last(self, t):
        return self.evidence(t, t.n - 1) if self.flags(t)[-1] else None


class DeadLayer:
    """A ReLU layer with (almost) every unit zero on the probe's held-out images (or, without a
    probe, on a training batch of at least BATCH_EVIDENCE_MIN images): no gradient passes below it."""
    kind = "dead"

    def applies(self, t):
        return bool(t.relu_layers()) and t.unit_source() is not None

    def flags(self, t, name):
        dead = t(t.unit_source() + name)
        with np.errstate(invalid="ignore"):
            return np.isfinite(dead) & (dead >= DEAD_LAYER)

    def evidence(self, t, i, name):
        return f"{name}: {100 * t(t.unit_source() + name)[i]:.0f}% of units dead {t.where()}"

    def events(self, t):
        return [e for name in t.relu_layers() for e in episodes(
            self.kind, t, self.flags(t, name), lambda i, name=name: self.evidence(t, i, name), t.state_gap())]

    def at_last(self, t):
        if not self.applies(t):
            return None
        parts = [self.evidence(t, t.n - 1, name) for name in t.relu_layers() if self.flags(t, name)[-1]]
        return "; ".join(parts) or None


class Collapse:
    """(Nearly) every held-out image of the probe (or, without a probe, of a training batch of at
    least BATCH_EVIDENCE_MIN images) predicted as one class at the label entropy's loss, for at
    least COLLAPSE_MIN_STEPS steps: the network outputs a constant."""
    kind = "collapse"

    def applies(self, t):
        return t.prediction_source() is not None and t.has(t.prediction_source()[0])

    def flags(self, t):
        share_col, loss_col = t.prediction_source()
        share, loss = t(share_col), t(loss_col)
        with np.errstate(invalid="ignore"):
            return np.isfinite(share) & (share >= COLLAPSE_SHARE) & (np.abs(loss - t.label_entropy) < COLLAPSE_LOSS_TOL)

    def evidence(self, t, i):
        share_col, loss_col = t.prediction_source()
        return (f"{100 * t(share_col)[i]:.0f}% of the {t.images()} predicted as one class, loss {t(loss_col)[i]:.3f} "
                f"(label entropy {t.label_entropy:.3f})")

    def events(self, t):
        return episodes(self.kind, t, self.flags(t), lambda i: self.evidence(t, i), t.state_gap(),
                        min_steps=COLLAPSE_MIN_STEPS, extent=t.every())

    def at_last(self, t):
        """Once the episode ending here has lasted COLLAPSE_MIN_STEPS steps (as the whole-run rule requires)."""
        if not self.applies(t) or t.n < COLLAPSE_MIN_STEPS:
            return None
        flags = self.flags(t)[-COLLAPSE_MIN_STEPS:]
        if not flags[-1]:
            return None
        measured = np.flatnonzero(np.isfinite(t(t.prediction_source()[0])[-COLLAPSE_MIN_STEPS:]))
        first, last, _ = runs_of(flags, t.state_gap())[-1]
        if first != measured[0] or last != len(flags) - 1:
            return None
        return self.evidence(t, t.n - 1).replace(" predicted as one class,", " predicted as one class for "
                                                 f"{COLLAPSE_MIN_STEPS} steps,")


class Stall:
    """The gradient small and the smoothed loss flat for STALL_WINDOW steps, far above its best."""
    kind = "stall"

    def applies(self, t):
        return t.has("grad_norm") and t.n > STALL_WINDOW

    def events(self, t):
        g, sm, n = t("grad_norm"), t.smoothed_loss, t.n
        g_ref = np.nanmedian(g[:min(n, EARLY_STEPS)])
        best = np.fmin.accumulate(np.where(np.isfinite(sm), sm, np.inf))
        flags = np.zeros(n, bool)
        for i in range(STALL_WINDOW, n):
            w = slice(i - STALL_WINDOW, i + 1)
            gw, lw = g[w], sm[w]
            if (np.nanmedian(gw) < STALL_GRAD_FRAC * g_ref and np.nanmax(lw) - np.nanmin(lw) < STALL_FLAT
                    and sm[i] > best[i] + STALL_ABOVE_BEST):
                flags[i] = True
        return episodes(self.kind, t, flags, lambda i: (
            f"gradient norm {np.nanmedian(g[i - STALL_WINDOW:i + 1]):.2g} (early {g_ref:.2g}), loss flat at "
            f"{sm[i]:.3f}, best {best[i]:.3f}"), STATE_GAP)


class Diverged:
    """NaN/inf, or the smoothed loss DIVERGE_FACTOR x its start and staying there to the end, still near
    its peak (a single huge step that comes back down is a spike, not a divergence; one that throws
    the loss up onto a high flat plateau -- dead ReLUs under a huge constant logit -- is a collapse)."""
    kind = "diverged"

    def applies(self, t):
        return True

    def nonfinite(self, t):
        return ~np.isfinite(t("loss"))

    def events(self, t):
        loss, sm, n = t("loss"), t.smoothed_loss, t.n
        bad = self.nonfinite(t)
        start = loss[0] if np.isfinite(loss[0]) else np.nan
        with np.errstate(invalid="ignore"):
            over = np.isfinite(sm) & (sm > DIVERGE_FACTOR * start)
        exploded = np.zeros(n, bool)
        if over[-1]:
            k = n - 1
            while k > 0 and over[k - 1]:
                k -= 1
            if sm[-1] >= EXPLODED_NEAR_PEAK * np.nanmax(sm[k:]):
                exploded[k:] = True
        first_bad = np.flatnonzero(bad | exploded)
        if not len(first_bad):
            return []
        i = int(first_bad[0])
        ev = (f"loss = {loss[i]:.4g}" if bad[i] else
              f"smoothed loss {sm[i]:.4g} > {DIVERGE_FACTOR:g} x start {start:.3g}")
        return [Event(self.kind, int(t.step[i]), int(t.step[-1]), int((bad | exploded).sum()), ev)]

    def at_last(self, t):
        """The debugger's "nan": this step's loss, or the loss after it (full trace), is NaN/inf."""
        loss, after = t("loss")[-1], t("loss_after")[-1]
        has_after = "loss_after" in t.last_keys
        if math.isfinite(loss) and not (has_after and not math.isfinite(after)):
            return None
        return f"loss = {loss:.4g}" + (f", loss after the step = {after:.4g}" if has_after else "")


# the whole-run rules in the order their events are listed (ties at a step keep this order)
RUN_RULES = (Diverged(), Overshoot(), Spike(), Oscillation(), EdgeOfStability(), DeadLayer(), Collapse(), Stall())
# the one-step view's rules, in the order its events are listed: {event name: rule}
STEP_RULES = {"nan": Diverged(), "overshoot": Overshoot(), "spike": Spike(), "dead": DeadLayer(),
              "collapse": Collapse(), "eos": EdgeOfStability()}


def overfit_events(evals):
    """Validation loss OVERFIT_REL above its minimum at the end while the training loss kept falling."""
    if len(evals.get("step", [])) < 3:
        return []
    vl = np.asarray(evals.get("val_loss", []), dtype=np.float64)
    tl = np.asarray(evals.get("train_loss", np.full(len(vl), np.nan)), dtype=np.float64)
    if not np.isfinite(vl).any():
        return []
    j = int(np.nanargmin(vl))
    k = len(vl) - 1
    if j < k and vl[k] > vl[j] * (1 + OVERFIT_REL) and tl[k] < tl[j]:
        return [Event("overfit", int(evals["step"][j]), int(evals["step"][k]), k - j,
                      f"val loss {vl[j]:.3f} -> {vl[k]:.3f} while train loss {tl[j]:.3f} -> {tl[k]:.3f}")]
    return []


def find_events(run):
    """All events of a run (``minicnn.load_run``), sorted by step."""
    t = Trace.of_run(run)
    if t.n == 0:
        return []
    events = [e for rule in RUN_RULES if rule.applies(t) for e in rule.events(t)]
    events += overfit_events(run.evals)
    return sorted(events, key=lambda ev: (ev.step, ev.kind))


def step_events(rec, previous=(), label_entropy=TEN_CLASSES, batch_size=None):
    """The events one step's record shows, as {kind: evidence}: find_events' rules applied to the
    last step, for a debugger that stops when one happens.

    overshoot here is any step that raised its own batch's loss (overshoot_flags), the single
    step a debugger wants to stop at; find_events makes an event of it only for a catapult or
    when it is the rule over a window.
    rec: a step record (minicnn.trace columns); previous: the records of the steps before it,
    oldest first (a spike is judged against the median of the last SPIKE_WINDOW losses; a collapse
    is reported once its episode has lasted COLLAPSE_MIN_STEPS steps, as find_events requires);
    batch_size: the run's, which says whether a training batch may stand in for the probe.
    """
    recent = list(previous)[-max(SPIKE_WINDOW, COLLAPSE_MIN_STEPS - 1):] + [rec]
    t = Trace.of_records(recent, label_entropy, batch_size)
    out = {}
    for kind, rule in STEP_RULES.items():
        evidence = rule.at_last(t)
        if evidence:
            out[kind] = evidence
    return out


# ---------------------------------------------------------------- the event table
def merge_events(events, max_rows=None):
    """The events with nearby episodes of the same kind (and layer) merged, the merge distance doubled
    until at most ``max_rows`` rows remain (default EVENT_ROWS): a 3,000-step run's 178 one-step
    episodes become a couple of dozen readable rows. A merged row counts every flagged step and
    says how many episodes it holds."""
    max_rows = EVENT_ROWS if max_rows is None else max_rows
    rows, gap = list(events), 1
    span = max((e.end for e in events), default=0) + 1
    while len(rows) > max_rows and gap <= span:
        gap *= 2
        rows = _merged(events, gap)
    return sorted(rows, key=lambda e: (e.step, e.kind))


def _merged(events, gap):
    groups = {}
    for e in sorted(events, key=lambda e: e.step):
        key = (e.kind, e.evidence.split(":")[0] if e.kind == "dead" else "")
        groups.setdefault(key, []).append([e])
    out = []
    for chain in groups.values():
        merged = [chain[0]]
        for (e,) in chain[1:]:
            if e.step - merged[-1][-1].end <= gap:
                merged[-1].append(e)
            else:
                merged.append([e])
        for m in merged:
            first = m[0]
            note = f" [{len(m)} episodes, steps {first.step}-{max(x.end for x in m)}]" if len(m) > 1 else ""
            out.append(Event(first.kind, first.step, max(x.end for x in m), sum(x.count for x in m),
                             first.evidence + note))
    return out


def event_summary(events):
    """One line per kind: how many episodes and flagged steps, first and last step."""
    kinds = {}
    for e in events:
        kinds.setdefault(e.kind, []).append(e)
    return [f"{k}: {len(es)} episode{'s' * (len(es) != 1)}, {sum(e.count for e in es)} step"
            f"{'s' * (sum(e.count for e in es) != 1)} flagged, steps {min(e.step for e in es)}-{max(e.end for e in es)}"
            for k, es in kinds.items()]
