"""The cost of each training instrument against a plain training step, beside PyTorch.

    python benchmarks/bench_instruments.py                    # network A, batch 32, ~4-5 minutes on 2 quiet cores
    python benchmarks/bench_instruments.py --batch 64 --reps 5 --threads 2 --out results.json

Network A = conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10 on 1x28x28 (the default "small"),
at its initial weights (seed 1) on a batch of the built-in shapes data.

1. Validation first, in float64 (the run stops on NOT OK): minicnn's per-sample gradients against
   torch.func (vmap of grad); the noise statistics computed from each; the exact Hessian-vector
   product (R-operator) against PyTorch's double backward; the top-k eigenvalues, Hutchinson
   trace (same Rademacher vectors), per-layer lambda_max and SLQ Ritz values of minicnn's operator
   against the same algorithms (minicnn.hessian's) driven by PyTorch's products. Then, for the
   record, how far the finite-difference products (method "fd", what trace.Sharpness used before
   session 5) are from the exact ones over --fd-dirs random directions, and Lanczos' lambda_max on
   each.
2. Timing, each instrument's median over --reps runs (the training steps: median of 20):
     train step        forward, backward, SGD update, float32 (minicnn cpu / torch)
     per-sample grads  Network.per_sample_grads on the float32 training network / torch.func
                       vmap(grad) (float32), both ending in one (N, P) array
     noise stats       noise.noise_stats on the (N, P) per-sample gradients (minicnn only: NumPy)
     gradient_noise    the two above together
     HVP               one Hessian-vector product, float64: minicnn's R-operator on the float64 twin
                       (and its centred difference of two gradients, method "fd") / torch double
                       backward through a cached first-order graph (PyHessian's way) / torch.func jvp
                       of grad (forward over reverse)
     Lanczos top-k     hessian.top_eigenvalues (minicnn's operator / the same code on torch's products)
     Hutchinson        hessian.hutchinson_trace with a fixed number of samples (--hutchinson)
     layer lambda_max  hessian.layer_lambda_max, every parameter layer
     SLQ density       hessian.spectral_density, one run of --slq-steps steps
   with the cost in Hessian-vector products and gradient evaluations (minicnn's) beside it.
3. The trace's instruments in a run (--trace-steps; 0 skips): a Trainer step of network A (batch
   64, light trace) with and without --noise-every 1, and each --sharpness choice on the fixed batch
   (config.SHARPNESS_SAMPLES images) every 10 steps from --trace-steps steps at lr 0.1 on, warm-
   started as in a run, beside lambda_max from a cold start (medians of --reps + 2 measurements).
Prints the validation, then the table; writes JSON to --out. PyTorch is needed for the side-by-side
columns and the validation (without it only minicnn's times are printed). Timing on a shared
machine is noisy: compare ratios measured in the same run.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import threads_env  # noqa: E402  (--threads reaches OpenBLAS and OpenMP before numpy loads)

_T = threads_env.THREADS
# PyTorch's OpenMP threads otherwise spin for a while after each of its calls and take the cores
# from the minicnn call timed next (bench_cpu.py saw the same); passive waiting sleeps instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT))

SPEC, SHAPE = "conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10", (1, 28, 28)
LR = 0.01
# float64 validation tolerances (max |a - b| / max |b|): per-sample gradients and exact Hessian-vector
# products are the same sums in another order (1e-10); the algorithms on top of the products
# (Lanczos, Hutchinson, SLQ) amplify rounding a little over tens of steps (1e-8).
TOL_EXACT, TOL_ALGO = 1e-10, 1e-8
FD_OFF = 1e-3          # a finite-difference product this far from the exact one crossed a kink


# --------------------------------------------------------------------------- torch side
def torch_model(torch, net):
    """The same layers in torch.nn, in the network's dtype, with its weights copied in."""
    return net.to_torch()


def torch_per_sample(torch, model, x, y):
    """(N, P) per-sample gradients of each sample's loss by torch.func.vmap(grad), flat_params order."""
    from torch.func import functional_call, grad, vmap
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


