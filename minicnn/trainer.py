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
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import trace as tr
from .config import RESUME_CHANGES, TrainConfig, adjustment_text, probe_batch, setup, sharpness_batch
from .errors import ConfigError, DataError, MinicnnError
from .rundir import (
    FINAL_CHECKPOINT,
    STEPS,
    RunWriter,
    asked_config,
    checkpoint_extra,
    checkpoint_step,
    clear_run_dir,
    environment,
    is_run_dir,
    label_entropy,
    list_checkpoints,
    load_checkpoint,
    load_run,
    make_writable_dir,
    read_table,
    save_checkpoint,
    table_lines,
    truncate_run,
)
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
    warnings: list = field(default_factory=list)   # values used other than asked (Trainer.warnings)
    stopped_by: str = None             # interrupted: SIGINT, SIGTERM, KeyboardInterrupt or should_stop
    resumed_from: int = None           # resume=True: the step the run continued from
    checkpoint: str = None             # interrupted: the checkpoint it can be resumed from (None: an earlier one)


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
        self.adjusted = {}           # {field: {asked, used, why}}: values setup could not use as asked
        cfg, data, net = setup(config, data, adjusted=self.adjusted, **overrides)
        self.cfg, self.data, self.net = cfg, data, net
        net.compile_ahead()          # a training step follows: its backward kernels compile meanwhile
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

    def resume_latest(self, checkpoints):
        """Resume from the latest readable checkpoint of [(step, path)] (in step order); a corrupt or
        truncated one is skipped for the one before it, and with none left the run starts at step 0.
        Returns (step, path used or None, [one line per checkpoint skipped])."""
        fresh, skipped = self.state(), []
        for _, path in reversed(checkpoints):
            try:
                return self.resume(path), path, skipped
            except MinicnnError as e:
                skipped.append(str(e))
                self.load_state(fresh)
        return 0, None, skipped

    # ------------------------------------------------------------------ the run as a whole
    def columns(self):
        """The trace columns this run writes (minicnn.trace.columns for its level and measurements)."""
        return tr.columns(self.net, self.level, self.sharp and self.sharp.measures,
                          probe=self.probe is not None, noise=bool(self.cfg.noise_every))

    def describe(self):
        """config.json's content: the config, the network and data it built, and the environment."""
        cfg, data, net = self.cfg, self.data, self.net
        return {"config": cfg.to_dict(), "spec": net.spec, "input_shape": net.input_shape,
                "num_params": net.num_params, "dataset": data.describe(), "num_classes": data.num_classes,
                "label_entropy": label_entropy(data.y_train, data.num_classes), "steps_total": self.total,
                "steps_per_epoch": self.steps_per_epoch, "trace_level": self.level, "eval_every": self.eval_every,
                "input_stats": input_stats(data.x_train), "environment": environment(),
                **({"adjusted": self.adjusted} if self.adjusted else {})}

    def warnings(self):
        """One line per value that could not be used as asked (see config.setup)."""
        return [adjustment_text(k, a) for k, a in self.adjusted.items()]

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


@dataclass
class StopRequest:
    """Why the loop should stop after the current step: the signal's name, if one came."""
    signal: str = None
    should_stop: object = None         # a callable: truthy stops the run

    def __call__(self):
        if self.signal is None and self.should_stop is not None and self.should_stop():
            self.signal = "should_stop"
        return self.signal is not None


