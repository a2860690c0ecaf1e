"""The training loop: mini-batch SGD, evaluated and traced, into a run directory.

    cfg = TrainConfig(lr=0.1, epochs=3)
    result = train(cfg, out="runs/lr0.1", on_step=print)
    t = Trainer(cfg); rec = t.step()             # the same loop, one step at a time

``train`` returns data and never prints; callbacks (``on_step(record)``, ``on_eval(record)``)
let a CLI or notebook show progress. What a run directory holds: minicnn.rundir.

Data order: epoch e visits the training set in ``default_rng([seed, e]).permutation(n)`` order,
so any step's batch can be rebuilt without replaying the ones before it.
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import trace as tr
from .config import probe_batch, setup, sharpness_batch
from .rundir import RunWriter, checkpoint_extra, environment, label_entropy, load_checkpoint, save_checkpoint
from .sgd import SGD, parse_schedule

EVAL_TRAIN_SUBSET = 2000     # training loss/accuracy at evaluations is measured on this many fixed samples


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
        self.total = cfg.total_steps(self.steps_per_epoch)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.level = cfg.trace_level(self.total)
        self.schedule = parse_schedule(cfg.lr_schedule, cfg.lr, self.total)
        self.opt = SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        self.sharp = None
        if cfg.sharpness_every:
            sb = sharpness_batch(n, cfg.seed)
            self.sharp = tr.Sharpness(net, data.x_train[sb], data.y_train[sb], seed=cfg.seed, measures=cfg.sharpness)
        self.meter = tr.StepMeter(net, self.level)   # the trace's work vectors, where the parameters live
        self.probe = None
        if cfg.probe_every and self.level != "off":
            pb = probe_batch(len(data.y_val), cfg.seed, cfg.probe_size)
            self.probe = tr.Probe(net, data.x_val[pb], data.y_val[pb])
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
        net, meter, step = self.net, self.meter, self.step_count
        xb, yb = self.batch()
        lr = self.schedule(step) if lr is None else float(lr)
        level = self.level if record else "off"
        probed = self.probe() if self.probe and level != "off" and step % self.cfg.probe_every == 0 else {}
        loss = net.loss(xb, yb)
        rec = {"step": step, "epoch": self.epoch, "lr": lr, "loss": loss}
        if math.isfinite(loss):
            # Gradient noise is measured on the step's own training batch: it is the noise of the
            # gradient this step takes (B_noise is compared with this batch size), and it costs only
            # the per-sample work, the gradient being the same bits. A fixed batch would give the
            # same B at every batch size but cost a forward and backward more; at small batches the
            # diagnosis averages over the run's measurements instead (diagnose.causes).
            if record and self.cfg.noise_every and step % self.cfg.noise_every == 0 and len(yb) >= 2:
                rec.update(tr.noise_backward(net))
            else:
                net.backward()
            if level != "off":
                rec.update(net.trace_stats())
            if self.sharp and sharpness and step % self.cfg.sharpness_every == 0:
                rec.update(self.sharp.measure(step, lr=lr))
            if level != "off":
                meter.before_update()
            self.opt.step([net.flat_params], [net.flat_grads], lr=lr)
            if level != "off":
                rec.update(meter.after_update(cos=step > 0))
            meter.remember_gradient()
            if level == "full":
                rec.update(meter.same_batch(xb, yb, loss))
        rec.update(probed)
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
        prev = self.meter.prev_grad
        s = {"step": self.step_count, "epoch": self.epoch, "pos": self.pos,
             "params": self.net.get_flat_params(),
             "momentum": self.opt.state_dict()["buffers"],
             "prev_grad": None if prev is None else self.net.host_copy(prev)}
        if self.sharp is not None:
            s["sharp"] = self.sharp.state()
        return s

    def load_state(self, s):
        self.step_count, self.epoch, self.pos = int(s["step"]), int(s["epoch"]), int(s["pos"])
        self.net.set_flat_params(s["params"])
        self.opt.load_state_dict({"buffers": s["momentum"]})
        if self.meter.prev_grad is not None and s.get("prev_grad") is not None:
            self.net.ops.copy_into(self.meter.prev_grad, s["prev_grad"])
        if self.sharp is not None and "sharp" in s:
            self.sharp.load_state(s["sharp"])

    def save(self, path):
        """A checkpoint (load_checkpoint reads its weights and momentum) that also resumes the run."""
        prev = self.meter.prev_grad
        extra = {"epoch": np.int64(self.epoch), "pos": np.int64(self.pos),
                 "prev_grad": None if prev is None else self.net.host_copy(prev)}
        if self.sharp is not None:
            extra.update(self.sharp.state())
        save_checkpoint(path, self.net, self.opt, self.step_count, **extra)

    def resume(self, path):
        """Load a checkpoint written by ``save`` (or a final checkpoint.npz: weights, momentum and
        step; the position then follows from the step). Returns its step."""
        step = load_checkpoint(path, self.net, self.opt)
        ex = checkpoint_extra(path)
        self.step_count = step
        self.epoch = int(ex.get("epoch", step // self.steps_per_epoch))
        self.pos = int(ex.get("pos", step % self.steps_per_epoch))
        prev = self.meter.prev_grad
        if prev is not None and "prev_grad" in ex and ex["prev_grad"].shape == tuple(prev.shape):
            self.net.ops.copy_into(prev, ex["prev_grad"])
        if self.sharp is not None:
            self.sharp.load_state(ex)
        return step

    # ------------------------------------------------------------------ the run as a whole
    def describe(self):
        """config.json's content: the config, the network and data it built, and the environment."""
        cfg, data, net = self.cfg, self.data, self.net
        return {"config": cfg.to_dict(), "spec": net.spec, "input_shape": net.input_shape,
                "num_params": net.num_params, "dataset": data.describe(), "num_classes": data.num_classes,
                "label_entropy": label_entropy(data.y_train, data.num_classes), "steps_total": self.total,
                "steps_per_epoch": self.steps_per_epoch, "trace_level": self.level, "eval_every": self.eval_every,
                "input_stats": input_stats(data.x_train), "environment": environment()}

    def evaluate(self, step):
        """Loss and accuracy on the first EVAL_TRAIN_SUBSET training samples and on the validation set."""
        net, data = self.net, self.data
        n_eval = min(EVAL_TRAIN_SUBSET, self.n)
        tl, ta = net.evaluate(data.x_train[:n_eval], data.y_train[:n_eval])
        vl, va = net.evaluate(data.x_val, data.y_val)
        return {"step": step, "epoch": step / self.steps_per_epoch, "train_loss": tl, "train_acc": ta,
                "val_loss": vl, "val_acc": va}


