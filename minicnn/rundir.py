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
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, DataError

CONFIG, STEPS, EVALS, SUMMARY = "config.json", "steps.csv", "evals.csv", "summary.json"
FINAL_CHECKPOINT = "checkpoint.npz"
CHECKPOINT_DIR = "checkpoints"
EVAL_COLUMNS = ("step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")
# what a run directory holds besides checkpoints/ (--overwrite removes these, and nothing else)
RUN_FILES = (CONFIG, STEPS, EVALS, SUMMARY, FINAL_CHECKPOINT, "loss.png", "inspect.png", "error.txt")


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


def read_checkpoint(path):
    """{name: array} of every array in a checkpoint, read in full; a DataError naming the file when
    it is missing, truncated or not a checkpoint (so a caller can fall back to an earlier one)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if "step" not in arrays or not any(k.startswith("param/") for k in arrays):
        raise DataError(f"checkpoint {path} is corrupt or truncated (no step or weights in it)")
    return arrays


def load_checkpoint(path, net, opt=None):
    """Load weights (and momentum buffers into opt) from a checkpoint; returns its step."""
    z = read_checkpoint(path)
    net.load_state_dict({k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")})
    bufs = sorted((int(k.split("/")[1]), v) for k, v in z.items() if k.startswith("momentum/"))
    if opt is not None:
        opt.load_state_dict({"buffers": [b for _, b in bufs] if bufs else None})
    return int(z["step"])


def checkpoint_step(path):
    """The step a checkpoint was written at (steps taken before it)."""
    return int(read_checkpoint(path)["step"])


def checkpoint_extra(path):
    """{name: array} of the extra arrays a checkpoint holds (see save_checkpoint)."""
    return {k[len("extra/"):]: v for k, v in read_checkpoint(path).items() if k.startswith("extra/")}


# --------------------------------------------------------------------------- writing a run
class CsvLog:
    """Append-only CSV with a header, flushed after every row; rows are dicts (missing cells empty)."""

    def __init__(self, path, cols, append=False):
        self.cols = list(cols)
        if append:
            have = table_lines(path)[0]
            if have != self.cols:
                raise DataError(f"{path}: cannot append: its columns ({', '.join(have)}) are not the ones this run "
                                f"writes ({', '.join(self.cols)})")
        self.f = open(path, "a" if append else "w", newline="")
        self.w = csv.writer(self.f)
        if not append:
            self.w.writerow(self.cols)
        self.f.flush()

    def write(self, record):
        """One row: the record's value of every column (missing: empty; other keys ignored)."""
        get = record.get
        self.w.writerow([format_value(get(c, "")) for c in self.cols])
        self.f.flush()

    def close(self):
        if not self.f.closed:
            self.f.close()


