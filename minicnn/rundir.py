"""A run directory: how it is written (``RunWriter``) and read back (``load_run``), in one place.

    config.json      the full TrainConfig (enough to reproduce the run bit for bit) + environment
    steps.csv        one row per SGD step (columns: minicnn.trace.columns), flushed as written
    evals.csv        step, epoch, train_loss, train_acc, val_loss, val_acc at each evaluation
    checkpoint.npz   final weights (PyTorch names) and optimizer state
    checkpoints/     step_XXXXXXX.npz before step 0 and every ``checkpoint_every`` steps: weights,
                     momentum, position in the data order (epoch, batch), previous gradient, so
                     that any step can be rebuilt by replay (minicnn.Stepper.from_run)
    summary.json     status (finished / diverged / interrupted), timings, final metrics
    loss.png         training and validation loss against steps (minicnn.plots.plot_losses)

Both CSV files load in one call: ``pandas.read_csv(path)`` or ``numpy.genfromtxt(path,
delimiter=",", names=True)``. Rows are flushed as they are written, so a crash, NaN or Ctrl-C
leaves every finished step on disk.
"""
import csv
import json
import os
import platform
import re
from dataclasses import dataclass

import numpy as np

from .errors import DataError

CONFIG, STEPS, EVALS, SUMMARY = "config.json", "steps.csv", "evals.csv", "summary.json"
FINAL_CHECKPOINT = "checkpoint.npz"
CHECKPOINT_DIR = "checkpoints"
EVAL_COLUMNS = ("step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")


