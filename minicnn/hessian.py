"""The loss Hessian on a fixed batch, without autograd: top eigenvalues, trace, eigenvalue density,
for all parameters or one layer's block.

    op = HessianOperator(net, x, y)               # H at the network's current weights, on batch (x, y)
    top_eigenvalues(op, k=3).values               # Lanczos: the 3 largest eigenvalues
    hutchinson_trace(op).trace, .stderr, .layers  # Hutchinson: tr H and each layer's block trace
    layer_lambda_max(op)                          # {layer: EigenResult}: lambda_max of each block H_ll
    spectral_density(op)                          # stochastic Lanczos quadrature: grid, density
    op.restrict("conv2")                          # the block H_ll of one layer as an operator

Hessian-vector products. ``HessianOperator`` works on a float64 twin of the network (same spec,
weights copied in, on the CPU for every device, as trace.Sharpness does). By default (method
"exact") each product is ``Network.hessian_vector_product``: Pearlmutter's R-operator, the forward
and backward passes differentiated along v, built from the same ops; it equals PyTorch's double
backward to rounding (1e-16 relative on network A) and costs about EXACT_HVP_GRAD_EQUIV gradient
evaluations. Method "fd" is the centred difference of two gradients that trace.Sharpness uses,
H v = (grad(w + h v) - grad(w - h v)) / (2 h), h = HVP_REL_EPS * max(1, |w|) / |v|: 2 gradient
evaluations, accurate to ~1e-8 where the loss is smooth, but wrong wherever a ReLU or max-pool
switches between w - h v and w + h v -- and on real data that is not rare: a unit whose
pre-activation is within ~h |patch| of 0 switches, and with N * (units per image) candidates some
do. Measured on network A (benchmarks/bench_instruments.py, shapes data, initial weights): at
batch 32 every one of 20 random directions gave a product off by more than 0.1% (median error 21x
the product's norm), at batch 8 four of five; trace.Sharpness's power iteration returned
lambda_max = 2.56 (1.98 from another start) against the exact 2.16 at batch 32, and 23.5 against
3.95 at batch 8. Hence the exact R-operator: about 1.5x the work of the two gradients, and no kinks
(the Hessian it gives, like PyTorch's, is that of the piece of the loss the weights are on).

Cost: every result reports ``hvps`` (Hessian-vector products), ``grad_evals`` (gradient
evaluations, or their equivalent for exact products) and ``seconds``.

A layer block: ``op.restrict(name)`` (or ``HessianOperator(..., layer=name)``) is H_ll, the block of
one parameter layer (its weight and bias): v is nonzero only in that layer's slice and the product
is restricted to it. Its eigenvalues are those of that layer's curvature alone.

Algorithms (PyHessian, Yao, Gholami, Keutzer, Mahoney 2020, "PyHessian: Neural Networks Through the
Lens of the Hessian", amirgholami/PyHessian pyhessian/hessian.py: eigenvalues, trace, density;
here with Lanczos instead of its deflated power iteration for the top eigenvalues):
- top_eigenvalues: Lanczos with full reorthogonalisation (Golub & Van Loan, Matrix Computations,
  ch. 10); stops when the Ritz residual bound beta_m |s_mi| of each of the top k is below
  tol times the largest |Ritz value|. Lanczos converges on the extreme eigenvalues in far fewer products than power
  iteration, and returns the largest (most positive) eigenvalues directly, negative ones or not.
- hutchinson_trace: tr H = E[v^T H v] over Rademacher v (Hutchinson 1990), with the standard error
  of the mean; the same products give every layer's block trace tr H_ll = E[v_l^T (H v)_l].
- spectral_density: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019, "An Investigation
  into Neural Net Optimization via Hessian Eigenvalue Density"; PyHessian's density): m Lanczos
  steps from a normalised Rademacher vector give Ritz values theta_j and weights tau_j (the squared
  first components of T's eigenvectors); the density is the average over runs of
  sum_j tau_j N(t; theta_j, sigma^2), which integrates to 1 (times the number of parameters: the
  eigenvalue count density).
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .ops.blas import single_thread

METHODS = ("exact", "fd")
# An exact product (R-operator) in gradient evaluations, by multiply-adds: a gradient is a forward
# (1 unit) and a backward (2: dW and dX); the R-operator runs them plus the tangent forward (2 per
# layer: x rw and rx w) and the tangent backward (4: two backward passes): 9 units = 3 gradients.
# Measured on network A, batch 32, cpu: 44 ms against 13 ms for a gradient.
EXACT_HVP_GRAD_EQUIV = 3
# method "fd": finite-difference step relative to the weight norm (the product direction is
# normalised): the centred difference's truncation error is O(h^2 * third derivative), its
# rounding error O(1e-16 / h); 1e-4 of max(1, |w|) is the value trace.Sharpness uses.
HVP_REL_EPS = 1e-4

# Lanczos for the top eigenvalues: stop when every wanted Ritz pair's residual |H y - theta y|
# (= beta_m |s_mi|, free from T) is below LANCZOS_TOL times the largest |Ritz value| (|lambda_1| or
# |lambda_min|, whichever is larger). Eigenvalue errors go as the
# residual squared over the gap: ~1e-6 relative for separated eigenvalues, up to ~1e-3 for
# clustered ones -- well inside what an instrument compares (lr * lambda against 2).
LANCZOS_TOL = 1e-3
# At most this many Lanczos steps (one Hessian-vector product each) per call.
LANCZOS_MAX_STEPS = 80
# The Krylov space is invariant (T is exact, Lanczos stops) when the next residual norm is below
# this fraction of the diagonal entry: rounding of the reorthogonalised products is ~1e-15 of it.
LANCZOS_BREAKDOWN = 1e-12

# Hutchinson: stop when the standard error is below HUTCHINSON_REL_SE of |trace| (after at least
# HUTCHINSON_MIN_SAMPLES, so that the standard error itself is estimated from enough samples), or
# after HUTCHINSON_MAX_SAMPLES products. 2% is enough to compare traces between steps and layers.
HUTCHINSON_REL_SE = 0.02
HUTCHINSON_MIN_SAMPLES = 10
HUTCHINSON_MAX_SAMPLES = 100

# Stochastic Lanczos quadrature: SLQ_STEPS Lanczos steps per run (Ghorbani et al. use 90 on
# millions of parameters; ~30 already resolve the bulk and the outliers of the networks here),
# SLQ_RUNS runs averaged, the density on SLQ_GRID points, each Ritz value smoothed by a Gaussian of
# width SLQ_SIGMA_REL times the spread of the Ritz values (PyHessian's density_plot uses a fixed
# 1e-5 of it, which shows spikes; 1% shows the bulk and the outliers as separate bumps).
SLQ_STEPS = 30
SLQ_RUNS = 3
SLQ_GRID = 400
SLQ_SIGMA_REL = 0.01
# The density's grid reaches this many sigmas past the extreme Ritz values (a Gaussian's mass
# beyond 5 sigma is 3e-7: the density integrates to 1 on the grid).
SLQ_GRID_MARGIN = 5


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EigenResult:
    """Top eigenvalues of a Hessian (block): values (k,) descending, vectors (k, size) unit Ritz
    vectors, residuals (k,) bounds on |H y - theta y|, steps (Lanczos steps taken), converged
    (every residual below tol), ritz_values (all Ritz values of the last T, ascending), cost."""
    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    steps: int
    converged: bool
    ritz_values: np.ndarray
    hvps: int
    grad_evals: int
    seconds: float

    @property
    def lambda_max(self):
        return float(self.values[0])


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of tr H: trace, stderr (standard error of the mean over samples),
    samples, layers {name: (trace of the layer's block, its standard error)}, cost."""
    trace: float
    stderr: float
    samples: int
    layers: dict = field(default_factory=dict)
    hvps: int = 0
    grad_evals: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class DensityResult:
    """Eigenvalue density by stochastic Lanczos quadrature: grid (G,), density (G,) integrating to 1
    (times ``size`` for an eigenvalue count density), ritz_values and ritz_weights (runs, m) (each
    run's weights sum to 1), sigma the Gaussian width, size the operator's dimension, cost."""
    grid: np.ndarray
    density: np.ndarray
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    sigma: float
    size: int
    hvps: int
    grad_evals: int
    seconds: float