class TorchHessian:
    """PyTorch's exact Hessian-vector products behind minicnn.hessian's operator interface (size,
    layers, layer, block, hvp, restrict, grad_evals counting 2 per product), so that the same
    Lanczos / Hutchinson / SLQ code runs on either. mode: "double" (double backward through a
    first-order graph built once, as PyHessian) or "func" (torch.func.jvp of torch.func.grad)."""

    def __init__(self, torch, net, x, y, mode="double"):
        self.torch, self.mode = torch, mode
        self.model = torch_model(torch, net).double()
        self.params = list(self.model.parameters())
        self.x, self.y = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y))
        self.offsets = net.offsets
        self.layers = net.param_layers()
        self.layer, self.block, self.size = None, slice(0, net.num_params), net.num_params
        self.hvps, self.grad_evals, self.seconds = 0, 0, 0.0
        self._graph = None

    def restrict(self, name):
        op = object.__new__(TorchHessian)
        op.__dict__.update(self.__dict__)
        op.layer, op.block = name, dict(self.layers)[name]
        op.size, op.hvps, op.grad_evals = op.block.stop - op.block.start, 0, 0
        return op

    def _split(self, v):
        return [self.torch.from_numpy(v[a:b]).reshape(p.shape)
                for a, b, p in zip(self.offsets, self.offsets[1:], self.params)]

    def full_hvp(self, v):
        torch = self.torch
        t0 = time.perf_counter()
        vs = self._split(np.ascontiguousarray(v))
        if self.mode == "double":
            if self._graph is None:
                loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
                self._graph = torch.autograd.grad(loss, self.params, create_graph=True)
            hv = torch.autograd.grad(self._graph, self.params, grad_outputs=vs, retain_graph=True)
        else:
            from torch.func import functional_call, grad, jvp
            names = [n for n, _ in self.model.named_parameters()]
            p0 = {n: p.detach() for n, p in self.model.named_parameters()}

            def loss(p):
                return torch.nn.functional.cross_entropy(functional_call(self.model, p, (self.x,)), self.y)

            _, hvd = jvp(grad(loss), (p0,), (dict(zip(names, vs)),))
            hv = [hvd[n] for n in names]
        out = np.concatenate([h.detach().numpy().ravel() for h in hv])
        self.hvps += 1
        self.grad_evals += 2
        self.seconds += time.perf_counter() - t0
        return out

    def hvp(self, v):
        full = np.zeros(self.offsets[-1])
        full[self.block] = v
        return self.full_hvp(full)[self.block]


# --------------------------------------------------------------------------- helpers
def rel(a, b):
    """max |a - b| / max |b| over the finite entries; entries that are the same infinity agree."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(a) & np.isfinite(b)
    if np.any(~fin & (a != b)):                      # a non-finite entry on one side only (or nan)
        return math.inf
    d = np.abs(a[fin] - b[fin])
    return float(np.max(d, initial=0.0) / max(1e-300, float(np.max(np.abs(b[fin]), initial=0.0))))


def alternate(fns, reps, warmup=1):
    """Median time of each callable in fns ({label: fn or None}), timed in turns: every repetition
    runs each once, the order flipping from one repetition to the next, so that a busy spell of the
    shared machine falls on both sides. -> {label: seconds or None}."""
    live = {k: f for k, f in fns.items() if f is not None}
    for f in live.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in live}
    keys = list(live)
    for r in range(reps):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            live[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(times[k]) if k in live else None) for k in fns}


# --------------------------------------------------------------------------- setup
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=3, help="top-k eigenvalues (Lanczos)")
    ap.add_argument("--hutchinson", type=int, default=20, help="Hutchinson samples (fixed)")
    ap.add_argument("--slq-steps", type=int, default=30)
    ap.add_argument("--fd-dirs", type=int, default=20, help="random directions for the fd-vs-exact record")
    ap.add_argument("--reps", type=int, default=3, help="runs per instrument (median)")
    ap.add_argument("--trace-steps", type=int, default=100,
                    help="training steps before the trace-measurement costs are taken (0: skip that part)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="bench-results/instruments.json")
    return ap.parse_args()


class Bench:
    """Network A at its initial weights, the batch, both frameworks' Hessian operators."""

    def __init__(self, args):
        import numba

        from minicnn import Network
        from minicnn.hessian import HessianOperator
        from minicnn.synthetic import make_shapes
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        self.args, self.torch = args, None
        if not args.no_torch:
            try:
                import torch
                torch.set_num_threads(args.threads)
                self.torch = torch
            except ImportError:
                pass
        self.N = args.batch
        self.x, self.y = make_shapes(self.N, seed=3)
        self.net32 = Network.from_spec(SPEC, SHAPE, seed=1, dtype=np.float32)
        self.net64 = Network.from_spec(SPEC, SHAPE, seed=1, dtype=np.float64)
        self.net64.set_flat_params(self.net32.get_flat_params().astype(np.float64))   # the instruments' weights
        self.x64 = self.x.astype(np.float64)
        self.op = HessianOperator(self.net32, self.x64, self.y)
        self.op_fd = HessianOperator(self.net32, self.x64, self.y, method="fd")
        self.kw_h = dict(max_samples=args.hutchinson, min_samples=args.hutchinson, rel_se=0.0, seed=5)
        self.th = self.tf = None
        if self.torch is not None:
            self.th = TorchHessian(self.torch, self.net64, self.x64, self.y, "double")
            self.tf = TorchHessian(self.torch, self.net64, self.x64, self.y, "func")


