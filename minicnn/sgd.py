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

from .errors import ConfigError
from .ops import on_device


class SGD:
    def __init__(self, lr=0.1, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("dampening", dampening)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"SGD {name} must be a finite number >= 0, got {v!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("Nesterov momentum requires momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.dampening, self.nesterov = float(dampening), bool(nesterov)
        self.buffers = None          # momentum buffers, one per parameter, created on the first step
        self._works = {}             # (param index, name) -> work array of the host update (see _work)

    def direction(self, params, grads):
        """The update direction d of the rule above (without -lr), updating momentum buffers.

        Computed in work buffers kept between steps (no allocation after the first step): the
        arrays returned are overwritten by the next call."""
        out = []
        first = self.buffers is None
        if first and self.momentum:
            self.buffers = [None] * len(params)
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g
            if self.weight_decay:
                d = np.multiply(p, self.weight_decay, out=self._work(i, "decayed", p))
                d += g                                              # g + weight_decay * w
            if self.momentum:
                if first:
                    self.buffers[i] = np.array(d, copy=True)
                else:
                    buf = self.buffers[i]
                    buf *= self.momentum
                    buf += np.multiply(d, 1 - self.dampening, out=self._work(i, "damped", p))
                if self.nesterov:
                    nd = np.multiply(self.buffers[i], self.momentum, out=self._work(i, "nesterov", p))
                    nd += d                                         # d + momentum * buf
                    d = nd
                else:
                    d = self.buffers[i]
            out.append(d)
        return out

    def _work(self, i, name, like):
        """A work array shaped like ``like`` for parameter i, allocated once."""
        a = self._works.get((i, name))
        if a is None or a.shape != like.shape or a.dtype != like.dtype:
            a = self._works[(i, name)] = np.empty_like(like)
        return a

    def step(self, params, grads, lr=None):
        """Update params in place: w -= lr * d. Returns the list of updates applied (-lr * d), in
        work arrays that the next step overwrites (copy them to keep them).

        Device (CUDA) arrays are updated on the device by one kernel per array (the same rule);
        nothing is returned then (the trace measures the update itself, see Trainer.step)."""
        lr = self.lr if lr is None else lr
        if params and on_device(params[0]):
            return self._step_device(params, grads, lr)
        deltas = []
        for i, (p, d) in enumerate(zip(params, self.direction(params, grads))):
            delta = np.multiply(d, -lr, out=self._work(i, "delta", p))
            p += delta
            deltas.append(delta)
        return deltas

    def _step_device(self, params, grads, lr):
        from .ops import cuda as gpu
        first = self.buffers is None
        if self.momentum:
            if first:
                self.buffers = [gpu.empty(p.shape, p.dtype) for p in params]
            elif not on_device(self.buffers[0]):           # loaded from a checkpoint
                self.buffers = [gpu.to_device(np.ascontiguousarray(b, dtype=p.dtype))
                                for b, p in zip(self.buffers, params)]
        bufs = self.buffers if self.momentum else None
        gpu.sgd_update(list(params), list(grads), bufs, lr, self.momentum, self.weight_decay,
                       self.dampening, self.nesterov, first)

    def state_dict(self):
        """Momentum buffers as host (NumPy) copies, wherever they live."""
        if self.buffers is None:
            return {"buffers": None}
        return {"buffers": [b.copy_to_host() if on_device(b) else b.copy() for b in self.buffers]}

    def load_state_dict(self, state):
        """Host arrays; a device run uploads them on its next step."""
        bufs = state.get("buffers")
        self.buffers = None if bufs is None else [np.array(b, copy=True) for b in bufs]


# --------------------------------------------------------------------------- schedules
SCHEDULE_HELP = ("constant | step:EVERY[:GAMMA] | cosine[:MIN_LR] | linear[:END_LR] | exp:GAMMA, "
                 "each optionally prefixed by warmup:STEPS+ (e.g. warmup:200+cosine), or an explicit "
                 "piecewise list STEP:LR,... such as 0:0.01,500:1.0,501:0.01 (lr from that step on)")


class Schedule:
    """lr(step) for step = 0, 1, ...; built from a spec string by ``parse_schedule``."""

    def __init__(self, fn, spec):
        self.fn, self.spec = fn, spec

    def __call__(self, step):
        return float(self.fn(step))

    def __repr__(self):
        return f"Schedule('{self.spec}')"


def parse_schedule(spec, base_lr, total_steps):
    """Parse a schedule spec (see SCHEDULE_HELP) into a Schedule over total_steps steps."""
    spec = (spec or "constant").strip()
    bad = ConfigError(f"bad --lr-schedule '{spec}'; accepted: {SCHEDULE_HELP}")
    total = max(int(total_steps), 1)
    try:
        if re.fullmatch(r"\d+:[^,]+(,\d+:[^,]+)*", spec) and not spec.startswith(("step", "warmup")):
            points = sorted((int(s), float(v)) for s, v in (p.split(":") for p in spec.split(",")))
            if points[0][0] != 0:
                points.insert(0, (0, base_lr))
            if any(not math.isfinite(v) or v < 0 for _, v in points):
                raise bad
            steps = np.array([s for s, _ in points])
            lrs = [v for _, v in points]
            return Schedule(lambda t: lrs[int(np.searchsorted(steps, t, side="right")) - 1], spec)
        warm = 0
        body = spec
        if spec.startswith("warmup:"):
            head, _, body = spec.partition("+")
            warm = int(head.split(":")[1])
            body = body or "constant"
        name, *args = body.split(":")
        args = [float(a) for a in args]
        if name == "constant" and not args:
            main = lambda t: base_lr
        elif name == "step" and 1 <= len(args) <= 2 and args[0] >= 1:
            every, gamma = int(args[0]), (args[1] if len(args) == 2 else 0.1)
            main = lambda t: base_lr * gamma ** (t // every)
        elif name == "cosine" and len(args) <= 1:
            lo = args[0] if args else 0.0
            main = lambda t: lo + (base_lr - lo) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        elif name == "linear" and len(args) <= 1:
            end = args[0] if args else 0.0
            main = lambda t: base_lr + (end - base_lr) * min(t, total) / total
        elif name == "exp" and len(args) == 1:
            main = lambda t: base_lr * args[0] ** t
        else:
            raise bad
        if warm < 0:
            raise bad
        if warm:
            return Schedule(lambda t: main(t) * min(1.0, (t + 1) / warm), spec)
        return Schedule(main, spec)
    except (ValueError, IndexError):
        raise bad from None
