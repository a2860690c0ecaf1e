"""One plain-SGD training step on the CPU: minicnn's Numba kernels against PyTorch, side by side.

    python benchmarks/bench_cpu.py                      # full run, ~5-6 minutes on 2 cores
    python benchmarks/bench_cpu.py --repeat 3           # three full runs, the median table last (~17 min)
    python benchmarks/bench_cpu.py --quick              # ~3 minutes, shorter timing per case
    python benchmarks/bench_cpu.py --batches 1,32 --nets A --threads 2 --out results.json

The process re-runs itself without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE when they are set (some
machines set them to pin OpenBLAS to older kernels, which a user's machine would not do; the
removed values are reported), and reports the CPU, the kernel each BLAS library runs
(threadpoolctl's 'architecture', or OpenBLAS's own corename) and PyTorch's ISA
(torch.backends.cpu.get_cpu_capability()).

Reference networks (conv 3x3 pad 1, max-pool 2x2):
    A = conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10 on 1x28x28
    B = conv32k3p1-relu-maxpool2-conv64k3p1-relu-maxpool2-fc10 on 3x32x32

What it measures (float32, the same thread count for Numba, PyTorch and OpenBLAS):
1. Validation first: one step's loss and every gradient, minicnn against PyTorch (same weights and
   batch); a mismatch is printed as NOT OK and the run stops.
2. This machine's float32 matmul rate (numpy and torch, n = 2048), the practical ceiling.
3. The training step (forward, loss, backward, SGD update) at every batch size, four ways:
   minicnn through its public API (``loss, grads = net.loss_and_grads(x, y)``, then
   ``SGD.step(net.params, grads)``), minicnn as train() runs it (net.loss, net.backward, the update
   on the flat buffers: the "internal" column, for the cost of the public API), idiomatic PyTorch
   (nn.Sequential, nn.CrossEntropyLoss, torch.optim.SGD) and lean functional PyTorch
   (F.conv2d/relu/max_pool2d/linear, F.cross_entropy, torch.autograd.grad, in-place updates).
   Warm-up, then repetitions that alternate them (the order flips every repetition), each a block
   of individually timed steps after one untimed step (PyTorch's OpenMP threads spin for a while
   after its step and slowed minicnn's next step; the untimed step applies to all); the median
   step time. GFLOP/s counts the conv and dense multiply-adds of the step (2 FLOP each; forward,
   dW and dX, no dX for the first layer), and its share of the matmul ceiling of step 2.
   api/int, the cost of the public API, is measured apart: the two minicnn paths on the same
   network, one step each in turns (paired_ratio), the median of the per-pair ratios.
4. Forward-only inference at batch 128 (minicnn net.forward, PyTorch eval + no_grad).
5. Peak memory of 5 training steps at batch 128, each framework alone in a subprocess
   (the growth of the peak resident set over the resident set before the first step).
6. Time to first step of `minicnn train` (subprocess; RunResult.first_step_s and the process's
   wall time), with a cold Numba cache (a fresh NUMBA_CACHE_DIR) and with the warm one.
7. Overhead of the per-step trace: median step time of train() at trace off / light / full.
Prints the table last and writes JSON to --out and CSV beside it (same name, .csv). With
--repeat R it does all of that R times (validation once) and prints the median of the R runs
for every number (ratios: the median of the per-run ratios).
PyTorch is optional: without it, only minicnn's numbers are reported.
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# OpenBLAS settings some machines export to pin it to older kernels (PERF-NOTES: with them numpy's
# OpenBLAS ran its AVX2 kernels while PyTorch used AVX-512); a user's machine would not set them.
BLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REMOVED_ENV = "MINICNN_BENCH_REMOVED_ENV"
if any(v in os.environ for v in BLAS_PINS) and "--keep-blas-env" not in sys.argv:
    _env = {k: v for k, v in os.environ.items() if k not in BLAS_PINS}
    _env[_REMOVED_ENV] = " ".join(f"{k}={os.environ[k]}" for k in BLAS_PINS if k in os.environ)
    os.execve(sys.executable, [sys.executable] + sys.argv, _env)       # the same command, without them


import threads_env  # noqa: E402  (--threads reaches OpenBLAS and OpenMP before numpy loads)

_T = threads_env.THREADS

import numpy as np  # noqa: E402  (after the thread-count environment above)

sys.path.insert(0, str(ROOT))

from reference_nets import NETS, random_batch  # noqa: E402

LR = 0.01
VALIDATE_RTOL = 2e-3            # float32, max |a-b| / max|b| per tensor


def try_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


# --------------------------------------------------------------------------- networks
def step_flops(net):
    """Multiply-add FLOPs (x2) of one training step per image: conv and dense, forward + dW + dX."""
    total = 0
    first = True
    for layer in net.layers:
        if layer.kind == "conv":
            C = layer.in_shape[0]
            F, OH, OW = layer.out_shape
            f = 2 * F * C * layer.K * layer.K * OH * OW
        elif layer.kind == "fc":
            f = 2 * layer.in_shape[0] * layer.out_shape[0]
        else:
            continue
        total += f * (2 if first else 3)
        first = False
    return total


def torch_model(torch, net):
    """The same layers in torch.nn with minicnn's weights copied in (minicnn.torch.to_torch)."""
    return net.to_torch()


