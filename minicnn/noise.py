"""Gradient noise from per-sample gradients: how much of a batch gradient is signal, per layer.

    G = net.per_sample_grads(x, y)                  # (B, P): g_i = d loss_i / d w, one row per sample
    report = noise_stats(G, net.param_layers())     # NoiseReport: .total and .layers[name]
    report.total.b_noise, report.layers["conv1"].norm_test
    report.record()                                 # {"b_noise": ..., "b_noise.conv1": ..., ...}

or in one call ``gradient_noise(net, x, y)``. Notation: B the batch size, g_i the per-sample
gradient of sample i's own loss, G = (1/B) sum_i g_i the batch gradient (of the mean loss),
d_i = g_i - G. Each statistic is computed on all parameters (``total``) and on each parameter
layer's slice of them alone (``layers``), in float64.

    tr_sigma           tr(Sigma^) = sum_i |d_i|^2 / (B - 1): the unbiased estimate of the trace of
                       the per-sample gradient covariance Sigma.
    grad_sq            |G|^2, the squared norm of the batch gradient. It is biased upwards:
                       E|G|^2 = |g|^2 + tr(Sigma) / B with g the true (expected) gradient.
    grad_sq_unbiased   |G|^2 - tr_sigma / B, the unbiased estimate of |g|^2 (can be <= 0 when the
                       noise swamps the signal).
    b_noise            the "simple" gradient noise scale B_simple = tr(Sigma) / |g|^2 (McCandlish,
                       Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"),
                       from the two unbiased estimates above (their Appendix A's estimators with
                       B_small = 1 and B_big = B). The batch size above which larger batches stop paying off;
                       inf when grad_sq_unbiased <= 0. McCandlish et al. average the numerator and
                       denominator over steps before dividing (the ratio of noisy estimates is
                       biased): ``tr_sigma`` and ``grad_sq_unbiased`` are reported for that.
    snr                grad_sq_unbiased / (tr_sigma / B) = B / b_noise: squared signal over the
                       variance of the batch gradient; > 1 when the batch gradient is mostly signal.
    gsnr_mean          the mean over parameters j of the gradient signal-to-noise ratio
                       G_j^2 / (Var_j + GSNR_EPS), Var_j = (1/B) sum_i d_ij^2 (Liu et al. 2020,
                       "Understanding Why Neural Networks Generalize Well Through GSNR of
                       Parameters"), exactly as Cockpit's MeanGSNR computes it.
    norm_test          Cockpit's norm test (Byrd, Chin, Nocedal, Wu 2012, "Sample size selection in
                       optimization methods for machine learning", eq. 3.9):
                       theta = sqrt(tr_sigma / (B |G|^2)), the smallest theta for which
                       E|G_B - g|^2 <= theta^2 |G|^2 holds; the batch is large enough for a
                       threshold theta (they use 0.5-0.9) when norm_test <= theta.
    inner_product_test Cockpit's inner-product test (Bollapragada, Byrd, Nocedal 2018, "Adaptive
                       Sampling Strategies for Stochastic Optimization", eq. 2.6):
                       sqrt(Var^(<g_i, G>) / (B |G|^4)), Var^ the unbiased sample variance of
                       the projections <g_i, G> over the batch.
    orthogonality_test Cockpit's orthogonality test (the same paper, eq. 3.3):
                       sqrt(sum_i |g_i - (<g_i, G> / |G|^2) G|^2 / ((B - 1) B |G|^2)): the noise
                       orthogonal to G.

The three tests are Cockpit's (Schneider, Dangel, Hennig 2021, "Cockpit: A Practical Debugging Tool
for the Training of Deep Neural Networks"; f-dangel/cockpit, cockpit/quantities/norm_test.py,
inner_test.py, ortho_test.py, mean_gsnr.py). Cockpit's per-sample gradients are those of the mean
loss, g_i / B; rewritten with minicnn's g_i its formulas are the ones above (e.g. its norm test's
"variance l1 norm" (B^2 sum |g_i/B|^2 - B |G|^2) / (B - 1) is tr_sigma). Here they are computed
from the centred d_i, which avoids the cancellation of the moment form.
"""
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .errors import ConfigError
from .ops.blas import single_thread

# Cockpit's MeanGSNR stabiliser (its default epsilon): keeps G_j^2 / Var_j finite for parameters
# whose per-sample gradients all agree (e.g. all zero behind a dead ReLU).
GSNR_EPS = 1e-5


@dataclass(frozen=True)
class NoiseStats:
    """The gradient-noise statistics of one block of parameters (see the module docstring)."""
    batch_size: int
    grad_sq: float
    tr_sigma: float
    grad_sq_unbiased: float
    b_noise: float
    snr: float
    gsnr_mean: float
    norm_test: float
    inner_product_test: float
    orthogonality_test: float


@dataclass(frozen=True)
class NoiseReport:
    """NoiseStats for all parameters (``total``) and for each parameter layer (``layers``, in layer
    order); ``seconds``: the time taken (per-sample gradients included when gradient_noise made them)."""
    total: NoiseStats
    layers: dict = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, names=None):
        """A flat dict for a trace row: {"<stat>": total, "<stat>.<layer>": per layer} for each
        statistic in ``names`` (default: every one but batch_size)."""
        names = names or STATS
        rec = {}
        for n in names:
            rec[n] = getattr(self.total, n)
            for layer, st in self.layers.items():
                rec[f"{n}.{layer}"] = getattr(st, n)
        return rec

    def as_dict(self):
        return {"total": asdict(self.total), "layers": {k: asdict(v) for k, v in self.layers.items()},
                "seconds": self.seconds}


