"""Sweeps: a grid of training runs, run in parallel (local processes or a Dask cluster), resumable.

    grid = {"arch": ["small", "wide"], "lr": [0.01, 0.1], "seed": [0, 1]}
    tasks = expand_grid(TrainConfig(epochs=1), grid, out="sweeps/a")
    result = run_sweep(tasks, out="sweeps/a", workers=2, on_result=print)
    result.rows          # one dict per run (the lines of sweeps/a/summary.csv)

A sweep directory holds one ordinary run directory per run (named from the swept values, e.g.
``arch=small_lr=0.1_seed=0``), ``sweep.json`` (the base config and the grid), ``summary.csv`` (one
row per finished run; rewritten as runs finish, so ``pandas.read_csv`` reads it at any time) and
``grid.png`` (``minicnn.plots.plot_grid``).

Resuming: a run whose directory already holds a ``summary.json`` with status finished or diverged
and the same config is not run again (its row is rebuilt from the directory); an interrupted (or
killed) one continues from its last checkpoint (``train(resume=True)``, bit for bit). A run that
raises is a row with status ``error`` and the message (the traceback is in ``error.txt`` in its
directory); it never stops the sweep, and it is retried on the next invocation.

Stopping: SIGINT or SIGTERM to the sweep process (or Ctrl-C to its process group) stops it: every
running run stops after its current step and writes its files and a checkpoint, runs not started
are not started, and summary.csv gets one row per run (``interrupted`` where a run did not finish);
``SweepResult.status`` is then "interrupted". A second signal makes the workers exit at once.
Workers ignore SIGINT themselves (the sweep process decides) and stop the same way when the sweep
process is killed.

Parallelism: ``workers`` processes (default: one per core) started with the "spawn" method (Numba's
threading layer and fork do not mix), each running its runs with ``cores // workers`` Numba threads
so the machine is not oversubscribed. Every ``@njit`` kernel is compiled with ``cache=True``, so a
worker loads the compiled kernels from the on-disk cache instead of compiling them again; a worker
runs many runs and keeps its kernels (and the last datasets it loaded) between them.
"""
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

from .config import TrainConfig
from .errors import ConfigError
from .ops import cores

# statuses of a run that count as done: re-running a finished or diverged run with the same config
# reproduces it bit for bit, so a resumed sweep skips it. "interrupted" and "error" are run again.
DONE_STATUSES = ("finished", "diverged")
# config fields that do not change a run's results (README: results do not depend on thread count)
NOT_COMPARED = ("threads",)
# the order in which swept options nest (outermost first); other options follow in TrainConfig order
GRID_ORDER = ("arch", "lr")
# a run-directory name longer than this is shortened and made unique by a hash of the full name
MAX_NAME = 120
SUMMARY_COLUMNS = ["name", "status", "steps", "final_train_loss", "final_train_acc", "final_val_loss",
                   "final_val_acc", "best_train_loss", "best_val_loss", "best_val_acc", "verdict",
                   "decisive_step", "diagnosis", "wall_s", "first_step_s", "error", "run_dir"]
# seconds to wait for a Dask scheduler before giving up with a clear message
SCHEDULER_TIMEOUT_S = 10
# a worker checks every this many seconds whether the sweep asked it to stop (or is gone), and the
# sweep process whether a run has finished or a signal came: how long a stop takes to start
WATCH_EVERY_S = 0.25
# a worker whose sweep process is gone (killed) finishes its current step and writes its run, then
# exits; after this many seconds it exits anyway (a step of the largest networks here takes ~1 s)
STOP_GRACE_S = 10


@dataclass
class Task:
    name: str                 # the run directory's name inside the sweep directory
    config: dict              # TrainConfig fields
    options: dict             # the swept options and their values for this run


