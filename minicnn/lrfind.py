"""The learning-rate range test (Smith 2015; fastai's ``lr_find``).

    res = lr_find(TrainConfig(arch="small"), lr_min=1e-6, lr_max=10, steps=200)
    res.suggested_lr, res.blowup_lr, res.two_over_lambda   # and res.lrs, res.losses, res.smoothed
    minicnn.plots.plot_lr_find(res, "lr_find.png")

From fresh weights, one SGD step per batch with the learning rate growing exponentially from
``lr_min`` to ``lr_max`` (lr_t = lr_min * (lr_max / lr_min) ** (t / (steps - 1))), stopping early
once the smoothed loss has exploded. The smoothed loss against lr (log scale) falls while steps
are too small to matter, falls fastest around a good learning rate, bottoms out, and shoots up
when the steps overshoot. Beside it: 2 / lambda_max of the loss Hessian at initialisation -- the
largest lr for which gradient descent on the local quadratic is stable.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from .config import SHARPNESS_SAMPLES, setup, sharpness_batch
from .errors import ConfigError
from .sgd import SGD
from .trace import Sharpness
from .trainer import batch_indices

LRFIND_STEPS = 200
LR_MIN = 1e-6
LR_MAX = 10.0
# exponential moving average of the loss (fastai's beta), with bias correction for the first steps
SMOOTH_BETA = 0.9
# stop once the smoothed loss is this many times its minimum (fastai stops at 4x): it has exploded
STOP_FACTOR = 4.0
# "starts to blow up": the first lr past the minimum where the smoothed loss has given back this
# share of what it had fallen from its start (a classifier thrown off often rises back to ln(classes)
# rather than to a multiple of its minimum), and at least BLOWUP_MIN_RISE nats -- beyond the
# wobble of the EMA near the bottom.
BLOWUP_RISE = 0.5
BLOWUP_MIN_RISE = 0.05
# the first steps of the EMA are too noisy to differentiate; skip this share of the curve
SKIP_START_FRAC = 0.05


@dataclass
class LRFindResult:
    lrs: np.ndarray                   # (T,) the lr of each step taken
    losses: np.ndarray                # (T,) the batch loss before each step
    smoothed: np.ndarray              # (T,) bias-corrected EMA of losses
    suggested_lr: float               # steepest descent of the smoothed loss against log lr
    min_loss_lr: float                # lr at the smoothed loss's minimum
    blowup_lr: float                  # first lr past the minimum where the loss rises back (BLOWUP_RISE)
    lambda_max: float = math.nan      # Hessian's top eigenvalue at initialisation
    two_over_lambda: float = math.nan
    stopped_early: bool = False
    config: dict = field(default_factory=dict)

    def verdict(self, lr):
        """One line on whether ``lr`` is safe for this network, from the measured numbers."""
        parts = []
        if math.isfinite(self.blowup_lr):
            if lr >= self.blowup_lr:
                parts.append(f"lr {lr:g} is past the point where the loss blows up ({self.blowup_lr:.3g}): "
                             f"expect divergence or a run that never learns")
            elif lr > self.min_loss_lr:
                parts.append(f"lr {lr:g} is between the loss minimum ({self.min_loss_lr:.3g}) and the blow-up "
                             f"({self.blowup_lr:.3g}): steps overshoot; expect an unstable, jumpy run")
            else:
                parts.append(f"lr {lr:g} is below the loss minimum of the range test ({self.min_loss_lr:.3g}) "
                             f"and the blow-up ({self.blowup_lr:.3g})")
        else:
            parts.append(f"the loss did not blow up up to lr {self.lrs[-1]:.3g}")
        if math.isfinite(self.two_over_lambda):
            side = "above" if lr > self.two_over_lambda else "below"
            parts.append(f"it is {side} 2/lambda_max at initialisation ({self.two_over_lambda:.3g})"
                         + (": the first steps overshoot along the sharpest direction" if side == "above" else ""))
        return "; ".join(parts)


def exp_lrs(lr_min, lr_max, steps):
    """(steps,) learning rates growing exponentially from lr_min to lr_max."""
    return lr_min * (lr_max / lr_min) ** (np.arange(steps) / max(1, steps - 1))


def ema(values, beta=SMOOTH_BETA):
    """Bias-corrected exponential moving average (fastai's smoothing); NaN/inf stay as they are."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    avg = 0.0
    for i, x in enumerate(v):
        avg = beta * avg + (1 - beta) * x
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def analyse(lrs, losses, beta=SMOOTH_BETA):
    """(smoothed, suggested_lr, min_loss_lr, blowup_lr) of a range test's curve."""
    lrs = np.asarray(lrs, dtype=np.float64)
    sm = ema(losses, beta)
    finite = np.isfinite(sm)
    if not finite.any():
        return sm, math.nan, math.nan, float(lrs[0])
    n_ok = int(np.argmin(finite)) if not finite.all() else len(sm)     # finite prefix
    s = sm[:n_ok]
    i_min = int(np.argmin(s))
    lo = min(int(SKIP_START_FRAC * len(s)), max(0, i_min - 1))
    if i_min - lo >= 2:
        slope = np.gradient(s[lo:i_min + 1], np.log(lrs[lo:i_min + 1]))[:-1]   # strictly before the minimum
        suggested = float(lrs[lo + int(np.argmin(slope))])
    else:
        suggested = float(lrs[max(0, i_min)]) / 10     # no descent seen: Smith's min/10 rule
    start = float(s[0])
    above = np.flatnonzero(s[i_min:] > s[i_min] + max(BLOWUP_MIN_RISE, BLOWUP_RISE * (start - s[i_min])))
    if above.size:
        blowup = float(lrs[i_min + int(above[0])])
    elif n_ok < len(sm):
        blowup = float(lrs[n_ok])           # the loss went to inf/NaN
    else:
        blowup = math.nan
    return sm, suggested, float(lrs[i_min]), blowup


def lr_find(config=None, data=None, lr_min=LR_MIN, lr_max=LR_MAX, steps=LRFIND_STEPS,
            sharpness_samples=SHARPNESS_SAMPLES, on_step=None, **overrides):
    """Run the range test for a TrainConfig's network, data and optimizer settings.

    The config's lr and lr_schedule are replaced by the exponential ramp; momentum, weight decay,
    batch size, init and seed are used as given. sharpness_samples: the batch on which lambda_max is
    measured at initialisation (0: skip it; it costs up to 60 gradient evaluations on that batch).
    Returns an LRFindResult.
    """
    if not (0 < lr_min < lr_max and math.isfinite(lr_max)):
        raise ConfigError(f"--lr-min must be > 0 and below --lr-max, got {lr_min:g} and {lr_max:g}")
    if steps < 10:
        raise ConfigError(f"the range test needs at least 10 steps, got {steps}")
    cfg, data, net = setup(config, data, **overrides)
    n = len(data.y_train)
    lam = math.nan
    if sharpness_samples:
        sb = sharpness_batch(n, cfg.seed, sharpness_samples)
        lam, _ = Sharpness(net, data.x_train[sb], data.y_train[sb], seed=cfg.seed)()
    opt = SGD(lr=lr_min, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    ramp = exp_lrs(lr_min, lr_max, steps)
    losses = []
    best, avg, stopped = math.inf, 0.0, False
    errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore")
    with errstate:
        epoch, t = 0, 0
        while t < steps and not stopped:
            for idx in batch_indices(n, cfg.batch_size, cfg.seed, epoch):
                if t >= steps:
                    break
                xb = np.ascontiguousarray(data.x_train[idx], dtype=net.dtype)
                loss = net.loss(xb, data.y_train[idx])
                losses.append(loss)
                if on_step:
                    on_step({"step": t, "lr": float(ramp[t]), "loss": float(loss)})
                avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * loss
                sm = avg / (1 - SMOOTH_BETA ** (t + 1))
                t += 1
                if not math.isfinite(sm) or sm > STOP_FACTOR * best:
                    stopped = True
                    break
                best = min(best, sm)
                net.backward()
                opt.step([net.flat_params], [net.flat_grads], lr=float(ramp[t - 1]))
            epoch += 1
    lrs = ramp[:len(losses)]
    sm, suggested, min_lr, blowup = analyse(lrs, losses)
    return LRFindResult(lrs, np.array(losses), sm, suggested, min_lr, blowup, lam,
                        2.0 / lam if lam and math.isfinite(lam) and lam > 0 else math.nan,
                        stopped, cfg.to_dict())


def save_csv(res, path):
    """lr, loss, smoothed loss per step (``pandas.read_csv`` / ``numpy.genfromtxt(names=True)``)."""
    with open(path, "w") as f:
        f.write("step,lr,loss,smoothed\n")
        for i, (lr, l, s) in enumerate(zip(res.lrs, res.losses, res.smoothed)):
            f.write(f"{i},{float(lr)!r},{float(l)!r},{float(s)!r}\n")
    return path