# --------------------------------------------------------------------------- the operator
class HessianOperator:
    """The loss Hessian on a fixed batch at fixed weights, as Hessian-vector products.

    net: any Network (its spec, input shape and current weights are used; it is not modified);
    x: (N, C, H, W), y: (N,) the batch; flat_params: (P,) weights instead of the network's current
    ones; layer: a parameter layer's name (``[n for n, _ in net.param_layers()]``) for that layer's
    block H_ll only; method: "exact" (R-operator) or "fd" (finite differences), see the module
    docstring. ``size`` is the dimension (P, or the layer's parameter count). ``hvps``,
    ``grad_evals`` and ``seconds`` count the products made through this operator, their cost in
    gradient evaluations and their time.
    """

    def __init__(self, net, x, y, flat_params=None, layer=None, method="exact"):
        from .network import Network
        if method not in METHODS:
            raise ConfigError(f"unknown Hessian-vector product method '{method}'; accepted: {', '.join(METHODS)}")
        self.method = method
        self.twin = Network(net.spec, net.input_shape, seed=0, dtype=np.float64,
                            device="numpy" if net.device == "numpy" else "cpu")
        w = net.get_flat_params() if flat_params is None else flat_params
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.layers = self.twin.param_layers()             # [(name, slice)] of the full parameter vector
        self.set_weights(w)
        self.hvps, self.grad_evals, self.seconds = 0, 0, 0.0
        self.select_block(layer)

    def set_weights(self, flat_params):
        """Move the operator to other weights (same twin, batch and block): flat_params (P,), copied
        in float64. A measurement every K steps reuses one operator instead of building a twin each
        time. (Operators made by ``restrict`` keep the weights they were made with.)"""
        w = np.array(flat_params, dtype=np.float64)
        if w.shape != (self.twin.num_params,):
            raise ConfigError(f"flat_params must have shape ({self.twin.num_params},), got {w.shape}")
        self.w = w
        self.h = HVP_REL_EPS * max(1.0, float(np.linalg.norm(w)))

    def select_block(self, layer):
        """Act on one parameter layer's block (None: all parameters)."""
        if layer is None:
            self.layer, self.block = None, slice(0, self.twin.num_params)
        else:
            found = dict(self.layers)
            if layer not in found:
                raise ConfigError(f"no parameter layer '{layer}'; parameter layers: {', '.join(found)}")
            self.layer, self.block = layer, found[layer]
        self.size = self.block.stop - self.block.start

    def restrict(self, layer):
        """The block H_ll of one parameter layer, as an operator on the same twin, batch and weights
        (with its own cost counters)."""
        op = object.__new__(HessianOperator)
        op.__dict__.update(self.__dict__)
        op.hvps, op.grad_evals, op.seconds = 0, 0, 0.0
        op.select_block(layer)
        return op

    def gradient(self, w=None):
        """The float64 gradient of the mean loss on the batch at flat weights w (default: the
        operator's), all parameters: (P,). One gradient evaluation (counted in grad_evals and seconds)."""
        t0 = time.perf_counter()
        self.twin.set_flat_params(self.w if w is None else w)
        self.twin.loss(self.x, self.y)
        self.twin.backward()
        g = self.twin.get_flat_grads()
        self.grad_evals += 1
        self.seconds += time.perf_counter() - t0
        return g

    def hvp(self, v):
        """H v for v: (size,) (in the block when the operator is restricted) -> (size,)."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (self.size,):
            raise ConfigError(f"hvp: v must have shape ({self.size},), got {v.shape}")
        self.hvps += 1
        if self.method == "fd":
            return self._hvp_fd(v)
        t0 = time.perf_counter()
        full = np.zeros(self.twin.num_params)
        full[self.block] = v
        self.twin.set_flat_params(self.w)
        out = self.twin.hessian_vector_product(self.x, self.y, full)[self.block]
        self.grad_evals += EXACT_HVP_GRAD_EQUIV
        self.seconds += time.perf_counter() - t0
        return out

    def _hvp_fd(self, v):
        nv = float(np.linalg.norm(v))
        if nv == 0:
            return np.zeros(self.size)
        h = self.h / nv
        wp, wm = self.w.copy(), self.w.copy()
        wp[self.block] += h * v
        wm[self.block] -= h * v
        gp = self.gradient(wp)
        gm = self.gradient(wm)
        return (gp[self.block] - gm[self.block]) / (2 * h)

    def __matmul__(self, v):
        return self.hvp(v)


def _cost(op, h0, e0, t0):
    """(hvps, grad_evals, seconds) spent on op since the counts h0, e0 and the time t0."""
    return dict(hvps=op.hvps - h0, grad_evals=op.grad_evals - e0, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- Lanczos
def _rademacher(rng, n):
    return rng.integers(0, 2, size=n).astype(np.float64) * 2 - 1


def lanczos(op, steps, v0, stop=None):
    """``steps`` Lanczos steps of op from v0, with full reorthogonalisation.

    -> (alpha (m,), beta (m-1,), Q (m, size)) with T = tridiag(beta, alpha, beta) = Q H Q^T, m <= steps
    (fewer when the Krylov space is invariant, or after a non-finite product, whose alpha is the
    last and not finite). ``stop(alpha, beta, beta_next)``, if given, is
    called after each step and ends the iteration when it returns True. The small linear algebra
    runs with OpenBLAS at one thread (minicnn.ops.blas: its spinning threads cost 10-100x on a
    shared machine); the products run as the operator runs them.
    """
    n = op.size
    steps = min(steps, n)
    Q = np.zeros((steps, n))
    alpha, beta = [], []
    q = v0 / np.linalg.norm(v0)
    for j in range(steps):
        Q[j] = q
        w = op.hvp(q)
        a = float(q @ w)
        alpha.append(a)
        if not (math.isfinite(a) and np.isfinite(w).all()):   # overflowed weights: nothing to iterate on
            break
        with single_thread():
            # full reorthogonalisation (twice is enough: Kahan's rule), which also removes the
            # a q_j and beta q_{j-1} terms of the three-term recurrence
            for _ in range(2):
                w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
            b = float(np.linalg.norm(w))
            if stop is not None and stop(alpha, beta, b):
                break
        if j + 1 == steps or b <= LANCZOS_BREAKDOWN * max(1.0, abs(a)):     # invariant subspace: T is exact
            break
        beta.append(b)
        q = w / b
    m = len(alpha)
    return np.array(alpha), np.array(beta[:m - 1]), Q[:m]


def _tridiag_eig(alpha, beta):
    """Eigen-decomposition of T = tridiag(beta, alpha, beta): ascending eigenvalues, eigenvectors
    in columns."""
    T = np.diag(alpha)
    if len(beta):
        T += np.diag(beta, 1) + np.diag(beta, -1)
    with single_thread():
        return np.linalg.eigh(T)


def top_eigenvalues(op, k=1, tol=LANCZOS_TOL, max_steps=LANCZOS_MAX_STEPS, seed=0, v0=None):
    """The k largest (most positive) eigenvalues of op and their vectors, by Lanczos.

    op: a HessianOperator (or anything with .size, .hvp(v), .hvps, .grad_evals); k >= 1;
    tol: residual tolerance relative to the largest |Ritz value| (LANCZOS_TOL); v0: (size,) start vector
    (default: Gaussian from seed; a previous top eigenvector warm-starts a measurement a few steps later).
    -> EigenResult
    """
    if not 1 <= k <= min(op.size, max_steps):
        raise ConfigError(f"k must be between 1 and min(the operator's size {op.size}, max_steps {max_steps}), got {k}")
    h0, e0, t0 = op.hvps, op.grad_evals, time.perf_counter()
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(op.size) if v0 is None else np.asarray(v0, dtype=np.float64)
    state = {}

    def converged(alpha, beta, b_next):
        if len(alpha) < k:
            return False
        theta, S = _tridiag_eig(np.array(alpha), np.array(beta))
        res = b_next * np.abs(S[-1, ::-1][:k])                 # residual bounds of the top k
        scale = max(abs(theta[-1]), abs(theta[0]), 1e-300)
        state.update(theta=theta, S=S, res=res)
        return bool(np.all(res <= tol * scale))

    alpha, beta, Q = lanczos(op, max_steps, v0, stop=converged)
    if not np.isfinite(alpha).all():                           # a non-finite product: no eigenvalues
        nan = np.full(k, math.nan)
        return EigenResult(values=nan, vectors=np.full((k, op.size), math.nan), residuals=nan, steps=len(alpha),
                           converged=False, ritz_values=np.array([math.nan]), **_cost(op, h0, e0, t0))
    theta, S = _tridiag_eig(alpha, beta)
    # residuals: from the stopping test if it ran on this T, else 0 for an exhausted (invariant) space
    res = state["res"] if "theta" in state and len(state["theta"]) == len(alpha) else np.zeros(min(k, len(alpha)))
    top = np.arange(len(theta) - 1, len(theta) - 1 - min(k, len(theta)), -1)
    with single_thread():
        vectors = S[:, top].T @ Q
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    conv = bool(np.all(res[:len(top)] <= tol * max(abs(theta[-1]), abs(theta[0]), 1e-300)))
    return EigenResult(values=theta[top], vectors=vectors, residuals=np.asarray(res[:len(top)]),
                       steps=len(alpha), converged=conv, ritz_values=theta, **_cost(op, h0, e0, t0))


def lambda_max(op, **kw):
    """The largest eigenvalue alone (top_eigenvalues with k=1): EigenResult, ``.lambda_max``."""
    return top_eigenvalues(op, k=1, **kw)


def layer_lambda_max(op, layers=None, **kw):
    """lambda_max of each parameter layer's block H_ll: {name: EigenResult} (each with its own cost).
    op: the full-network operator; layers: names (default: every parameter layer); kw: top_eigenvalues'."""
    names = [n for n, _ in op.layers] if layers is None else list(layers)
    return {name: top_eigenvalues(op.restrict(name), k=1, **kw) for name in names}