class MinicnnStep:
    """minicnn through its public API."""

    def __init__(self, net):
        import minicnn
        self.net = net
        self.opt = minicnn.SGD(lr=LR)
        self.grads = None

    def __call__(self, x, y):
        loss, self.grads = self.net.loss_and_grads(x, y)      # held until the next step, as a loop's
        self.opt.step(self.net.params, self.grads)             # variable holds them: two buffers alternate
        return loss


class MinicnnInternalStep:
    """minicnn as train() runs a step: loss, backward, the update on the flat buffers."""

    def __init__(self, net):
        import minicnn
        self.net = net
        self.opt = minicnn.SGD(lr=LR)

    def __call__(self, x, y):
        net = self.net
        loss = net.loss(x, y)
        net.backward()
        self.opt.step([net.flat_params], [net.flat_grads])
        return loss


class TorchStep:
    """Idiomatic PyTorch: nn.Sequential, nn.CrossEntropyLoss, torch.optim.SGD."""

    def __init__(self, torch, model):
        self.torch, self.model = torch, model
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)
        self.lossf = torch.nn.CrossEntropyLoss()

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = self.lossf(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()


class TorchLeanStep:
    """Lean functional PyTorch: F.conv2d / relu / max_pool2d / linear and F.cross_entropy on leaf
    tensors, torch.autograd.grad, the update in place (no nn.Module, no optimizer object)."""

    def __init__(self, torch, net):
        self.torch = torch
        self.F = torch.nn.functional
        self.params = [torch.tensor(np.array(p), requires_grad=True) for p in net.params]
        self.layers = [(layer.kind, getattr(layer, "K", 0), getattr(layer, "S", 0), getattr(layer, "P", 0))
                       for layer in net.layers]

    def forward(self, x):
        F, h, i = self.F, x, 0
        for kind, k, stride, pad in self.layers:
            if kind == "conv":
                h = F.conv2d(h, self.params[i], self.params[i + 1], stride=stride, padding=pad)
                i += 2
            elif kind == "relu":
                h = F.relu(h)
            elif kind == "maxpool":
                h = F.max_pool2d(h, k, stride)
            elif kind == "flatten":
                h = h.flatten(1)
            elif kind == "fc":
                h = F.linear(h, self.params[i], self.params[i + 1])
                i += 2
        return h

    def __call__(self, x, y):
        loss = self.F.cross_entropy(self.forward(x), y)
        grads = self.torch.autograd.grad(loss, self.params)
        with self.torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-LR)
        return loss.item()


def validate(torch, name):
    """One step's loss and gradients, minicnn against PyTorch, float32 (also warms the kernels up)."""
    import minicnn
    spec, shape = NETS[name]
    net = minicnn.Network.from_spec(spec, input_shape=shape, seed=1, dtype=np.float32)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8,) + shape).astype(np.float32)
    y = rng.integers(0, 10, 8)
    loss, grads = net.loss_and_grads(x, y)
    rows = []
    if torch is None:
        return [(name, "loss", 0.0, True)]
    model = torch_model(torch, net)
    tl = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    tl.backward()
    rows.append((name, "loss", abs(loss - tl.item()) / max(1e-8, abs(tl.item())), None))
    for pn, g, p in zip(net.param_names, grads, model.parameters()):
        ref = p.grad.numpy()
        rows.append((name, pn, float(np.max(np.abs(g - ref)) / max(1e-8, np.max(np.abs(ref)))), None))
    return [(n, what, err, err <= VALIDATE_RTOL) for n, what, err, _ in rows]


