"""The cost of minicnn.torch.Recorder against the bare PyTorch loop it records.

    python benchmarks/bench_recorder.py                 # network A, batch 64, ~4 minutes on 2 busy cores
    python benchmarks/bench_recorder.py --blocks 40 --threads 2 --out recorder.json

Network A = nn.Sequential(Conv2d(1,16,3,p1), ReLU, MaxPool2d(2), Conv2d(16,32,3,p1), ReLU,
MaxPool2d(2), Flatten, Linear(1568,10)) on 1x28x28 batches of the built-in shapes data, SGD lr 0.05
momentum 0.9, float32. Each configuration trains its own copy of the model from the same weights on
the same batches:

    bare            the loop alone: zero_grad, forward, cross-entropy, backward, optimizer.step()
    light           + Recorder(level="light") (checkpoints every 200 steps, as the default)
    light + probe   + a probe of 256 held-out images every 10 steps (the evidence for dead layers)
    full            + level="full": the loss after the step and alpha (one more forward and backward)
    full, no alpha  + level="full", alpha=False: the loss after the step only (one no-grad forward)

1. Validation, after the timed steps: every recorded model's weights must equal the bare
   loop's bit for bit (recording changes nothing in the training); the run exits 1 when they differ.
2. Timing, interleaved step by step so that a busy machine's slow spells fall on every
   configuration alike: each cycle takes one step of every configuration (the order rotates every
   cycle), each step timed on its own, in CPU time of this process (time.process_time: with one
   torch thread the work itself, little affected by other processes) and in wall time. A block is
   --block cycles (10: one probe measurement per block); per block each configuration's time over
   the bare loop's in the same block; the median over --blocks blocks, with the spread. The load
   average is printed before and after: on a shared machine the ratios are what to compare.
3. Attributed: the Recorder's own CPU time (inside its hooks and rec.step) over the rest of the
   same steps (see Attribution).
4. Floors (see Floors): what the targets cannot go below on this machine -- the ReLU reductions
   the light trace's dead-unit columns need, and the extra forward (and backward, for alpha) of the
   full trace -- timed once per cycle on a copy of the model, over the bare loop's steps.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {                       # name -> Recorder arguments (None: the bare loop)
    "bare": None,
    "light": dict(level="light"),
    "light + probe": dict(level="light", probe=True),
    "full": dict(level="full"),
    "full, no alpha": dict(level="full", alpha=False),
}
TARGETS = {"light": 0.05, "full": 0.60}       # issue 19: the overhead the Recorder should stay under
# CPU time of this process (with one torch thread: the work itself, whatever else the machine runs)
# and wall time (what a user waits, and what a busy machine's other processes inflate)
CLOCKS = ("cpu", "wall")


def net_a(torch):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def setups(torch, mt, data, out, batch):
    """{name: (model, optimizer, recorder or None)}, every model a copy of the same weights."""
    ref = net_a(torch)
    probe = (data.x_val[:256], data.y_val[:256])
    runs = {}
    for name, kw in CONFIGS.items():
        model = net_a(torch)
        model.load_state_dict(ref.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rec = None
        if kw is not None:
            kw = dict(kw)
            if kw.pop("probe", False):
                kw["probe"] = probe
            rec = mt.Recorder(model, opt, out=os.path.join(out, name.replace(" ", "").replace(",", "_")), **kw)
        runs[name] = (model, opt, rec)
    return runs


class Attribution:
    """Time spent inside the Recorder's entry points (its forward hooks, optimizer-step hooks and
    rec.step), outermost calls only, by configuration: the overhead measured directly, as a share
    of the same steps' time -- far less noisy on a busy machine than the difference of two loops."""
    ENTRY = ("on_forward_start", "on_relu", "on_forward_end", "before_step", "after_step", "step")

    def __init__(self, recorder_class):
        self.spent, self.depth, self.current = {}, 0, None
        for name in self.ENTRY:
            setattr(recorder_class, name, self.timed(getattr(recorder_class, name)))

    def timed(self, method):
        def wrapper(rec, *args, **kwargs):
            self.depth += 1
            t0 = time.process_time()
            try:
                return method(rec, *args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0 and self.current is not None:
                    self.spent[self.current] = self.spent.get(self.current, 0.0) + time.process_time() - t0
        return wrapper


def one_step(torch, run, x, y):
    """One training step (recorded when the run has a Recorder); returns its (CPU, wall) seconds."""
    F = torch.nn.functional
    model, opt, rec = run
    c0, t0 = time.process_time(), time.perf_counter()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if rec is not None:
        rec.step(loss, x, y)
    return time.process_time() - c0, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=12, help="blocks of cycles (the median is over these)")
    ap.add_argument("--block", type=int, default=10, help="cycles per block (one step of every configuration each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the fairest on a busy machine)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    import minicnn.torch as mt
    from minicnn.data import load_shapes
    torch.set_num_threads(args.threads)
    data = load_shapes(seed=0, n_train=20 * args.batch, n_val=256)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(y), args.batch)]
    load0 = os.getloadavg()
    print(f"network A, batch {args.batch}, torch {torch.__version__}, {args.threads} thread(s); "
          f"load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as out:
        attribution = Attribution(mt.Recorder)
        runs = setups(torch, mt, data, out, args.batch)
        names = list(runs)
        floors = Floors(torch, net_a(torch))
        times, inside = run_cycles(torch, args, runs, batches, attribution, floors)
        ok = validate(torch, runs)
        for _, _, rec in runs.values():
            if rec is not None:
                rec.close()
    results = {}
    for clock in CLOCKS:
        ratios = {n: [t / b for t, b in zip(times[clock][n], times[clock]["bare"])] for n in names[1:]}
        results[clock] = report(args, clock, names, times[clock], ratios)
    results["attributed"] = report_attributed(args, inside)
    results["floors"] = floors.report(args)
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "threads": args.threads, "blocks": args.blocks, "block": args.block,
                       "load_before": load0, "load_after": load1, "validated": ok, "results": results}, f, indent=2)
    return 0 if ok else 1


