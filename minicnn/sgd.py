"""Plain SGD (with optional momentum, dampening, Nesterov, weight decay) and learning-rate schedules.

The update is torch.optim.SGD's, written out so that every step is a formula you can check:

    g   = grad + weight_decay * w
    buf = g                                   (first step)
    buf = momentum * buf + (1 - dampening) * g   (later steps)
    d   = g + momentum * buf  if nesterov  else  buf        (d = g when momentum == 0)
    w   = w - lr * d
"""
import math
import re

import numpy as np

from .errors import ArgumentTypeError, ConfigError
from .ops import backend_of, on_device

# accepted ranges, (low, high, high included): momentum below 1 -- at 1 the buffer never decays
# (buf = buf + g), so every past gradient counts forever and the step grows without bound (PyTorch
# accepts it; it is never what a run wants); dampening in [0, 1], the share of the new gradient dropped
RANGES = {"lr": (0.0, math.inf, False), "momentum": (0.0, 1.0, False), "dampening": (0.0, 1.0, True),
          "weight_decay": (0.0, math.inf, False)}


def check_hyper(name, v):
    """``v`` as a float if it is a number in RANGES[name], else a one-line error naming ``name``."""
    lo, hi, closed = RANGES[name]
    accepted = f"a finite number in [{lo:g}, {hi:g}{']' if closed else ')'}" if math.isfinite(hi) else \
        f"a finite number >= {lo:g}"
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"SGD {name} must be {accepted}, got {type(v).__name__} {v!r}")
    if not (math.isfinite(v) and lo <= v and (v <= hi if closed else v < hi)):
        why = " (at 1 the momentum buffer never decays: every past gradient would count forever)" \
            if name == "momentum" and v == 1 else ""
        raise ConfigError(f"SGD {name} must be {accepted}, got {v!r}{why}")
    return float(v)