# --------------------------------------------------------------------------- timing
def timed_block(fn, x, y, steps):
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn(x, y)
        ts.append(time.perf_counter() - t0)
    return ts


def side_by_side(fns, budget_s, min_reps=5, warmup=3):
    """Median step time of each fn, alternating blocks; fns: {label: (fn, x, y)}."""
    for fn, xx, yy in fns.values():
        for _ in range(warmup):
            fn(xx, yy)
    # size blocks so that one repetition of all fns takes ~budget_s / min_reps / 2
    probe = {k: statistics.median(timed_block(fn, xx, yy, 3)) for k, (fn, xx, yy) in fns.items()}
    per_rep = max(budget_s / (min_reps * 2), 1e-3)
    block = {k: max(1, min(50, int(per_rep / max(t, 1e-6) / len(fns)))) for k, t in probe.items()}
    times = {k: [] for k in fns}
    keys = list(fns)
    t_end = time.perf_counter() + budget_s
    rep = 0
    while rep < min_reps or time.perf_counter() < t_end:
        order = keys if rep % 2 == 0 else keys[::-1]
        for k in order:
            fn, xx, yy = fns[k]
            fn(xx, yy)             # untimed: refills the caches, lets the other framework's threads go idle
            times[k] += timed_block(fn, xx, yy, block[k])
        rep += 1
        if rep >= 200:
            break
    return {k: statistics.median(v) for k, v in times.items()}, {k: len(v) for k, v in times.items()}


def paired_ratio(fa, fb, x, y, budget_s, min_pairs=41):
    """Median over pairs of (time of fa's step) / (time of fb's step), the two steps of a pair run
    one after the other (the order swapped every pair), each after an untimed step of its own.
    For two paths of one framework: it cancels the machine's drift, and the framework that ran
    before (another's threads still spinning) slows neither more than the other, as it can
    alternating blocks with PyTorch's in between (up to 3-5% at batch 1-8, NOTES session 8).
    min_pairs: the budget gives thousands of pairs at small batches but few at large ones, and
    single pairs spread widely (B at batch 128: quartiles 0.97-1.04, extremes 0.39 and 2.0): the
    median of 15 moved by +-3% (5-95%, resampled), of 41 by +-1.7% (NOTES session 10), finer
    than the 3% the API is held to."""
    ratios, t_end, pc = [], time.perf_counter() + budget_s, time.perf_counter
    while len(ratios) < min_pairs or (pc() < t_end and len(ratios) < 5000):
        t = {}
        for k, fn in ((("a", fa), ("b", fb)) if len(ratios) % 2 == 0 else (("b", fb), ("a", fa))):
            fn(x, y)
            t0 = pc()
            fn(x, y)
            t[k] = pc() - t0
        ratios.append(t["a"] / t["b"])
    return statistics.median(ratios), len(ratios)


def matmul_rate(torch, n, budget_s):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    c = np.empty_like(a)
    fns = {"numpy": (lambda x, y: np.matmul(x, y, out=c), a, b)}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tc = torch.empty_like(ta)
        fns["torch"] = (lambda x, y: torch.mm(x, y, out=tc), ta, tb)
    med, _ = side_by_side(fns, budget_s, min_reps=3, warmup=1)
    return {k: 2 * n ** 3 / t / 1e9 for k, t in med.items()}


TRAIN_FNS = ("minicnn", "internal", "torch", "torch_lean")