@dataclass
class SweepResult:
    out: str
    rows: list                                   # one dict per run, in grid order (summary.csv)
    ran: int = 0                                 # runs executed by this invocation
    skipped: int = 0                             # runs already done on disk (resumed)
    wall_s: float = 0.0
    summary_path: str = None
    options: list = field(default_factory=list)  # the swept option names, in grid order
    status: str = "finished"                     # finished | interrupted (a signal stopped the sweep)
    stopped_by: str = None                       # SIGINT, SIGTERM or KeyboardInterrupt
    forced: bool = False                         # a second signal: the workers were made to exit at once

    @property
    def errors(self):
        """How many runs ended in an error."""
        return sum(r.get("status") == "error" for r in self.rows)


# ---------------------------------------------------------------- the grid
def grid_keys(grid):
    """Swept option names in nesting order: arch, lr, then TrainConfig order, seed last."""
    order = [k for k in GRID_ORDER if k in grid]
    order += [k for k in TrainConfig.__dataclass_fields__ if k in grid and k not in order and k != "seed"]
    if "seed" in grid:
        order.append("seed")
    return order


def expand_grid(base, grid):
    """Every combination of the grid's values over a base TrainConfig, as a list of Tasks.

    base: a TrainConfig (or a dict of its fields). grid: {field: [values]}; an option with one value
    is still recorded as swept if given here. Tasks come out with the first key outermost.
    """
    base = base.to_dict() if isinstance(base, TrainConfig) else dict(base)
    unknown = sorted(set(grid) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"cannot sweep over {', '.join(unknown)}: not a training option")
    keys = grid_keys(grid)
    for k in keys:
        if not grid[k]:
            raise ConfigError(f"the sweep over {k} has no values")
        if len(set(map(repr, grid[k]))) != len(grid[k]):
            raise ConfigError(f"the sweep over {k} repeats a value: {', '.join(map(str, grid[k]))}")
    varied = [k for k in keys if len(grid[k]) > 1]
    tasks = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        options = dict(zip(keys, combo))
        cfg = TrainConfig(**{**base, **options})
        cfg.validate()
        tasks.append(Task(run_name({k: options[k] for k in varied}), cfg.to_dict(), options))
    return tasks


def _value_text(v):
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def run_name(options):
    """A deterministic directory name from the swept values: ``arch=small_lr=0.1_seed=0``."""
    if not options:
        return "run"
    name = "_".join(f"{k}={_value_text(v)}" for k, v in options.items())
    name = re.sub(r"[^A-Za-z0-9.=+_-]", "-", name)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name[:MAX_NAME - 11] + "-" + digest
    return name