# --------------------------------------------------------------------------- 1. validation
def validate(b):
    """minicnn against PyTorch in float64 (list of (what, error, tol)); exits on NOT OK."""
    from minicnn.hessian import hutchinson_trace, layer_lambda_max, spectral_density, top_eigenvalues
    from minicnn.noise import noise_stats
    torch, net64, x64, y, op, th, k = b.torch, b.net64, b.x64, b.y, b.op, b.th, b.args.k
    G64 = net64.per_sample_grads(x64, y)
    Gt = torch_per_sample(torch, torch_model(torch, net64), torch.from_numpy(x64), torch.from_numpy(y)).numpy()
    checks = [("per-sample gradients vs torch.func", rel(G64, Gt), TOL_EXACT)]
    a, c = noise_stats(G64, net64.param_layers()), noise_stats(Gt, net64.param_layers())
    fields = ("b_noise", "norm_test", "inner_product_test", "orthogonality_test", "gsnr_mean")
    checks.append(("noise stats (all, per layer) from each", max(
        rel([getattr(s, f) for s in [a.total, *a.layers.values()]],
            [getattr(s, f) for s in [c.total, *c.layers.values()]]) for f in fields), TOL_EXACT * 100))
    v = np.random.default_rng(0).standard_normal(op.size)
    hv_t = th.full_hvp(v)
    checks.append(("HVP (exact R-operator) vs torch double backward", rel(op.hvp(v), hv_t), TOL_EXACT))
    checks.append(("torch.func jvp(grad) vs double backward", rel(b.tf.full_hvp(v), hv_t), TOL_EXACT))
    r_m, r_t = top_eigenvalues(op, k=k), top_eigenvalues(th, k=k)
    checks.append((f"Lanczos top-{k} vs on torch's products", rel(r_m.values, r_t.values), TOL_ALGO))
    h_m, h_t = hutchinson_trace(op, **b.kw_h), hutchinson_trace(th, **b.kw_h)
    checks.append(("Hutchinson trace, same vectors", rel([h_m.trace, *[t for t, _ in h_m.layers.values()]],
                                                         [h_t.trace, *[t for t, _ in h_t.layers.values()]]), TOL_ALGO))
    l_m, l_t = layer_lambda_max(op), layer_lambda_max(th)
    checks.append(("layer lambda_max",
                   rel([r.lambda_max for r in l_m.values()], [r.lambda_max for r in l_t.values()]), TOL_ALGO))
    s_m = spectral_density(op, steps=b.args.slq_steps, runs=1)
    s_t = spectral_density(th, steps=b.args.slq_steps, runs=1)
    checks.append(("SLQ Ritz values", rel(s_m.ritz_values, s_t.ritz_values), TOL_ALGO))
    print("\nvalidation (float64, max |a-b| / max |b|):")
    for what, err, tol in checks:
        print(f"  {'OK    ' if err <= tol else 'NOT OK'} {what:52s} {err:9.2e}  (tol {tol:.0e})")
    print(f"  lambda_1..{k} = {', '.join(f'{v:.6g}' for v in r_m.values)};  trace = {h_m.trace:.6g} "
          f"+- {h_m.stderr:.2g};  layer lambda_max: " + ", ".join(f"{n} {r.lambda_max:.4g}" for n, r in l_m.items()))
    if any(err > tol for _, err, tol in checks):
        sys.exit("validation failed: not timing")
    return checks