STATS = tuple(f.name for f in fields(NoiseStats) if f.name != "batch_size")


def record_columns(layer_names, names=None):
    """The keys of ``NoiseReport.record(names)`` for parameter layers ``layer_names``, in its order
    (a trace header before any measurement): ["<stat>", "<stat>.<layer>", ...] per statistic."""
    return [key for n in (names or STATS) for key in (n, *(f"{n}.{layer}" for layer in layer_names))]


def _ratio(a, b):
    """a / b, with inf for a > 0 over b <= 0 and nan for 0 / 0."""
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


def block_stats(g, d):
    """NoiseStats of one block. g: (P,) the batch gradient G, d: (B, P) the centred per-sample
    gradients g_i - G (float64)."""
    return _stats(g, np.einsum("ij,ij->i", d, d), d @ g, np.einsum("ij,ij->j", d, d) / d.shape[0], d.shape[0])


def _stats(g, sq, dg, var_j, B):
    """NoiseStats from g: (P,) = G, sq: (B,) = |d_i|^2, dg: (B,) = <d_i, G>, var_j: (P,) = the
    per-parameter population variance (1/B) sum_i d_ij^2."""
    grad_sq = float(g @ g)
    tr_sigma = float(sq.sum()) / (B - 1)
    grad_sq_unb = grad_sq - tr_sigma / B
    b_noise = _ratio(tr_sigma, grad_sq_unb)
    snr = _ratio(grad_sq_unb, tr_sigma / B) if tr_sigma > 0 else (math.inf if grad_sq_unb > 0 else math.nan)
    var_proj = float(dg @ dg) / (B - 1)               # unbiased variance of <g_i, G> (its mean is |G|^2)
    if grad_sq > 0:
        orth = np.maximum(sq - dg * dg / grad_sq, 0.0)    # |d_i - (<d_i,G>/|G|^2) G|^2 = the orthogonal part of g_i
        var_orth = float(orth.sum()) / (B - 1)
        norm_test = math.sqrt(tr_sigma / (B * grad_sq))
        inner = math.sqrt(var_proj / (B * grad_sq * grad_sq))
        ortho = math.sqrt(var_orth / (B * grad_sq))
    else:
        norm_test = inner = ortho = math.inf if tr_sigma > 0 else math.nan
    gsnr = float(np.mean(g * g / (var_j + GSNR_EPS))) if g.size else math.nan
    return NoiseStats(batch_size=B, grad_sq=grad_sq, tr_sigma=tr_sigma, grad_sq_unbiased=grad_sq_unb,
                      b_noise=b_noise, snr=snr, gsnr_mean=gsnr, norm_test=norm_test,
                      inner_product_test=inner, orthogonality_test=ortho)


def noise_stats(per_sample, layers=None):
    """Gradient-noise statistics from per-sample gradients.

    per_sample: (B, P) array, row i the gradient of sample i's loss (``Network.per_sample_grads``);
    layers: [(name, slice)] column blocks (``net.param_layers()``), or None for the total only.
    -> NoiseReport. B >= 2 (the variance needs two samples). One (B, P) float64 temporary (the
    centred gradients); each block reads its columns of it once for |d_i|^2 and once for <d_i, G>,
    and when the layers tile the columns the total is the sum of theirs (measured: about half the
    time of squaring the whole (B, P) array into temporaries first, at B = 64 on network A).
    """
    t0 = time.perf_counter()
    G = np.asarray(per_sample, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] < 2:
        raise ConfigError(f"noise statistics need per-sample gradients of shape (B, P) with B >= 2, got {G.shape}")
    B, P = G.shape
    g = G.mean(axis=0)
    d = G - g                                         # (B, P) centred
    var_j = np.einsum("ij,ij->j", d, d) / B           # (P,)

    def sums(sl):                                     # (|d_i|^2, <d_i, G>) over a block's columns: (B,), (B,)
        ds = d[:, sl]
        with single_thread():
            return np.einsum("ij,ij->i", ds, ds), ds @ g[sl]
    layers = list(layers or [])
    parts = {name: sums(sl) for name, sl in layers}
    bounds = [(sl.start, sl.stop) for _, sl in layers]
    tiled = bool(layers) and bounds[0][0] == 0 and bounds[-1][1] == P and all(
        a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sq, dg = (sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())) if tiled else sums(slice(None))
    total = _stats(g, sq, dg, var_j, B)
    per_layer = {name: _stats(g[sl], *parts[name], var_j[sl], B) for name, sl in layers}
    return NoiseReport(total=total, layers=per_layer, seconds=time.perf_counter() - t0)


def gradient_noise(net, x, y):
    """noise_stats of a batch on a network: per-sample gradients (``net.per_sample_grads``, in the
    network's own dtype and device, accumulated in float64), per layer and in total. -> NoiseReport,
    ``seconds`` including the per-sample gradients. Leaves the batch gradient in net.flat_grads."""
    t0 = time.perf_counter()
    G = net.per_sample_grads(x, y)
    rep = noise_stats(G, net.param_layers())
    return NoiseReport(total=rep.total, layers=rep.layers, seconds=time.perf_counter() - t0)
