"""The per-step trace: what each SGD step did, in numbers, written as it happens.

Levels
    off    only the step's loss and lr (needed for the loss curve)
    light  what the step's own forward/backward gives: gradient/weight/update norms per layer,
           gradient cosine with the previous step, dead ReLU fractions, logit statistics
    full   light + one more forward/backward on the SAME batch after the update: the loss after
           the step (the direct test of overshoot), the first-order prediction -lr*<g, d> beside
           the actual change, and Cockpit's alpha from a quadratic fitted along the step

Sharpness (every K steps, any level): lambda_max of the loss Hessian on a fixed batch by power
iteration on Hessian-vector products from centred finite differences of gradients (no autograd),
reported beside 2/lr, the stability threshold of gradient descent on a quadratic.

Every quantity is computed here (StepMeter, step_norms, alpha_from_step, Sharpness; the dead
fractions and logit statistics are backend reductions, see Network.trace_stats); the run directory
(minicnn.rundir) writes the records as steps.csv.
"""
import math

import numpy as np

TRACE_LEVELS = ("off", "light", "full")      # documented above

# Power iteration for lambda_max: stop when the estimate changes by less than this (relative),
# or after POWER_ITERS_MAX iterations (each costs two gradient evaluations).
POWER_TOL = 1e-3
POWER_ITERS_MAX = 30
# Finite-difference step for Hessian-vector products, relative to the weight norm: in float64
# the centred difference error is O(eps^2 * third derivative) while rounding is O(1e-16 / eps);
# 1e-4 of ||w|| balances both for the networks here.
HVP_REL_EPS = 1e-4


def columns(net, level, sharpness, probe=False):
    """Column names of the trace for a network and trace level (probe: with the probe's columns)."""
    cols = ["step", "epoch", "lr", "loss", "time_s"]
    if level in ("light", "full"):
        cols += ["grad_norm", "weight_norm", "update_norm", "grad_cos", "logit_max", "entropy",
                 "top_class_share", "batch_acc"]
        for name, _ in net.param_layers():
            cols += [f"grad_norm.{name}", f"weight_norm.{name}", f"update_ratio.{name}"]
        cols += [f"dead.{layer.name}" for layer in net.layers if layer.kind == "relu"]
    if level == "full":
        cols += ["loss_after", "loss_change", "predicted_change", "alpha"]
    if sharpness:
        cols += ["lambda_max", "two_over_lr", "hvp_evals"]
    if probe and level != "off":
        cols += probe_columns(net)
    return cols


def probe_columns(net):
    return ([f"probe_{k}" for k in PROBE_STATS]
            + [f"probe_dead.{layer.name}" for layer in net.layers if layer.kind == "relu"])


# --------------------------------------------------------------------------- the probe
PROBE_STATS = ("loss", "acc", "top_class_share", "logit_max", "entropy")


class Probe:
    """The network's units and predictions on a fixed set of held-out images (every K steps):
    the loss and accuracy on them, the share predicted as the most common class, the largest
    |logit|, the mean softmax entropy, and per ReLU layer the share of units zero on every image.

    Unlike the same numbers on the training batch these do not depend on which (or how few)
    images a step drew: a unit zero for all probe images is dead, a probe predicted as one class
    is a constant prediction."""

    def __init__(self, net, x, y):
        self.net = net
        self.x = np.ascontiguousarray(x, dtype=net.dtype)
        self.y = np.ascontiguousarray(y, dtype=np.int64)

    def __call__(self):
        loss = self.net.loss(self.x, self.y)
        st = self.net.trace_stats()
        rec = {"probe_loss": loss, "probe_acc": st.pop("batch_acc")}
        rec.update({f"probe_{k}": st.pop(k) for k in PROBE_STATS if k in st})
        rec.update({f"probe_{k}": v for k, v in st.items()})          # probe_dead.<relu layer>
        return rec