def fd_record(b):
    """How far the finite-difference products (method fd) are from the exact ones, and lambda_max
    by Lanczos on each, for the record."""
    from minicnn.hessian import top_eigenvalues
    from minicnn.trace import Sharpness
    op, op_fd = b.op, b.op_fd
    rng = np.random.default_rng(7)
    errs, errs2 = [], []
    for _ in range(b.args.fd_dirs):
        v = rng.standard_normal(op.size)
        x, e = op_fd.hvp(v), op.hvp(v)
        errs.append(rel(x, e))
        errs2.append(float(np.linalg.norm(x - e) / np.linalg.norm(e)))
    errs, errs2 = np.array(errs), np.array(errs2)
    fd_max = top_eigenvalues(op_fd, k=1).lambda_max
    exact_max = top_eigenvalues(op, k=1).lambda_max
    lam, evals = Sharpness(b.net32, b.x64, b.y, seed=0)()
    rec = dict(directions=len(errs), off=int((errs > FD_OFF).sum()), median=float(np.median(errs)),
               worst=float(errs.max()), median_l2=float(np.median(errs2)), fd_lambda_max=fd_max,
               exact_lambda_max=exact_max, sharpness=lam, sharpness_evals=evals)
    print(f"\nfinite-difference products (method fd) against the exact ones: {rec['off']} of {len(errs)} random "
          f"directions off by more than {FD_OFF:g} (max-norm error: median {rec['median']:.1e}, worst "
          f"{rec['worst']:.1e}; 2-norm: median {rec['median_l2']:.1e});\n"
          f"Lanczos lambda_max on fd products {fd_max:.6g} against the exact {exact_max:.6g}; "
          f"trace.Sharpness (exact, tolerance SHARPNESS_TOL) {lam:.6g} ({evals} gradient evaluations)")
    return rec


# --------------------------------------------------------------------------- 2. timing
def time_step(b, rows):
    """The float32 training step both ways; returns its minicnn time (the unit of the 'x step' column)."""
    from minicnn import SGD
    net32, torch = b.net32, b.torch
    opt = SGD(lr=LR)
    x32 = np.ascontiguousarray(b.x, np.float32)
    w_saved = net32.get_flat_params()

    def step():
        net32.loss(x32, b.y)
        net32.backward()
        opt.step([net32.flat_params], [net32.flat_grads])
    tstep = None
    if torch is not None:
        tm32 = torch_model(torch, net32)
        topt = torch.optim.SGD(tm32.parameters(), lr=LR)
        xt, yt = torch.from_numpy(x32), torch.from_numpy(b.y)

        def tstep():
            topt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(tm32(xt), yt).backward()
            topt.step()
    t = alternate({"m": step, "t": tstep}, 20, warmup=3)      # both train from the same weights on
    rows.append(("train step (float32)", t["m"], t["t"], None, "1 gradient"))
    net32.set_flat_params(w_saved)
    return t["m"]