# --------------------------------------------------------------------------- small writers
def write_json(path, obj):
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file)."""
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


def format_value(v):
    """A CSV cell: floats as repr (round-trips exactly; nan and inf as such), everything else as is."""
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


def environment():
    """What a bit-for-bit replay depends on besides the config: versions and thread count."""
    env = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine()}
    try:
        import numba
        env.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    return env


def label_entropy(y, k):
    """Entropy (nats) of the label distribution: the loss of the best constant prediction."""
    p = np.bincount(y, minlength=k) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(path, net, opt, step, **extra):
    """Weights (PyTorch names), momentum buffers, the step, and any ``extra`` arrays (position in
    the data order, previous gradient, ...: see Trainer.save)."""
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


def checkpoint_extra(path):
    """{name: array} of the extra arrays a checkpoint holds (see save_checkpoint)."""
    with np.load(path) as z:
        return {k[len("extra/"):]: z[k] for k in z.files if k.startswith("extra/")}


# --------------------------------------------------------------------------- writing a run
class CsvLog:
    """Append-only CSV with a header, flushed after every row; rows are dicts (missing cells empty)."""

    def __init__(self, path, cols):
        self.cols = list(cols)
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.cols, restval="", extrasaction="ignore")
        self.w.writeheader()
        self.f.flush()

    def write(self, record):
        self.w.writerow({k: format_value(v) for k, v in record.items()})
        self.f.flush()

    def close(self):
        if not self.f.closed:
            self.f.close()


class RunWriter:
    """Writes one run directory as the run goes: ``config`` first, then ``step`` / ``eval`` rows
    as they happen, ``checkpoint`` when due, and ``finish`` (final checkpoint and summary)."""

    def __init__(self, out, config, step_columns, checkpoints=True):
        self.out = out
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, CONFIG), config)
        self.steps = CsvLog(os.path.join(out, STEPS), step_columns)
        self.evals = CsvLog(os.path.join(out, EVALS), EVAL_COLUMNS)
        if checkpoints:
            os.makedirs(os.path.join(out, CHECKPOINT_DIR), exist_ok=True)

    def step(self, record):
        self.steps.write(record)

    def eval(self, record):
        self.evals.write(record)

    def checkpoint_path(self, step):
        return checkpoint_path(self.out, step)

    def close(self):
        self.steps.close()
        self.evals.close()

    def finish(self, summary, save_final):
        """``save_final(path)`` writes the final checkpoint; then summary.json."""
        self.close()
        save_final(os.path.join(self.out, FINAL_CHECKPOINT))
        write_json(os.path.join(self.out, SUMMARY), summary)


# --------------------------------------------------------------------------- reading a run
@dataclass
class Run:
    path: str
    config: dict          # config.json: {"config": TrainConfig fields, "spec": ..., ...}
    steps: dict           # steps.csv as column -> numpy array
    evals: dict           # evals.csv as column -> numpy array
    summary: dict         # summary.json ({} while a run is still going or was killed hard)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def label_entropy(self):
        """The loss of a constant prediction of the label distribution (ln classes when unknown)."""
        import math
        return float(self.config.get("label_entropy") or math.log(max(2, self.config.get("num_classes", 10))))


def read_table(path):
    """A CSV written by CsvLog as a dict of column name -> float64 array (empty cells NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    head, body = rows[0], rows[1:]
    out = {}
    for j, name in enumerate(head):
        vals = [r[j] if j < len(r) else "" for r in body]
        out[name] = np.array([float(v) if v != "" else np.nan for v in vals])
    return out


def mismatch_reason(run, data_description):
    """Why a replay of ``run`` may differ from its record: what differs between then and now."""
    diffs = []
    then, now = run.config.get("environment", {}), environment()
    for k in sorted(set(then) | set(now)):
        if then.get(k) != now.get(k):
            diffs.append(f"{k} {then.get(k)} when recorded, {now.get(k)} now")
    if run.config.get("dataset") not in (None, data_description):
        diffs.append(f"data '{run.config.get('dataset')}' when recorded, '{data_description}' now")
    if diffs:
        return "; ".join(diffs)
    return ("same versions, thread count and data description: the training data may differ in content "
            "(data passed to train() directly is recorded only by its description), or the code changed "
            "since the run was recorded")


def not_replayable(run, step=None):
    """Why minicnn cannot replay ``run``, in one line, with what can be done instead -- or None for a
    run minicnn trained. A run recorded elsewhere (config.json "source", e.g. a PyTorch loop recorded
    by minicnn.torch.Recorder) has no data order minicnn could repeat; its checkpoints (step_*.pt,
    the weights before that step) start ``minicnn debug`` on the user's own data when its model
    converts (config.json "spec")."""
    source = run.config.get("source")
    if not source:
        return None
    why = (f"{run.path} was recorded by {source}, not trained by minicnn: its steps cannot be replayed "
           f"(the data and the loop that made them are not in the run)")
    spec = run.config.get("spec")
    if not spec:
        reason = run.config.get("unavailable", {}).get("minicnn network", "its model does not convert to minicnn")
        return f"{why}; {reason}; minicnn inspect reads the run"
    ckpts = [(k, p[:-len(".npz")] + ".pt") for k, p in list_checkpoints(run.path) if step is None or k <= step]
    if not ckpts:
        return f"{why}; it has no checkpoints to start from; minicnn inspect reads the run"
    k, pt = ckpts[-1]
    lr = run.config.get("config", {}).get("lr")
    return (f"{why}; to step through its network from the weights before step {k}: minicnn debug --arch {spec} "
            f"--init-from {pt}" + (f" --lr {lr:g}" if lr is not None else "") + " --data YOUR_DATA.npz")


def load_run(path):
    """Load config, per-step trace, evaluations and summary of a run directory."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise DataError(f"not a run directory: {path} (no config.json); give a folder written by 'minicnn train --out'")
    with open(cfg_path) as f:
        config = json.load(f)
    summary = {}
    if os.path.isfile(os.path.join(path, SUMMARY)):
        with open(os.path.join(path, SUMMARY)) as f:
            summary = json.load(f)
    steps = read_table(os.path.join(path, STEPS)) if os.path.isfile(os.path.join(path, STEPS)) else {}
    evals = read_table(os.path.join(path, EVALS)) if os.path.isfile(os.path.join(path, EVALS)) else {}
    return Run(path, config, steps, evals, summary)
