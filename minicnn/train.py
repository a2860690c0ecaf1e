"""The training loop: mini-batch SGD, evaluated and traced, into a run directory.

    cfg = TrainConfig(lr=0.1, epochs=3)
    result = train(cfg, out="runs/lr0.1", on_step=print)

``train`` returns data and never prints; callbacks (``on_step(record)``, ``on_eval(record)``)
let a CLI or notebook show progress. A run directory holds:

    config.json      the full TrainConfig (enough to reproduce the run bit for bit) + environment
    steps.csv        one row per SGD step (see minicnn.trace for the columns), flushed as written
    evals.csv        step, epoch, train_loss, train_acc, val_loss, val_acc at each evaluation
    checkpoint.npz   final weights (PyTorch names) and optimizer state
    checkpoints/     step_XXXXXXX.npz before step 0 and every ``checkpoint_every`` steps: weights,
                     momentum, position in the data order (epoch, batch), previous gradient, so
                     that any step can be rebuilt by replay (minicnn.Stepper.from_run)
    summary.json     status (finished / diverged / interrupted), timings, final metrics
    loss.png         training and validation loss against steps

Data order: epoch e visits the training set in ``default_rng([seed, e]).permutation(n)`` order,
so any step's batch can be rebuilt without replaying the ones before it.
"""
import copy
import csv
import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from . import trace as tr
from .errors import ConfigError
from .sgd import SGD, parse_schedule