# --------------------------------------------------------------------------- step metrics
# The per-layer dot products one step needs, by name, over g (the gradient), w (the weights before
# the step), d (the update), p (the previous step's gradient): every norm, the gradient cosine and,
# for the full trace, the first-order predicted change <g, d>. One ops.segment_dots call computes
# them where the arrays live (the GPU for device cuda); only these numbers reach the host.
LIGHT_DOTS = ("gg", "ww", "dd", "gp", "pp")
FULL_DOTS = LIGHT_DOTS + ("gd",)


class StepMeter:
    """What the trace measures around one SGD step, in work vectors where the parameters live.

        meter.before_update()                   # remembers the weights
        opt.step(...)
        rec.update(meter.after_update(cos=...)) # norms, update ratios, gradient cosine
        meter.remember_gradient()               # for the next step's cosine
        rec.update(meter.same_batch(x, y, loss))   # full trace: loss after the step, alpha
    """

    def __init__(self, net, level):
        self.net, self.level = net, level
        P, ops = net.num_params, net.ops
        self.prev_grad = ops.zeros(P, net.dtype) if level != "off" else None
        self.before = ops.empty(P, net.dtype)
        self.delta = ops.empty(P, net.dtype)
        slices = [sl for _, sl in net.param_layers()]
        self.bounds = np.array([sl.start for sl in slices] + [slices[-1].stop], dtype=np.int64)
        self.dots = {}

    def _vectors(self, name):
        net = self.net
        v = {"g": net.flat_grads, "w": self.before, "d": self.delta, "p": self.prev_grad}
        return v[name[0]], v[name[1]]

    def before_update(self):
        self.net.ops.copy_into(self.before, self.net.flat_params)

    def after_update(self, cos=True):
        """The step's norms (see step_norms) from one segment_dots call; keeps the dots by name."""
        ops = self.net.ops
        ops.subtract(self.delta, self.net.flat_params, self.before)
        names = FULL_DOTS if self.level == "full" else LIGHT_DOTS
        rows = ops.segment_dots([self._vectors(n) for n in names], self.bounds)
        self.dots = dict(zip(names, rows))
        return step_norms(self.net, self.dots, cos=cos)

    def remember_gradient(self):
        if self.prev_grad is not None:
            self.net.ops.copy_into(self.prev_grad, self.net.flat_grads)

    def same_batch(self, x, y, loss):
        """The full trace's test of the step on its own batch: the loss after the step, its change
        against the first-order prediction <g, d>, and Cockpit's alpha (one more forward+backward)."""
        net = self.net
        df0 = float(self.dots["gd"].sum())
        loss_after = net.loss(x, y)
        rec = {"loss_after": loss_after, "loss_change": loss_after - loss, "predicted_change": df0}
        if math.isfinite(loss_after):
            net.backward()
            df1 = float(net.ops.segment_dots([(net.flat_grads, self.delta)], self.bounds).sum())
            rec["alpha"] = alpha_from_step(loss, loss_after, df0, df1)
        return rec


def step_norms(net, dots, cos=True):
    """The step's norms from per-layer dot products (ops.segment_dots over the parameter layers).

    dots: {name: per-layer values} with gg = <g,g>, ww = <w,w>, dd = <d,d>, gp = <g,g_prev>,
    pp = <g_prev,g_prev>; g the gradient, w the weights before the step, d the update. Per layer:
    gradient norm, weight norm, ||d|| / ||w||; in all: the three norms and the cosine between this
    step's gradient and the previous one (cos=True).
    """
    gg, ww, dd, gp, pp = (np.asarray(dots[k], dtype=np.float64) for k in LIGHT_DOTS)
    gn = math.sqrt(gg.sum())
    rec = {"grad_norm": gn, "weight_norm": math.sqrt(ww.sum()), "update_norm": math.sqrt(dd.sum())}
    if cos:
        pn = math.sqrt(pp.sum())
        rec["grad_cos"] = float(gp.sum()) / (gn * pn) if gn > 0 and pn > 0 else math.nan
    for (name, _), g2, w2, d2 in zip(net.param_layers(), gg, ww, dd):
        wn = math.sqrt(w2)
        rec[f"grad_norm.{name}"] = math.sqrt(g2)
        rec[f"weight_norm.{name}"] = wn
        rec[f"update_ratio.{name}"] = math.sqrt(d2) / wn if wn > 0 else math.nan
    return rec