# --------------------------------------------------------------------------- Hutchinson
def hutchinson_trace(op, max_samples=HUTCHINSON_MAX_SAMPLES, rel_se=HUTCHINSON_REL_SE,
                     min_samples=HUTCHINSON_MIN_SAMPLES, seed=0):
    """tr H by Hutchinson's estimator: the mean of v^T H v over Rademacher vectors v, with its
    standard error; stops once stderr <= rel_se * |trace| (after min_samples) or at max_samples.
    On the full operator the same products also give each layer's block trace (v_l^T (H v)_l).
    -> TraceResult"""
    if max_samples < 2 or min_samples < 2:
        raise ConfigError(f"hutchinson_trace needs at least 2 samples (for its standard error), got "
                          f"max_samples={max_samples}, min_samples={min_samples}")
    h0, e0, t0 = op.hvps, op.grad_evals, time.perf_counter()
    rng = np.random.default_rng(seed)
    blocks = op.layers if op.layer is None else []
    base = op.block.start
    total, per_layer = [], {name: [] for name, _ in blocks}
    while len(total) < max_samples:
        v = _rademacher(rng, op.size)
        hv = op.hvp(v)
        prod = v * hv
        total.append(float(prod.sum()))
        for name, sl in blocks:
            per_layer[name].append(float(prod[sl.start - base:sl.stop - base].sum()))
        n = len(total)
        if n >= min_samples:
            se = float(np.std(total, ddof=1)) / math.sqrt(n)
            if se <= rel_se * abs(float(np.mean(total))):
                break

    def mean_se(s):
        return float(np.mean(s)), float(np.std(s, ddof=1)) / math.sqrt(len(s))

    tr, se = mean_se(total)
    return TraceResult(trace=tr, stderr=se, samples=len(total),
                       layers={name: mean_se(s) for name, s in per_layer.items()}, **_cost(op, h0, e0, t0))