@contextmanager
def stop_on_signals(enabled=True, should_stop=None):
    """While active: the first SIGINT or SIGTERM asks the loop to stop after the current step (the
    StopRequest it yields says which came); a second one raises KeyboardInterrupt at once. Only in
    the main thread (where Python delivers signals), and a signal whose handler is SIG_IGN (a sweep
    worker's SIGINT: its sweep decides) stays ignored."""
    stop = StopRequest(should_stop=should_stop)
    sigs = {}
    if enabled and threading.current_thread() is threading.main_thread():
        sigs = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        sigs = {s: h for s, h in sigs.items() if h is not signal.SIG_IGN}

    def handler(signum, frame):
        if stop.signal is not None:
            raise KeyboardInterrupt
        stop.signal = signal.Signals(signum).name
    for s in sigs:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in sigs.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def train(config=None, out=None, data=None, on_step=None, on_eval=None, on_start=None, overwrite=False,
          resume=False, signals=True, should_stop=None, **overrides):
    """Train a network as ``config`` says; write a run directory to ``out`` if given.

    data: a minicnn.data.Dataset to use instead of loading ``config.data`` (e.g. in notebooks).
    overrides: TrainConfig fields, e.g. train(lr=0.01, steps=100).
    out: a directory that already holds a run is refused, unless ``overwrite`` (its run's files are
    removed first) or ``resume``: continue that run from its last checkpoint, with the config it
    recorded (only RESUME_CHANGES may differ: more steps or epochs, threads), appending to its
    trace, so that its steps are bit for bit those of a run never stopped.
    signals: SIGINT and SIGTERM stop the run after the current step, which is written with every
    file and a checkpoint to resume from (status "interrupted"); a second signal stops at once.
    should_stop: a callable, checked after every step; when it returns true the run stops the same way.
    """
    t_start = time.perf_counter()
    with stop_on_signals(signals, should_stop) as stop:     # a signal during setup stops before step 0
        if resume:
            trainer, resumed = resume_trainer(out, config, data, t_start, overrides)
        else:
            trainer, resumed = _new_trainer(out, overwrite, config, data, t_start, overrides), None
        result = RunResult("finished", 0, run_dir=out, config=trainer.cfg.to_dict(), net=trainer.net,
                           warnings=trainer.warnings())
        writer = _writer(trainer, out, resumed, result)
        if on_start:
            on_start({"net": trainer.net, "data": trainer.data, "steps_total": trainer.total,
                      "steps_per_epoch": trainer.steps_per_epoch, "trace_level": trainer.level,
                      "warnings": result.warnings, "resumed_from": result.resumed_from,
                      "skipped": resumed["skipped"] if resumed else []})
        consistent = True
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/inf are recorded, not warned
                consistent = _loop(trainer, result, writer, on_step, on_eval, stop)
        finally:
            result.wall_s = time.perf_counter() - t_start
            if writer:
                writer.close()
        if writer:
            _finish(trainer, result, writer, consistent)
    return result


def _new_trainer(out, overwrite, config, data, t_start, overrides):
    """A Trainer for a new run into ``out``: refused if ``out`` holds a run and not ``overwrite``;
    ``out`` is checked writable first (and removed again, if it was made here, when setup fails)."""
    if not out:
        return Trainer(config, data=data, t_start=t_start, **overrides)
    if is_run_dir(out) and not overwrite:
        raise ConfigError(f"{out} already holds a run; accepted: --overwrite to replace it, --resume {out} to "
                          f"continue it (train(overwrite=True) / train(resume=True)), or another --out")
    made, p = [], os.path.abspath(out)
    while not os.path.exists(p):          # the folders made here, the run's own first
        made, p = made + [p], os.path.dirname(p)
    make_writable_dir(out)
    try:
        trainer = Trainer(config, data=data, t_start=t_start, **overrides)
    except BaseException:
        for d in made:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    if overwrite:
        clear_run_dir(out)
    return trainer


def _writer(trainer, out, resumed, result):
    """The RunWriter of ``out`` (None without one); a resumed run appends, and its config.json
    lists every resume."""
    if not out:
        return None
    desc = trainer.describe()
    if resumed:
        desc["resumed"] = resumed["previous"] + [{"from_step": resumed["step"], "steps_total": trainer.total}]
        result.resumed_from, result.steps = resumed["step"], resumed["step"]
        result.losses, result.evals = resumed["losses"], resumed["evals"]
    return RunWriter(out, desc, trainer.columns(), checkpoints=bool(trainer.cfg.checkpoint_every),
                     append=bool(resumed))