def time_noise_and_hvp(b, rows):
    from minicnn.noise import gradient_noise, noise_stats
    net32, torch, op, op_fd, reps = b.net32, b.torch, b.op, b.op_fd, b.args.reps
    x32 = np.ascontiguousarray(b.x, np.float32)
    tps = thvp = tfhvp = None
    v = np.random.default_rng(1).standard_normal(op.size)
    if torch is not None:
        tm32, xt, yt = torch_model(torch, net32), torch.from_numpy(x32), torch.from_numpy(b.y)

        def tps():
            torch_per_sample(torch, tm32, xt, yt)

        def thvp():
            b.th.full_hvp(v)

        def tfhvp():
            b.tf.full_hvp(v)
    G = net32.per_sample_grads(x32, b.y)
    t = alternate({"m": lambda: net32.per_sample_grads(x32, b.y), "t": tps,
                   "noise": lambda: noise_stats(G, net32.param_layers()),
                   "both": lambda: gradient_noise(net32, x32, b.y)}, reps * 3)
    rows.append(("per-sample grads (float32 -> (N,P))", t["m"], t["t"], None, f"N x P = {b.N} x {net32.num_params}"))
    rows.append(("noise stats from (N,P)", t["noise"], None, None, "per layer + total"))
    rows.append(("gradient_noise (both)", t["both"], None, None, ""))
    t = alternate({"m": lambda: op.hvp(v), "t": thvp, "f": tfhvp, "grad": op.gradient, "fd": lambda: op_fd.hvp(v)},
                  reps * 3)
    rows.append(("gradient (float64 twin)", t["grad"], None, None, "1 gradient"))
    rows.append(("HVP exact (float64)", t["m"], t["t"], t["f"], f"1 HVP = {t['m'] / t['grad']:.1f} gradients' time"))
    rows.append(("HVP fd (float64; crosses kinks)", t["fd"], None, None, "2 gradients"))


def time_algorithms(b, rows):
    """minicnn.hessian's algorithms on minicnn's products and on PyTorch's."""
    from minicnn.hessian import hutchinson_trace, layer_lambda_max, spectral_density, top_eigenvalues
    k, reps = b.args.k, b.args.reps

    def timed_algo(name, f, cost):
        out = {}
        t = alternate({"m": lambda: out.__setitem__("m", f(b.op)),
                       "t": (lambda: out.__setitem__("t", f(b.th))) if b.th is not None else None}, reps, warmup=0)
        rows.append((name, t["m"], t["t"], None, cost(out["m"])))

    timed_algo(f"Lanczos top-{k}", lambda o: top_eigenvalues(o, k=k),
               lambda r: f"{r.hvps} HVPs, lambda_1 {r.values[0]:.5g}")
    timed_algo("Lanczos lambda_max (k=1)", lambda o: top_eigenvalues(o, k=1), lambda r: f"{r.hvps} HVPs")
    timed_algo(f"Hutchinson trace ({b.args.hutchinson} samples)", lambda o: hutchinson_trace(o, **b.kw_h),
               lambda r: f"{r.hvps} HVPs, trace {r.trace:.4g} +- {r.stderr:.2g}")
    timed_algo("layer lambda_max (all layers)", lambda o: layer_lambda_max(o),
               lambda r: f"{sum(x.hvps for x in r.values())} HVPs")
    timed_algo(f"SLQ density (1 run x {b.args.slq_steps})",
               lambda o: spectral_density(o, steps=b.args.slq_steps, runs=1), lambda r: f"{r.hvps} HVPs")


