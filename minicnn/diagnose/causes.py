"""Causes: for a verdict, the most likely reason among those the trace can tell apart, the evidence
for it, and what to try -- as data (``Cause``), with the change ``minicnn.verify`` can replay.

Each test reads the run's own record: its lr per step, config (batch size, momentum, weight decay),
the input statistics and first loss in config.json / steps.csv, the first logits, the probe, the
weight norms. "No cause found" is an allowed answer.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from .thresholds import (
    CHANCE_MARGIN,
    DEAD_LAYER,
    EOS_RATIO,
    FIRST_LOSS_FACTOR,
    INIT_LOGIT_MAX,
    INPUT_ABS_MAX,
    LR_SPIKE_FACTOR,
    MEMORISED_TRAIN_ACC,
    MOMENTUM_HIGH,
    NOISE_BATCH_FACTOR,
    NOISE_MIN_MEASUREMENTS,
    NOISE_WINDOW,
    SLOW_UPDATE_RATIO,
    SPIKE_FACTOR,
    TINY_BATCH,
    WD_SHRINK,
    WD_STEP_DECAY,
)

CAUSES = ("lr_too_high", "lr_spike", "lr_too_low", "inputs_unnormalised", "init_scale", "dead_init", "tiny_batch",
          "gradient_noise", "weight_decay", "momentum", "labels", "none")


@dataclass
class Cause:
    name: str                  # one of CAUSES
    title: str                 # what the cause is, in a line
    evidence: list = field(default_factory=list)   # the numbers that point at it
    fix: str = ""              # what to try
    change: dict = None        # the fix as data, for minicnn.verify (None: nothing to replay)

    @property
    def text(self):
        lines = [f"likely cause: {self.title}"] + [f"  evidence: {e}" for e in self.evidence]
        return "\n".join(lines + ([f"  try: {self.fix}"] if self.fix else []))


NO_CAUSE = Cause("none", "no cause found among those the trace can tell apart (lr, its schedule, inputs, "
                 "initialisation, batch size, gradient noise, momentum, weight decay, labels)")


class Signs:
    """What the cause tests read, computed once: config, input statistics, first loss and logits."""

    def __init__(self, lv, config, onset_is_a_step=True):
        self.lv, self.t = lv, lv.t
        self.onset_is_a_step = onset_is_a_step       # False: the verdict's step marks a period, not one step
        self.cfg = config.get("config", {})
        self.foreign = bool(config.get("source"))     # recorded outside minicnn: no minicnn options to name
        self.inputs = config.get("input_stats") or {}
        self.classes = config.get("num_classes", 10)

    def first(self, name):
        v = self.t(name)
        at = np.flatnonzero(np.isfinite(v))
        return float(v[at[0]]) if len(at) else math.nan

    def median_before(self, name, i, window=50):
        v = self.t(name)[max(0, i - window):i]
        v = v[np.isfinite(v)]
        return float(np.median(v)) if len(v) else math.nan


# ---------------------------------------------------------------- the tests, one per cause
def lr_spike(s, T):
    """The lr at the onset far above the lr of the steps before it (a one-step jump in the schedule)."""
    if T is None or T == 0:
        return None
    lr = s.t("lr")
    if not s.onset_is_a_step:          # T marks a period (learned, then worse): the first jump in it, if any
        with np.errstate(invalid="ignore"):
            ups = np.flatnonzero(lr[T:][1:] > lr[T:][:-1]) + T + 1
        jumps = [j for j in ups if lr[j] >= LR_SPIKE_FACTOR * s.median_before("lr", j)]
        T = int(jumps[0]) if jumps else T
    before = s.median_before("lr", T)
    if not (np.isfinite(before) and before > 0 and lr[T] >= LR_SPIKE_FACTOR * before):
        return None
    end = T
    while end + 1 < s.t.n and lr[end + 1] >= LR_SPIKE_FACTOR * before:
        end += 1
    steps = list(range(int(s.t.step[T]), int(s.t.step[end]) + 1))
    where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    return Cause("lr_spike", f"an outsized learning rate at {where}: {lr[T]:g}, {lr[T] / before:.0f}x the "
                 f"{before:g} of the steps before",
                 [f"lr {lr[T]:g} at step {steps[0]} against a median {before:g} over the 50 steps before"],
                 f"keep the lr at {before:g} at {where} (remove the jump from "
                 f"{'the schedule' if s.foreign else '--lr-schedule'})",
                 {"kind": "lr_at", "steps": steps, "lr": before, "from_step": steps[0]})


def inputs(s, T):
    """Un-normalised inputs: pixel values far outside [0, 1] / a standardised range."""
    top = max(abs(s.inputs.get("max", 0.0)), abs(s.inputs.get("min", 0.0)))
    if not top > INPUT_ABS_MAX:
        return None
    first = s.first("loss")
    ev = [f"inputs range {s.inputs.get('min', math.nan):.3g}..{s.inputs.get('max', math.nan):.3g} "
          f"(mean {s.inputs.get('mean', math.nan):.3g}, std {s.inputs.get('std', math.nan):.3g})"]
    if np.isfinite(first):
        ev.append(f"first loss {first:.4g} against ln {s.classes} = {math.log(s.classes):.3f} for a "
                  f"constant prediction")
    scale = s.cfg.get("input_scale", 1.0) or 1.0
    return Cause("inputs_unnormalised", f"un-normalised inputs (values up to {top:.4g})", ev,
                 f"normalise the inputs to [0, 1] (divide by {top:.4g}) or standardise them",
                 {"kind": "restart", "config": {"input_scale": scale / top}})


def init_scale(s, T):
    """Weights initialised far too large: huge first logits with normal inputs."""
    logit = s.first("logit_max")
    if not np.isfinite(logit):
        logit = s.first("probe_logit_max")
    first = s.first("loss")
    big_loss = np.isfinite(first) and first > FIRST_LOSS_FACTOR * max(s.lv.t.label_entropy, 1e-9)
    if not ((np.isfinite(logit) and logit > INIT_LOGIT_MAX) or (not np.isfinite(logit) and big_loss)):
        return None
    ev = [f"largest |logit| at step 0: {logit:.4g} (a fresh network with PyTorch's init gives O(1))"]
    if np.isfinite(first):
        ev.append(f"first loss {first:.4g} against ln {s.classes} = {math.log(s.classes):.3f}")
    scale = f" (init scale {s.cfg['init_scale']:g})" if "init_scale" in s.cfg else ""
    return Cause("init_scale", f"an initialisation far too large{scale}", ev,
                 "initialise at PyTorch's default scale" + ("" if s.foreign else " (--init torch --init-scale 1)"),
                 {"kind": "restart", "config": {"init": "torch", "init_scale": 1.0}})


def dead_init(s, T):
    """Every unit of a layer dead from the initialisation, before any step."""
    src = s.t.unit_source()
    if src is None:
        return None
    dead = {name: s.first(src + name) for name in s.t.relu_layers()}
    dead = {k: v for k, v in dead.items() if np.isfinite(v) and v >= DEAD_LAYER}
    if not dead:
        return None
    ev = [f"{k}: {100 * v:.0f}% of units dead {s.t.where()} at step 0" for k, v in dead.items()]
    return Cause("dead_init", "an initialisation that leaves the ReLUs dead (negative biases / pre-activations)", ev,
                 "initialise so that units start alive (" + ("He or PyTorch's default" if s.foreign else
                                                               "--init he or torch") + "; no large negative biases)",
                 {"kind": "restart", "config": {"init": "he"}})


def momentum(s, T):
    m = s.cfg.get("momentum") or 0.0
    if m < MOMENTUM_HIGH:
        return None
    lr = s.cfg.get("lr", math.nan)
    return Cause("momentum", f"momentum {m:g}: each gradient keeps acting for ~{1 / (1 - m):.0f} steps, so the "
                 f"effective step is lr/(1-m) = {lr / (1 - m):.3g}",
                 [f"momentum {m:g} with lr {lr:g}"],
                 "lower the momentum to 0.9 (or divide the lr by 10)",
                 {"kind": "restart", "config": {"momentum": 0.9}})


def tiny_batch(s, T):
    b = s.cfg.get("batch_size") or 0
    if not (0 < b <= TINY_BATCH):
        return None
    ev = [f"batches of {b}: one image's gradient is {100 / b:.0f}% of a step"]
    if T is not None and s.onset_is_a_step:
        loss_T, usual = s.t("loss")[T], s.median_before("loss", T)
        if np.isfinite(loss_T) and np.isfinite(usual) and loss_T > SPIKE_FACTOR * usual:
            ev.append(f"the batch at step {int(s.t.step[T])} had loss {loss_T:.3g} against a median {usual:.3g}: "
                      f"one confidently wrong image made the step")
    noise = noise_scale(s, T)
    if noise is not None:
        ev.append(noise_evidence(noise, b))
    lr = s.t("lr")[T if T is not None else 0]
    return Cause("tiny_batch", f"tiny batches ({b} images): a single image's gradient can make a whole step", ev,
                 f"use batches of 32 or more, or divide the lr by 10 (to {lr / 10:g})",
                 {"kind": "lr_scale", "from_step": _step(s, T), "factor": 0.1})


def noise_scale(s, T):
    """(B_noise, measurements, first step, last step) over the noise measurements of the NOISE_WINDOW
    steps up to the onset (from the start: the first NOISE_WINDOW steps), numerator and denominator
    averaged before dividing; None without NOISE_MIN_MEASUREMENTS of them."""
    trs, gsq = s.t("tr_sigma"), s.t("grad_sq_unbiased")
    step = s.t.step
    end = int(step[T]) if T else NOISE_WINDOW
    at = np.flatnonzero(np.isfinite(trs) & np.isfinite(gsq) & (step <= end) & (step >= end - NOISE_WINDOW))
    if len(at) < NOISE_MIN_MEASUREMENTS:
        return None
    num, den = float(np.mean(trs[at])), float(np.mean(gsq[at]))
    bn = num / den if den > 0 else math.inf
    return bn, len(at), int(step[at[0]]), int(step[at[-1]])


def noise_evidence(noise, b):
    bn, n, a, z = noise
    snr = f"SNR B/B_noise {b / bn:.2g}" if math.isfinite(bn) else "the noise swamps the signal estimate"
    return (f"gradient noise scale B_noise = tr(Sigma)/|g|^2 = {bn:.3g} (averaged over {n} measurements, steps "
            f"{a}-{z}) against batches of {b}: {snr}")


def gradient_noise(s, T):
    """Batch size << B_noise (measured, --noise-every): the steps are mostly noise -- and, where
    lambda_max is measured, not a step too large for the curvature (lr x lambda_max < 2 before the onset)."""
    b = s.cfg.get("batch_size") or 0
    noise = noise_scale(s, T)
    if noise is None or not (b > 0 and noise[0] >= NOISE_BATCH_FACTOR * b):
        return None
    ev = [noise_evidence(noise, b)]
    lam = s.t("lambda_max")
    i = T or 0
    near = np.flatnonzero(np.isfinite(lam[:i + 1]))
    if len(near):
        j = near[-1]
        prod = s.t("lr")[j] * lam[j]
        if prod >= EOS_RATIO:
            return None
        ev.append(f"lr x lambda_max = {prod:.3g} at step {int(s.t.step[j])}: below 2, the curvature alone "
                  f"would let the steps descend")
    lr = s.t("lr")[i]
    return Cause("gradient_noise", f"batches far smaller than the gradient noise scale ({b} against B_noise "
                 f"{noise[0]:.3g}): the steps are mostly noise", ev,
                 f"use batches of ~{min(noise[0], 1e6):.0f} images, or divide the lr by 10 (to {lr / 10:g}) "
                 f"from step {_step(s, T)}",
                 {"kind": "lr_scale", "from_step": _step(s, T), "factor": 0.1})


def weight_decay(s, T):
    wd, lr = s.cfg.get("weight_decay") or 0.0, s.cfg.get("lr") or 0.0
    wn = s.t("weight_norm")
    ok = np.isfinite(wn)
    if not (wd * lr >= WD_STEP_DECAY and ok.sum() >= 2):
        return None
    w0, w1 = wn[ok][0], wn[ok][-1]
    if not w1 < WD_SHRINK * w0:
        return None
    return Cause("weight_decay", f"weight decay {wd:g} at lr {lr:g}: each step shrinks the weights by "
                 f"{100 * wd * lr:.1f}% before the gradient acts",
                 [f"the weight norm fell from {w0:.3g} to {w1:.3g}"],
                 f"divide the weight decay by 100 (to {wd / 100:g})",
                 {"kind": "restart", "config": {"weight_decay": wd / 100}})


def lr_too_high(s, T):
    lr = s.t("lr")
    i = T or 0
    ev = []
    lam = s.t("lambda_max")
    near = np.flatnonzero(np.isfinite(lam[:i + 1]))
    if len(near):
        j = near[-1]
        ev.append(f"lr x lambda_max = {lr[j] * lam[j]:.3g} at step {int(s.t.step[j])} "
                  f"({'above' if lr[j] * lam[j] >= EOS_RATIO else 'below'} the stability limit 2)")
    if np.isfinite(s.lv.over_share):
        ev.append(f"{100 * s.lv.over_share:.0f}% of steps raised their own batch's loss")
    ratios = [s.t(f"update_ratio.{name}")[i] for name in s.t.param_layers()]
    ratios = [r for r in ratios if np.isfinite(r)]
    if ratios:
        ev.append(f"the update at step {int(s.t.step[i])} moved a layer by {100 * max(ratios):.0f}% of its norm")
    return Cause("lr_too_high", f"a learning rate too large for the curvature (lr {lr[i]:g})", ev,
                 f"divide the lr by 10 (to {lr[i] / 10:g}) from step {int(s.t.step[i])}",
                 {"kind": "lr_scale", "from_step": int(s.t.step[i]), "factor": 0.1})


def lr_too_low(s, T):
    ratios = np.vstack([s.t(f"update_ratio.{n}") for n in s.t.param_layers()]) if s.t.param_layers() else None
    if ratios is None or not np.isfinite(ratios).any():
        return None
    med = float(np.nanmedian(np.nanmax(ratios, axis=0)))
    if not med < SLOW_UPDATE_RATIO:
        return None
    lr = s.cfg.get("lr", math.nan)
    return Cause("lr_too_low", f"a learning rate too small to move the weights (lr {lr:g})",
                 [f"the median step moved the weights by {100 * med:.3g}% of their norm"],
                 f"multiply the lr by 10 (to {lr * 10:g})", {"kind": "lr_scale", "from_step": 0, "factor": 10.0})


def labels(s, T):
    e = s.lv.t_evals
    if not e or len(e.get("val_acc", [])) < 2:
        return None
    chance = 1.0 / s.classes
    va, ta = float(np.nanmax(e["val_acc"])), float(e["train_acc"][-1])
    if not (va <= chance + CHANCE_MARGIN and ta >= MEMORISED_TRAIN_ACC):
        return None
    return Cause("labels", "labels that do not follow the images: the network memorises the training set",
                 [f"train accuracy {100 * ta:.0f}% while the best validation accuracy is {100 * va:.0f}% "
                  f"(chance {100 * chance:.0f}%)"],
                 "check that the labels belong to their images (a shuffle applied to one and not the other?)")


def _step(s, T):
    return int(s.t.step[T]) if T is not None else 0


# ---------------------------------------------------------------- the choice
# Which causes can explain which verdict, most specific first: a cause whose evidence is a fact of
# the setup (an lr spike in the schedule, inputs or an init far off) beats the generic "lr too high";
# measured gradient noise (only with --noise-every) comes after the setup's causes (a batch of <= 4
# is tiny_batch, whose evidence then includes the noise; weight decay is a setting too) and before
# the generic lr.
CANDIDATES = {
    "diverged": (lr_spike, inputs, init_scale, momentum, tiny_batch, lr_too_high),
    "collapse": (lr_spike, inputs, init_scale, dead_init, momentum, tiny_batch, weight_decay, gradient_noise,
                 lr_too_high),
    "unstable": (lr_spike, inputs, init_scale, momentum, tiny_batch, gradient_noise, lr_too_high),
    "stuck": (dead_init, inputs, init_scale, weight_decay),
    "slow": (weight_decay, lr_too_low),
    "overfitting": (labels,),
}


def find_cause(lv, verdict, T, config, onset_is_a_step=True):
    """The most likely cause of ``verdict`` (decisive index T or None), or NO_CAUSE."""
    s = Signs(lv, config, onset_is_a_step)
    for test in CANDIDATES.get(verdict, ()):
        cause = test(s, T)
        if cause is not None and cause.evidence:      # a cause the record shows nothing of is not named
            return cause
    return NO_CAUSE
