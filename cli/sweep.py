"""``minicnn sweep`` (a grid of runs on local processes or a Dask cluster) and ``minicnn lr-find``
(the learning-rate range test). Registered on the ``minicnn`` group at the end of cli/main.py.

In ``sweep`` every training option takes a comma-separated list of values (``--lr 0.01,0.1``,
``--arch small,wide``); ``--lr-schedule`` values may themselves contain commas, so its list is
separated by ``;``. Each item is checked exactly as ``minicnn train`` checks the option.
"""
import json
import math
import os
import sys
import time

import click

from .main import _lr_text, config_from_options, training_options

# options whose single values may contain commas: their sweep lists are separated by ';'
LIST_SEP = {"lr_schedule": ";"}


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
        return [int(s) for s in value.split(",") if s.strip() != ""] or None
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
                line.append(_lr_text(v))
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
    state = {"bar": None, "last": ""}

    def on_start(to_run, skipped):
        where = f"Dask scheduler {scheduler}" if scheduler else \
            f"{min(workers or _cores(), max(1, to_run))} local worker processes"
        if skipped:
            click.echo(f"resuming: {skipped} runs already finished, {to_run} to run")
        if to_run and not quiet:
            click.echo(f"running {to_run} runs on {where}")
            state["bar"] = click.progressbar(length=to_run, label="sweep", file=sys.stderr, show_pos=True,
                                             item_show_func=lambda _: state["last"])
            state["bar"].__enter__()

    def on_result(row, done, to_run):
        state["last"] = f"{row['name']}: {row.get('verdict') or row.get('status')}"
        if state["bar"] is not None:
            state["bar"].update(1)

    try:
        result = run_sweep(tasks, out, workers=workers, scheduler=scheduler, rerun=rerun, on_start=on_start,
                           on_result=on_result, grid=grid, base=base.to_dict())
    finally:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
    click.echo(format_table(result.rows, result.options))
    errors = sum(r.get("status") == "error" for r in result.rows)
    click.echo(f"{result.ran} runs in {result.wall_s:.1f} s, {result.skipped} resumed"
               + (f", {errors} failed (see error.txt in their run directories)" if errors else ""))
    click.echo(f"summary: {result.summary_path}")
    if plot and result.rows:
        from minicnn.plots import plot_grid
        path = plot_grid(sweep_cells(result), os.path.join(out, "grid.png"),
                         title=f"sweep {os.path.basename(os.path.normpath(out))}: loss against steps")
        click.echo(f"figure: {path}")


def _cores():
    from minicnn.sweep import _cores as cores
    return cores()


@click.command("lr-find")
@training_options
@click.option("--lr-min", type=click.FloatRange(0, min_open=True), default=1e-6, show_default=True,
              help="Learning rate of the first step.")
@click.option("--lr-max", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Learning rate of the last step (the test stops earlier once the loss explodes).")
@click.option("--sharpness-samples", type=click.IntRange(0), default=256, show_default=True,
              help="Samples on which lambda_max is measured at initialisation (0: skip).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for lr_find.png/.csv/.json (default: runs/lr-find-<arch>-s<seed>-<time>).")
def lr_find_command(lr_min, lr_max, sharpness_samples, out, **kw):
    """The learning-rate range test: lr grows exponentially each step until the loss explodes.

    Plots the smoothed loss against lr (log scale) and marks the suggested lr (steepest descent),
    where the loss starts to blow up, 2/lambda_max at initialisation, and --lr (yours), with a line
    on whether --lr is safe. --steps sets the test's length (default 200); --lr-schedule and
    --epochs are not used.

    \b
    Example:
      minicnn lr-find --arch small --lr 0.1
      minicnn lr-find --arch deep --momentum 0.9 --lr-min 1e-5 --lr-max 3 --steps 300
    """
    from minicnn.lrfind import LRFIND_STEPS, lr_find, plot_lr_find, save_csv
    cfg = config_from_options(**kw)
    cfg.validate()
    steps = cfg.steps or LRFIND_STEPS
    arch = cfg.arch if len(cfg.arch) <= 24 else "custom"
    out = out or os.path.join("runs", f"lr-find-{arch}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with click.progressbar(length=steps, label="lr range test", file=sys.stderr, show_pos=True) as bar:
        res = lr_find(cfg, lr_min=lr_min, lr_max=lr_max, steps=steps, sharpness_samples=sharpness_samples,
                      on_step=lambda rec: bar.update(1))
    click.echo(f"{len(res.lrs)} steps from lr {lr_min:g} to {res.lrs[-1]:.3g} in {time.perf_counter() - t0:.1f} s"
               + (" (stopped: the loss exploded)" if res.stopped_early else ""))
    click.echo(f"suggested lr (steepest descent):  {res.suggested_lr:.3g}")
    click.echo(f"loss minimum at lr:               {res.min_loss_lr:.3g}")
    click.echo(f"loss starts to blow up at lr:     {res.blowup_lr:.3g}")
    if sharpness_samples:
        click.echo(f"lambda_max at init: {res.lambda_max:.4g}, 2/lambda_max: {res.two_over_lambda:.3g}"
                   + ("  (negative: the top-magnitude curvature is concave)" if res.lambda_max < 0 else ""))
    click.echo(f"--lr {cfg.lr:g}: {res.verdict(cfg.lr)}")
    save_csv(res, os.path.join(out, "lr_find.csv"))
    with open(os.path.join(out, "lr_find.json"), "w") as f:
        json.dump({"suggested_lr": res.suggested_lr, "min_loss_lr": res.min_loss_lr, "blowup_lr": res.blowup_lr,
                   "lambda_max": res.lambda_max, "two_over_lambda": res.two_over_lambda,
                   "stopped_early": res.stopped_early, "lr_min": lr_min, "lr_max": lr_max, "steps": len(res.lrs),
                   "config": res.config}, f, indent=2, default=str)
    path = plot_lr_find(res, os.path.join(out, "lr_find.png"), lr=cfg.lr)
    click.echo(f"figure: {path}")