def run_cycles(torch, args, runs, batches, attribution, floors):
    """The timed cycles: ({clock: {name: [seconds per step, per block]}}, {name: [attributed share, per
    block]}); the floors measured once per cycle."""
    names = list(runs)
    times = {clock: {n: [] for n in names} for clock in CLOCKS}    # per block: seconds per step
    inside = {n: [] for n in names[1:]}
    step = 0
    for b in range(args.blocks + 1):               # block 0 is the warm-up
        spent = {clock: dict.fromkeys(names, 0.0) for clock in CLOCKS}
        for _ in range(args.block):
            xb, yb = batches[step % len(batches)]
            k = step % len(names)
            for name in names[k:] + names[:k]:
                attribution.current = name
                for clock, sec in zip(CLOCKS, one_step(torch, runs[name], xb, yb)):
                    spent[clock][name] += sec
            attribution.current = None
            floors.measure(xb, yb)
            step += 1
        own = dict(attribution.spent)
        attribution.spent.clear()
        floors.end_block(spent["cpu"]["bare"], keep=b > 0)
        for clock in CLOCKS if b else ():
            for name in names:
                times[clock][name].append(spent[clock][name] / args.block)
        if b:                  # the Recorder's own CPU time over the rest of the same steps
            for name in names[1:]:
                inside[name].append(own.get(name, 0.0) / (spent["cpu"][name] - own.get(name, 0.0)))
    return times, inside


