"""``minicnn inspect``: a run's diagnosis, its events, any step's record, and the figure -- for a run
directory (minicnn's, or a PyTorch loop recorded by minicnn.torch.Recorder) or plain log files."""
import os

import click
import numpy as np

from minicnn.diagnose.thresholds import EVENT_ROWS
from minicnn.verify import VERIFY_STEPS


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True)
@click.option("--val", "val_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With log files: a file holding the validation loss (e.g. a TensorBoard export).")
@click.option("--classes", type=click.IntRange(2), default=None,
              help="With log files: the number of classes (a constant prediction's loss, ln K, is then known).")
@click.option("--step", "at_step", type=click.IntRange(0), default=None,
              help="Print the full record of this step and its neighbours.")
@click.option("--context", type=click.IntRange(0, 50), default=2, show_default=True,
              help="Neighbouring steps shown with --step.")
@click.option("--plot/--no-plot", default=True, show_default=True,
              help="Write inspect.png: losses with events, gradient norms, update ratios, dead ReLUs, sharpness "
                   "(per layer when measured), gradient noise scale (when measured).")
@click.option("--max-events", type=click.IntRange(1), default=EVENT_ROWS, show_default=True,
              help="Rows of the event table: nearby episodes of a kind are merged until this many remain.")
@click.option("--verify", is_flag=True,
              help="Check the suggested fix: replay the run to its decisive step, train on as recorded and with the "
                   "fix from the same state and batches, and compare (writes verify.png).")
@click.option("--verify-steps", type=click.IntRange(1), default=VERIFY_STEPS, show_default=True,
              help="With --verify: steps to train both ways.")
def inspect_command(paths, val_file, classes, at_step, context, plot, max_events, verify, verify_steps):
    """Diagnose a run: the verdict, its decisive step and likely cause, and a table of events.

    PATHS is a run directory, or one or more plain log files: a CSV or JSON-lines table with a step
    and a loss column (names matched loosely: step/iteration/global_step, loss/train_loss, and
    optionally val_loss, val_acc, lr), or TensorBoard scalar exports (Wall time, Step, Value; what
    each holds from its file name, or given as ROLE=FILE: loss=a.csv val_loss=b.csv).

    \b
    Example:
      minicnn inspect runs/small-lr0.1-s0-20261128-101500
      minicnn inspect runs/x --step 1412
      minicnn inspect runs/x --verify
      minicnn inspect metrics.csv --classes 10
      minicnn inspect run-train-tag-loss.csv --val run-validation-tag-loss.csv
    """
    from minicnn.diagnose import diagnose
    if len(paths) == 1 and os.path.isdir(paths[0]) and val_file is None:
        run_dir = paths[0]
        run, figure = open_run(run_dir), os.path.join(run_dir, "inspect.png")
    else:
        run_dir = None
        run, figure = open_log(paths, val_file, classes, verify), log_figure(paths)
    d = diagnose(run)
    click.echo("diagnosis: " + d.text)
    if run.config.get("source"):
        from minicnn.logs import evidence_gaps
        gaps = evidence_gaps(run)
        if gaps:
            click.echo("what this record cannot show:")
            for line in gaps:
                click.echo("  " + line)
    echo_events(d.events, max_events)
    if at_step is not None:
        echo_step(run, at_step, context)
    if plot:
        from minicnn.plots import plot_inspect
        click.echo(f"figure: {plot_inspect(run, d, figure)}")
    if verify:
        from minicnn.verify import verify as check
        v = check(run_dir, steps=verify_steps, png=os.path.join(run_dir, "verify.png") if plot else None)
        click.echo(v.text)
        if v.png:
            click.echo(f"figure: {v.png}")


