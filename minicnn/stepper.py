"""Step-by-step SGD, like pdb: pause at any step, look inside, try an alternative, rewind.

    s = minicnn.Stepper(lr=0.5, steps=300, arch="tiny", n_train=512)
    s.step(5)                       # the records of 5 SGD steps
    s.until("overshoot")            # step until an event (or the end of the run)
    s.record                        # the last step's record (minicnn.trace columns + "events")
    s.whatif(lr=[0.1, 0.03])        # the last step redone from the same state and batch, not committed
    s.slice(png="slice.png")        # the loss on that batch along that step's direction
    s.sharpness(per_layer=True)     # lambda_max now (and each layer's), against 2/lr
    s.spectrum(k=5, png="spec.png") # top eigenvalues, trace, eigenvalue density
    s.noise()                       # gradient noise per layer on the next batch
    s.back(3)                       # rewind 3 steps (a bounded history is kept in memory)
    s = minicnn.Stepper.from_run("runs/x", step=1412)   # replay a recorded run to step 1412

"The current step" is the last step taken (the one ``record`` holds): ``whatif`` and ``slice``
redo it from the state before it, on its own batch. ``layer`` looks at the current weights on the
batch the next step will use. Nothing here prints; ``minicnn debug`` (cli/debug.py) is the REPL.
"""
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import diagnose as dg
from . import trace as tr
from .config import TrainConfig, sharpness_batch
from .errors import ConfigError, DataError, MinicnnError
from .hessian import HessianOperator
from .ops.ref import dead_fraction
from .rundir import (
    label_entropy,
    list_checkpoints,
    load_run,
    make_writable_dir,
    mismatch_reason,
    not_replayable,
    os_reason,
)
from .trainer import Trainer

# Steps `back` can rewind: each costs ~3 copies of the parameters (weights, momentum, previous
# gradient), 0.25 MB for the default network.
HISTORY = 100
# `until eos` without a --sharpness-every schedule measures lambda_max itself every this many
# steps (each measurement costs tens of gradient evaluations on 256 samples).
EOS_CHECK_EVERY = 10
# `spectrum`: the top eigenvalues it lists by default, and the density from one Lanczos run of
# hessian.SLQ_STEPS products (PyHessian's density uses one run too, n_v=1): in the debugger a run
# costs ~30 products on the fixed batch, and one already shows the bulk and the outliers.
SPECTRUM_K = 5
SPECTRUM_SLQ_RUNS = 1
SLICE_RANGE = (-1.0, 3.0)     # step lengths: 0 is where the step started, 1 where it landed
SLICE_POINTS = 41
_ERRSTATE = dict(over="ignore", invalid="ignore", divide="ignore")   # NaN/inf are results here


@dataclass
class Slice:
    """The loss on one batch along one step's update direction d: f(w + a*d) for a in ``alphas``."""
    step: int
    lr: float
    alphas: np.ndarray           # (M,) step lengths
    losses: np.ndarray           # (M,) measured loss on the step's batch
    quadratic: np.ndarray        # (M,) f0 + a*slope + a^2/2 * curvature
    f0: float                    # loss where the step started (a = 0)
    landed: float                # loss where it landed (a = 1): the record's loss_after
    slope: float                 # <g, d>: first-order change over the whole step
    curvature: float             # d'Hd (float64 finite differences on the batch)
    lam_dir: float               # d'Hd / |d|^2: the curvature lambda along the line
    min_alpha: float             # where the measured 1-D minimum is (grid)
    quad_min_alpha: float        # -slope / curvature (nan if the fit is not convex)
    png: str = None

    def view_range(self):
        """(lo, hi) of the loss to draw: all of it from the start onwards (a >= 0), where the
        step and its overshoot are; the uphill side a < 0 may leave the frame."""
        fin = np.isfinite(self.losses)
        ahead = self.losses[fin & (self.alphas >= 0)]
        if not len(ahead):
            return (0.0, 1.0)
        lo, hi = float(np.min(self.losses[fin])), float(ahead.max())
        pad = 0.1 * (hi - lo) + 1e-6
        return lo - pad, hi + pad


