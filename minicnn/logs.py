"""Plain training logs as runs the diagnosis reads: ``minicnn inspect LOG.csv``.

    run = load_log(["metrics.csv"])                                  # one table: step, loss, val_loss, lr ...
    run = load_log(["run-train-tag-loss.csv", "run-validation-tag-loss.csv"])   # TensorBoard scalar exports
    run = load_log(["loss.csv"], val="val.csv", classes=10)
    d = diagnose(run)                    # minicnn.diagnose: the verdict from what the log holds
    run.config["log"]["notes"]           # where each quantity came from, what was done to the rows
    evidence_gaps(run)                   # what the log cannot show, and what a full trace would add

A log is a table: a CSV file (comma, semicolon or tab separated, a header row) or JSON lines (one
object per line; nested objects flattened as "train/loss"). Column names are matched loosely
(case, spaces, "/", "-" and "." do not matter; see NAMES): a step column (step, iteration,
global_step, ...; without one an epoch column when there is one row per epoch, else the row
number), a loss column (loss, train_loss, ...; required) and optionally val_loss, val_acc, a
training accuracy and lr. Empty cells (and JSON nulls) are "not logged at this row" -- sparse
tables such as PyTorch Lightning's metrics.csv log training and validation on different rows --
while nan / inf are values: a loss that became NaN.

TensorBoard's scalar download (columns Wall time, Step, Value) holds one tag per file: the quantity
comes from the file name (run-<run>-tag-<tag>.csv: the tag names it, a run named like validation
makes it the validation one), or from ROLE=FILE (loss=a.csv val_loss=b.csv), or ``val=FILE``.

Rows: without a step they are dropped; the same step twice (a resumed run, several rows per step)
keeps the last row; rows out of step order are sorted -- each said in the notes.
"""
import csv
import io
import json
import math
import os
import re

import numpy as np

from .diagnose.thresholds import COLLAPSE_LOSS_TOL, COLLAPSE_MIN_STEPS
from .errors import DataError
from .rundir import EVAL_COLUMNS, Run

# The names each quantity goes by, normalised (lower case, runs of other characters as "_"), the
# preferred first: PyTorch scripts, Lightning's CSVLogger (train_loss_step / _epoch), Keras'
# CSVLogger (loss, accuracy, val_loss, val_accuracy), Hugging Face's Trainer (loss, eval_loss,
# learning_rate), TensorBoard tags (Loss/train -> loss_train, epoch_loss).
NAMES = {
    "step": ("step", "steps", "global_step", "globalstep", "iteration", "iterations", "iter", "it", "n_iter",
             "trainer_global_step", "train_step", "step_num", "batch", "update", "updates"),
    "epoch": ("epoch", "epochs"),
    "loss": ("loss", "train_loss", "training_loss", "loss_train", "train_loss_step", "trainloss", "batch_loss",
             "train_batch_loss", "loss_step", "epoch_loss", "train_loss_epoch", "train_epoch_loss"),
    "val_loss": ("val_loss", "valid_loss", "validation_loss", "eval_loss", "dev_loss", "test_loss", "loss_val",
                 "loss_valid", "loss_validation", "loss_eval", "loss_test", "val_loss_epoch", "valloss",
                 "epoch_val_loss"),
    "val_acc": ("val_acc", "val_accuracy", "valid_acc", "valid_accuracy", "validation_acc", "validation_accuracy",
                "eval_acc", "eval_accuracy", "test_acc", "test_accuracy", "acc_val", "accuracy_val",
                "accuracy_validation", "acc_test", "accuracy_test", "val_acc_epoch", "epoch_val_accuracy"),
    "train_acc": ("train_acc", "train_accuracy", "training_accuracy", "acc_train", "accuracy_train", "acc",
                  "accuracy", "train_acc_step", "train_acc_epoch", "epoch_accuracy"),
    "lr": ("lr", "learning_rate", "learningrate", "lr_0", "lr_group_0"),
}
# Lightning's LearningRateMonitor writes lr-SGD, lr-Adam/pg1: names that start so are learning rates
LR_PREFIXES = ("lr_", "learning_rate_")
# a TensorBoard run (or a name part) with one of these words holds held-out data: its loss is val_loss
HELD_OUT = ("val", "valid", "validation", "eval", "test", "dev")
ROLES = ("loss", "val_loss", "val_acc", "train_acc", "lr")
TENSORBOARD = ["wall_time", "step", "value"]
ACCEPTED = ("accepted: a CSV or JSON-lines table with a step column (step, iteration, global_step, ...) and a "
            "loss column (loss, train_loss, ...), optionally val_loss, val_acc, lr; or TensorBoard scalar CSV "
            "exports (Wall time, Step, Value), one file per tag, named by their file name or as ROLE=FILE")