class SGD:
    """torch.optim.SGD's update rule on lists of arrays (host or device, see minicnn.ops):

        opt = SGD(lr=0.1, momentum=0.9)
        opt.step(net.params, grads)                       # or [net.flat_params], [net.flat_grads]

    The update itself is a backend op (``sgd_update`` in ref, cpu and cuda, the same formula),
    run where the parameters live.
    """

    def __init__(self, lr=0.1, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        lr, momentum, weight_decay, dampening = (check_hyper(n, v) for n, v in (
            ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("dampening", dampening)))
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.dampening, self.nesterov = dampening, bool(nesterov)
        self.buffers = None          # momentum buffers, one per parameter, created on the first step
        self._work = {}              # the update's intermediate arrays, kept between steps

    def step(self, params, grads, lr=None):
        """Update params in place: w -= lr * d (the rule in the module docstring), with the
        optimizer's lr unless ``lr`` is given. params and grads: lists of arrays of the same
        shapes, in the same order. Lists that are views of one flat buffer each (net.params and the
        gradients of net.loss_and_grads) are updated through the buffers, in one pass (the same
        arithmetic per element)."""
        lr = self.lr if lr is None else check_hyper("lr", lr)
        flat_p, flat_g = _flat_buffer(params), _flat_buffer(grads)
        if flat_p is None or flat_g is None or params.layout is not grads.layout:
            check_pairs(params, grads)     # (views of one layout, as net.params and loss_and_grads' are, match)
        if (flat_p is not None and flat_g is not None and len(params) == len(grads)
                and flat_p.size == flat_g.size and flat_p.dtype == flat_g.dtype):
            params, grads = [flat_p], [flat_g]
        ops = backend_of(params[0] if params else None)
        first = self.buffers is None
        if self.momentum:
            if not first:
                self.buffers = _buffers_like(self.buffers, params)
            if first:
                self.buffers = [ops.empty(p.shape, p.dtype) for p in params]
            elif on_device(params[0]) and not on_device(self.buffers[0]):      # loaded from a checkpoint
                self.buffers = [ops.to_device(np.ascontiguousarray(b, dtype=p.dtype))
                                for b, p in zip(self.buffers, params)]
        ops.sgd_update(list(params), list(grads), self.buffers if self.momentum else None, lr, self.momentum,
                       self.weight_decay, self.dampening, self.nesterov, first, work=self._work)

    def state_dict(self):
        """Momentum buffers as host (NumPy) copies, wherever they live (one flat buffer after
        steps on flat buffers, as train() makes)."""
        if self.buffers is None:
            return {"buffers": None}
        return {"buffers": [b.copy_to_host() if on_device(b) else b.copy() for b in self.buffers]}

    def load_state_dict(self, state):
        """Host arrays; a device run uploads them on its next step."""
        bufs = state.get("buffers")
        self.buffers = None if bufs is None else [np.array(b, copy=True) for b in bufs]


def check_pairs(params, grads):
    """params and grads: lists (or tuples) of arrays, as many of each, each gradient the shape of its
    parameter -- else a one-line error (a missing gradient would silently leave its parameter as it is)."""
    for name, v in (("params", params), ("grads", grads)):
        if not isinstance(v, (list, tuple)):
            raise ArgumentTypeError(f"SGD.step: {name} must be a list of arrays, got {type(v).__name__}")
    if len(params) != len(grads):
        raise ConfigError(f"SGD.step: {len(params)} params but {len(grads)} grads; give one gradient per parameter")
    for i, (p, g) in enumerate(zip(params, grads)):
        if not hasattr(g, "shape") or tuple(g.shape) != tuple(p.shape):
            got = tuple(g.shape) if hasattr(g, "shape") else type(g).__name__
            raise ConfigError(f"SGD.step: grads[{i}] has shape {got}, its parameter {tuple(p.shape)}; "
                              f"accepted: one array of its parameter's shape per parameter")


def _flat_buffer(arrays):
    """The flat buffer a list of views covers (see network.FlatViews), or None."""
    buffer = getattr(arrays, "buffer", None)
    return buffer() if callable(buffer) else None


def _buffers_like(bufs, params):
    """Momentum buffers shaped as params: as they are, the views of one flat buffer as the
    parameters' shapes, or several buffers joined into one flat one (steps on per-parameter lists
    and on flat buffers may alternate; the state is the same numbers either way)."""
    if len(bufs) == len(params) and all(b.shape == p.shape for b, p in zip(bufs, params)):
        return bufs
    if sum(b.size for b in bufs) != sum(p.size for p in params):
        raise ConfigError(f"SGD.step: the momentum buffers hold {sum(b.size for b in bufs)} numbers but the "
                          f"parameters {sum(p.size for p in params)}; use one optimizer per set of parameters")
    if len(bufs) == 1:
        flat = bufs[0].reshape(-1)
    elif on_device(bufs[0]):
        raise ConfigError("SGD.step: cannot join per-parameter device momentum buffers into one")
    else:
        flat = np.concatenate([b.ravel() for b in bufs])
    sizes = np.cumsum([0] + [p.size for p in params])
    return [flat[a:b].reshape(p.shape) for a, b, p in zip(sizes, sizes[1:], params)]


# --------------------------------------------------------------------------- schedules
SCHEDULE_HELP = ("constant | step:EVERY[:GAMMA] | cosine[:MIN_LR] | linear[:END_LR] | exp:GAMMA, "
                 "each optionally prefixed by warmup:STEPS+ (e.g. warmup:200+cosine), or an explicit "
                 "piecewise list STEP:LR,... such as 0:0.01,500:1.0,501:0.01 (lr from that step on)")


class Schedule:
    """lr(step) for step = 0, 1, ...; built from a spec string by ``parse_schedule``."""

    def __init__(self, fn, spec):
        self.fn, self.spec = fn, spec
        # cosine and linear run over the run's length: another total_steps changes every step's lr
        self.depends_on_total = bool(re.search(r"(^|\+)(cosine|linear)(:|$)", spec))

    def __call__(self, step):
        return float(self.fn(step))

    def __repr__(self):
        return f"Schedule('{self.spec}')"


# the whole schedule is checked before training (every step's lr finite and >= 0); runs longer than
# this are checked on this many evenly spaced steps, both ends included (every schedule here is
# monotone or piecewise constant, so its extremes are at the ends or at its named points)
# (and a piecewise list's own values are checked directly). 100,000 evaluations take ~0.1 s.
SCHEDULE_CHECK_MAX = 100_000


def parse_schedule(spec, base_lr, total_steps):
    """Parse a schedule spec (see SCHEDULE_HELP) into a Schedule over total_steps steps.

    The lr of every step must be a finite number >= 0: a schedule that goes negative or NaN
    anywhere in the run (cosine:-1, exp:nan, ...) is a ConfigError here, before training."""
    if spec is not None and not isinstance(spec, str):
        raise ArgumentTypeError(f"--lr-schedule must be a string, got {type(spec).__name__} {spec!r}; "
                                f"accepted: {SCHEDULE_HELP}")
    spec = (spec or "constant").strip()
    bad = ConfigError(f"bad --lr-schedule '{spec}'; accepted: {SCHEDULE_HELP}")
    total = max(int(total_steps), 1)
    try:
        if re.fullmatch(r"\d+:[^,]+(,\d+:[^,]+)*", spec) and not spec.startswith(("step", "warmup")):
            fn = _piecewise(spec, base_lr)
        else:
            fn = _named(spec, base_lr, total, bad)
    except ConfigError:
        raise
    except (ValueError, IndexError, OverflowError, ZeroDivisionError):
        raise bad from None
    schedule = Schedule(fn, spec)
    _check_every_step(schedule, spec, total)
    return schedule


def _piecewise(spec, base_lr):
    """STEP:LR,...: the lr from each step on (steps strictly increasing; before the first, base_lr)."""
    points = [(int(s), float(v)) for s, v in (p.split(":") for p in spec.split(","))]
    for (s0, _), (s1, _) in zip(points, points[1:]):
        if s1 <= s0:
            raise ConfigError(f"bad --lr-schedule '{spec}': {s1} comes after {s0}; accepted: a piecewise list "
                              f"STEP:LR,... with increasing steps, e.g. 0:0.01,500:1.0,501:0.01")
    for s, v in points:
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"bad --lr-schedule '{spec}': lr {v:g} from step {s}; accepted: learning rates "
                              f"that are finite numbers >= 0")
    if points[0][0] != 0:
        points.insert(0, (0, base_lr))
    steps = np.array([s for s, _ in points])
    lrs = [v for _, v in points]

    def lr(t):
        return lrs[int(np.searchsorted(steps, t, side="right")) - 1]
    return lr