@dataclass
class UntilResult:
    event: str
    hit: bool
    steps: int                   # steps taken
    evidence: str = ""
    records: list = field(default_factory=list)


def parse_event(text):
    """'overshoot' | 'spike' | 'dead' | 'collapse' | 'nan' | 'eos' | 'loss>X' | 'loss<X' | 'step N'
    -> a predicate (stepper, record) -> evidence string or None."""
    t = " ".join(str(text).split()).lower()
    if t in dg.STEP_EVENTS:
        return lambda s, rec: rec["events"].get(t)
    for op in (">", "<"):
        if t.startswith("loss") and t[4:].lstrip().startswith(op):
            try:
                x = float(t[4:].lstrip()[1:])
            except ValueError:
                break
            if op == ">":
                return lambda s, rec: f"loss {rec['loss']:.6g} > {x:g}" if not rec["loss"] <= x else None
            return lambda s, rec: f"loss {rec['loss']:.6g} < {x:g}" if rec["loss"] < x else None
    if t.startswith("step"):
        try:
            n = int(t[4:].strip(" =:"))
        except ValueError:
            n = -1
        if n >= 0:
            def reached(s, rec):
                return f"reached step {n}" if rec["step"] >= n else None
            reached.target_step = n
            return reached
    raise ConfigError(f"unknown event '{text}'; one of {', '.join(dg.STEP_EVENTS)}, loss>X, loss<X, step N")


