"""Compare settings of the cpu backend's blocking constants, alternated in one process.

    python benchmarks/ab_plan.py --nets B --batches 1 '{}' '{"_PARTS_MIN_MACS": 1e12}'
    python benchmarks/ab_plan.py --batches 8,32 '{}' '{"_CONV_PARALLEL_MIN_MACS": 4194304}'

Each JSON object is a variant: constants of minicnn.ops.cpu set while that variant's network
builds its workspaces (the first step), then restored; '{}' is the code as it is. The blocking is
fixed when a workspace is made, so the variants then run side by side: public-API steps in
alternating blocks (the order flips every round), median step time, the ratio to the first
variant. For thresholds that decide between one thread and several (_PARTS_MIN_MACS,
_CONV_PARALLEL_MIN_MACS, _PARALLEL_MIN), time on a quiet machine: under load a second thread waits
for a time slice and every split loses. _PARALLEL_MIN is read at each call, so it cannot be
compared this way.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from reference_nets import NETS, random_batch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", help="JSON objects {constant: value} of minicnn.ops.cpu")
    p.add_argument("--nets", default="A,B")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block-s", type=float, default=0.25, help="seconds of steps per variant per round")
    a = p.parse_args()
    import numba

    import minicnn
    from minicnn.ops import cpu
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    variants = [json.loads(v) for v in a.variants]
    for v in variants:
        for k in v:
            if not hasattr(cpu, k):
                p.error(f"minicnn.ops.cpu has no constant {k}")
    defaults = {k: getattr(cpu, k) for v in variants for k in v}

    def step(net, opt, x, y):
        loss, grads = net.loss_and_grads(x, y)
        opt.step(net.params, grads)

    print(f"{a.threads} threads; median step ms (ratio to the first variant); load average before each case")
    for name in a.nets.split(","):
        spec, shape = NETS[name]
        for n in (int(b) for b in a.batches.split(",")):
            x, y = random_batch(shape, n)
            runs = []
            for v in variants:
                for k, val in {**defaults, **v}.items():
                    setattr(cpu, k, type(defaults[k])(val))
                net = minicnn.Network.from_spec(spec, shape, seed=0, dtype=np.float32)
                opt = minicnn.SGD(lr=0.01)
                step(net, opt, x, y)                 # builds the workspaces under these constants
                runs.append((net, opt))
            for k, val in defaults.items():
                setattr(cpu, k, val)
            t0 = time.perf_counter()
            for net, opt in runs:
                step(net, opt, x, y)
            block = max(1, int(a.block_s * len(runs) / max(time.perf_counter() - t0, 1e-6)))
            times = [[] for _ in runs]
            load = os.getloadavg()[0]
            for r in range(a.rounds):
                for i in (range(len(runs)) if r % 2 == 0 else range(len(runs) - 1, -1, -1)):
                    net, opt = runs[i]
                    step(net, opt, x, y)
                    for _ in range(block):
                        t = time.perf_counter()
                        step(net, opt, x, y)
                        times[i].append(time.perf_counter() - t)
            med = [statistics.median(t) * 1e3 for t in times]
            print(f"{name} batch {n} (load {load:.2f}): "
                  + " | ".join(f"{json.dumps(v)} {m:.3f} ({m / med[0]:.3f})" for v, m in zip(variants, med)),
                  flush=True)


if __name__ == "__main__":
    main()
