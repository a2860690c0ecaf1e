"""``minicnn sweep``: a grid of runs on local processes or a Dask cluster.

In ``sweep`` every training option takes a comma-separated list of values (``--lr 0.01,0.1``,
``--arch small,wide``); ``--lr-schedule`` and ``--sharpness`` values may themselves contain commas,
so their lists are separated by ``;``. Each item is checked exactly as ``minicnn train`` checks the option.
"""
import math
import os
import sys

import click

from .options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    config_from_options,
    lr_text,
    training_options,
)

# options whose single values may contain commas: their sweep lists are separated by ';'
LIST_SEP = {"lr_schedule": ";", "sharpness": ";"}


def _training_params():
    """The click Options of training_options, in the order click stores them on a function."""
    def dummy(**kw):
        pass
    training_options(dummy)
    return list(dummy.__click_params__)


def sweep_training_options(f):
    """training_options where every value-taking option accepts a list (parsed by parse_lists)."""
    params = getattr(f, "__click_params__", None)
    if params is None:
        params = f.__click_params__ = []
    for p in _training_params():
        if p.is_flag:
            params.append(p)
            continue
        sep = LIST_SEP.get(p.name, ",")
        kind = "|".join(p.type.choices) if isinstance(p.type, click.Choice) else p.type.name.split()[0].upper()
        opt = click.Option(p.opts, type=click.STRING, default=p.default, show_default=p.show_default,
                           help=p.help, metavar=f"{kind}[{sep}...]")
        opt.list_type = p.type      # the original type: each item is converted with it
        params.append(opt)
    return f