def _finish(trainer, result, writer, consistent):
    """After the loop: a stopped run's checkpoint at the stop, the final checkpoint, summary.json and
    loss.png. A run stopped in the middle of a step (a second signal) has no state to save: it
    resumes from its last periodic checkpoint."""
    if result.status == "interrupted" and consistent:
        result.checkpoint = writer.checkpoint_path(result.steps)
        trainer.save(result.checkpoint)
    writer.finish(_summary(result), trainer.save if consistent else None)
    from .plots import plot_losses
    plot_losses(writer.out)


def _loop(trainer, result, writer, on_step, on_eval, stop):
    """Evaluate, then step (checkpointing when due) until the run's steps are done, the loss is
    NaN/inf, or a stop is asked (a signal, should_stop, Ctrl-C); every step's record goes to the
    writer and ``on_step`` as it happens. Returns False when stopped in the middle of a step."""
    def evaluate(step):
        rec = trainer.evaluate(step)
        result.evals.append(rec)
        if writer:
            writer.eval(rec)
        if on_eval:
            on_eval(rec)

    every, start = trainer.cfg.checkpoint_every, result.steps
    step, in_step = start, False
    try:
        if (step % trainer.eval_every == 0 or step == trainer.total) and step not in {e["step"] for e in result.evals}:
            evaluate(step)
        while step < trainer.total and not stop():
            if writer and every and step % every == 0 and not (step == start and os.path.exists(
                    writer.checkpoint_path(step))):
                trainer.save(writer.checkpoint_path(step))
            in_step = True
            rec = trainer.step()
            if step == start:
                result.first_step_s = rec["time_s"]
            result.losses.append(rec["loss"])
            if writer:
                writer.step(rec)
            step = result.steps = step + 1
            in_step = False
            if on_step:
                on_step(rec)
            if not math.isfinite(rec["loss"]):
                result.status = "diverged"
                result.message = (f"loss became {rec['loss']} at step {step - 1}; stopped there "
                                  f"(every step up to it is recorded)")
                return True
            if step % trainer.eval_every == 0 or step == trainer.total:
                evaluate(step)
        if step < trainer.total:
            _interrupted(result, stop.signal, step, True)
    except KeyboardInterrupt:
        _interrupted(result, stop.signal or "KeyboardInterrupt", step, not in_step)
    return not in_step


def _interrupted(result, by, step, consistent):
    result.status, result.stopped_by = "interrupted", by
    result.message = (f"stopped by {by} after {step} steps; every step is recorded and a checkpoint written, "
                      f"so the run can be resumed from step {step}" if consistent else
                      f"stopped by {by} in the middle of step {step}; every step before it is recorded; a resume "
                      f"continues from the last periodic checkpoint")


def _summary(result):
    last = result.evals[-1] if result.evals else {}
    extra = {k: v for k, v in (("stopped_by", result.stopped_by), ("resumed_from", result.resumed_from))
             if v is not None}
    return {"status": result.status, "message": result.message, "steps": result.steps, "wall_s": result.wall_s,
            "first_step_s": result.first_step_s, "final_eval": last,
            "best_val_loss": min((e["val_loss"] for e in result.evals), default=None),
            "final_train_loss": result.losses[-1] if result.losses else None, **extra}


# ---------------------------------------------------------------------- resuming a run
def resume_config(run, config, overrides):
    """The TrainConfig of a recorded run, with the RESUME_CHANGES asked for; anything else asked
    that differs from the record is a ConfigError (values the run adjusted compare as asked)."""
    if not isinstance(run.config.get("config"), dict):
        raise DataError(f"{run.path}/config.json has no 'config' object; the file is damaged")
    base = TrainConfig.from_dict(asked_config(run.config)).to_dict()
    asked = {**(config.to_dict() if config is not None else {}), **overrides}
    TrainConfig.from_dict(asked)                          # unknown fields named
    differ = [k for k, v in asked.items() if k not in RESUME_CHANGES and v != base[k]]
    if differ:
        raise ConfigError(f"--resume continues {run.path} as recorded; "
                          + ", ".join(f"{k} is {base[k]!r} there, {asked[k]!r} asked" for k in differ)
                          + f"; accepted changes: {', '.join(RESUME_CHANGES)}")
    changes = {k: asked[k] for k in RESUME_CHANGES if k in asked and asked[k] is not None}
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None                       # epochs asked: the run's length follows them
    return TrainConfig(**{**base, **changes})