def alpha_from_step(f0, f1, df0, df1):
    """Cockpit's alpha: where the step ended relative to the minimum of a 1-D quadratic.

    Along the step w(t) = w + t*d, t in [0, 1], fit q(t) = a t^2 + b t + c by least squares to
    q(0) = f0, q(1) = f1, q'(0) = df0, q'(1) = df1 (df = <grad, d>). With t* = -b / (2a) the
    minimum, alpha = 1/t* - 1: -1 no move, 0 landed on the minimum, 1 landed on the mirror point
    (loss back where it started), > 1 overshot further (loss rose). Concave fits (a <= 0) or a
    step that went uphill have no such minimum: alpha is nan there.
    """
    A = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    rhs = np.array([f0, f1, df0, df1], dtype=np.float64)
    if not np.all(np.isfinite(rhs)):
        return math.nan
    a, b, _ = np.linalg.lstsq(A, rhs, rcond=None)[0]
    if a <= 0 or b >= 0:
        return math.nan
    t_star = -b / (2 * a)
    return float(1.0 / t_star - 1.0)


# --------------------------------------------------------------------------- sharpness
class Sharpness:
    """lambda_max of the loss Hessian on a fixed batch, by power iteration with finite-difference HVPs.

    Works on a float64 twin of the network (same spec, weights copied in), so the finite
    differences are accurate even when training runs in float32. The twin runs on the CPU for
    every device (a CUDA network's weights are copied to the host once per measurement). ``evals`` counts gradient
    evaluations spent (two per Hessian-vector product).
    """

    def __init__(self, net, x, y, seed=0):
        from .network import Network
        self.net = net
        self.twin = Network(net.spec, net.input_shape, seed=0, dtype=np.float64,
                            device="numpy" if net.device == "numpy" else "cpu")
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self.v = None            # warm start: the previous top eigenvector
        self.evals = 0

    def gradient(self, w):
        """The float64 gradient of the loss on this batch at flat weights w (one evaluation)."""
        self.twin.flat_params[...] = w
        self.twin.loss(self.x, self.y)
        self.twin.backward()
        self.evals += 1
        return self.twin.flat_grads.copy()

    def hvp(self, w, v):
        eps = HVP_REL_EPS * max(1.0, float(np.linalg.norm(w)))
        return (self.gradient(w + eps * v) - self.gradient(w - eps * v)) / (2 * eps)

    def _power(self, w, v, shift=0.0):
        """Power iteration on H - shift*I from v: (its dominant eigenvalue, eigenvector)."""
        v = v / np.linalg.norm(v)
        lam = math.nan
        for _ in range(POWER_ITERS_MAX):
            hv = self.hvp(w, v) - shift * v
            new = float(v @ hv)
            norm = np.linalg.norm(hv)
            if not (math.isfinite(new) and norm > 0):
                lam = new
                break
            v = hv / norm
            if math.isfinite(lam) and abs(new - lam) <= POWER_TOL * abs(new):
                lam = new
                break
            lam = new
        return lam, v

    def __call__(self, flat_params=None):
        """(lambda_max, gradient evaluations used) at the given (default: current) weights.

        Power iteration finds the eigenvalue of largest magnitude. Near initialisation and on
        plateaus that can be a negative one (a saddle's downhill direction); then it is run again
        on H - lambda_min*I, whose dominant eigenvalue is lambda_max - lambda_min, so the result is
        always the largest (most positive) eigenvalue, the one that sets the stability limit 2/lr.
        """
        w = np.array(self.net.get_flat_params() if flat_params is None else flat_params, dtype=np.float64)
        v = self.v if self.v is not None else self.rng.standard_normal(w.size)
        start = self.evals
        lam, v = self._power(w, v)
        if math.isfinite(lam) and lam < 0:
            top, v = self._power(w, self.rng.standard_normal(w.size), shift=lam)
            lam = top + lam
        self.v = v
        return lam, self.evals - start
