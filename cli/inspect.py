"""``minicnn inspect``: a run's diagnosis, its events, any step's record, and the figure."""
import os

import click
import numpy as np


@click.command("inspect")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--step", "at_step", type=click.IntRange(0), default=None,
              help="Print the full record of this step and its neighbours.")
@click.option("--context", type=click.IntRange(0, 50), default=2, show_default=True,
              help="Neighbouring steps shown with --step.")
@click.option("--plot/--no-plot", default=True, show_default=True,
              help="Write inspect.png: losses with events, gradient norms, update ratios, dead ReLUs, sharpness.")
@click.option("--max-events", type=click.IntRange(1), default=40, show_default=True, help="Event rows to print.")
def inspect_command(run_dir, at_step, context, plot, max_events):
    """Diagnose a run: the verdict, the decisive steps, and a table of events.

    \b
    Example:
      minicnn inspect runs/small-lr0.1-s0-20261128-101500
      minicnn inspect runs/x --step 1412
    """
    from minicnn.diagnose import diagnose
    from minicnn.rundir import load_run
    run = load_run(run_dir)
    d = diagnose(run)
    cfg = run.config.get("config", {})
    n = len(run.steps.get("step", []))
    click.echo(f"run: {run.path}  ({run.config.get('spec', '?')}, lr {cfg.get('lr')}, "
               + (f"{n} steps, {run.summary.get('status', 'no summary: still running or killed')})" if n
                  else "no steps recorded)"))
    for line in run.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo("diagnosis: " + d.text)
    if d.events:
        click.echo(f"events ({len(d.events)}):")
        for ev in d.events[:max_events]:
            click.echo("  " + str(ev))
        if len(d.events) > max_events:
            click.echo(f"  ... {len(d.events) - max_events} more (--max-events)")
    else:
        click.echo("events: none")
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


def _num(v):
    if not np.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.5g}"