def resume_trainer(out, config, data, t_start, overrides):
    """(a Trainer at the run's last good checkpoint, what was resumed) for ``train(resume=True)``;
    the run directory is cut back to that checkpoint (later rows and checkpoints removed)."""
    if not out:
        raise ConfigError("resume needs the run directory to continue: train(out=RUN_DIR, resume=True)")
    run = load_run(out)
    if run.summary.get("status") == "diverged":
        raise ConfigError(f"{out} diverged ({run.summary.get('message', '')}); resuming would repeat it; "
                          f"accepted: a run that was interrupted, killed or finished")
    trainer = Trainer(resume_config(run, config, overrides), data=data, t_start=t_start)
    recorded_total = int(run.config.get("steps_total", trainer.total))
    if trainer.total != recorded_total and trainer.schedule.depends_on_total:
        raise ConfigError(f"--lr-schedule {trainer.cfg.lr_schedule} depends on the run's length: {trainer.total} "
                          f"steps instead of the recorded {recorded_total} would change the lr of every step, so "
                          f"the resumed run could not continue the recorded one; accepted: the same length, or a "
                          f"schedule that does not depend on it (constant, step, exp, a piecewise list)")
    _match_trace(trainer, run)
    rows = len(run.steps.get("step", []))
    step, used, skipped = trainer.resume_latest(_resume_points(out, rows))
    if step >= trainer.total:
        raise ConfigError(f"{out} has taken all its {trainer.total} steps; accepted: more --steps or --epochs "
                          f"to continue it")
    truncate_run(out, step)
    steps = read_table(os.path.join(out, STEPS)) if os.path.isfile(os.path.join(out, STEPS)) else {}
    evals = load_run(out).evals
    return trainer, {"step": step, "checkpoint": used, "skipped": skipped, "previous": run.config.get("resumed", []),
                     "losses": [float(v) for v in steps.get("loss", [])],
                     "evals": [{k: float(evals[k][i]) for k in evals} for i in range(len(evals.get("step", [])))]}


def _match_trace(trainer, run):
    """The resumed run writes the columns steps.csv has: the recorded trace level, and no change of columns."""
    level = run.config.get("trace_level", trainer.level)
    if level != trainer.level:               # "auto" over a new length: keep what the run recorded
        trainer.level, trainer.meter = level, tr.StepMeter(trainer.net, level)
    path = os.path.join(run.path, STEPS)
    if os.path.isfile(path):
        have, want = table_lines(path)[0], trainer.columns()
        if have and have != list(want):
            raise DataError(f"{path}: cannot continue it: its columns are not the ones this version writes "
                            f"({len(have)} there, {len(want)} now); accepted: a run recorded by this version")


def _resume_points(out, rows):
    """[(step, path)] a run can resume from, by step: its periodic checkpoints (the stop writes one) and
    the final checkpoint when it holds the position in the data order, none past its ``rows`` steps."""
    points = [(k, p) for k, p in list_checkpoints(out) if k <= rows]
    final = os.path.join(out, FINAL_CHECKPOINT)
    try:
        ex = checkpoint_extra(final) if os.path.isfile(final) else {}
        k = checkpoint_step(final) if "pos" in ex else None
    except DataError:                    # resume_latest names it, and goes on to the periodic ones
        ex, k = {}, rows
    if k is not None and k <= rows and k not in {s for s, _ in points}:
        points.append((k, final))
    return sorted(points)
