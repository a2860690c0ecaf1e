"""The per-step trace: what each SGD step did, in numbers, written as it happens.

Levels
    off    only the step's loss and lr (needed for the loss curve)
    light  what the step's own forward/backward gives: gradient/weight/update norms per layer,
           gradient cosine with the previous step, dead ReLU fractions, logit statistics
    full   light + one more forward/backward on the SAME batch after the update: the loss after
           the step (the direct test of overshoot), the first-order prediction -lr*<g, d> beside
           the actual change, and Cockpit's alpha from a quadratic fitted along the step

Sharpness (every K steps, any level): lambda_max of the loss Hessian on a fixed batch by Lanczos on
exact Hessian-vector products (minicnn.hessian, no autograd), reported beside 2/lr, the stability
threshold of gradient descent on a quadratic; optionally the top K eigenvalues, the trace and each
layer's lambda_max (SHARPNESS_MEASURES).

Gradient noise (every K steps, any level): on those steps the gradient comes from the per-sample
gradients of the training batch (Network.per_sample_backward, the same flat_grads bit for bit) and
minicnn.noise's statistics of them are recorded (NOISE_TOTAL, NOISE_PER_LAYER).

Every quantity is computed here (StepMeter, step_norms, alpha_from_step, Sharpness; the dead
fractions and logit statistics are backend reductions, see Network.trace_stats); the run directory
(minicnn.rundir) writes the records as steps.csv.
"""
import math
import time

import numpy as np

from .errors import ConfigError
from .hessian import HessianOperator, hutchinson_trace, top_eigenvalues
from .noise import noise_stats

TRACE_LEVELS = ("off", "light", "full")      # documented above


# Columns in seconds of wall-clock time: the only ones that differ between two runs of one config
# (every other column is bit for bit the same with the same seed, data order and thread count)
TIMING_COLUMNS = ("time_s", "sharpness_s", "noise_s")


def columns(net, level, sharpness, probe=False, noise=False):
    """Column names of the trace for a network and trace level. sharpness: what is measured every K
    steps (a parse_sharpness dict or string; True: lambda_max; falsy: nothing); probe: the probe's
    columns; noise: the gradient-noise columns."""
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
        cols += sharpness_columns(net, sharpness if isinstance(sharpness, dict)
                                  else parse_sharpness(sharpness if isinstance(sharpness, str) else None))
    if noise:
        cols += noise_columns(net)
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


# --------------------------------------------------------------------------- gradient noise
# minicnn.noise's statistics recorded every --noise-every K steps: all of them for all parameters,
# and per layer the noise scale with the two unbiased estimates it is the ratio of (a run-level
# B_noise averages those over steps before dividing, as McCandlish et al. do), so that a network
# with L layers adds 7 + 3L columns rather than 9 (L + 1). noise_s: the seconds of the per-sample
# backward and the statistics (what the measurement costs beyond a plain backward, and the backward).
NOISE_TOTAL = ("b_noise", "tr_sigma", "grad_sq_unbiased", "snr", "norm_test", "inner_product_test",
               "orthogonality_test")
NOISE_PER_LAYER = ("b_noise", "tr_sigma", "grad_sq_unbiased")


def noise_columns(net):
    """The trace columns of a gradient-noise measurement."""
    layers = [name for name, _ in net.param_layers()]
    return list(NOISE_TOTAL) + [f"{s}.{n}" for s in NOISE_PER_LAYER for n in layers] + ["noise_s"]


def noise_record(report):
    """A minicnn.noise.NoiseReport as the trace's noise columns (without noise_s)."""
    rec = {s: getattr(report.total, s) for s in NOISE_TOTAL}
    rec.update({f"{s}.{n}": getattr(st, s) for s in NOISE_PER_LAYER for n, st in report.layers.items()})
    return rec