def _named(spec, base_lr, total, bad):
    """constant | step:EVERY[:GAMMA] | cosine[:MIN] | linear[:END] | exp:GAMMA, after an optional warmup:N+."""
    warm, body = 0, spec
    if spec.startswith("warmup:"):
        head, _, body = spec.partition("+")
        warm = int(head.split(":")[1])
        body = body or "constant"
    name, *args = body.split(":")
    args = [float(a) for a in args]
    if name == "constant" and not args:
        def main(t):
            return base_lr
    elif name == "step" and 1 <= len(args) <= 2 and args[0] >= 1:
        every, gamma = int(args[0]), (args[1] if len(args) == 2 else 0.1)

        def main(t):
            return base_lr * gamma ** (t // every)
    elif name == "cosine" and len(args) <= 1:
        lo = args[0] if args else 0.0

        def main(t):
            return lo + (base_lr - lo) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    elif name == "linear" and len(args) <= 1:
        end = args[0] if args else 0.0

        def main(t):
            return base_lr + (end - base_lr) * min(t, total) / total
    elif name == "exp" and len(args) == 1:
        def main(t):
            return base_lr * args[0] ** t
    else:
        raise bad
    if warm < 0:
        raise bad
    if not warm:
        return main

    def warmed(t):
        return main(t) * min(1.0, (t + 1) / warm)
    return warmed


def _check_every_step(schedule, spec, total):
    steps = range(total) if total <= SCHEDULE_CHECK_MAX else np.unique(
        np.linspace(0, total - 1, SCHEDULE_CHECK_MAX).astype(np.int64))
    for t in steps:
        try:
            lr = schedule(int(t))
        except (OverflowError, ZeroDivisionError):
            lr = math.inf
        if not (math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"--lr-schedule '{spec}' gives lr {lr:g} at step {int(t)}; every step's lr must be "
                              f"a finite number >= 0 (accepted: {SCHEDULE_HELP})")