class RunWriter:
    """Writes one run directory as the run goes: ``config`` first, then ``step`` / ``eval`` rows
    as they happen, ``checkpoint`` when due, and ``finish`` (final checkpoint and summary)."""

    def __init__(self, out, config, step_columns, checkpoints=True, append=False):
        """append: continue the steps.csv and evals.csv already there (a resumed run)."""
        self.out = out
        make_writable_dir(out)
        try:
            write_json(os.path.join(out, CONFIG), config)
            self.steps = CsvLog(os.path.join(out, STEPS), step_columns, append)
            self.evals = CsvLog(os.path.join(out, EVALS), EVAL_COLUMNS, append)
            if checkpoints:
                os.makedirs(os.path.join(out, CHECKPOINT_DIR), exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {out}: {os_reason(e)}") from None

    def step(self, record):
        self.steps.write(record)

    def eval(self, record):
        self.evals.write(record)

    def checkpoint_path(self, step):
        os.makedirs(os.path.join(self.out, CHECKPOINT_DIR), exist_ok=True)
        return checkpoint_path(self.out, step)

    def close(self):
        self.steps.close()
        self.evals.close()

    def finish(self, summary, save_final):
        """``save_final(path)`` writes the final checkpoint (None: there is none to write); then summary.json."""
        self.close()
        if save_final is not None:
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
    warnings: list = field(default_factory=list)   # what did not add up (a cut last row, ...), one line each

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def label_entropy(self):
        """The loss of a constant prediction of the label distribution (ln classes when unknown)."""
        import math
        return float(self.config.get("label_entropy") or math.log(max(2, self.config.get("num_classes", 10))))


def table_lines(path):
    """(header cells, [(line number, raw line, cells)], cut) of a CSV written by CsvLog. ``cut``: the
    file does not end with a line end, so its last row was cut mid-way (a killed run) and is left
    out. Binary data, a row with the wrong number of cells, or a cell that is not a number is a
    DataError naming the file and the line."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    tail = lines.pop()                    # the text after the last line end: b"" in a whole file
    head, rows = None, []
    for i, line in enumerate(lines + [tail], 1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise DataError(f"{path}, line {i}: binary data, not text; a {os.path.basename(path)} written by "
                            f"minicnn train holds numbers separated by commas") from None
        if i > len(lines) or not text.strip():
            continue
        cells = next(csv.reader([text]))
        if head is None:
            head = cells
            continue
        if len(cells) != len(head):
            raise DataError(f"{path}, line {i}: {len(cells)} cells, the header has {len(head)}; the file is damaged")
        for name, v in zip(head, cells):
            try:
                float(v) if v != "" else None
            except ValueError:
                raise DataError(f"{path}, line {i}: column {name} holds {v[:40]!r}, not a number; the file is "
                                f"damaged") from None
        rows.append((i, line, cells))
    return head or [], rows, tail != b""


def read_table(path, warnings=None):
    """A CSV written by CsvLog as a dict of column name -> float64 array (empty cells NaN). A last
    row cut mid-way is left out, and said so in ``warnings`` (a list) if given."""
    head, rows, cut = table_lines(path)
    if cut and warnings is not None:
        warnings.append(f"{path}: its last line was cut mid-row (the run was killed while writing it); "
                        f"loaded the {len(rows)} whole rows")
    return {name: np.array([float(r[2][j]) if r[2][j] != "" else np.nan for r in rows])
            for j, name in enumerate(head)}


def read_json(path):
    """A JSON object from a run directory's file; a DataError naming the file and line otherwise."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: binary data, not JSON text; the file is damaged") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"the file is damaged") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a JSON {type(obj).__name__}, not the object minicnn writes; "
                        f"the file is damaged")
    return obj


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
    """Load config, per-step trace, evaluations and summary of a run directory. What does not add
    up (a cut last row, a summary that counts more steps than the trace holds) is in ``warnings``."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise DataError(f"not a run directory: {path} (no config.json); give a folder written by 'minicnn train --out'")
    config = read_json(cfg_path)
    summary = read_json(os.path.join(path, SUMMARY)) if os.path.isfile(os.path.join(path, SUMMARY)) else {}
    warnings = [] if isinstance(config.get("config"), dict) else [
        f"{cfg_path}: holds no run configuration (no 'config' object); the file is damaged"]
    steps = read_table(os.path.join(path, STEPS), warnings) if os.path.isfile(os.path.join(path, STEPS)) else {}
    evals = read_table(os.path.join(path, EVALS), warnings) if os.path.isfile(os.path.join(path, EVALS)) else {}
    step = steps.get("step", np.zeros(0))
    bad = np.flatnonzero(np.diff(step) <= 0) if len(step) > 1 else []
    if len(bad):
        raise DataError(f"{os.path.join(path, STEPS)}: step {step[bad[0] + 1]:g} follows step {step[bad[0]]:g}; "
                        f"rows must be in step order; the file is damaged")
    n = len(step)
    if not n:
        warnings.append(f"{path}: no steps recorded" + ("" if os.path.isfile(os.path.join(path, STEPS))
                                                         else " (no steps.csv)"))
    elif isinstance(summary.get("steps"), int) and summary["steps"] != n:
        warnings.append(f"{path}: summary.json says {summary['steps']} steps but steps.csv holds {n}")
    return Run(path, config, steps, evals, summary, warnings)


def asked_config(config_json):
    """The TrainConfig fields a run was asked for: config.json's "config", with every value setup
    adjusted (minicnn.config.setup: a batch larger than the data, ...) back to the one asked."""
    cfg = dict(config_json.get("config") or {})
    cfg.update({k: a["asked"] for k, a in (config_json.get("adjusted") or {}).items() if k in cfg})
    return cfg


# --------------------------------------------------------------------------- the directory itself
def os_reason(e):
    """Why an OSError happened, in words: 'permission denied', 'a file is in the way', ..."""
    if isinstance(e, NotADirectoryError):
        return "part of the path is a file, not a folder"
    if isinstance(e, FileExistsError):
        return "something that is not a folder is already there"
    if isinstance(e, PermissionError):
        return "permission denied"
    return (e.strerror or type(e).__name__).lower()


def make_writable_dir(path, what="the run directory"):
    """Create ``path`` (and its parents) and check a file can be written in it; a one-line
    ConfigError naming the folder and why otherwise (a read-only folder, /proc, below a file)."""
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(path)
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".minicnn-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {os_reason(e)}; accepted: a folder you can create "
                          f"and write") from None
    return path


def is_run_dir(path):
    """True when ``path`` holds (part of) a run: a config.json, steps.csv, summary.json or checkpoints."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in (CONFIG, STEPS, SUMMARY, CHECKPOINT_DIR))


def clear_run_dir(path):
    """Remove a run's files (RUN_FILES and checkpoints/step_*.npz), nothing else."""
    for f in RUN_FILES:
        p = os.path.join(path, f)
        if os.path.isfile(p):
            os.remove(p)
    for _, p in list_checkpoints(path):
        os.remove(p)
    d = os.path.join(path, CHECKPOINT_DIR)
    if os.path.isdir(d) and not os.listdir(d):
        shutil.rmtree(d)


def truncate_run(path, step):
    """Cut a run back to its state at ``step`` (steps taken) for a resume: steps.csv keeps the rows
    of steps < step, evals.csv those at steps <= step (byte for byte, header included), later
    checkpoints, the final checkpoint and the summary go."""
    for name, keep in ((STEPS, lambda t: t < step), (EVALS, lambda t: t <= step)):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            continue
        head, rows, _ = table_lines(p)
        with open(p, "rb") as f:
            first = f.readline()
        kept = [line + b"\n" for _, line, cells in rows if keep(float(cells[head.index("step")]))]
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(first + b"".join(kept))
        os.replace(tmp, p)
    for k, p in list_checkpoints(path):
        if k > step:
            os.remove(p)
    for f in (SUMMARY, FINAL_CHECKPOINT):
        if os.path.isfile(os.path.join(path, f)):
            os.remove(os.path.join(path, f))
