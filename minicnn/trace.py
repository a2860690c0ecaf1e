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

The trace file is a CSV with a header: ``numpy.genfromtxt(path, delimiter=",", names=True)`` or
``pandas.read_csv(path)`` reads it in one call. Rows are flushed as they are written, so a crash,
NaN or Ctrl-C leaves every finished step on disk.
"""
import csv
import math

import numpy as np

TRACE_LEVELS = ("off", "light", "full")

# Power iteration for lambda_max: stop when the estimate changes by less than this (relative),
# or after POWER_ITERS_MAX iterations (each costs two gradient evaluations).
POWER_TOL = 1e-3
POWER_ITERS_MAX = 30
# Finite-difference step for Hessian-vector products, relative to the weight norm: in float64
# the centred difference error is O(eps^2 * third derivative) while rounding is O(1e-16 / eps);
# 1e-4 of ||w|| balances both for the networks here.
HVP_REL_EPS = 1e-4


def columns(net, level, sharpness):
    """Column names of the trace for a network and trace level."""
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
    return cols


class TraceWriter:
    """Append-only CSV of step records, flushed after every row."""

    def __init__(self, path, cols):
        self.cols = cols
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=cols, restval="", extrasaction="ignore")
        self.w.writeheader()
        self.f.flush()

    def write(self, record):
        self.w.writerow({k: _fmt(v) for k, v in record.items()})
        self.f.flush()

    def close(self):
        if not self.f.closed:
            self.f.close()


def _fmt(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v


def read_trace(path):
    """The trace as a dict of column name -> numpy array (pandas.read_csv works too)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    head, body = rows[0], rows[1:]
    out = {}
    for j, name in enumerate(head):
        vals = [r[j] if j < len(r) else "" for r in body]
        out[name] = np.array([float(v) if v != "" else np.nan for v in vals])
    return out


# --------------------------------------------------------------------------- step metrics
# Dead-unit fractions and logit statistics are reductions of the backend (ops.dead_fraction,
# ops.logit_stats; Network.trace_stats calls them), so that on the GPU they run there.
def step_norms(net, dots, cos=True):
    """The step's norms from per-layer dot products (ops.segment_dots over the parameter layers).

    dots rows: <g,g>, <w,w>, <d,d>, <g,g_prev>, <g_prev,g_prev> with g the gradient, w the weights
    before the step, d the update. Per layer: gradient norm, weight norm, ||d|| / ||w||; in all:
    the three norms and the cosine between this step's gradient and the previous one (cos=True).
    """
    gg, ww, dd, gp, pp = (np.asarray(r, dtype=np.float64) for r in dots[:5])
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