# --------------------------------------------------------------------------- SLQ
def spectral_density(op, steps=SLQ_STEPS, runs=SLQ_RUNS, grid_points=SLQ_GRID, sigma=None, seed=0):
    """The eigenvalue density of op by stochastic Lanczos quadrature (module docstring).

    steps: Lanczos steps per run; runs: independent Rademacher starts averaged; sigma: Gaussian
    width (default SLQ_SIGMA_REL of the Ritz values' spread). -> DensityResult
    """
    h0, e0, t0 = op.hvps, op.grad_evals, time.perf_counter()
    rng = np.random.default_rng(seed)
    values, weights = [], []
    for _ in range(runs):
        alpha, beta, _ = lanczos(op, steps, _rademacher(rng, op.size))
        theta, S = _tridiag_eig(alpha, beta)
        values.append(theta)
        weights.append(S[0] ** 2)
    m = max(len(v) for v in values)                       # pad short (invariant) runs with zero weights
    ritz = np.array([np.pad(v, (0, m - len(v)), constant_values=v[-1]) for v in values])
    wts = np.array([np.pad(w, (0, m - len(w))) for w in weights])
    lo, hi = float(ritz.min()), float(ritz.max())
    spread = hi - lo if hi > lo else max(abs(hi), 1.0)
    sigma = SLQ_SIGMA_REL * spread if sigma is None else float(sigma)
    grid = np.linspace(lo - SLQ_GRID_MARGIN * sigma, hi + SLQ_GRID_MARGIN * sigma, grid_points)
    z = (grid[None, None, :] - ritz[:, :, None]) / sigma   # (runs, m, G)
    dens = (wts[:, :, None] * np.exp(-0.5 * z * z)).sum(axis=1).mean(axis=0) / (sigma * math.sqrt(2 * math.pi))
    return DensityResult(grid=grid, density=dens, ritz_values=ritz, ritz_weights=wts, sigma=sigma,
                         size=op.size, **_cost(op, h0, e0, t0))