def input_stats(x, samples=EVAL_TRAIN_SUBSET):
    """Mean, standard deviation, min and max of the inputs (the first ``samples`` images): what
    un-normalised pixels look like (0..255 instead of 0..1) in the run's config.json."""
    x = np.asarray(x[:samples], dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def train(config=None, out=None, data=None, on_step=None, on_eval=None, on_start=None, **overrides):
    """Train a network as ``config`` says; write a run directory to ``out`` if given.

    data: a minicnn.data.Dataset to use instead of loading ``config.data`` (e.g. in notebooks).
    overrides: TrainConfig fields, e.g. train(lr=0.01, steps=100).
    """
    t_start = time.perf_counter()
    trainer = Trainer(config, data=data, t_start=t_start, **overrides)
    result = RunResult("finished", 0, run_dir=out, config=trainer.cfg.to_dict(), net=trainer.net)
    writer = None
    if out:
        cols = tr.columns(trainer.net, trainer.level, trainer.sharp and trainer.sharp.measures,
                          probe=trainer.probe is not None, noise=bool(trainer.cfg.noise_every))
        writer = RunWriter(out, trainer.describe(), cols, checkpoints=bool(trainer.cfg.checkpoint_every))
    if on_start:
        on_start({"net": trainer.net, "data": trainer.data, "steps_total": trainer.total,
                  "steps_per_epoch": trainer.steps_per_epoch, "trace_level": trainer.level})
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/inf are recorded, not warned
            _loop(trainer, result, writer, on_step, on_eval)
    finally:
        result.wall_s = time.perf_counter() - t_start
        if writer:
            writer.close()
    if writer:
        writer.finish(_summary(result), lambda path: save_checkpoint(path, trainer.net, trainer.opt, result.steps))
        from .plots import plot_losses
        plot_losses(out)
    return result


def _loop(trainer, result, writer, on_step, on_eval):
    """Evaluate, then step (checkpointing when due) until the run's steps are done, the loss is
    NaN/inf, or Ctrl-C; every step's record goes to the writer and ``on_step`` as it happens."""
    def evaluate(step):
        rec = trainer.evaluate(step)
        result.evals.append(rec)
        if writer:
            writer.eval(rec)
        if on_eval:
            on_eval(rec)

    every = trainer.cfg.checkpoint_every
    step = 0
    try:
        evaluate(0)
        while step < trainer.total:
            if writer and every and step % every == 0:
                trainer.save(writer.checkpoint_path(step))
            rec = trainer.step()
            if step == 0:
                result.first_step_s = rec["time_s"]
            result.losses.append(rec["loss"])
            if writer:
                writer.step(rec)
            step = result.steps = step + 1
            if on_step:
                on_step(rec)
            if not math.isfinite(rec["loss"]):
                result.status = "diverged"
                result.message = (f"loss became {rec['loss']} at step {step - 1}; stopped there "
                                  f"(every step up to it is recorded)")
                break
            if step % trainer.eval_every == 0 or step == trainer.total:
                evaluate(step)
    except KeyboardInterrupt:
        result.status = "interrupted"
        result.message = f"interrupted at step {step}; every finished step is recorded"


def _summary(result):
    last = result.evals[-1] if result.evals else {}
    return {"status": result.status, "message": result.message, "steps": result.steps, "wall_s": result.wall_s,
            "first_step_s": result.first_step_s, "final_eval": last,
            "best_val_loss": min((e["val_loss"] for e in result.evals), default=None),
            "final_train_loss": result.losses[-1] if result.losses else None}