def sweep_id(base, grid):
    """A short hash of a sweep's base config and grid: the default directory of the same sweep."""
    base = base.to_dict() if isinstance(base, TrainConfig) else dict(base)
    text = json.dumps({"base": {k: v for k, v in base.items() if k not in NOT_COMPARED},
                       "grid": {k: grid[k] for k in sorted(grid)}}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


# ---------------------------------------------------------------- one run (in a worker)
@functools.lru_cache(maxsize=2)
def _cached_data(data, seed, data_dir, n_train, n_val, split, image_size):
    from .data import load_data
    return load_data(data, seed=seed, data_dir=data_dir, n_train=n_train, n_val=n_val, split=split,
                     image_size=image_size)


# per-process: how many runs this worker has started; whether it was asked to stop (SIGTERM)
_WORKER = {"runs": 0, "stopping": False}
# One run at a time per process: minicnn.ops.cpu selects Numba's workqueue threading layer, which
# must not be entered by two threads at once (a Dask worker with several threads would do that).
_RUN_LOCK = threading.Lock()


def run_one(name, config, run_dir, ship=False, procs_per_host=None, resume=True):
    """Train one run of a sweep into ``run_dir`` and return its summary row (never raises).

    ship: train into a temporary directory and return its files in the row (``row["files"]``,
    relative path -> bytes) for the caller to write -- for Dask workers that may not share a
    filesystem. procs_per_host: {host: worker processes on it}, to share a host's cores among them.
    resume: continue an interrupted run of the same config in ``run_dir`` (else it starts over).
    A worker asked to stop (SIGTERM) stops the run after its current step and starts no other.
    """
    with _RUN_LOCK:
        if _WORKER["stopping"]:
            return {"name": name, **stopped_row(run_dir, config), "worker_pid": os.getpid()}
        return _run_one(name, config, run_dir, ship, procs_per_host, resume)


def _run_one(name, config, run_dir, ship, procs_per_host, resume):
    t0 = time.perf_counter()
    _WORKER["runs"] += 1
    row = {"name": name, "worker_pid": os.getpid(), "worker_run": _WORKER["runs"]}
    target = run_dir
    tmp = None
    if ship:
        tmp = tempfile.mkdtemp(prefix="minicnn-sweep-")
        run_dir = os.path.join(tmp, name)
    try:
        cfg = TrainConfig.from_dict(config)
        if cfg.threads is None:
            cfg.threads = _dask_worker_threads(procs_per_host or {})
        cfg.validate()
        data = _cached_data(cfg.data, cfg.seed, cfg.data_dir, cfg.n_train, cfg.n_val, cfg.split, cfg.image_size)
        result = _train(cfg, run_dir, data, resume and not ship and can_resume(run_dir, config))
        row.update(run_row(run_dir))
        row.update(first_step_s=result.first_step_s, resumed_from=result.resumed_from)
    except Exception as e:  # a failed run is a row, never a crashed sweep
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        row.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0])
    row["task_s"] = time.perf_counter() - t0
    row["run_dir"] = target
    if ship:
        row["files"] = _read_files(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def _train(cfg, run_dir, data, resume):
    """One run of the sweep: resumed where it stopped, else from the start (replacing whatever is
    in run_dir); stopped after a step once this worker is asked to stop."""
    from .errors import MinicnnError
    from .trainer import train
    kw = dict(out=run_dir, data=data, signals=False, should_stop=lambda: _WORKER["stopping"])
    if resume:
        try:
            return train(cfg, resume=True, **kw)
        except MinicnnError:                   # nothing to resume from after all: start over
            pass
    return train(cfg, overwrite=True, **kw)


def stopped_row(run_dir, config):
    """The row of a run the sweep stopped: what its directory holds of a run of ``config`` (status
    interrupted), or 'stopped before it started'."""
    if can_resume(run_dir, config):
        try:
            return {**run_row(run_dir), "status": "interrupted", "run_dir": run_dir}
        except Exception:         # a damaged run directory: as if not started
            pass
    return {"status": "interrupted", "steps": 0, "error": "stopped before it started", "run_dir": run_dir}


def _dask_worker_threads(procs_per_host):
    """Numba threads for a run on a Dask worker: its machine's cores shared by the worker
    processes on that machine (each runs one run at a time, see _RUN_LOCK)."""
    try:
        from distributed import get_worker
        w = get_worker()
    except (ImportError, ValueError):
        return None
    return max(1, cores() // max(1, procs_per_host.get(_host(w.address), 1)))


def _host(address):
    """'tcp://10.0.0.5:40123' -> '10.0.0.5'."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _read_files(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def _write_files(d, files):
    root = os.path.realpath(d)
    for rel, blob in files.items():
        p = os.path.realpath(os.path.join(root, rel))
        if not p.startswith(root + os.sep):       # only inside the run directory
            continue
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(blob)


def run_row(run_dir):
    """The summary row of a run directory: status, final/best losses and accuracies, diagnosis."""
    import numpy as np

    from .diagnose import diagnose
    from .rundir import load_run
    run = load_run(run_dir)
    s, ev = run.summary, run.evals
    row = {"status": s.get("status", "incomplete"), "steps": s.get("steps"), "wall_s": s.get("wall_s"),
           "first_step_s": s.get("first_step_s"),
           "error": s.get("message", "") if s.get("status") == "diverged" else ""}

    def last(col):
        v = ev.get(col)
        return float(v[-1]) if v is not None and len(v) else math.nan

    def best(col, fn):
        v = ev.get(col)
        v = v[np.isfinite(v)] if v is not None else []
        return float(fn(v)) if len(v) else math.nan

    row.update(final_train_loss=last("train_loss"), final_train_acc=last("train_acc"),
               final_val_loss=last("val_loss"), final_val_acc=last("val_acc"),
               best_train_loss=best("train_loss", np.min), best_val_loss=best("val_loss", np.min),
               best_val_acc=best("val_acc", np.max))
    if s.get("status") == "diverged":      # the last evaluation predates the blow-up; the run ended at inf/NaN
        row["final_train_loss"] = s.get("final_train_loss", math.nan)
    d = diagnose(run)
    row.update(verdict=d.verdict, decisive_step=d.decisive_step, diagnosis=d.title)
    return row


# ---------------------------------------------------------------- the sweep
def recorded(run_dir, config):
    """(status in summary.json or None, whether run_dir's run was asked for exactly ``config``
    (threads aside)); (None, False) where there is no readable run."""
    from .rundir import asked_config
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = asked_config(json.load(f))
        status = None
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as f:
                status = json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None, False
    strip = lambda c: {k: v for k, v in c.items() if k not in NOT_COMPARED}  # noqa: E731
    return status, strip(saved) == strip(config)


def is_done(run_dir, config):
    """True when run_dir holds a finished (or diverged) run of exactly this config."""
    status, same = recorded(run_dir, config)
    return same and status in DONE_STATUSES


def can_resume(run_dir, config):
    """True when run_dir holds an interrupted (or killed: no summary) run of exactly this config."""
    status, same = recorded(run_dir, config)
    return same and status in (None, "interrupted")


@contextmanager
def _child_env(threads):
    """Environment inherited by spawned workers: no thread pool bigger than a worker's share."""
    names = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(threads) for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_summary(path, rows, options):
    """summary.csv: the swept options, then SUMMARY_COLUMNS, then any other keys; atomically."""
    cols = ["name"] + [o for o in options] + [c for c in SUMMARY_COLUMNS if c != "name"]
    extra = sorted({k for r in rows for k in r if k not in cols and k not in ("files",)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in cols + extra})
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return path


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def run_sweep(tasks, out, workers=None, scheduler=None, rerun=False, on_start=None, on_result=None,
              grid=None, base=None, signals=True):
    """Run every task not already done in ``out``; return a SweepResult (rows in task order).

    workers: local processes (default: one per core, at most one per task to run; one when the runs
    use device "cuda"). scheduler: the
    address of a Dask distributed scheduler ("tcp://host:8786") to send the runs to instead.
    rerun: run every task again even when its directory holds a finished run.
    on_start(to_run, skipped) and on_result(row, done, to_run) report progress.
    signals: SIGINT and SIGTERM stop the sweep as the module docstring says (main thread only).
    """
    from .rundir import make_writable_dir
    from .trainer import stop_on_signals
    t0 = time.perf_counter()
    on_gpu = any(t.config.get("device") == "cuda" for t in tasks)
    if on_gpu and scheduler is None:
        from .ops import get_backend
        get_backend("cuda")          # no GPU here: the one-line error now, not from every worker
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError("two runs of the sweep would share a directory name; give each option's values once")
    make_writable_dir(out, "the sweep directory")
    _write_sweep_json(out, tasks, grid, base)
    book = _Book(tasks, out, on_result)
    book.rows, todo = _done_rows(tasks, out, rerun)
    book.todo = len(todo)
    book.write()
    forced = False
    with stop_on_signals(signals) as stop:
        client = _dask_client(scheduler) if scheduler and todo else None
        try:
            if on_start:
                on_start(len(todo), len(tasks) - len(todo))
            if client is not None:
                _run_dask(todo, out, client, book.finish, stop)
            elif todo:
                # runs on the GPU share one device: one local process unless told otherwise
                _run_local(todo, out, workers or (1 if on_gpu else None), book.finish, stop, not rerun)
        except KeyboardInterrupt:            # a second signal: the workers were told to exit at once
            stop.signal, forced = stop.signal or "KeyboardInterrupt", True
        finally:
            if client is not None:
                client.close()
            book.complete()
    return SweepResult(out, book.ordered(), ran=len(todo), skipped=len(tasks) - len(todo),
                       wall_s=time.perf_counter() - t0, summary_path=book.path, options=book.options,
                       status="interrupted" if stop.signal else "finished", stopped_by=stop.signal, forced=forced)


class _Book:
    """The sweep's rows as they come in, and summary.csv rewritten after each."""

    def __init__(self, tasks, out, on_result):
        self.tasks, self.out, self.on_result = tasks, out, on_result
        self.by_name = {t.name: t for t in tasks}
        self.options = list(tasks[0].options) if tasks else []
        self.path = os.path.join(out, "summary.csv")
        self.rows, self.todo = {}, 0

    def ordered(self):
        return [self.rows[t.name] for t in self.tasks if t.name in self.rows]

    def write(self):
        write_summary(self.path, self.ordered(), self.options)

    def finish(self, row):
        t = self.by_name[row["name"]]
        files = row.pop("files", None)
        if files is not None:
            d = os.path.join(self.out, t.name)
            shutil.rmtree(d, ignore_errors=True)
            _write_files(d, files)
        self.rows[t.name] = {"name": t.name, **t.options, **row, "resumed": False}
        self.write()
        if self.on_result:
            self.on_result(self.rows[t.name], sum(1 for r in self.rows.values() if not r.get("resumed")), self.todo)

    def complete(self):
        """A row for every task (a stopped sweep: what each run's directory holds), then summary.csv."""
        for t in self.tasks:
            if t.name not in self.rows:
                d = os.path.join(self.out, t.name)
                self.rows[t.name] = {"name": t.name, **t.options, **stopped_row(d, t.config), "resumed": False}
        self.write()


def _done_rows(tasks, out, rerun):
    """({name: row} of the tasks already done in ``out``, [the tasks still to run])."""
    rows, todo = {}, []
    for t in tasks:
        d = os.path.join(out, t.name)
        if not rerun and is_done(d, t.config):
            try:
                rows[t.name] = {"name": t.name, **t.options, **run_row(d), "run_dir": d, "resumed": True}
                continue
            except Exception:       # an unreadable run directory is simply run again
                pass
        todo.append(t)
    return rows, todo


def _write_sweep_json(out, tasks, grid, base):
    from .rundir import write_json
    write_json(os.path.join(out, "sweep.json"), {
        "base": base.to_dict() if isinstance(base, TrainConfig) else base,
        "grid": grid, "runs": [{"name": t.name, "options": t.options} for t in tasks]})


def _run_local(todo, out, workers, finish, stop, resume):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    n_cores = cores()
    workers = max(1, min(workers or n_cores, len(todo)))
    threads = max(1, n_cores // workers)
    ctx = mp.get_context("spawn")
    stop_event, exit_event = ctx.Event(), ctx.Event()
    with _child_env(threads), ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                                  initargs=(os.getpid(), stop_event, exit_event)) as pool:
        futures = {}
        for t in todo:
            cfg = dict(t.config)
            if cfg.get("threads") is None:
                cfg["threads"] = threads
            futures[pool.submit(run_one, t.name, cfg, os.path.join(out, t.name), resume=resume)] = t
        try:
            _collect(futures, out, finish, stop, stop_event)
        except KeyboardInterrupt:
            exit_event.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _collect(futures, out, finish, stop, stop_event):
    """Hand each run's row to ``finish`` as it comes; on a stop request, tell the workers to stop
    (each finishes its step and writes its run) and cancel the runs not started."""
    from concurrent.futures import FIRST_COMPLETED, wait
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=WATCH_EVERY_S, return_when=FIRST_COMPLETED)
        for fut in done:
            t = futures[fut]
            finish({"name": t.name, **stopped_row(os.path.join(out, t.name), t.config)} if fut.cancelled()
                   else _result_or_error(fut, t, out))
        if stop() and not stop_event.is_set():
            stop_event.set()
            for fut in pending:
                fut.cancel()


def _worker_init(parent_pid, stop_event, exit_event):
    """Worker initializer. Ctrl-C is the sweep process's to handle (SIGINT ignored here). SIGTERM --
    sent by the user, or by this worker's watcher when the sweep sets ``stop_event`` or its process
    is gone -- stops the current run after its step (its files written) and starts no other.
    ``exit_event``, or a sweep gone for STOP_GRACE_S, exits at once. (A sweep killed hard once left
    its workers training on as orphans for over an hour.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)

    def watch():
        asked = None
        while True:
            gone = os.getppid() != parent_pid
            if asked is None and (gone or stop_event.is_set()):
                asked = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
            if exit_event.is_set() or (gone and time.monotonic() - asked > STOP_GRACE_S):
                os._exit(1)
            time.sleep(WATCH_EVERY_S)
    threading.Thread(target=watch, daemon=True, name="minicnn-watch-sweep").start()


def _stop_worker(signum, frame):
    _WORKER["stopping"] = True


def _result_or_error(fut, task, out):
    try:
        return fut.result()
    except Exception as e:  # the worker process died (or the result did not unpickle)
        return {"name": task.name, "status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0],
                "run_dir": os.path.join(out, task.name)}


def _dask_client(scheduler):
    """A distributed.Client connected to ``scheduler``, or a one-line ConfigError."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("--scheduler needs Dask distributed: pip install 'minicnn[dask]'") from None
    try:
        return Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT_S}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} within {SCHEDULER_TIMEOUT_S} s: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _run_dask(todo, out, client, finish, stop):
    """The runs on a Dask cluster, rows handed to ``finish`` as they come back. A stop cancels every
    run not yet back (a run on a Dask worker cannot be stopped after a step: it starts over next time)."""
    from distributed import as_completed
    procs = {}
    for addr in client.scheduler_info().get("workers", {}):
        procs[_host(addr)] = procs.get(_host(addr), 0) + 1
    futures = {}
    for t in todo:
        fut = client.submit(run_one, t.name, t.config, os.path.join(out, t.name), ship=True, procs_per_host=procs,
                            key=f"minicnn-{t.name}-{os.getpid()}-{time.time_ns()}", pure=False)
        futures[fut] = t
    done = as_completed(list(futures), loop=client.loop)
    while not done.is_empty() and not stop():
        if not done.has_ready():
            time.sleep(WATCH_EVERY_S)
            continue
        for fut in done.next_batch(block=False):
            finish(_result_or_error(fut, futures[fut], out))
    if stop():
        client.cancel([f for f in futures if not f.done()])


# ---------------------------------------------------------------- the figure's cells
def grid_cells(rows, row_key="arch", col_key="lr"):
    """Cells for minicnn.plots.plot_grid from summary rows: rows by ``row_key``, columns by
    ``col_key`` and then every other swept option (one panel per run)."""
    cells = []
    for r in rows:
        others = [k for k in r.get("_options", []) if k not in (row_key, col_key)]
        col = f"{col_key}={_value_text(r.get(col_key))}"
        if others:
            col += " " + " ".join(f"{k}={_value_text(r.get(k))}" for k in others)
        cell = {"row": f"{row_key}={r.get(row_key)}", "col": col, "run": r.get("run_dir"),
                "verdict": r.get("verdict") or r.get("status"), "decisive_step": r.get("decisive_step"),
                "subtitle": r.get("error") if r.get("status") == "error" else r.get("diagnosis")}
        cells.append(cell)
    return cells


def sweep_cells(result, row_key="arch", col_key="lr"):
    """grid_cells for a SweepResult (knows which options were swept)."""
    rows = [{**r, "_options": result.options} for r in result.rows]
    return grid_cells(rows, row_key, col_key)