def bench_train(torch, name, batches, budget_s, ceiling):
    import minicnn
    spec, shape = NETS[name]
    rows = []
    for n in batches:
        net = minicnn.Network.from_spec(spec, input_shape=shape, seed=0, dtype=np.float32)
        flops = step_flops(net) * n
        x, y = random_batch(shape, n)
        # the public API and train()'s path step the same network (in turns): two identical networks
        # differed by 2-4% at batch 1 by where their buffers lie alone (NOTES, session 8)
        fns = {"minicnn": (MinicnnStep(net), x, y), "internal": (MinicnnInternalStep(net), x, y)}
        if torch is not None:
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
            fns["torch"] = (TorchStep(torch, torch_model(torch, net)), tx, ty)
            fns["torch_lean"] = (TorchLeanStep(torch, net), tx, ty)
        med, counts = side_by_side(fns, budget_s)
        row = {"net": name, "batch": n, "mflop_per_step": flops / 1e6, "load": os.getloadavg()[0]}
        for k, t in med.items():
            row[f"{k}_ms"] = t * 1e3
            row[f"{k}_img_s"] = n / t
            row[f"{k}_gflops"] = flops / t / 1e9
            row[f"{k}_share_of_matmul"] = flops / t / 1e9 / ceiling
            row[f"{k}_steps_timed"] = counts[k]
        row["api_over_internal"], row["api_pairs"] = paired_ratio(fns["minicnn"][0], fns["internal"][0], x, y,
                                                                  budget_s / 2)
        if torch is not None:
            row["ratio"] = med["minicnn"] / med["torch"]
            row["ratio_lean"] = med["minicnn"] / med["torch_lean"]
        rows.append(row)
        print(f"  train {name} batch {n:4d}: minicnn {row['minicnn_ms']:8.3f} ms (internal {row['internal_ms']:.3f})"
              + (f"  torch {row['torch_ms']:8.3f} ms  ratio {row['ratio']:.2f}  lean {row['torch_lean_ms']:8.3f} ms"
                 f"  ratio {row['ratio_lean']:.2f}" if torch else "") + f"  (load {row['load']:.2f})", flush=True)
    return rows


def bench_infer(torch, name, n, budget_s):
    import minicnn
    spec, shape = NETS[name]
    net = minicnn.Network.from_spec(spec, input_shape=shape, seed=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32)
    fns = {"minicnn": (lambda xx, yy: net.forward(xx), x, None)}
    if torch is not None:
        model = torch_model(torch, net).eval()
        lean = TorchLeanStep(torch, net)

        def tfwd(xx, yy):
            with torch.no_grad():
                return model(xx)

        def tlean(xx, yy):
            with torch.no_grad():
                return lean.forward(xx)
        fns["torch"] = (tfwd, torch.from_numpy(x), None)
        fns["torch_lean"] = (tlean, torch.from_numpy(x), None)
    med, _ = side_by_side(fns, budget_s)
    row = {"net": name, "batch": n}
    for k, t in med.items():
        row[f"{k}_ms"] = t * 1e3
        row[f"{k}_img_s"] = n / t
    if torch is not None:
        row["ratio"] = med["minicnn"] / med["torch"]
        row["ratio_lean"] = med["minicnn"] / med["torch_lean"]
    print(f"  infer {name} batch {n}: " + "  ".join(f"{k} {t * 1e3:.3f} ms" for k, t in med.items()), flush=True)
    return row


# --------------------------------------------------------------------------- subprocess probes
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mem_probe(framework, name, n, threads):
    """Run in a subprocess: peak RSS growth (MiB) over 5 training steps after one warm-up step."""
    spec, shape = NETS[name]
    import minicnn
    net = minicnn.Network.from_spec(spec, input_shape=shape, seed=0, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, n).astype(np.int64)
    if framework in ("torch", "torch_lean"):
        import torch
        torch.set_num_threads(threads)
        fn = TorchStep(torch, torch_model(torch, net)) if framework == "torch" else TorchLeanStep(torch, net)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    else:
        import numba

        import minicnn.ops.cpu  # noqa: F401  (picks the threading layer before numba launches one)
        numba.set_num_threads(threads)
        fn = MinicnnStep(net)
        fn(x[:1], y[:1])                  # compile outside the measurement (another batch size)
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    for _ in range(6):
        fn(x, y)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"rss_before_mib": before / 1024, "peak_mib": peak / 1024,
                      "step_peak_growth_mib": (peak - before) / 1024}))