# A log whose steps are this many apart (median) is "logged every k steps": the diagnosis's windows
# count rows, so they span k times as many steps -- said in the notes.
SPARSE_EVERY = 2


def normalise(name):
    """A column name as NAMES lists it: lower case, runs of other characters as '_'."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


# --------------------------------------------------------------------------- reading one file
def read_text(path):
    """The file's text, or a one-line DataError for what is not a text table."""
    if not os.path.isfile(path):
        raise DataError(f"no file {path}; {ACCEPTED}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path} is empty; {ACCEPTED}")
    if "tfevents" in os.path.basename(path):
        raise DataError(f"{path} is a TensorBoard event file; export its scalars as CSV (TensorBoard's scalar "
                        f"download) and give those; {ACCEPTED}")
    try:
        if b"\x00" in raw[:4096]:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text table (binary content); {ACCEPTED}") from None


def parse_cell(v):
    """A number, or None for an empty / non-numeric cell ('nan' and 'inf' are numbers)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def read_rows(path):
    """(column names, rows as lists of numbers or None) of a CSV or JSON-lines file."""
    text = read_text(path)
    start = text.lstrip()[:1]
    if start in "{[":
        return _json_rows(path, text)
    sample = text[:65536]
    try:
        dialect = csv.Sniffer().sniff(sample.splitlines()[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = [r for r in csv.reader(io.StringIO(text), dialect) if r and not r[0].startswith("#")]
    head = [h.strip() for h in rows[0]]
    if all(parse_cell(h) is not None for h in head):
        raise DataError(f"{path} has no header row (its first row is numbers); {ACCEPTED}")
    if len(rows) < 2:
        raise DataError(f"{path} has a header ({', '.join(head)}) but no rows; {ACCEPTED}")
    return head, [[parse_cell(r[j]) if j < len(r) else None for j in range(len(head))] for r in rows[1:]]


def _json_rows(path, text):
    """JSON lines (or one JSON array) of objects -> (keys in order of appearance, rows)."""
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON lines (line {e.lineno}: {e.msg}); {ACCEPTED}") from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path} holds JSON values that are not objects; {ACCEPTED}")
    flat = [_flatten(r) for r in records]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    return keys, [[parse_cell(r.get(k)) for k in keys] for r in flat]


def _flatten(obj, prefix=""):
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- columns and roles
def find_column(names, role):
    """The column of ``names`` that holds ``role`` (see NAMES), or None."""
    norm = [normalise(n) for n in names]
    for want in NAMES[role]:
        if want in norm:
            return names[norm.index(want)]
    if role == "lr":
        hits = [n for n, m in zip(names, norm) if m.startswith(LR_PREFIXES)]
        return hits[0] if hits else None
    if role == "loss":             # the one loss-like column that is not a held-out one
        hits = [n for n, m in zip(names, norm) if "loss" in m and not set(m.split("_")) & set(HELD_OUT)]
        return hits[0] if len(hits) == 1 else None
    return None


def tag_role(path):
    """The quantity a TensorBoard export holds, from its file name run-<run>-tag-<tag>.csv, or None."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.match(r"run[-_](.*?)[-_]tag[-_](.*)$", stem)
    run, tag = (m.group(1), m.group(2)) if m else ("", stem)
    role = next((r for r in ("val_loss", "val_acc", "lr", "loss", "train_acc") if find_column([tag], r)), None)
    held_out = bool(set(normalise(run).split("_")) & set(HELD_OUT))
    if held_out and role in ("loss", "train_acc"):
        role = {"loss": "val_loss", "train_acc": "val_acc"}[role]
    return role


def step_axis(path, names, rows):
    """(the step of every row (NaN where missing), where they came from)."""
    col = find_column(names, "step")
    if col is not None:
        return np.array([np.nan if r[names.index(col)] is None else r[names.index(col)] for r in rows]), f"'{col}'"
    ep = find_column(names, "epoch")
    if ep is not None:
        e = [r[names.index(ep)] for r in rows]
        loss = find_column(names, "loss")
        logged = [v for v, r in zip(e, rows) if loss is None or r[names.index(loss)] is not None]
        if logged and None not in logged and len(set(logged)) == len(logged):
            return np.array([np.nan if v is None else v for v in e]), f"'{ep}' (one row per epoch: a step is an epoch)"
    return np.arange(len(rows), dtype=np.float64), "the row order (no step column)"