class Floors:
    """What the targets cannot go below on this machine, in CPU time over the bare loop's steps of
    the same block (median over blocks), measured once per cycle on a copy of the model on the
    same batch (the times do not depend on its weights):

        dead units         the per-ReLU reduction the light trace needs for its dead-unit columns
                           (Recorder.on_relu's sum over the batch and count), in a training forward
        step copies        the copies the light trace needs for any optimizer's update and gradient
                           cosine: gradient and weights before the step, weights after (as
                           StepVectors: one torch.cat each into a float64 row)
        no-grad forward    the loss after the step of the full trace (one forward, no gradient)
        forward + backward the same with alpha (the gradient after the step), as level="full" runs it
    """
    NAMES = ("dead units", "step copies", "no-grad forward", "forward + backward")
    TARGET = {"dead units": "light", "step copies": "light", "no-grad forward": "full", "forward + backward": "full"}

    def __init__(self, torch, model):
        self.torch, self.model, self.params = torch, model, list(model.parameters())
        self.reduce_s = 0.0
        self.rows = torch.zeros(3, sum(p.numel() for p in self.params), dtype=torch.float64)
        self.spent = dict.fromkeys(self.NAMES, 0.0)
        self.shares = {n: [] for n in self.NAMES}
        for m in model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.register_forward_hook(self.on_relu)

    def on_relu(self, module, args, output):
        c0 = time.process_time()
        output.detach().sum(0).count_nonzero()
        self.reduce_s += time.process_time() - c0

    def measure(self, x, y):
        torch, F = self.torch, self.torch.nn.functional
        self.reduce_s = 0.0
        c0 = time.process_time()
        with torch.no_grad():
            F.cross_entropy(self.model(x), y)
        self.spent["no-grad forward"] += time.process_time() - c0 - self.reduce_s
        self.reduce_s = 0.0
        c0 = time.process_time()
        grads = torch.autograd.grad(F.cross_entropy(self.model(x), y), self.params)
        self.spent["forward + backward"] += time.process_time() - c0 - self.reduce_s
        self.spent["dead units"] += self.reduce_s
        c0 = time.process_time()
        flat = [p.detach().reshape(-1) for p in self.params]
        torch.cat([g.reshape(-1) for g in grads], out=self.rows[0])
        torch.cat(flat, out=self.rows[1])
        torch.cat(flat, out=self.rows[2])
        self.spent["step copies"] += time.process_time() - c0

    def end_block(self, bare_s, keep):
        for n in self.NAMES:
            if keep:
                self.shares[n].append(self.spent[n] / bare_s)
            self.spent[n] = 0.0

    def report(self, args):
        print(f"floors: CPU time per step over the bare loop's (median over {args.blocks} blocks [min..max])")
        rows = {}
        for n in self.NAMES:
            s = self.shares[n]
            target = TARGETS[self.TARGET[n]]
            print(f"        {n:<18} {100 * statistics.median(s):+7.1f}% [{100 * min(s):+.0f}%..{100 * max(s):+.0f}%]"
                  f"   (of {self.TARGET[n]}'s {100 * target:.0f}%)")
            rows[n] = {"share": statistics.median(s), "shares": s}
        return rows


def validate(torch, runs):
    bare = runs["bare"][0].state_dict()
    ok = True
    for name, (model, _, _) in runs.items():
        same = all(torch.equal(v, bare[k]) for k, v in model.state_dict().items())
        ok &= same
        if not same:
            print(f"NOT OK  {name}: its weights differ from the bare loop's")
    if ok:
        print("OK  every recorded model's weights equal the bare loop's bit for bit")
    return ok


def report(args, clock, names, per_step, ratios):
    """Print one clock's table; returns its rows."""
    print(f"{clock}: {'configuration':<16} {'ms/step':>8} {'overhead':>9}  (median over {args.blocks} blocks of "
          f"{args.block} steps; ratio to the bare loop in the same block [min..max])")
    rows = {}
    for name in names:
        ms = 1e3 * statistics.median(per_step[name])
        over = statistics.median(ratios[name]) - 1 if name in ratios else 0.0
        target = TARGETS.get(name)
        flag = "" if target is None else f"   target <= {100 * target:.0f}%: {'met' if over <= target else 'NOT met'}"
        spread = (f" [{100 * (min(ratios[name]) - 1):+.0f}%..{100 * (max(ratios[name]) - 1):+.0f}%]"
                  if name in ratios else "")
        print(f"{'':{len(clock) + 2}}{name:<16} {ms:8.2f} {100 * over:+8.1f}%{spread}{flag}")
        rows[name] = {"ms_per_step": ms, "overhead": over, "ratios": ratios.get(name, [])}
    return rows


def report_attributed(args, inside):
    print(f"attributed: the Recorder's own CPU time (inside its hooks and rec.step) over the rest of the same steps, "
          f"median over {args.blocks} blocks [min..max]")
    rows = {}
    for name, shares in inside.items():
        over = statistics.median(shares)
        target = TARGETS.get(name)
        flag = "" if target is None else f"   target <= {100 * target:.0f}%: {'met' if over <= target else 'NOT met'}"
        spread = f"[{100 * min(shares):+.0f}%..{100 * max(shares):+.0f}%]"
        print(f"            {name:<16} {100 * over:+8.1f}% {spread}{flag}")
        rows[name] = {"overhead": over, "shares": shares}
    return rows


if __name__ == "__main__":
    sys.exit(main())