def run_sub(args, env=None, timeout=900):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=str(ROOT), check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"subprocess failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), wall


FIRST_STEP_CODE = """
import json, tempfile, time, minicnn
t = time.perf_counter()
r = minicnn.train(steps=1, trace='full', threads={threads}, out=tempfile.mkdtemp())
print(json.dumps({{"first_step_s": r.first_step_s, "train_s": time.perf_counter() - t}}))
"""


def bench_first_step(threads):
    code = FIRST_STEP_CODE.format(threads=threads)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        r, wall = run_sub(["-c", code], env=env)
        out["cold"] = dict(r, process_wall_s=wall)
    run_sub(["-c", code])                 # make sure the normal cache is filled
    r, wall = run_sub(["-c", code])
    out["warm"] = dict(r, process_wall_s=wall)
    for k, v in out.items():
        print(f"  first step, {k} cache: {v['first_step_s']:.2f} s after train() "
              f"({v['process_wall_s']:.2f} s process wall)", flush=True)
    return out


def bench_trace(threads, steps):
    import minicnn
    per = {"off": [], "light": [], "full": []}
    for rep in range(3):        # the levels alternated, the order reversed every repetition
        for level in (("off", "light", "full") if rep % 2 == 0 else ("full", "light", "off")):
            ts = []
            minicnn.train(steps=steps, trace=level, threads=threads, eval_every=10 ** 9, n_train=4000,
                          n_val=200, on_step=lambda rec, ts=ts: ts.append(rec["time_s"]))
            per[level].append(statistics.median(np.diff(ts[2:])) * 1e3)
    out = {level: statistics.median(v) for level, v in per.items()}
    for level in ("light", "full"):
        out[f"{level}_overhead"] = out[level] / out["off"] - 1
    print(f"  trace: off {out['off']:.2f} ms/step, light {out['light']:.2f} "
          f"({out['light_overhead']:+.0%}), full {out['full']:.2f} ({out['full_overhead']:+.0%})", flush=True)
    return out


# --------------------------------------------------------------------------- report
def _pct(r, k):
    return f"{r[k + '_gflops']:.1f} ({r[k + '_share_of_matmul']:.0%})" if k + "_gflops" in r else "-"