def file_series(path, role=None):
    """{role: (steps, values, source)} of one file, and a note on its steps. ``role`` names what a
    single-quantity file (a TensorBoard export, or ROLE=FILE) holds."""
    names, rows = read_rows(path)
    base = os.path.basename(path)
    if [normalise(n) for n in names] == TENSORBOARD:
        role = role or tag_role(path)
        if role is None:
            raise DataError(f"{path}: a TensorBoard export whose file name does not say what it holds; give it as "
                            f"loss={path} or val_loss={path} (roles: {', '.join(ROLES)})")
        cols = {role: names[2]}
    elif role is not None:
        col = find_column(names, role) or find_column(names, "loss")
        if col is None:
            raise DataError(f"{path} has no {role} or loss column (columns: {', '.join(names)}); {ACCEPTED}")
        cols = {role: col}
    else:
        cols = {r: find_column(names, r) for r in ROLES}
        cols = {r: c for r, c in cols.items() if c is not None}
    steps, where = step_axis(path, names, rows)
    out = {}
    for r, c in cols.items():
        j = names.index(c)
        keep = np.array([row[j] is not None for row in rows], dtype=bool)
        vals = np.array([np.nan if row[j] is None else row[j] for row in rows], dtype=np.float64)
        out[r] = (steps[keep], vals[keep], f"{base}: '{c}'")
    return out, f"steps of {base} from {where}", names


# --------------------------------------------------------------------------- rows to a run
def tidy(steps, values, what):
    """One series' rows cleaned: rows without a step dropped, the last row of a repeated step kept,
    sorted by step. Returns (steps, values, [notes on what was done])."""
    notes = []
    ok = np.isfinite(steps)
    if not ok.all():
        notes.append(f"{what}: {int((~ok).sum())} rows without a step dropped")
    s, v = steps[ok], values[ok]
    _, last_rev = np.unique(s[::-1], return_index=True)
    keep = np.sort(len(s) - 1 - last_rev)                 # the last row of every step, in file order
    if len(keep) < len(s):
        notes.append(f"{what}: {len(s) - len(keep)} rows repeat an earlier step (a resumed run, or several rows "
                     f"per step): kept the last row of each step")
    s, v = s[keep], v[keep]
    if np.any(np.diff(s) < 0):
        notes.append(f"{what}: rows not in step order: sorted by step")
    order = np.argsort(s, kind="stable")
    return s[order], v[order], notes


def role_and_path(arg):
    """'val_loss=FILE' -> ('val_loss', FILE); a plain path -> (None, path)."""
    role, sep, rest = str(arg).partition("=")
    if sep and role in ROLES and not os.path.exists(arg):
        return role, rest
    return None, str(arg)


def load_log(paths, val=None, classes=None):
    """A Run (minicnn.rundir.Run) from plain log files, for minicnn.diagnose.

    paths: one or more files, each optionally as ROLE=FILE (roles: loss, val_loss, val_acc,
    train_acc, lr); val: a file holding the validation loss (the same as val_loss=FILE); classes:
    the number of classes, when known (the loss of a constant prediction is then ln classes).
    ``steps`` holds step, loss and lr (the lr in force at each step); ``evals`` the validation rows
    (val_loss, val_acc, and train_loss / train_acc as the means since the previous one);
    ``config["log"]`` the files, the column each quantity came from and notes on the rows.
    Bad input raises a one-line DataError.
    """
    specs = [role_and_path(p) for p in paths] + ([("val_loss", str(val))] if val else [])
    if not specs:
        raise DataError(f"no log files given; {ACCEPTED}")
    series, notes, seen = {}, [], []
    for role, path in specs:
        got, note, names = file_series(path, role)
        notes.append(note)
        seen.append((path, names))
        for r, s in got.items():
            if r in series:
                raise DataError(f"both {series[r][2]} and {s[2]} hold {r}; give one, or name each file as ROLE=FILE")
            series[r] = s
    if "loss" not in series:
        where = "; ".join(f"{p} (columns: {', '.join(n)})" for p, n in seen)
        raise DataError(f"no training-loss column in {where}; {ACCEPTED}")
    if classes is not None and not (isinstance(classes, int) and classes >= 2):
        raise DataError(f"classes={classes!r}; accepted: the number of classes, an int >= 2")
    s, loss, n = tidy(*series["loss"][:2], "loss")
    notes += n
    steps = {"step": s, "loss": loss}
    if "lr" in series:
        ls, lv, n = tidy(*series["lr"][:2], "lr")
        notes += n
        at = np.searchsorted(ls, s, side="right") - 1           # the lr in force at each loss step
        steps["lr"] = np.where(at >= 0, lv[np.maximum(at, 0)], np.nan)
    evals, n = eval_table(series, s, loss)
    notes += n + row_notes(s, loss)
    used = {src.split(": ", 1)[1].strip("'") for _, _, src in series.values()}
    ignored = sorted({c for _, names in seen for c in names} - used
                     - {c for _, names in seen for c in names if normalise(c) in ("wall_time", "value")
                        or normalise(c) in NAMES["step"] + NAMES["epoch"]})
    config = {"source": "a plain log", "config": {},
              "log": {"files": [p for _, p in specs], "columns": {r: v[2] for r, v in series.items()},
                      "notes": notes, "not_read": ignored},
              "label_entropy": math.log(classes) if classes else math.nan}
    if classes:
        config["num_classes"] = classes
    return Run(specs[0][1], config, steps, evals, {})


