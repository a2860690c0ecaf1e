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
from .ops import backend_of, on_device


class SGD:
    """torch.optim.SGD's update rule on lists of arrays (host or device, see minicnn.ops):

        opt = SGD(lr=0.1, momentum=0.9)
        opt.step(net.params, grads)                       # or [net.flat_params], [net.flat_grads]

    The update itself is a backend op (``sgd_update`` in ref, cpu and cuda, the same formula),
    run where the parameters live.
    """

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
        self._work = {}              # the update's intermediate arrays, kept between steps

    def step(self, params, grads, lr=None):
        """Update params in place: w -= lr * d (the rule in the module docstring), with the
        optimizer's lr unless ``lr`` is given. Lists that are views of one flat buffer each
        (net.params and the gradients of net.loss_and_grads) are updated through the buffers,
        in one pass (the same arithmetic per element)."""
        lr = self.lr if lr is None else lr
        flat_p, flat_g = _flat_buffer(params), _flat_buffer(grads)
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