def noise_backward(net):
    """The backward pass of the last ``net.loss`` call as ``per_sample_backward`` (flat_grads bit
    for bit what ``backward`` writes) and the noise columns of its per-sample gradients, with
    noise_s the seconds of both. The batch needs >= 2 samples."""
    t0 = time.perf_counter()
    rec = noise_record(noise_stats(net.per_sample_backward(), net.param_layers()))
    rec["noise_s"] = time.perf_counter() - t0
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
# What --sharpness can measure every --sharpness-every K steps (a comma list; lambda_max is always
# there, the others add columns):
#   lambda_max       the Hessian's largest eigenvalue, beside 2/lr (columns lambda_max, two_over_lr)
#   topk[:K]         the K largest eigenvalues (lambda_2 .. lambda_K): whether the top is isolated
#   trace[:SAMPLES]  the trace by Hutchinson's estimator with its standard error, and each layer's
#                    block trace from the same products (hessian_trace, hessian_trace_se, hessian_trace.<layer>)
#   layers           lambda_max of each parameter layer's own block H_ll (lambda_max.<layer>)
# and always the cost: hvp_evals (Hessian-vector products), grad_evals (their cost in gradient
# evaluations, minicnn.hessian.EXACT_HVP_GRAD_EQUIV each) and sharpness_s (seconds).
SHARPNESS_MEASURES = ("lambda_max", "topk", "trace", "layers")
# topk's default K: 3 eigenvalues tell an isolated top (lambda_1 >> lambda_2) from a cluster, at
# ~1.4x the products of lambda_max alone (Lanczos converges on the top 3 nearly as fast as on the
# top 1: a median 11 against 8 products on network A, steps 100-140, benchmarks/NOTES.md session 5).
SHARPNESS_TOPK = 3
# trace's default sample count: Hutchinson's standard error falls as 1/sqrt(samples) and its
# variance is ~2 |H|_F^2, large for these Hessians (20 samples: +-27% on network A at its initial
# weights), so a precise trace costs hundreds of products; 20 products (2.5x lambda_max's) follow
# the trace's changes by factors over training, the standard error beside it.
SHARPNESS_TRACE_SAMPLES = 20
# Lanczos tolerance of the trace's measurements (minicnn.hessian.LANCZOS_TOL's meaning: residual
# relative to |lambda_max|): the eigenvalue error is at most the residual and typically its square
# over the gap -- measured 0.06% at 1e-2 (9 products) against 1e-3 (12 products), network A after
# 100 steps; lr * lambda_max is compared with 2, so 1e-2 is plenty and saves a quarter of the cost.
SHARPNESS_TOL = 1e-2
# Seed stream of the random vectors (Lanczos' first start, Hutchinson's probes), drawn from
# [seed, SHARPNESS_VECTORS, step]: a measurement's randomness depends only on the run's seed and
# its step, so a replay from a checkpoint needs no generator state, only the warm-start vectors.
SHARPNESS_VECTORS = 1 << 22
# Upper bounds of topk:K and trace:SAMPLES: each is a count of Hessian-vector products per
# measurement (topk keeps K parameter-sized vectors too); past these a measurement costs more than
# hundreds of training steps, and a typo like topk:30000 would exhaust the memory of a large network.
SHARPNESS_MAX = {"topk": 64, "trace": 10_000}


def parse_sharpness(text):
    """'lambda_max', 'topk', 'topk:5', 'trace:50', 'layers' or a comma list of them -> {measure: its
    number or None}, in SHARPNESS_MEASURES order with lambda_max always in. Raises ConfigError."""
    out = {"lambda_max": None}
    for item in str(text or "lambda_max").replace("+", ",").split(","):
        name, _, num = item.strip().partition(":")
        if name not in SHARPNESS_MEASURES or (num and name not in ("topk", "trace")):
            raise ConfigError(f"--sharpness: unknown measure '{item.strip()}'; accepted: a comma list of "
                              f"lambda_max, topk[:K], trace[:SAMPLES], layers")
        if num:
            if not num.isdigit() or not 2 <= int(num) <= SHARPNESS_MAX[name]:
                raise ConfigError(f"--sharpness: '{item.strip()}' needs a whole number in 2..{SHARPNESS_MAX[name]:,} "
                                  f"after the colon")
            out[name] = int(num)
        elif name not in out:
            out[name] = {"topk": SHARPNESS_TOPK, "trace": SHARPNESS_TRACE_SAMPLES}.get(name)
    return {m: out[m] for m in SHARPNESS_MEASURES if m in out}


def sharpness_text(measures):
    """The normalised --sharpness string of a parse_sharpness dict (what config.json records)."""
    return ",".join(m + (f":{v}" if v is not None else "") for m, v in measures.items())


def sharpness_columns(net, measures):
    """The trace columns of a sharpness measurement (see SHARPNESS_MEASURES)."""
    cols = ["lambda_max", "two_over_lr", "hvp_evals", "grad_evals", "sharpness_s"]
    if "topk" in measures:
        cols += [f"lambda_{i}" for i in range(2, measures["topk"] + 1)]
    layers = [name for name, _ in net.param_layers()]
    if "trace" in measures:
        cols += ["hessian_trace", "hessian_trace_se"] + [f"hessian_trace.{n}" for n in layers]
    if "layers" in measures:
        cols += [f"lambda_max.{n}" for n in layers]
    return cols