def table(res):
    m = res["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {res['threads']} threads; float32 matmul "
             + ", ".join(f"{k} {v:.0f}" for k, v in res["matmul_gflops"].items()) + " GFLOP/s (the ceiling)",
             "BLAS: " + "; ".join(f"{b.get('internal_api')} {b.get('version') or ''} kernel {b.get('architecture')} "
                                  f"({os.path.basename(b.get('filepath') or '?')})" for b in m.get("blas", []))
             + f"; PyTorch ISA: {m.get('torch_cpu_capability')}; Numba threading layer {m.get('numba_threading_layer')}"
             + (f"; removed from the environment: {m['removed_env']}" if m.get("removed_env") else "")]
    if res.get("runs"):
        lines.append(f"median of {res['runs']} full runs (ratios: median of the per-run ratios)")
    lines.append("")
    lines.append("ratio = minicnn (public API) / PyTorch step time; lean = functional PyTorch; api/int = public "
                 "API / train()'s internal path on the same network (median of per-step pairs); GFLOP/s (% of the "
                 "matmul ceiling)")
    lines.append("")
    lines.append("| net | batch | minicnn ms | torch ms | ratio | lean ms | ratio lean | api/int | "
                 "minicnn GFLOP/s | torch GFLOP/s | lean GFLOP/s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["train"]:
        def tm(k, f="{:.3f}", r=r):
            return f.format(r[k]) if k in r else "-"
        lines.append(f"| {r['net']} | {r['batch']} | {tm('minicnn_ms')} | {tm('torch_ms')} | {tm('ratio', '{:.2f}')} | "
                     f"{tm('torch_lean_ms')} | {tm('ratio_lean', '{:.2f}')} | {tm('api_over_internal', '{:.3f}')} | "
                     f"{_pct(r, 'minicnn')} | {_pct(r, 'torch')} | {_pct(r, 'torch_lean')} |")
    if res.get("infer"):
        lines.append("")
        lines.append("| inference (forward only) | batch | minicnn ms | torch ms | ratio | lean ms | ratio lean |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in res["infer"]:
            lines.append(f"| {r['net']} | {r['batch']} | {r['minicnn_ms']:.3f} | "
                         f"{r.get('torch_ms', float('nan')):.3f} | "
                         f"{r.get('ratio', float('nan')):.2f} | {r.get('torch_lean_ms', float('nan')):.3f} | "
                         f"{r.get('ratio_lean', float('nan')):.2f} |")
    if res.get("memory"):
        lines.append("")
        lines.append("| peak memory, 5 steps at batch 128 | framework | RSS before (MiB) | peak growth (MiB) |")
        lines.append("|---|---|---:|---:|")
        for r in res["memory"]:
            lines.append(f"| {r['net']} | {r['framework']} | {r['rss_before_mib']:.0f} | "
                         f"{r['step_peak_growth_mib']:.1f} |")
    if res.get("first_step"):
        fs = res["first_step"]
        lines.append("")
        lines.append("| `minicnn train` time to first step | after train() call (s) | process wall (s) |")
        lines.append("|---|---:|---:|")
        for k in ("cold", "warm"):
            lines.append(f"| {k} Numba cache | {fs[k]['first_step_s']:.2f} | {fs[k]['process_wall_s']:.2f} |")
    if res.get("trace"):
        t = res["trace"]
        lines.append("")
        lines.append(f"trace overhead (train(), small net, batch 64): off {t['off']:.2f} ms/step, "
                     f"light {t['light']:.2f} ({t['light_overhead']:+.0%}), full {t['full']:.2f} "
                     f"({t['full_overhead']:+.0%}); levels alternated, 3 repetitions, medians")
    return "\n".join(lines)


def median_of(objs):
    """The element-wise median of several results of the same structure (numbers: the median;
    anything else: the first run's)."""
    first = objs[0]
    if isinstance(first, dict):
        return {k: median_of([o[k] for o in objs]) for k in first if all(k in o for o in objs)}
    if isinstance(first, list) and all(isinstance(o, list) and len(o) == len(first) for o in objs):
        return [median_of(list(items)) for items in zip(*objs)]
    if isinstance(first, (int, float)) and not isinstance(first, bool) and any(o != first for o in objs):
        return statistics.median(objs)
    return first


def blas_info():
    """[{internal_api, version, architecture, filepath}] of the BLAS libraries loaded (numpy's;
    SciPy's, which minicnn's convolutions call): threadpoolctl's report, else OpenBLAS's corename."""
    try:
        from threadpoolctl import threadpool_info
        return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "filepath", "num_threads")}
                for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        pass
    import ctypes
    out = []
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                out.append({"internal_api": "openblas", "version": None, "architecture": fn().decode(),
                            "filepath": path})
                break
    return out


def write_csv(path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter timing per case (1 s instead of 4), skip nothing")
    p.add_argument("--repeat", type=int, default=1,
                   help="full runs; with more than one the median table is printed last")
    p.add_argument("--batches", default="1,8,32,128,512", help="comma-separated batch sizes")
    p.add_argument("--nets", default="A,B", help="comma-separated: A, B")
    p.add_argument("--threads", type=int, default=int(_T), help="threads for Numba, PyTorch and OpenBLAS")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per (net, batch)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: infer,memory,first,trace")
    p.add_argument("--no-torch", action="store_true", help="do not import PyTorch")
    p.add_argument("--keep-blas-env", action="store_true",
                   help=f"do not re-run without {' / '.join(BLAS_PINS)} when they are set")
    p.add_argument("--out", default="bench-results/cpu.json", help="JSON output (CSV written beside it)")
    p.add_argument("--mem-probe", nargs=3, metavar=("FRAMEWORK", "NET", "BATCH"), help=argparse.SUPPRESS)
    return p.parse_args()


def describe_machine(numba, torch):
    import minicnn
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "torch": torch.__version__ if torch else None, "minicnn": minicnn.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability() if torch else None,
            "removed_env": os.environ.get(_REMOVED_ENV, ""),
            "blas_env": {k: os.environ.get(k) for k in BLAS_PINS if k in os.environ}}