def open_run(run_dir):
    """load_run, with its header line (and, for a run recorded elsewhere, by what)."""
    from minicnn.rundir import load_run
    run = load_run(run_dir)
    cfg = run.config.get("config", {})
    n = len(run.steps.get("step", []))
    click.echo(f"run: {run.path}  ({run.config.get('spec') or run.config.get('model', '?')}, lr {cfg.get('lr')}, "
               + (f"{n} steps, {run.summary.get('status', 'no summary: still running or killed')})" if n
                  else "no steps recorded)"))
    for line in run.warnings:
        click.echo(f"warning: {line}", err=True)
    echo_source(run)
    return run


def open_log(paths, val_file, classes, verify):
    """load_log, with where each quantity came from and what was done to the rows."""
    from minicnn.logs import load_log
    if verify:
        raise click.UsageError("--verify replays a run directory from its checkpoints; a log has none")
    dirs = [p for p in paths if os.path.isdir(p)]
    if dirs:
        raise click.UsageError(f"give one run directory, or log files; {dirs[0]} is a directory")
    missing = [p for p in paths if not os.path.exists(p) and not os.path.exists(p.partition("=")[2])]
    if missing:
        raise click.UsageError(f"{missing[0]} does not exist; give a run directory or log files")
    run = load_log(paths, val=val_file, classes=classes)
    log = run.config["log"]
    found = ", ".join(f"{role} from {src}" for role, src in log["columns"].items())
    click.echo(f"log: {', '.join(log['files'])}  ({len(run.steps['step'])} steps; {found})")
    for note in log["notes"]:
        click.echo(f"  {note}")
    if log["not_read"]:
        click.echo(f"  not read: {', '.join(log['not_read'])}")
    return run


def log_figure(paths):
    """inspect.png beside the first log file, named after it."""
    first = str(paths[0]).partition("=")[2] if not os.path.exists(paths[0]) else str(paths[0])
    return os.path.splitext(first)[0] + ".inspect.png"


def echo_source(run):
    """For a run recorded outside minicnn: by what, and what it could not measure."""
    source = run.config.get("source")
    if not source:
        return
    opt = run.config.get("optimizer", {}).get("class")
    click.echo(f"recorded by {source}" + (f" ({run.config.get('model')}, {opt})" if opt else ""))
    for what, why in run.config.get("unavailable", {}).items():
        click.echo(f"  not measured: {what}: {why}")


def echo_step(run, at_step, context):
    """The full record of one step and its neighbours, one column per step."""
    steps = run.steps.get("step")
    if steps is None or at_step not in set(steps.astype(int)):
        last = int(steps[-1]) if steps is not None and len(steps) else -1
        raise click.BadParameter(f"step {at_step} is not in this run (steps 0..{last})", param_hint="--step")
    i = int(np.flatnonzero(steps.astype(int) == at_step)[0])
    lo, hi = max(0, i - context), min(len(steps), i + context + 1)
    cols = list(run.steps)
    click.echo(f"step {at_step} and neighbours:")
    width = max(len(c) for c in cols)
    click.echo(" " * (width + 2) + "".join(f"{int(steps[j]):>13d}" + ("*" if j == i else " ") for j in range(lo, hi)))
    for c in cols[1:]:
        click.echo(f"  {c:<{width}}" + "".join(f"{_num(run.steps[c][j]):>13} " for j in range(lo, hi)))


def echo_events(events, max_rows):
    """A per-kind summary, then the event table with nearby episodes merged to at most max_rows rows."""
    from minicnn.diagnose import event_summary, merge_events
    if not events:
        click.echo("events: none")
        return
    click.echo(f"events ({len(events)} episodes):")
    for line in event_summary(events):
        click.echo("  " + line)
    rows = merge_events(events, max_rows)
    if len(rows) < len(events):
        click.echo(f"table ({len(rows)} rows, nearby episodes of a kind merged):")
    for ev in rows[:max_rows]:
        click.echo("  " + str(ev))
    if len(rows) > max_rows:
        click.echo(f"  ... {len(rows) - max_rows} more")


def _num(v):
    if not np.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.5g}"