class Sharpness:
    """The loss Hessian on a fixed batch, measured every K steps: lambda_max (and, as asked, the top
    K eigenvalues, the trace, each layer's lambda_max), exactly.

        sharp = Sharpness(net, x, y, seed=0, measures="lambda_max,layers")
        rec = sharp.measure(step)        # {"lambda_max": ..., "lambda_max.conv1": ..., "hvp_evals": ...}
        lam, grad_evals = sharp()        # lambda_max alone at the current weights

    Hessian-vector products are exact (minicnn.hessian.HessianOperator: the R-operator on a float64
    twin of the network, on the CPU for every device; a CUDA network's weights are copied to the
    host once per measurement) -- finite differences of gradients cross ReLU / max-pool kinks
    (lambda_max 23.5 against the exact 3.95 on network A at batch 8). Eigenvalues by Lanczos
    (hessian.top_eigenvalues, tolerance SHARPNESS_TOL), which returns the most positive eigenvalue
    directly, negative ones or not; each warm-started from the previous measurement's top
    eigenvector(s) plus an equal random part, the vectors being the only state (``state`` /
    ``load_state``: a checkpoint carries them, so a replay reproduces the recorded numbers bit for
    bit). Random vectors come from (seed, step).
    """

    def __init__(self, net, x, y, seed=0, measures="lambda_max"):
        self.net, self.seed = net, seed
        self.measures = parse_sharpness(measures) if isinstance(measures, str) else dict(measures)
        self.op = HessianOperator(net, x, y)
        self.warm = {}           # "" (all parameters) or a layer name -> (k, P) previous top eigenvectors

    def _rng(self, step):
        return np.random.default_rng([self.seed, SHARPNESS_VECTORS, int(step)])

    def _top(self, op, key, k, step):
        """Lanczos' top k of op, warm-started from the previous vectors of ``key``: their sum plus an
        equal random part (unit vectors both), so that a direction that was not among the top before
        still has a component to grow from -- Lanczos' residual test cannot see an eigenvalue its
        start vector misses."""
        prev = self.warm.get(key)
        prev = prev if prev is not None and prev.shape[1] == op.size else None
        v0 = self._rng(step).standard_normal(op.size)
        if prev is not None and np.linalg.norm(prev.sum(axis=0)) > 0:
            w = prev.sum(axis=0)
            v0 = w / np.linalg.norm(w) + v0 / np.linalg.norm(v0)
        res = top_eigenvalues(op, k=k, tol=SHARPNESS_TOL, v0=v0)
        if np.isfinite(res.vectors).all():
            self.warm[key] = res.vectors.copy()
        return res

    def measure(self, step=0, flat_params=None, lr=None, measures=None):
        """One measurement at the given (default: the network's current) weights -> the trace
        record's sharpness columns (sharpness_columns); ``lr`` adds two_over_lr = 2/lr; measures:
        a parse_sharpness dict instead of the instrument's own."""
        op, m = self.op, self.measures if measures is None else measures
        op.set_weights(self.net.get_flat_params() if flat_params is None else flat_params)
        t0 = time.perf_counter()
        results = [self._top(op, "", m.get("topk") or 1, step)]
        rec = {"lambda_max": float(results[0].values[0])}
        if lr is not None:
            rec["two_over_lr"] = 2.0 / lr if lr > 0 else math.inf
        rec.update({f"lambda_{i + 1}": float(v) for i, v in enumerate(results[0].values) if i > 0})
        if "trace" in m:
            h = hutchinson_trace(op, max_samples=m["trace"], min_samples=m["trace"], rel_se=0.0,
                                 seed=[self.seed, SHARPNESS_VECTORS, int(step), 1])
            results.append(h)
            rec.update(hessian_trace=h.trace, hessian_trace_se=h.stderr)
            rec.update({f"hessian_trace.{n}": tr_se[0] for n, tr_se in h.layers.items()})
        if "layers" in m:
            for name, _ in op.layers:
                r = self._top(op.restrict(name), name, 1, step)
                results.append(r)
                rec[f"lambda_max.{name}"] = float(r.values[0])
        rec.update(hvp_evals=sum(r.hvps for r in results), grad_evals=sum(r.grad_evals for r in results),
                   sharpness_s=time.perf_counter() - t0)
        return rec

    def __call__(self, flat_params=None, step=0):
        """(lambda_max, gradient evaluations used) at the given (default: current) weights: the
        largest (most positive) eigenvalue, the one that sets the stability limit 2/lr."""
        rec = self.measure(step, flat_params)
        return rec["lambda_max"], rec["grad_evals"]

    def state(self):
        """The warm-start vectors, as checkpoint arrays: {"sharp_v": (k, P), "sharp_v.<layer>": (1, P_l)}.
        Not copies: a measurement replaces these arrays and never writes into them, so the debugger's
        per-step snapshots share them."""
        return {("sharp_v" + (f".{key}" if key else "")): v for key, v in self.warm.items()}

    def load_state(self, arrays):
        """Restore ``state()``'s vectors (other keys are ignored; a (P,) vector of older checkpoints
        is the lambda_max warm start)."""
        self.warm = {}
        for name, v in arrays.items():
            if name == "sharp_v" or name.startswith("sharp_v."):
                v = np.array(v, dtype=np.float64)
                self.warm[name[len("sharp_v."):] if "." in name else ""] = v.reshape(-1, v.shape[-1])