def eval_table(series, s, loss):
    """The evaluations: every step with a validation loss or accuracy, with the training loss (and
    accuracy, if logged) averaged over the steps since the previous evaluation."""
    vals, notes = {}, []
    for r in ("val_loss", "val_acc"):
        if r in series:
            vs, vv, n = tidy(*series[r][:2], r)
            vals[r], notes = (vs, vv), notes + n
    if not vals:
        return {}, notes
    at = np.unique(np.concatenate([vs for vs, _ in vals.values()]))
    out = {c: np.full(len(at), np.nan) for c in EVAL_COLUMNS}
    out["step"] = at
    for r, (vs, vv) in vals.items():
        out[r][np.searchsorted(at, vs)] = vv
    acc = tidy(*series["train_acc"][:2], "train_acc")[:2] if "train_acc" in series else None
    prev = -math.inf
    for i, e in enumerate(at):
        w = (s > prev) & (s <= e) & np.isfinite(loss)
        out["train_loss"][i] = loss[w].mean() if w.any() else np.nan
        if acc is not None:
            wa = (acc[0] > prev) & (acc[0] <= e) & np.isfinite(acc[1])
            out["train_acc"][i] = acc[1][wa].mean() if wa.any() else np.nan
        prev = e
    return out, notes


def row_notes(s, loss):
    """What the rows are like: non-finite losses, the logging interval."""
    notes = []
    bad = ~np.isfinite(loss)
    if bad.any():
        notes.append(f"{int(bad.sum())} rows with a non-finite loss (nan/inf), the first at step {s[bad][0]:g}")
    gap = float(np.median(np.diff(s))) if len(s) > 1 else 1.0
    if gap >= SPARSE_EVERY:
        notes.append(f"logged every {gap:g} steps: the diagnosis counts rows, so its windows (a 20-row moving "
                     f"average, the 50 rows before a spike) span {gap:g}x as many steps")
    return notes


# --------------------------------------------------------------------------- what is missing
def evidence_gaps(run):
    """Lines: what the run's record cannot show (for any Run: a plain log, a light trace, a
    recorded PyTorch loop), and what a full trace would add. Empty when nothing the diagnosis
    reads is missing."""
    cols, ev = set(run.steps), run.evals
    trace = []
    if not any(c.startswith("update_ratio.") for c in cols):
        trace.append("no per-layer gradient, weight and update sizes: the decisive step is read from the loss "
                     "alone, and a learning rate too high or too low cannot be told from the size of the steps")
    if "loss_after" not in cols:
        trace.append("no loss after each step on its own batch: an overshooting step shows only when the next "
                     "batches' losses spike")
    probed = any(c.startswith("probe_") for c in cols)
    if not probed:
        trace.append("no dead units or predictions on held-out images: a collapse onto a plateau (dead ReLUs, a "
                     "constant prediction) cannot be told apart from instability or slow learning")
    lines = list(trace)
    if "lr" not in cols:
        lines.append("no learning rate: a jump in the schedule cannot be named as the cause")
    if not len(ev.get("val_loss", [])) or not np.isfinite(ev["val_loss"]).any():
        lines.append("no validation loss: overfitting cannot be told")
    h = run.label_entropy
    if not math.isfinite(h):
        lines.append("the number of classes is unknown (--classes K): a loss at ln K, a constant prediction's, "
                     "is not recognised")
    elif not probed and len(run.steps.get("loss", [])):
        tail = run.steps["loss"][-COLLAPSE_MIN_STEPS:]
        tail = tail[np.isfinite(tail)]
        if len(tail) and abs(float(np.median(tail)) - h) < COLLAPSE_LOSS_TOL:
            lines.append(f"the loss ended at {np.median(tail):.3g}, near ln {math.exp(h):.0f} = {h:.3g}, a constant "
                         f"prediction's loss: possibly a collapse, which only held-out predictions can confirm")
    if trace:
        lines.append("a full trace adds the missing per-step evidence: record the loop with minicnn.torch.Recorder("
                     "model, optimizer, out=DIR, level='full', probe=(x_val[:256], y_val[:256])), then minicnn "
                     "inspect DIR")
    return lines