class Stepper:
    """An SGD run you drive by hand. Takes a TrainConfig and/or its fields, like ``train``.

    data: a minicnn.data.Dataset instead of loading ``config.data``; history: steps ``back`` can undo.
    """

    def __init__(self, config=None, data=None, history=HISTORY, **overrides):
        self.trainer = Trainer(config, data=data, **overrides)
        self.history = deque(maxlen=max(1, int(history)))   # snapshots before each recent step
        self.record = None                                    # the last step's record
        self._recent = deque(maxlen=max(dg.SPIKE_WINDOW, dg.COLLAPSE_MIN_STEPS))
        d = self.trainer.data
        self.label_entropy = label_entropy(d.y_train, d.num_classes)
        self.replay = None             # what from_run found
        self._sharp = None

    # ------------------------------------------------------------------ properties
    @property
    def net(self):
        return self.trainer.net

    @property
    def cfg(self):
        return self.trainer.cfg

    @property
    def step_count(self):
        """Steps taken; the next step is step number step_count."""
        return self.trainer.step_count

    @property
    def next_lr(self):
        return self.trainer.schedule(self.trainer.step_count)

    def layer_names(self):
        return [layer.name for layer in self.net.layers]

    # ------------------------------------------------------------------ snapshots
    def _snapshot(self):
        return {"trainer": self.trainer.state(), "record": self.record, "recent": list(self._recent)}

    def _restore(self, snap):
        self.trainer.load_state(snap["trainer"])
        self.record = snap["record"]
        self._recent.clear()
        self._recent.extend(snap["recent"])

    # ------------------------------------------------------------------ stepping
    def step(self, n=1):
        """Take n SGD steps (fewer if the loss becomes NaN/inf); returns their records. Each
        record carries ``events``: {kind: evidence} by minicnn.diagnose.step_events."""
        if n < 0 or n > self.trainer.total:
            raise ConfigError(f"step count must be in 0..{self.trainer.total} (the run's length), got {n}; "
                              f"'until EVENT' steps to an event or the end of the run")
        recs = []
        with np.errstate(**_ERRSTATE):
            for _ in range(int(n)):
                if self.record is not None and not math.isfinite(self.record["loss"]):
                    raise MinicnnError(f"the loss is {self.record['loss']} at step {self.record['step']}; "
                                       f"go back first")
                self.history.append(self._snapshot())
                try:
                    rec = self.trainer.step()
                except BaseException:            # Ctrl-C mid-step: leave the state as it was
                    self._restore(self.history.pop())
                    raise
                rec["events"] = dg.step_events(rec, self._recent, self.label_entropy, self.cfg.batch_size)
                self._recent.append(rec)
                self.record = rec
                recs.append(rec)
        return recs

    def until(self, event, max_steps=None, eos_every=None, on_step=None):
        """Step until ``event`` (see parse_event) happens, max_steps are taken (default: to the end
        of the run's steps; at most the run's length), or the loss becomes NaN/inf. ``on_step(record)``
        sees every step as it is taken (progress)."""
        pred = parse_event(event)
        target = getattr(pred, "target_step", None)
        total = self.trainer.total
        if target is not None and target < self.step_count:
            raise ConfigError(f"step {target} is already taken (the next step is {self.step_count}); 'back' first")
        if target is not None and target > max(total - 1, self.step_count):
            raise ConfigError(f"step {target} is past the end of the run (steps 0..{total - 1}); accepted: a step "
                              f"from {self.step_count} to {max(total - 1, self.step_count)}")
        if max_steps is not None and not 1 <= max_steps <= total:
            raise ConfigError(f"a step limit must be in 1..{total} (the run's length), got {max_steps}")
        left = total - self.step_count
        if max_steps is None:
            if left <= 0:
                raise MinicnnError(f"the run's {self.trainer.total} steps are done; give a step limit")
            max_steps = left
        want_eos = " ".join(str(event).split()).lower() == "eos" and self.trainer.sharp is None
        eos_every = eos_every or EOS_CHECK_EVERY
        res = UntilResult(str(event), False, 0)
        for _ in range(int(max_steps)):
            # lambda_max before the step's update, as the trainer measures it
            sh = self.sharpness() if want_eos and self.step_count % eos_every == 0 else None
            rec = self.step(1)[0]
            res.steps += 1
            res.records.append(rec)
            if on_step:
                on_step(rec)
            if sh is not None:
                rec.update(lambda_max=sh["lambda_max"], two_over_lr=sh["two_over_lr"])
                rec["events"] = dg.step_events(rec, list(self._recent)[:-1], self.label_entropy, self.cfg.batch_size)
            ev = pred(self, rec)
            if ev:
                res.hit, res.evidence = True, ev
                break
            if not math.isfinite(rec["loss"]):
                res.evidence = f"stopped: the loss became {rec['loss']} at step {rec['step']}"
                break
        return res

    def back(self, n=1):
        """Restore the state n steps ago; returns the number of steps now taken."""
        n = int(n)
        if n < 1:
            raise ConfigError(f"back needs n >= 1, got {n}")
        if n > len(self.history):
            raise MinicnnError(f"only {len(self.history)} step(s) back are in memory "
                               f"(history {self.history.maxlen})")
        for _ in range(n):
            snap = self.history.pop()
        self._restore(snap)
        return self.step_count

    # ------------------------------------------------------------------ looking around
    def _current(self):
        """The snapshot before the last step taken."""
        if self.record is None:
            raise MinicnnError("no step taken yet: 'step' first (whatif and slice redo the last step)")
        if not self.history or self.history[-1]["trainer"]["step"] != self.record["step"]:
            raise MinicnnError(f"the state before step {self.record['step']} is no longer in memory")
        return self.history[-1]

    def whatif(self, lr):
        """Redo the last step from the same state and batch with other learning rates, without
        committing. lr: a number or a list. Returns one dict per lr: lr, loss, loss_after, change,
        update_norm, alpha, committed (True for the lr the step used). At the step's own lr,
        loss_after is the committed step's, bit for bit."""
        lrs = [float(x) for x in (lr if isinstance(lr, (list, tuple, np.ndarray)) else [lr])]
        for x in lrs:
            if not (math.isfinite(x) and x >= 0):
                raise ConfigError(f"lr must be a finite number >= 0, got {x}")
        pre = self._current()
        now = self._snapshot()
        out = []
        try:
            with np.errstate(**_ERRSTATE):
                for x in lrs:
                    self.trainer.load_state(pre["trainer"])
                    xb, yb = self.trainer.batch()
                    rec = self.trainer.step(lr=x, sharpness=False)
                    after = rec.get("loss_after")
                    if after is None and math.isfinite(rec["loss"]):
                        after = self.net.loss(xb, yb)
                    after = math.nan if after is None else after
                    out.append({"lr": x, "loss": rec["loss"], "loss_after": after, "change": after - rec["loss"],
                                "update_norm": rec.get("update_norm", math.nan), "alpha": rec.get("alpha", math.nan),
                                "committed": x == self.record["lr"]})
        finally:
            self._restore(now)
        return out

    def slice(self, lo=SLICE_RANGE[0], hi=SLICE_RANGE[1], num=SLICE_POINTS, png=None):
        """The loss on the last step's batch along its update d = w_after - w_before, at a*d for
        ``num`` step lengths a from lo to hi, beside the quadratic fitted from the gradient and the
        curvature along d. Writes a figure to ``png`` if given."""
        pre = self._current()
        now = self._snapshot()
        net = self.net
        w0 = pre["trainer"]["params"].astype(np.float64)
        w1 = now["trainer"]["params"].astype(np.float64)
        d = w1 - w0
        xb, yb = self.trainer.batch(pre["trainer"]["epoch"], pre["trainer"]["pos"])
        alphas = np.union1d(np.linspace(lo, hi, int(num)), [0.0, 1.0])
        losses = np.empty(len(alphas))
        try:
            with np.errstate(**_ERRSTATE):
                for i, a in enumerate(alphas):
                    net.set_flat_params((w0 + a * d).astype(net.dtype))
                    losses[i] = net.loss(xb, yb)
        finally:
            self._restore(now)
        f0 = float(losses[alphas == 0.0][0])
        landed = float(losses[alphas == 1.0][0])
        dn = float(np.linalg.norm(d))
        if dn > 0 and math.isfinite(f0):
            op = HessianOperator(net, xb, yb, flat_params=w0)     # float64, exact products
            with np.errstate(**_ERRSTATE):
                slope = float(op.gradient() @ d)
                lam_dir = float((d / dn) @ op.hvp(d / dn))
        else:
            slope, lam_dir = 0.0, math.nan
        curv = lam_dir * dn * dn
        quad = f0 + alphas * slope + 0.5 * alphas ** 2 * curv
        finite = np.isfinite(losses)
        min_alpha = float(alphas[np.argmin(np.where(finite, losses, np.inf))]) if finite.any() else math.nan
        quad_min = -slope / curv if curv > 0 else math.nan
        s = Slice(self.record["step"], self.record["lr"], alphas, losses, quad, f0, landed, slope, curv, lam_dir,
                  min_alpha, quad_min)
        if png:
            from .plots import plot_slice
            s.png = plot_slice(s, png)
        return s

    def _sharpness(self):
        """The Sharpness instrument on the run's fixed sharpness batch (built once; its warm starts
        are its own: the run's measurements are not disturbed)."""
        if self._sharp is None:
            sb = sharpness_batch(self.trainer.n, self.cfg.seed)
            self._sharp = tr.Sharpness(self.net, self.trainer.data.x_train[sb], self.trainer.data.y_train[sb],
                                       seed=self.cfg.seed)
        return self._sharp

    def sharpness(self, per_layer=False):
        """lambda_max of the loss Hessian at the current weights, on the run's fixed sharpness batch,
        against 2/lr for the next step's lr; per_layer: also each parameter layer's own block
        lambda_max ("layers": {name: {lambda_max, lr_times_lambda}}). Cost: hvp_evals, grad_evals,
        seconds."""
        measures = {"lambda_max": None, **({"layers": None} if per_layer else {})}
        lr = self.next_lr
        with np.errstate(**_ERRSTATE):
            rec = self._sharpness().measure(self.step_count, lr=lr, measures=measures)
        lam = rec["lambda_max"]
        out = {"step": self.step_count, "lambda_max": lam, "lr": lr, "two_over_lr": rec["two_over_lr"],
               "lr_times_lambda": lr * lam, "hvp_evals": rec["hvp_evals"], "grad_evals": rec["grad_evals"],
               "seconds": rec["sharpness_s"]}
        if per_layer:
            out["layers"] = {k[len("lambda_max."):]: {"lambda_max": v, "lr_times_lambda": lr * v}
                             for k, v in rec.items() if k.startswith("lambda_max.")}
        return out

    def spectrum(self, k=SPECTRUM_K, samples=tr.SHARPNESS_TRACE_SAMPLES, png=None):
        """The Hessian's spectrum at the current weights on the fixed sharpness batch: the top k
        eigenvalues (Lanczos), the trace by Hutchinson with ``samples`` products (and its standard
        error), and the eigenvalue density by stochastic Lanczos quadrature (SPECTRUM_SLQ_RUNS run),
        drawn to ``png`` if given. -> {step, lr, top: (k,), trace, trace_se, layer_traces, density
        (hessian.DensityResult), hvps, grad_evals, seconds, png}."""
        from .hessian import hutchinson_trace, spectral_density, top_eigenvalues
        kmax = tr.SHARPNESS_MAX["topk"]
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= kmax):
            raise ConfigError(f"spectrum: k must be a whole number in 1..{kmax} (as --sharpness topk:K), got {k}")
        sharp = self._sharpness()
        op = sharp.op
        op.set_weights(self.net.get_flat_params())
        seed = [self.cfg.seed, tr.SHARPNESS_VECTORS, self.step_count]
        with np.errstate(**_ERRSTATE):
            top = top_eigenvalues(op, k=min(k, op.size), seed=seed)
            h = hutchinson_trace(op, max_samples=samples, min_samples=samples, rel_se=0.0, seed=seed + [1])
            dens = spectral_density(op, runs=SPECTRUM_SLQ_RUNS, seed=seed + [2])
        parts = (top, h, dens)
        out = {"step": self.step_count, "lr": self.next_lr, "top": top.values, "trace": h.trace, "trace_se": h.stderr,
               "samples": h.samples, "layer_traces": h.layers, "density": dens,
               "hvps": sum(p.hvps for p in parts), "grad_evals": sum(p.grad_evals for p in parts),
               "seconds": sum(p.seconds for p in parts), "png": None}
        if png:
            from .plots import plot_density
            out["png"] = plot_density(dens, png, top=top.values, lr=self.next_lr,
                                      title=f"Hessian eigenvalue density at step {self.step_count} "
                                            f"({len(op.y)} fixed training images)")
        return out

    def noise(self):
        """Gradient noise on the batch the next step will use, at the current weights (as ``layer``
        looks): minicnn.noise's statistics per layer and in total from the per-sample gradients.
        -> {step, batch_size, report (noise.NoiseReport), seconds}. Raises for a batch of 1."""
        from .noise import gradient_noise
        xb, yb = self.trainer.batch()
        if len(yb) < 2:
            raise ConfigError(f"the next batch has {len(yb)} image; gradient noise needs at least 2")
        with np.errstate(**_ERRSTATE):
            rep = gradient_noise(self.net, xb, yb)
        return {"step": self.step_count, "batch_size": len(yb), "report": rep, "seconds": rep.seconds}

    def layer(self, name, bins=10):
        """Weight, gradient and activation statistics of one layer: current weights, gradient and
        output on the batch the next step will use. Each entry: {mean, std, min, max, norm,
        zero_share, hist: (counts, edges)}."""
        net = self.net
        names = self.layer_names()
        if name not in names:
            raise ConfigError(f"no layer '{name}'; layers: {', '.join(names)}")
        layer = net.layers[names.index(name)]
        xb, yb = self.trainer.batch()
        out = {"name": name, "kind": layer.kind, "out_shape": tuple(layer.out_shape), "step": self.step_count}
        with np.errstate(**_ERRSTATE):
            act = net.forward(xb, upto=name)
            out["activation"] = _stats(act, bins)
            if layer.kind == "relu":
                out["dead"] = dead_fraction(act)
            loss = net.loss(xb, yb)
            if math.isfinite(loss):
                net.backward()
        out["loss"] = loss
        for pname, p, g in zip(net.param_names, net.params, net.grads):
            lname, _, kind = pname.rpartition(".")
            if lname == name:
                out[kind] = _stats(net.host_copy(p), bins)
                out[f"{kind}.grad"] = _stats(net.host_copy(g), bins)
        return out

    def save(self, path):
        """A checkpoint of the current state: weights and momentum (load_checkpoint reads them)
        plus the position in the data order."""
        make_writable_dir(os.path.dirname(os.path.abspath(path)), "the folder")
        try:
            self.trainer.save(path)
        except OSError as e:
            raise ConfigError(f"cannot write the checkpoint {path}: {os_reason(e)}") from None
        return path

    # ------------------------------------------------------------------ replay
    @classmethod
    def from_run(cls, run_dir, step, data=None, history=HISTORY):
        """Rebuild the state of a recorded run right after its step ``step`` (weights, momentum,
        data order) by replay from the nearest periodic checkpoint at or before it, and compare
        the replayed losses with steps.csv. ``stepper.replay`` says what was found: match (bit for
        bit), the first step that differs and by how much, and the likely reason. ``back`` can
        then rewind as far as the checkpoint the replay started from (at most ``history`` steps)."""
        run = load_run(run_dir)
        if not_replayable(run, step):
            raise ConfigError(not_replayable(run, step))
        steps = run.steps.get("step")
        if steps is None or not len(steps):
            raise MinicnnError(f"{run_dir}: no steps recorded")
        recorded = {int(t): i for i, t in enumerate(steps)}
        step = int(step)
        if step not in recorded:
            raise ConfigError(f"step {step} is not in this run (steps 0..{int(steps[-1])})")
        if not isinstance(run.config.get("config"), dict):
            raise DataError(f"{run_dir}/config.json has no 'config' object; the file is damaged")
        cfg = TrainConfig.from_dict(run.config["config"])
        s = cls(cfg, data=data, history=history)
        t0 = time.perf_counter()
        start, used, skipped = s.trainer.resume_latest([(k, p) for k, p in list_checkpoints(run_dir) if k <= step])
        cols = {c: run.steps[c] for c in ("loss", "loss_after") if c in run.steps}
        first_bad = None
        rep = None
        with np.errstate(**_ERRSTATE):
            for t in range(start, step + 1):
                if t < step + 1 - s.history.maxlen:
                    r = s.trainer.step(record=False)     # only the loss: the state after is the same
                else:
                    r = s.step(1)[0]
                for c, v in cols.items():
                    if c in r and first_bad is None and not _same(r[c], v[recorded[t]]):
                        first_bad = (t, c, r[c], float(v[recorded[t]]))
                rep = r
        i = recorded[step]
        info = {"run": run_dir, "step": step, "checkpoint_step": start if used else None, "skipped": skipped,
                "warnings": run.warnings,
                "replayed_steps": step + 1 - start, "seconds": time.perf_counter() - t0,
                "loss": rep["loss"], "recorded_loss": float(run.steps["loss"][i]),
                "match": first_bad is None, "first_mismatch": first_bad, "reason": ""}
        if "loss_after" in cols and "loss_after" in rep:
            info.update(loss_after=rep["loss_after"], recorded_loss_after=float(run.steps["loss_after"][i]))
        if first_bad is not None:
            info["reason"] = mismatch_reason(run, s.trainer.data.describe())
        s.replay = info
        return s


def _same(a, b):
    a, b = float(a), float(b)
    return a == b or (math.isnan(a) and math.isnan(b))


def _stats(a, bins):
    a = np.asarray(a, dtype=np.float64).ravel()
    fin = a[np.isfinite(a)]
    if not len(fin):
        return {"size": a.size, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "norm": math.nan, "zero_share": math.nan, "hist": (np.zeros(bins, int), np.zeros(bins + 1))}
    counts, edges = np.histogram(fin, bins=bins)
    return {"size": a.size, "mean": float(fin.mean()), "std": float(fin.std()), "min": float(fin.min()),
            "max": float(fin.max()), "norm": float(np.linalg.norm(fin)), "zero_share": float(np.mean(a == 0)),
            "hist": (counts, edges)}
