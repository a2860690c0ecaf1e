"""``minicnn train``: train a network with mini-batch SGD and write a run directory."""
import math
import os
import sys

import click
from click.core import ParameterSource

from minicnn.config import RESUME_CHANGES

from .options import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    arch_label,
    config_from_options,
    lr_text,
    timestamp,
    training_options,
)


def default_out(cfg):
    return os.path.join("runs", f"{arch_label(cfg.arch)}-lr{lr_text(cfg.lr)}-s{cfg.seed}-{timestamp()}")


class Progress:
    """A click progress bar over steps with the running loss, plus one line per evaluation."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.bar = None
        self.running = math.nan
        self.tty = sys.stderr.isatty()

    def start(self, info):
        for line in info.get("warnings", []):
            click.echo(f"warning: {line}", err=True)
        for line in info.get("skipped", []):
            click.echo(f"skipped: {line}", err=True)
        if info.get("resumed_from") is not None:
            click.echo(f"resuming from step {info['resumed_from']} of {info['steps_total']:,}")
        if self.quiet:
            return
        net, data = info["net"], info["data"]
        click.echo(f"data: {data.describe()}")
        click.echo(f"net:  {net.spec}  ({net.num_params:,} parameters, {net.dtype.name}, {net.device}); "
                   f"{info['steps_total']:,} steps, {info['steps_per_epoch']:,} per epoch, "
                   f"trace {info['trace_level']}")
        self.bar = click.progressbar(length=info["steps_total"], label="training", file=sys.stderr,
                                     show_pos=True, item_show_func=lambda _: f"loss {self.running:.4f}")
        self.bar.__enter__()

    def step(self, rec):
        loss = rec["loss"]
        self.running = loss if not math.isfinite(self.running) else 0.95 * self.running + 0.05 * loss
        if self.bar is not None:
            self.bar.update(1)

    def eval(self, rec):
        if self.quiet:
            return
        if self.tty and self.bar is not None:
            sys.stderr.write("\r\x1b[K")
        click.echo(f"epoch {rec['epoch']:6.2f}  step {rec['step']:6d}  train loss {rec['train_loss']:.4f}  "
                   f"train acc {100 * rec['train_acc']:5.1f}%  val loss {rec['val_loss']:.4f}  "
                   f"val acc {100 * rec['val_acc']:5.1f}%")

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command("train")
@training_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to write (default: runs/<arch>-lr<lr>-s<seed>-<time>); one that already holds "
                   "a run is refused unless --overwrite or --resume.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out (its files are removed first).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue the run in RUN_DIR (interrupted, killed, or finished: then with more --steps or "
                   "--epochs) from its last checkpoint, bit for bit as if never stopped; it keeps its recorded "
                   f"options (only {', '.join('--' + k for k in RESUME_CHANGES)} may change).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.pass_context
def train_command(ctx, out, overwrite, resume_dir, quiet, **kw):
    """Train a network with mini-batch SGD and write a run directory.

    Ctrl-C or SIGTERM stops after the current step and writes everything, with a checkpoint to
    continue from: minicnn train --resume RUN_DIR.

    \b
    Example:
      minicnn train --lr 0.1 --epochs 3
      minicnn train --arch conv8k5-relu-maxpool2-fc10 --lr 0.03 --momentum 0.9 --out runs/a
      minicnn train --resume runs/a --steps 5000
    """
    from minicnn.trainer import train
    if resume_dir:
        if overwrite or (out and os.path.abspath(out) != os.path.abspath(resume_dir)):
            raise click.UsageError("--resume RUN_DIR continues that run in place; give neither --out nor --overwrite")
        given = {k: v for k, v in kw.items()
                 if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        out, run = resume_dir, dict(resume=True, **given)
    else:
        cfg = config_from_options(**kw)
        cfg.validate()
        out, run = out or default_out(cfg), dict(config=cfg, overwrite=overwrite)
    progress = Progress(quiet)
    try:
        result = train(out=out, on_step=progress.step, on_eval=progress.eval, on_start=progress.start, **run)
    finally:
        progress.close()
    report(result, out)


def report(result, out):
    """The run's outcome, its diagnosis, and the exit code: 3 diverged, 130 interrupted (143 by SIGTERM)."""
    last = result.evals[-1] if result.evals else None
    click.echo(f"{result.status}: {result.steps} steps in {result.wall_s:.1f} s "
               f"({result.steps / max(result.wall_s, 1e-9):.0f} steps/s, first step after {result.first_step_s:.2f} s)")
    if last:
        click.echo(f"final: val loss {last['val_loss']:.4f}, val acc {100 * last['val_acc']:.1f}%")
    click.echo(f"run directory: {out}")
    from minicnn.diagnose import diagnose
    from minicnn.rundir import load_run
    click.echo("diagnosis: " + diagnose(load_run(out)).text)
    if result.status == "diverged":
        click.echo(f"diverged: {result.message}", err=True)
        sys.exit(EXIT_DIVERGED)
    if result.status == "interrupted":
        click.echo(f"interrupted: {result.message}; continue it with: minicnn train --resume {out}", err=True)
        sys.exit(EXIT_TERMINATED if result.stopped_by == "SIGTERM" else EXIT_INTERRUPTED)
