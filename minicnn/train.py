"""The training loop: mini-batch SGD, evaluated and traced, into a run directory.

    cfg = TrainConfig(lr=0.1, epochs=3)
    result = train(cfg, out="runs/lr0.1", on_step=print)

``train`` returns data and never prints; callbacks (``on_step(record)``, ``on_eval(record)``)
let a CLI or notebook show progress. A run directory holds:

    config.json      the full TrainConfig (enough to reproduce the run bit for bit) + environment
    steps.csv        one row per SGD step (see minicnn.trace for the columns), flushed as written
    evals.csv        step, epoch, train_loss, train_acc, val_loss, val_acc at each evaluation
    checkpoint.npz   final weights (PyTorch names) and optimizer state
    summary.json     status (finished / diverged / interrupted), timings, final metrics
    loss.png         training and validation loss against steps

Data order: epoch e visits the training set in ``default_rng([seed, e]).permutation(n)`` order,
so any step's batch can be rebuilt without replaying the ones before it.
"""
import csv
import json
import math
import os
import platform
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
    seed: int = 0
    eval_every: int = None        # steps between evaluations; default once per epoch
    dtype: str = "float32"
    device: str = "cpu"
    trace: str = "auto"
    sharpness_every: int = 0
    threads: int = None
    split: float = None
    image_size: int = None

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
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        need(self.trace in tr.TRACE_LEVELS + ("auto",),
             f"--trace must be one of auto, {', '.join(tr.TRACE_LEVELS)}, got {self.trace}")
        need(self.sharpness_every >= 0, f"--sharpness-every must be >= 0, got {self.sharpness_every}")
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


def save_checkpoint(path, net, opt, step):
    arrays = {f"param/{k}": v for k, v in net.state_dict().items()}
    if opt.buffers is not None:
        arrays.update({f"momentum/{i}": b for i, b in enumerate(opt.buffers)})
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


def set_threads(threads):
    if threads:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def train(config=None, out=None, data=None, on_step=None, on_eval=None, on_start=None, **overrides):
    """Train a network as ``config`` says; write a run directory to ``out`` if given.

    data: a minicnn.data.Dataset to use instead of loading ``config.data`` (e.g. in notebooks).
    overrides: TrainConfig fields, e.g. train(lr=0.01, steps=100).
    """
    from .data import load_data
    from .network import Network

    t_start = time.perf_counter()
    cfg = TrainConfig(**{**(config.to_dict() if config else {}), **overrides})
    cfg.validate()
    set_threads(cfg.threads)
    if data is None:
        data = load_data(cfg.data, seed=cfg.seed, data_dir=cfg.data_dir, n_train=cfg.n_train,
                         n_val=cfg.n_val, split=cfg.split, image_size=cfg.image_size)
    net = Network.from_spec(cfg.arch, input_shape=data.input_shape, seed=cfg.seed, dtype=cfg.dtype,
                            init=cfg.init, init_scale=cfg.init_scale, device=cfg.device)
    if net.num_classes < data.num_classes:
        raise ConfigError(f"the network has {net.num_classes} outputs but the data has {data.num_classes} "
                          f"classes; end the spec with fc{data.num_classes}")
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else int(math.ceil((cfg.epochs or 3) * steps_per_epoch))
    eval_every = cfg.eval_every or steps_per_epoch
    level = cfg.trace if cfg.trace != "auto" else ("full" if total <= AUTO_FULL_TRACE_MAX_STEPS else "light")
    schedule = parse_schedule(cfg.lr_schedule, cfg.lr, total)
    opt = SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    dt = net.dtype
    n_eval = min(EVAL_TRAIN_SUBSET, n)
    sharp = None
    if cfg.sharpness_every:
        sb = np.random.default_rng([cfg.seed, 1 << 20]).permutation(n)[:min(n, 256)]
        sharp = tr.Sharpness(net, data.x_train[sb], data.y_train[sb], seed=cfg.seed)

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
        writer = tr.TraceWriter(os.path.join(out, "steps.csv"), tr.columns(net, level, bool(sharp)))
        evals_f = open(os.path.join(out, "evals.csv"), "w", newline="")
        evals_w = csv.writer(evals_f)
        evals_w.writerow(["step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc"])
        evals_f.flush()
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

    prev_grad = np.empty_like(net.flat_grads) if level != "off" else None
    flat_before = np.empty_like(net.flat_params)
    step = 0
    errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore")  # NaN/inf are recorded, not warned
    errstate.__enter__()
    try:
        evaluate(0)
        epoch = 0
        while step < total:
            for idx in batch_indices(n, cfg.batch_size, cfg.seed, epoch):
                if step >= total:
                    break
                xb = np.ascontiguousarray(data.x_train[idx], dtype=dt)
                yb = data.y_train[idx]
                lr = schedule(step)
                loss = net._loss(xb, yb)
                rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss}
                diverged = not math.isfinite(loss)
                if not diverged:
                    net._backward(yb)
                    if level != "off":
                        rec.update(tr.logit_stats(net.logits, net.probs, yb))
                        for layer in net.layers:
                            if layer.kind == "relu":
                                rec[f"dead.{layer.name}"] = tr.dead_fraction(layer.out)
                    if sharp and step % cfg.sharpness_every == 0:
                        lam, evals = sharp()
                        rec.update(lambda_max=lam, two_over_lr=2.0 / lr if lr > 0 else math.inf, hvp_evals=evals)
                    flat_before[...] = net.flat_params
                    opt.step([net.flat_params], [net.flat_grads], lr=lr)
                    if level != "off":
                        g = net.flat_grads
                        delta = net.flat_params - flat_before
                        gn = float(np.linalg.norm(g))
                        rec.update(grad_norm=gn, weight_norm=float(np.linalg.norm(flat_before)),
                                   update_norm=float(np.linalg.norm(delta)))
                        if step > 0:
                            pn = float(np.linalg.norm(prev_grad))
                            rec["grad_cos"] = float(g @ prev_grad) / (gn * pn) if gn > 0 and pn > 0 else math.nan
                        rec.update(tr.layer_norms(net, g, delta, flat_before))
                        prev_grad[...] = g
                        if level == "full":
                            df0 = float(np.dot(g.astype(np.float64), delta.astype(np.float64)))
                            loss_after = net._loss(xb, yb)
                            rec.update(loss_after=loss_after, loss_change=loss_after - loss, predicted_change=df0)
                            if math.isfinite(loss_after):
                                net._backward(yb)
                                df1 = float(np.dot(net.flat_grads.astype(np.float64), delta.astype(np.float64)))
                                rec["alpha"] = tr.alpha_from_step(loss, loss_after, df0, df1)
                rec["time_s"] = time.perf_counter() - t_start
                if step == 0:
                    result.first_step_s = rec["time_s"]
                result.losses.append(loss)
                if writer:
                    writer.write(rec)
                step += 1
                result.steps = step
                if on_step:
                    on_step(rec)
                if diverged:
                    result.status = "diverged"
                    result.message = (f"loss became {loss} at step {step - 1}; stopped there "
                                      f"(every step up to it is recorded)")
                    break
                if step % eval_every == 0 or step == total:
                    evaluate(step)
            if result.status != "finished":
                break
            epoch += 1
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
        save_checkpoint(os.path.join(out, "checkpoint.npz"), net, opt, step)
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
