"""A/B: minicnn at another git revision against this working tree, alternated in one process.

    python benchmarks/ab_cpu.py --old HEAD~1                     # nets A, B; batches 1,8,32,128,512
    python benchmarks/ab_cpu.py --old e0d562a --batches 8,128 --nets B --rounds 7 --threads 2

For comparing two versions of minicnn's own code on a shared machine: both run in the same
process, step after step in alternating blocks (the order flips every round), so load that comes
and goes hits both alike; the ratio new/old of the medians is what to read. The old revision is
exported with ``git archive`` into a temporary directory as the package ``minicnn_old`` (minicnn's
imports are relative, so it runs as a second copy with its own Numba cache). The step is the
public API: ``loss, grads = net.loss_and_grads(x, y)`` then ``SGD.step(net.params, grads)``.
Prints the load average before each case. Results are checked equal to float32 rounding first.
On a loaded machine, ``--threads 1 --clock cpu`` times the work itself (the calling thread's CPU
time), which waiting for a time slice does not inflate.
"""
import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import threads_env  # noqa: E402  (--threads reaches OpenBLAS and OpenMP before numpy loads)

THREADS = threads_env.THREADS

import numpy as np  # noqa: E402
from reference_nets import NETS, random_batch  # noqa: E402


def export(rev, dest):
    """git archive REV's minicnn/ into dest/minicnn_old; returns dest."""
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "minicnn"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    os.rename(os.path.join(dest, "minicnn"), os.path.join(dest, "minicnn_old"))
    return dest


class PublicStep:
    """The public API's training step."""

    def __init__(self, pkg, spec, shape):
        self.net = pkg.Network.from_spec(spec, input_shape=shape, seed=0, dtype=np.float32)
        self.opt = pkg.SGD(lr=0.01)

    def __call__(self, x, y):
        loss, grads = self.net.loss_and_grads(x, y)
        self.opt.step(self.net.params, grads)
        return loss


class InferStep:
    def __init__(self, pkg, spec, shape):
        self.net = pkg.Network.from_spec(spec, input_shape=shape, seed=0, dtype=np.float32)

    def __call__(self, x, y):
        return self.net.forward(x)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def alternate(fns, x, y, rounds, budget_s):
    """{label: median step time}; fns alternated in blocks, order flipped every round."""
    for f in fns.values():
        for _ in range(3):
            f(x, y)
    probe = {k: statistics.median(_timed(f, x, y, 3)) for k, f in fns.items()}
    per_round = budget_s / rounds / len(fns)
    block = {k: max(1, min(200, int(per_round / max(t, 1e-6)))) for k, t in probe.items()}
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            fns[k](x, y)
            times[k] += _timed(fns[k], x, y, block[k])
    return {k: _stat(v) for k, v in times.items()}


_stat = statistics.median


def _timed(f, x, y, n):
    ts = []
    for _ in range(n):
        t0 = _clock()
        f(x, y)
        ts.append(_clock() - t0)
    return ts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="git revision to compare against (e.g. HEAD, a commit)")
    p.add_argument("--batches", default="1,8,32,128,512")
    p.add_argument("--nets", default="A,B")
    p.add_argument("--threads", type=int, default=int(THREADS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case (both versions)")
    p.add_argument("--infer", action="store_true", help="time forward-only inference instead of a training step")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="cpu: the calling thread's CPU time (time.thread_time), which waiting for a time slice on "
                        "a loaded machine does not inflate; meaningful with --threads 1 only")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="min: the fastest step of each, closest to what an idle machine gives when others share it")
    a = p.parse_args()
    global _clock, _stat
    _clock = CLOCKS[a.clock]
    _stat = min if a.stat == "min" else statistics.median
    tmp = tempfile.mkdtemp(prefix="minicnn-ab-")
    sys.path.insert(0, export(a.old, tmp))
    sys.path.insert(0, str(ROOT))
    import minicnn
    import minicnn.ops.cpu  # noqa: F401  (before set_num_threads: picks the threading layer)
    old = importlib.import_module("minicnn_old")
    importlib.import_module("minicnn_old.ops.cpu")
    import numba
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    kind = InferStep if a.infer else PublicStep
    print(f"old = {a.old}, new = working tree; {a.threads} threads; {a.clock} clock; "
          f"{'inference' if a.infer else 'training step (public API)'}; {a.stat} of {a.rounds} alternated rounds")
    print("| net | batch | load | old ms | new ms | new/old |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in a.nets.split(","):
        spec, shape = NETS[name]
        for n in (int(b) for b in a.batches.split(",")):
            x, y = random_batch(shape, n)
            fns = {"old": kind(old, spec, shape), "new": kind(minicnn, spec, shape)}
            lo, ln = fns["old"](x, y), fns["new"](x, y)
            if not a.infer:
                assert abs(lo - ln) <= 1e-5 * max(1.0, abs(lo)), (lo, ln)
            load = os.getloadavg()[0]
            med = alternate(fns, x, y, a.rounds, a.budget)
            print(f"| {name} | {n} | {load:.2f} | {med['old'] * 1e3:.3f} | {med['new'] * 1e3:.3f} | "
                  f"{med['new'] / med['old']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
