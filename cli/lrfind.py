"""``minicnn lr-find``: the learning-rate range test."""
import json
import os
import sys
import time

import click

from minicnn.config import SHARPNESS_SAMPLES
from minicnn.lrfind import LR_MAX, LR_MIN, LRFIND_STEPS

from .options import arch_label, config_from_options, timestamp, training_options

HELP = f"""The learning-rate range test: lr grows exponentially each step until the loss explodes.

    Plots the smoothed loss against lr (log scale) and marks the suggested lr (steepest descent),
    where the loss starts to blow up, 2/lambda_max at initialisation, and --lr (yours), with a line
    on whether --lr is safe. --steps sets the test's length (default {LRFIND_STEPS}); --lr-schedule and
    --epochs are not used.

    \b
    Example:
      minicnn lr-find --arch small --lr 0.1
      minicnn lr-find --arch deep --momentum 0.9 --lr-min 1e-5 --lr-max 3 --steps 300
    """


@click.command("lr-find", help=HELP)
@training_options
@click.option("--lr-min", type=click.FloatRange(0, min_open=True), default=LR_MIN, show_default=True,
              help="Learning rate of the first step.")
@click.option("--lr-max", type=click.FloatRange(0, min_open=True), default=LR_MAX, show_default=True,
              help="Learning rate of the last step (the test stops earlier once the loss explodes).")
@click.option("--sharpness-samples", type=click.IntRange(0), default=SHARPNESS_SAMPLES, show_default=True,
              help="Samples on which lambda_max is measured at initialisation (0: skip).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for lr_find.png/.csv/.json (default: runs/lr-find-<arch>-s<seed>-<time>).")
def lr_find_command(lr_min, lr_max, sharpness_samples, out, **kw):
    """The learning-rate range test (help: HELP)."""
    from minicnn.lrfind import lr_find, save_csv
    from minicnn.plots import plot_lr_find
    cfg = config_from_options(**kw)
    cfg.validate()
    steps = cfg.steps or LRFIND_STEPS
    out = out or os.path.join("runs", f"lr-find-{arch_label(cfg.arch)}-s{cfg.seed}-{timestamp()}")
    from minicnn.rundir import make_writable_dir
    make_writable_dir(out, "--out")
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
