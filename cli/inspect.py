"""``minicnn inspect``: a run's diagnosis, its events, any step's record, and the figure."""
import os

import click
import numpy as np

from minicnn.diagnose.thresholds import EVENT_ROWS
from minicnn.verify import VERIFY_STEPS


@click.command("inspect")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
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
def inspect_command(run_dir, at_step, context, plot, max_events, verify, verify_steps):
    """Diagnose a run: the verdict, its decisive step and likely cause, and a table of events.

    \b
    Example:
      minicnn inspect runs/small-lr0.1-s0-20261128-101500
      minicnn inspect runs/x --step 1412
      minicnn inspect runs/x --verify
    """
    from minicnn.diagnose import diagnose
    from minicnn.rundir import load_run
    run = load_run(run_dir)
    d = diagnose(run)
    cfg = run.config.get("config", {})
    click.echo(f"run: {run.path}  ({run.config.get('spec', '?')}, lr {cfg.get('lr')}, "
               f"{len(run.steps.get('step', []))} steps, "
               f"{run.summary.get('status', 'no summary: still running or killed')})")
    click.echo("diagnosis: " + d.text)
    echo_events(d.events, max_events)
    if at_step is not None:
        steps = run.steps.get("step")
        if steps is None or at_step not in set(steps.astype(int)):
            last = int(steps[-1]) if steps is not None and len(steps) else -1
            raise click.BadParameter(f"step {at_step} is not in this run (steps 0..{last})", param_hint="--step")
        i = int(np.flatnonzero(steps.astype(int) == at_step)[0])
        lo, hi = max(0, i - context), min(len(steps), i + context + 1)
        cols = list(run.steps)
        click.echo(f"step {at_step} and neighbours:")
        width = max(len(c) for c in cols)
        click.echo(" " * (width + 2)
                   + "".join(f"{int(steps[j]):>13d}" + ("*" if j == i else " ") for j in range(lo, hi)))
        for c in cols[1:]:
            click.echo(f"  {c:<{width}}" + "".join(f"{_num(run.steps[c][j]):>13} " for j in range(lo, hi)))
    if plot:
        from minicnn.plots import plot_inspect
        path = plot_inspect(run, d, os.path.join(run_dir, "inspect.png"))
        click.echo(f"figure: {path}")
    if verify:
        from minicnn.verify import verify as check
        v = check(run_dir, steps=verify_steps, png=os.path.join(run_dir, "verify.png") if plot else None)
        click.echo(v.text)
        if v.png:
            click.echo(f"figure: {v.png}")


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