def validate_all(torch, nets):
    """Validate every net against PyTorch first; exit without timing on a mismatch."""
    print("validation (float32, batch 8, minicnn vs torch, max|diff|/max|torch| per tensor):", flush=True)
    ok = True
    for name in nets:
        for n, what, err, good in validate(torch, name):
            print(f"  {n} {what:14s} {err:.2e} {'OK' if good else 'NOT OK'}")
            ok &= good
    if not ok:
        print("bench_cpu: validation failed; not timing", file=sys.stderr)
        sys.exit(1)


def one_run(a, torch, machine, nets, batches, budget, skip):
    """Every part of the benchmark once: {train, infer, memory, first_step, trace, ...}."""
    res = {"threads": a.threads, "quick": a.quick, "budget_s": budget, "machine": machine,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_at_start": os.getloadavg()[0]}
    print("matmul ceiling:", flush=True)
    res["matmul_gflops"] = matmul_rate(torch, 2048, 2.0 if a.quick else 4.0)
    ceiling = max(res["matmul_gflops"].values())
    print("  " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in res["matmul_gflops"].items()), flush=True)
    res["train"] = []
    for name in nets:
        res["train"] += bench_train(torch, name, batches, budget, ceiling)
    if "infer" not in skip:
        res["infer"] = [bench_infer(torch, name, 128, budget) for name in nets]
    if "memory" not in skip:
        res["memory"] = []
        for name in nets:
            for fw in ("minicnn",) + (("torch", "torch_lean") if torch else ()):
                r, _ = run_sub([__file__, "--mem-probe", fw, name, "128", "--threads", str(a.threads)])
                res["memory"].append(dict(r, net=name, framework=fw, batch=128))
    if "first" not in skip:
        res["first_step"] = bench_first_step(a.threads)
    if "trace" not in skip:
        res["trace"] = bench_trace(a.threads, 30 if a.quick else 80)
    return res


def write_results(runs, out):
    final = runs[0] if len(runs) == 1 else dict(median_of(runs), runs=len(runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(final, all_runs=runs) if len(runs) > 1 else final, indent=1))
    write_csv(out.with_suffix(".csv"), final["train"] + [dict(r, kind="infer") for r in final.get("infer", [])])
    print()
    print(table(final))
    print(f"\nwritten: {out} and {out.with_suffix('.csv')}")


def main():
    a = parse_args()
    if a.mem_probe:
        mem_probe(a.mem_probe[0], a.mem_probe[1], int(a.mem_probe[2]), a.threads)
        return
    import numba  # set_num_threads would otherwise launch as the default (OpenMP)

    import minicnn.ops.cpu  # noqa: F401  (first: it picks Numba's threading layer, which set_num_threads launches)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    torch = None if a.no_torch else try_torch()
    if torch is not None:
        torch.set_num_threads(a.threads)
    budget = a.budget or (1.0 if a.quick else 4.0)
    batches = [int(b) for b in a.batches.split(",") if b]
    nets = [n.strip() for n in a.nets.split(",") if n.strip()]
    skip = {s for s in a.skip.split(",") if s}
    machine = describe_machine(numba, torch)
    validate_all(torch, nets)
    machine["numba_threading_layer"] = numba.threading_layer()
    machine["blas"] = blas_info()            # after validate: minicnn's BLAS (SciPy's) is loaded by now
    print(f"machine: {machine['cpu']}; BLAS "
          + "; ".join(f"{b['internal_api']} {b.get('architecture')}" for b in machine["blas"])
          + f"; PyTorch ISA {machine['torch_cpu_capability']}"
          + (f"; removed from the environment: {machine['removed_env']}" if machine["removed_env"] else ""), flush=True)
    runs = []
    for run in range(a.repeat):
        if a.repeat > 1:
            print(f"run {run + 1} of {a.repeat} (load {os.getloadavg()[0]:.2f}):", flush=True)
        runs.append(one_run(a, torch, machine, nets, batches, budget, skip))
        if a.repeat > 1:
            print()
            print(table(runs[-1]))
            print()
    write_results(runs, Path(a.out))


if __name__ == "__main__":
    main()