DTYPES = ("float32", "float64")
# "auto" trace: full when the run is small enough that doubling a step's cost is cheap
AUTO_FULL_TRACE_MAX_STEPS = 20000
EVAL_TRAIN_SUBSET = 2000     # training loss/accuracy at evaluations is measured on this many fixed samples
# Periodic checkpoints (RUN_DIR/checkpoints/step_XXXXXXX.npz, before step 0 and every K steps):
# replaying to any step T costs at most K steps. A checkpoint of the default network is ~170 kB
# (weights + momentum + previous gradient), so even a 20,000-step run keeps them under 20 MB.
CHECKPOINT_EVERY = 200
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig:
    data: str = "shapes"
    data_dir: str = None
    n_train: int = None
    n_val: int = None
    arch: str = "small"
    lr: float = 0.1
    lr_schedule: str = "constant"
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    batch_size: int = 64
    epochs: float = None          # default 3 when neither epochs nor steps is given
    steps: int = None
    init: str = "torch"
    init_scale: float = 1.0
    input_scale: float = 1.0      # multiply every input by this (255: what un-normalised pixels do)
    seed: int = 0
    eval_every: int = None        # steps between evaluations; default once per epoch
    dtype: str = "float32"
    device: str = "cpu"
    trace: str = "auto"
    sharpness_every: int = 0
    threads: int = None
    split: float = None
    image_size: int = None
    checkpoint_every: int = CHECKPOINT_EVERY   # steps between periodic checkpoints (0: none)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0,
             f"--lr must be a finite number >= 0, got {self.lr}")
        need(isinstance(self.input_scale, (int, float)) and math.isfinite(self.input_scale) and self.input_scale > 0,
             f"--input-scale must be a finite number > 0, got {self.input_scale}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        need(self.trace in tr.TRACE_LEVELS + ("auto",),
             f"--trace must be one of auto, {', '.join(tr.TRACE_LEVELS)}, got {self.trace}")
        need(self.sharpness_every >= 0, f"--sharpness-every must be >= 0, got {self.sharpness_every}")
        need(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")


@dataclass
class RunResult:
    status: str                        # finished | diverged | interrupted
    steps: int                         # SGD steps taken
    message: str = ""
    run_dir: str = None
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    wall_s: float = 0.0
    first_step_s: float = 0.0          # from train() call to the end of the first step (compile included)
    net: object = None


def batch_indices(n, batch_size, seed, epoch):
    """The sample indices of every batch of an epoch, in order (the last batch may be smaller)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def save_checkpoint(path, net, opt, step, **extra):
    """Weights (PyTorch names), momentum buffers, the step, and any ``extra`` arrays (position in
    the data order, previous gradient, ...: see Trainer.state)."""
    arrays = {f"param/{k}": v for k, v in net.state_dict().items()}
    bufs = opt.state_dict()["buffers"]
    if bufs is not None:
        arrays.update({f"momentum/{i}": b for i, b in enumerate(bufs)})
    arrays.update({f"extra/{k}": np.asarray(v) for k, v in extra.items() if v is not None})
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=np.int64(step), **arrays)
    os.replace(tmp, path)


def load_checkpoint(path, net, opt=None):
    """Load weights (and momentum buffers into opt) from a checkpoint; returns its step."""
    with np.load(path) as z:
        net.load_state_dict({k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")})
        bufs = sorted((int(k.split("/")[1]), z[k]) for k in z.files if k.startswith("momentum/"))
        if opt is not None:
            opt.load_state_dict({"buffers": [b for _, b in bufs] if bufs else None})
        return int(z["step"])


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:07d}.npz")


def list_checkpoints(run_dir):
    """[(step, path)] of a run's periodic checkpoints, by step."""
    d = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(d):
        return []
    out = []
    for f in os.listdir(d):
        m = re.fullmatch(r"step_(\d+)\.npz", f)
        if m:
            out.append((int(m.group(1)), os.path.join(d, f)))
    return sorted(out)


def set_threads(threads):
    if threads:
        import numba

        from .ops import cpu  # noqa: F401  (first: it picks Numba's threading layer, which set_num_threads launches)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def setup(config=None, data=None, **overrides):
    """(config, data, network) for a run: the config validated (overrides applied), threads set, the
    data loaded (unless given) and scaled by input_scale, the network built and checked against it."""
    from .data import load_data
    from .network import Network
    cfg = TrainConfig(**{**(config.to_dict() if config else {}), **overrides})
    cfg.validate()
    set_threads(cfg.threads)
    if data is None:
        data = load_data(cfg.data, seed=cfg.seed, data_dir=cfg.data_dir, n_train=cfg.n_train,
                         n_val=cfg.n_val, split=cfg.split, image_size=cfg.image_size)
    data = data.scaled(cfg.input_scale)
    net = Network.from_spec(cfg.arch, input_shape=data.input_shape, seed=cfg.seed, dtype=cfg.dtype,
                            init=cfg.init, init_scale=cfg.init_scale, device=cfg.device)
    if net.num_classes < data.num_classes:
        raise ConfigError(f"the network has {net.num_classes} outputs but the data has {data.num_classes} "
                          f"classes; end the spec with fc{data.num_classes}")
    return cfg, data, net


class Trainer:
    """One SGD run, one step at a time: the loop of ``train`` as an object.

        t = Trainer(TrainConfig(lr=0.1, steps=100))
        rec = t.step()          # the step's trace record (see minicnn.trace)
        t.step_count, t.epoch, t.pos    # steps taken; where the next batch comes from

    ``train`` loops over ``step()``; the debugger (minicnn.Stepper) steps it by hand, snapshots it
    with ``state()`` and rewinds it with ``load_state()``. The next step's batch is
    ``batch_indices(n, batch_size, seed, epoch)[pos]``.
    """

    def __init__(self, config=None, data=None, t_start=None, **overrides):
        self.t_start = time.perf_counter() if t_start is None else t_start
        cfg, data, net = setup(config, data, **overrides)
        self.cfg, self.data, self.net = cfg, data, net
        self.n = n = len(data.y_train)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total = cfg.steps if cfg.steps is not None else int(math.ceil((cfg.epochs or 3) * self.steps_per_epoch))
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.level = cfg.trace if cfg.trace != "auto" else ("full" if self.total <= AUTO_FULL_TRACE_MAX_STEPS else "light")
        self.schedule = parse_schedule(cfg.lr_schedule, cfg.lr, self.total)
        self.opt = SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.sharp = None
        if cfg.sharpness_every:
            sb = sharpness_batch(n, cfg.seed)
            self.sharp = tr.Sharpness(net, data.x_train[sb], data.y_train[sb], seed=cfg.seed)
        # work vectors where the parameters live (the GPU for device "cuda"): the previous gradient
        # (for grad_cos), the weights before the step and the step itself
        P, ops = net.num_params, net.ops
        self.prev_grad = ops.zeros(P, net.dtype) if self.level != "off" else None
        self._flat_before = ops.empty(P, net.dtype)
        self._delta = ops.empty(P, net.dtype)
        slices = [sl for _, sl in net.param_layers()]
        self._bounds = np.array([sl.start for sl in slices] + [slices[-1].stop], dtype=np.int64)
        self.step_count = 0          # steps taken; the next step is step number step_count
        self.epoch = 0               # the next batch: batch ``pos`` of epoch ``epoch``
        self.pos = 0
        self._order = (None, None)   # (epoch, its batches)

    # ------------------------------------------------------------------ data order
    def batch_indices(self, epoch=None, pos=None):
        """Sample indices of the next step's batch (or of batch ``pos`` of ``epoch``)."""
        epoch = self.epoch if epoch is None else epoch
        pos = self.pos if pos is None else pos
        if self._order[0] != epoch:
            self._order = (epoch, batch_indices(self.n, self.cfg.batch_size, self.cfg.seed, epoch))
        return self._order[1][pos]

    def batch(self, epoch=None, pos=None):
        """(x: (N, C, H, W), y: (N,)) of the next step (or of batch ``pos`` of ``epoch``), as the
        step uses them."""
        idx = self.batch_indices(epoch, pos)
        return np.ascontiguousarray(self.data.x_train[idx], dtype=self.net.dtype), self.data.y_train[idx]

    # ------------------------------------------------------------------ one step
    def step(self, lr=None, record=True, sharpness=True):
        """Take the next SGD step and return its trace record.

        lr: use this learning rate instead of the schedule's (the debugger's what-if).
        record=False: only loss and lr (faster; the state afterwards is the same, for replay).
        sharpness=False: skip a due lambda_max measurement.
        A non-finite loss is recorded and the weights are left as they were.
        """
        net, opt, cfg = self.net, self.opt, self.cfg
        step = self.step_count
        xb, yb = self.batch()
        lr = self.schedule(step) if lr is None else float(lr)
        level = self.level if record else "off"
        loss = net.loss(xb, yb)
        rec = {"step": step, "epoch": self.epoch, "lr": lr, "loss": loss}
        if math.isfinite(loss):
            net.backward()
            ops, g, before, delta = net.ops, net.flat_grads, self._flat_before, self._delta
            if level != "off":
                rec.update(net.trace_stats())
            if self.sharp and sharpness and step % cfg.sharpness_every == 0:
                lam, evals = self.sharp()
                rec.update(lambda_max=lam, two_over_lr=2.0 / lr if lr > 0 else math.inf, hvp_evals=evals)
            if level != "off":
                ops.copy_into(before, net.flat_params)
            opt.step([net.flat_params], [net.flat_grads], lr=lr)
            if level != "off":
                # every norm and dot product of the step, per layer, in one call (on the device for cuda)
                ops.subtract(delta, net.flat_params, before)
                pairs = [(g, g), (before, before), (delta, delta), (g, self.prev_grad), (self.prev_grad, self.prev_grad)]
                dots = ops.segment_dots(pairs + [(g, delta)] * (level == "full"), self._bounds)
                rec.update(tr.step_norms(net, dots, cos=step > 0))
            if self.prev_grad is not None:
                ops.copy_into(self.prev_grad, g)
            if level == "full":
                df0 = float(dots[5].sum())
                loss_after = net.loss(xb, yb)
                rec.update(loss_after=loss_after, loss_change=loss_after - loss, predicted_change=df0)
                if math.isfinite(loss_after):
                    net.backward()
                    df1 = float(ops.segment_dots([(net.flat_grads, delta)], self._bounds).sum())
                    rec["alpha"] = tr.alpha_from_step(loss, loss_after, df0, df1)
        rec["time_s"] = time.perf_counter() - self.t_start
        self.step_count += 1
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        return rec

    # ------------------------------------------------------------------ snapshots
    def state(self):
        """Everything the next steps depend on, as copies: weights, momentum, position in the data
        order, the previous gradient (for grad_cos) and the sharpness warm start."""
        s = {"step": self.step_count, "epoch": self.epoch, "pos": self.pos,
             "params": self.net.get_flat_params(),
             "momentum": self.opt.state_dict()["buffers"],
             "prev_grad": None if self.prev_grad is None else self.net.host_copy(self.prev_grad)}
        if self.sharp is not None:
            s["sharp_v"] = None if self.sharp.v is None else self.sharp.v.copy()
            s["sharp_rng"] = copy.deepcopy(self.sharp.rng.bit_generator.state)
        return s

    def load_state(self, s):
        self.step_count, self.epoch, self.pos = int(s["step"]), int(s["epoch"]), int(s["pos"])
        self.net.set_flat_params(s["params"])
        self.opt.load_state_dict({"buffers": s["momentum"]})
        if self.prev_grad is not None and s.get("prev_grad") is not None:
            self.net.ops.copy_into(self.prev_grad, s["prev_grad"])
        if self.sharp is not None and "sharp_v" in s:
            self.sharp.v = None if s["sharp_v"] is None else np.array(s["sharp_v"])
            self.sharp.rng.bit_generator.state = copy.deepcopy(s["sharp_rng"])

    def save(self, path):
        """A checkpoint (load_checkpoint reads its weights and momentum) that also resumes the run."""
        extra = {"epoch": np.int64(self.epoch), "pos": np.int64(self.pos),
                 "prev_grad": None if self.prev_grad is None else self.net.host_copy(self.prev_grad)}
        if self.sharp is not None and self.sharp.v is not None:
            extra["sharp_v"] = self.sharp.v
        save_checkpoint(path, self.net, self.opt, self.step_count, **extra)

    def resume(self, path):
        """Load a checkpoint written by ``save`` (or a final checkpoint.npz: weights, momentum and
        step; the position then follows from the step). Returns its step."""
        step = load_checkpoint(path, self.net, self.opt)
        with np.load(path) as z:
            ex = {k[len("extra/"):]: z[k] for k in z.files if k.startswith("extra/")}
        self.step_count = step
        self.epoch = int(ex.get("epoch", step // self.steps_per_epoch))
        self.pos = int(ex.get("pos", step % self.steps_per_epoch))
        if self.prev_grad is not None and "prev_grad" in ex and ex["prev_grad"].shape == tuple(self.prev_grad.shape):
            self.net.ops.copy_into(self.prev_grad, ex["prev_grad"])
        if self.sharp is not None and "sharp_v" in ex:
            self.sharp.v = np.array(ex["sharp_v"])
        return step


def sharpness_batch(n, seed):
    """The fixed samples lambda_max is measured on."""
    return np.random.default_rng([seed, 1 << 20]).permutation(n)[:min(n, 256)]


def train(config=None, out=None, data=None, on_step=None, on_eval=None, on_start=None, **overrides):
    """Train a network as ``config`` says; write a run directory to ``out`` if given.

    data: a minicnn.data.Dataset to use instead of loading ``config.data`` (e.g. in notebooks).
    overrides: TrainConfig fields, e.g. train(lr=0.01, steps=100).
    """
    t_start = time.perf_counter()
    trainer = Trainer(config, data=data, t_start=t_start, **overrides)
    cfg, data, net = trainer.cfg, trainer.data, trainer.net
    n, total, level = trainer.n, trainer.total, trainer.level
    steps_per_epoch, eval_every = trainer.steps_per_epoch, trainer.eval_every
    n_eval = min(EVAL_TRAIN_SUBSET, n)

    result = RunResult("finished", 0, run_dir=out, config=cfg.to_dict(), net=net)
    writer = evals_f = None
    if out:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "config.json"), {
            "config": cfg.to_dict(), "spec": net.spec, "input_shape": net.input_shape,
            "num_params": net.num_params, "dataset": data.describe(), "num_classes": data.num_classes,
            "label_entropy": _entropy(data.y_train, data.num_classes), "steps_total": total,
            "steps_per_epoch": steps_per_epoch, "trace_level": level, "eval_every": eval_every,
            "environment": _environment()})
        writer = tr.TraceWriter(os.path.join(out, "steps.csv"), tr.columns(net, level, bool(trainer.sharp)))
        evals_f = open(os.path.join(out, "evals.csv"), "w", newline="")
        evals_w = csv.writer(evals_f)
        evals_w.writerow(["step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"])
        evals_f.flush()
        if cfg.checkpoint_every:
            os.makedirs(os.path.join(out, CHECKPOINT_DIR), exist_ok=True)
    if on_start:
        on_start({"net": net, "data": data, "steps_total": total, "steps_per_epoch": steps_per_epoch,
                  "trace_level": level})

    def evaluate(step):
        tl, ta = net.evaluate(data.x_train[:n_eval], data.y_train[:n_eval])
        vl, va = net.evaluate(data.x_val, data.y_val)
        rec = {"step": step, "epoch": step / steps_per_epoch, "train_loss": tl, "train_acc": ta,
               "val_loss": vl, "val_acc": va}
        result.evals.append(rec)
        if evals_f:
            evals_w.writerow([_fmt(rec[k]) for k in ("step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")])
            evals_f.flush()
        if on_eval:
            on_eval(rec)

    step = 0
    errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore")  # NaN/inf are recorded, not warned
    errstate.__enter__()
    try:
        evaluate(0)
        while step < total:
            if out and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                trainer.save(checkpoint_path(out, step))
            rec = trainer.step()
            loss = rec["loss"]
            if step == 0:
                result.first_step_s = rec["time_s"]
            result.losses.append(loss)
            if writer:
                writer.write(rec)
            step += 1
            result.steps = step
            if on_step:
                on_step(rec)
            if not math.isfinite(loss):
                result.status = "diverged"
                result.message = (f"loss became {loss} at step {step - 1}; stopped there "
                                  f"(every step up to it is recorded)")
                break
            if step % eval_every == 0 or step == total:
                evaluate(step)
    except KeyboardInterrupt:
        result.status = "interrupted"
        result.message = f"interrupted at step {step}; every finished step is recorded"
    finally:
        errstate.__exit__(None, None, None)
        result.wall_s = time.perf_counter() - t_start
        if writer:
            writer.close()
        if evals_f:
            evals_f.close()
    if out:
        save_checkpoint(os.path.join(out, "checkpoint.npz"), net, trainer.opt, step)
        last = result.evals[-1] if result.evals else {}
        _write_json(os.path.join(out, "summary.json"), {
            "status": result.status, "message": result.message, "steps": step, "wall_s": result.wall_s,
            "first_step_s": result.first_step_s, "final_eval": last,
            "best_val_loss": min((e["val_loss"] for e in result.evals), default=None),
            "final_train_loss": result.losses[-1] if result.losses else None})
        from .plots import plot_losses
        plot_losses(out)
    return result


def _entropy(y, k):
    p = np.bincount(y, minlength=k) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _fmt(v):
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


def _environment():
    env = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine()}
    try:
        import numba
        env.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    return env