def parse_lists(ctx, values):
    """{option name: [converted values]} from the string values of sweep_training_options."""
    params = {p.name: p for p in ctx.command.params}
    out = {}
    for name, raw in values.items():
        p = params.get(name)
        if p is None or not hasattr(p, "list_type"):
            out[name] = [raw]
            continue
        if raw is None:
            out[name] = [None]
            continue
        sep = LIST_SEP.get(name, ",")
        items = [s.strip() for s in str(raw).split(sep)]
        if any(s == "" for s in items):
            raise click.BadParameter(f"empty item in the list {raw!r}", ctx=ctx, param=p)
        out[name] = [p.list_type.convert(s, p, ctx) for s in items]
    return out


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _fmt(v, nd=4):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def format_table(rows, options):
    """The sweep summary as aligned text: swept options, then status, losses, accuracy, verdict."""
    cols = list(options) + ["status", "final_train_loss", "final_val_loss", "final_val_acc", "best_val_loss",
                            "verdict", "decisive_step"]
    heads = list(options) + ["status", "train loss", "val loss", "val acc", "best val", "verdict", "decisive"]
    cells = []
    for r in rows:
        line = []
        for c in cols:
            v = r.get(c)
            if c == "final_val_acc" and isinstance(v, float) and math.isfinite(v):
                line.append(f"{100 * v:.1f}%")
            elif c == "lr" and isinstance(v, float):
                line.append(lr_text(v))
            elif c == "decisive_step" and isinstance(v, float) and math.isfinite(v):
                line.append(str(int(v)))
            else:
                line.append(_fmt(v))
        cells.append(line)
    widths = [max([len(h)] + [len(l[i]) for l in cells]) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    for r, line in zip(rows, cells):
        text = "  ".join(v.ljust(w) for v, w in zip(line, widths))
        if r.get("status") == "error":
            text += "  " + str(r.get("error", ""))
        out.append(text.rstrip())
    return "\n".join(out)


class SweepProgress:
    """Where the runs go, what was resumed, and a progress bar over the runs as they finish."""

    def __init__(self, scheduler, workers, quiet):
        self.scheduler, self.workers, self.quiet = scheduler, workers, quiet
        self.bar, self.last = None, ""

    def start(self, to_run, skipped):
        from minicnn.ops import cores
        where = f"Dask scheduler {self.scheduler}" if self.scheduler else \
            f"{min(self.workers or cores(), max(1, to_run))} local worker processes"
        if skipped:
            click.echo(f"resuming: {skipped} runs already finished, {to_run} to run")
        if to_run and not self.quiet:
            click.echo(f"running {to_run} runs on {where}")
            self.bar = click.progressbar(length=to_run, label="sweep", file=sys.stderr, show_pos=True,
                                         item_show_func=lambda _: self.last)
            self.bar.__enter__()

    def result(self, row, done, to_run):
        self.last = f"{row['name']}: {row.get('verdict') or row.get('status')}"
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command("sweep")
@sweep_training_options
@click.option("--seeds", callback=_int_list, default=None, metavar="INT[,...]",
              help="Seeds to repeat every run with (overrides --seed).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Local worker processes (default: one per core); each gets cores // workers Numba threads.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Send the runs to this Dask distributed scheduler (e.g. tcp://10.0.0.5:8786) instead "
                   "(needs: pip install 'minicnn[dask]').")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Sweep directory (default: sweeps/sweep-<hash of the options>, so re-running the same "
                   "sweep resumes it).")
@click.option("--rerun", is_flag=True, help="Run every run again, even those already finished in --out.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write grid.png.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def sweep_command(ctx, seeds, workers, scheduler, out, rerun, plot, quiet, **kw):
    """Train a grid of runs in parallel; summarise and plot them.

    Every training option takes a comma-separated list of values to sweep over (--lr-schedule: a
    ';'-separated one); the grid is every combination.

    Each run is an ordinary run directory inside the sweep directory, beside summary.csv (one row
    per run: options, final/best losses and accuracy, diagnosis verdict and decisive step) and
    grid.png (rows architectures, columns learning rates). Re-running the same command skips runs
    that finished; a run that fails is a row with its error.

    \b
    Example:
      minicnn sweep --lr 1e-4,1e-3,1e-2,1e-1 --arch small,wide,deep --seeds 0,1 --epochs 5
      minicnn sweep --lr 0.01,0.1 --momentum 0,0.9 --scheduler tcp://10.0.0.5:8786
    """
    from minicnn.sweep import expand_grid, run_sweep, sweep_cells, sweep_id
    lists = parse_lists(ctx, kw)
    if seeds:
        lists["seed"] = seeds
    base = config_from_options(**{k: v[0] for k, v in lists.items()})
    grid = {k: v for k, v in lists.items() if len(v) > 1 or k == "seed" and seeds}
    grid.setdefault("arch", [base.arch])
    grid.setdefault("lr", [base.lr])
    tasks = expand_grid(base, grid)
    out = out or os.path.join("sweeps", f"sweep-{sweep_id(base, grid)}")
    swept = ", ".join(f"{k} ({len(v)})" for k, v in grid.items() if len(v) > 1) or "nothing"
    click.echo(f"sweep: {len(tasks)} runs over {swept} -> {out}")
    progress = SweepProgress(scheduler, workers, quiet)
    try:
        result = run_sweep(tasks, out, workers=workers, scheduler=scheduler, rerun=rerun, on_start=progress.start,
                           on_result=progress.result, grid=grid, base=base.to_dict())
    finally:
        progress.close()
    click.echo(format_table(result.rows, result.options))
    errors = result.errors
    click.echo(f"{result.ran} runs in {result.wall_s:.1f} s, {result.skipped} resumed"
               + (f", {errors} failed (see error.txt in their run directories)" if errors else ""))
    click.echo(f"summary: {result.summary_path}")
    if plot and result.rows:
        from minicnn.plots import plot_grid
        path = plot_grid(sweep_cells(result), os.path.join(out, "grid.png"),
                         title=f"sweep {os.path.basename(os.path.normpath(out))}: loss against steps")
        click.echo(f"figure: {path}")
    exit_status(result)


def exit_status(result):
    """Exit 130 (143 by SIGTERM) when the sweep was stopped, 1 when some runs failed, else 0."""
    if result.status == "interrupted":
        left = sum(r.get("status") == "interrupted" for r in result.rows)
        written = ("the runs under way were killed at once (a second signal): each keeps its steps up to its "
                   "last checkpoint" if result.forced else "every run's files and summary.csv are written")
        click.echo(f"interrupted by {result.stopped_by}: {left} of {len(result.rows)} runs did not finish "
                   f"({written}); run the same command again to resume", err=True)
        sys.exit(EXIT_TERMINATED if result.stopped_by == "SIGTERM" else EXIT_INTERRUPTED)
    if result.errors:
        click.echo(f"{result.errors} of {len(result.rows)} runs failed", err=True)
        sys.exit(EXIT_FAILED)