# --------------------------------------------------------------------------- 3. the trace's measurements
def trace_costs(args):
    """What the trace's instruments cost in a run: Trainer steps of network A (batch 64, light
    trace) with and without --noise-every 1, then each --sharpness choice measured on the fixed batch
    of SHARPNESS_SAMPLES images every 10 steps from step ``--trace-steps`` on (lr 0.1), each
    warm-started from its own previous measurement as in a run, and lambda_max from a cold (random)
    start at the same weights: medians over --reps + 2 measurements. -> rows, the plain step's time."""
    from minicnn.config import SHARPNESS_SAMPLES
    from minicnn.trainer import Trainer
    kw = dict(arch=SPEC, lr=0.1, batch_size=64, n_train=4000, n_val=500, trace="light", steps=10 ** 6,
              probe_every=0, threads=args.threads)
    plain, noisy = Trainer(**kw), Trainer(**kw, noise_every=1)
    t = alternate({"plain": plain.step, "noise": noisy.step}, 10 * args.reps, warmup=2)
    rows = [("trace light, batch 64: a step", t["plain"], None, None, "train step + light trace"),
            ("  with --noise-every 1 (that step)", t["noise"], None, None,
             f"+{t['noise'] / t['plain'] - 1:.0%}: per-sample backward + stats")]
    run = Trainer(**kw, sharpness_every=10 ** 6)
    for _ in range(max(0, args.trace_steps - 10)):
        run.step(record=False, sharpness=False)
    choices = {"cold": None, "lambda_max": {}, "topk": {"topk": 3}, "trace": {"trace": 20}, "layers": {"layers": None}}
    warm = {name: {} for name in choices}
    got = {name: [] for name in choices}
    for _ in range(args.reps + 2):
        for _ in range(10):
            run.step(record=False, sharpness=False)
        for name, extra in choices.items():
            run.sharp.load_state(warm[name] if extra is not None else {})
            got[name].append(run.sharp.measure(run.step_count, measures={"lambda_max": None, **(extra or {})}))
            warm[name] = run.sharp.state()
    steps = f"steps {args.trace_steps}-{run.step_count}"
    for name, recs in got.items():
        label = "lambda_max, cold start" if name == "cold" else f"--sharpness {name}, every 10 steps"
        hv, ge = (statistics.median(r[k] for r in recs) for k in ("hvp_evals", "grad_evals"))
        rows.append((label, statistics.median(r["sharpness_s"] for r in recs), None, None,
                     f"median {hv:g} HVPs = {ge:g} gradients ({SHARPNESS_SAMPLES} images, {steps}; "
                     f"HVPs {', '.join(str(r['hvp_evals']) for r in recs)})"))
    return rows, t["plain"]


# --------------------------------------------------------------------------- report
def print_table(rows, unit, title):
    print(f"\n{title}")
    print(f"{'instrument':40s} {'minicnn ms':>11s} {'x step':>7s} {'torch ms':>10s} {'torch/mini':>10s}  "
          "cost (minicnn)")
    out = []
    for name, tm, tt, tf_, cost in rows:
        tts = f"{tt * 1e3:10.2f}" if tt is not None else f"{'-':>10s}"
        ratio = f"{tt / tm:10.2f}" if tt is not None else f"{'-':>10s}"
        print(f"{name:40s} {tm * 1e3:11.2f} {tm / unit:7.1f} {tts} {ratio}  {cost}")
        if tf_ is not None:
            print(f"{'  torch.func jvp(grad) instead':40s} {'':11s} {'':7s} {tf_ * 1e3:10.2f} {tf_ / tm:10.2f}")
        out.append(dict(instrument=name, minicnn_s=tm, steps=tm / unit, torch_s=tt, torch_func_s=tf_, cost=cost))
    return out


def main():
    args = parse_args()
    b = Bench(args)
    print(f"network A ({SPEC}, {b.net32.num_params} parameters), batch {b.N}, threads {args.threads}, "
          f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    checks = validate(b) if b.torch is not None else []
    fd = fd_record(b)
    rows = []
    unit = time_step(b, rows)
    time_noise_and_hvp(b, rows)
    time_algorithms(b, rows)
    out = print_table(rows, unit, f"timing (median; on a shared machine: noisy), network A, batch {b.N}")
    trace_out = []
    if args.trace_steps:
        trows, tunit = trace_costs(args)
        trace_out = print_table(trows, tunit, "the trace's instruments in a run (network A; x step: a batch-64 "
                                              "step with the light trace)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(network=SPEC, batch=b.N, threads=args.threads, params=b.net32.num_params,
                       load_average=os.getloadavg(), validation=[dict(check=c, error=e, tol=t) for c, e, t in checks],
                       fd=fd, rows=out, trace_rows=trace_out), f, indent=1)


if __name__ == "__main__":
    main()
