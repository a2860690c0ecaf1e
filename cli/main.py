"""The ``minicnn`` command line: a thin click layer over the library.

Every echo, exit code and error message lives here; the library returns data and raises
``MinicnnError`` subclasses for bad input, which become one ``Error: ...`` line and exit code 1
(click's own usage errors exit 2).

Exit codes: 0 ok, 1 bad input/data, 2 usage error, 3 the run diverged (NaN/inf), 130 interrupted.
"""
import math
import os
import sys
import time

import click
import numpy as np

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class MinicnnGroup(click.Group):
    """A click group that turns library errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        from minicnn.errors import MinicnnError
        try:
            return super().invoke(ctx)
        except MinicnnError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=MinicnnGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(package_name="minicnn")
def main():
    """minicnn: train small CNNs with plain SGD and see why training behaves as it does."""


def _lr_text(v):
    return f"{v:g}"


def training_options(f):
    """The options shared by every command that trains (train, and later sweep/debug)."""
    from minicnn.data import DATA_HELP
    from minicnn.network import DEVICES, INITS
    from minicnn.sgd import SCHEDULE_HELP
    from minicnn.spec import PRESETS
    from minicnn.train import CHECKPOINT_EVERY
    opts = [
        click.option("--data", default="shapes", show_default=True, help=f"Dataset: {DATA_HELP}."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder holding (or to download) the files of a named dataset."),
        click.option("--split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
                     help="When a dataset has only its test split locally: fraction of it to train on."),
        click.option("--image-size", type=click.IntRange(4, 1024), default=None,
                     help="Resize images of an image folder to this size."),
        click.option("--n-train", type=click.IntRange(1), default=None, help="Use only this many training samples."),
        click.option("--n-val", type=click.IntRange(1), default=None, help="Use only this many validation samples."),
        click.option("--arch", default="small", show_default=True,
                     help=f"Network spec (e.g. conv16k3p1-relu-maxpool2-fc10) or preset: {', '.join(PRESETS)}."),
        click.option("--lr", type=click.FloatRange(0), default=0.1, show_default=True, help="Learning rate."),
        click.option("--lr-schedule", default="constant", show_default=True, help=f"Schedule: {SCHEDULE_HELP}."),
        click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="SGD momentum (torch.optim.SGD's rule)."),
        click.option("--nesterov", is_flag=True, help="Nesterov momentum."),
        click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="L2 weight decay added to the gradient."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Mini-batch size."),
        click.option("--epochs", type=click.FloatRange(0, min_open=True), default=None,
                     help="Epochs to train (default 3 unless --steps is given)."),
        click.option("--steps", type=click.IntRange(1), default=None, help="SGD steps to train (overrides --epochs)."),
        click.option("--init", type=click.Choice(INITS), default="torch", show_default=True,
                     help="Weight initialisation: PyTorch's default, He (Kaiming normal) or Xavier (Glorot uniform)."),
        click.option("--init-scale", type=click.FloatRange(0), default=1.0, show_default=True,
                     help="Multiply every initial parameter by this."),
        click.option("--input-scale", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                     help="Multiply every input by this (e.g. 255: see what un-normalised pixels do)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for data, init and data order."),
        click.option("--eval-every", type=click.IntRange(1), default=None,
                     help="Steps between evaluations (default: once per epoch)."),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                     help="cpu (Numba), numpy (the slow reference) or cuda (Numba CUDA)."),
        click.option("--trace", type=click.Choice(["auto", "off", "light", "full"]), default="auto", show_default=True,
                     help="Per-step trace detail (auto: full for runs up to 20,000 steps, else light)."),
        click.option("--sharpness-every", type=click.IntRange(0), default=0, show_default=True,
                     help="Every K steps, measure lambda_max of the loss Hessian on a fixed batch (0: never)."),
        click.option("--threads", type=click.IntRange(1), default=None, help="Numba threads (default: all cores)."),
        click.option("--checkpoint-every", type=click.IntRange(0), default=CHECKPOINT_EVERY, show_default=True,
                     help="Steps between checkpoints under RUN_DIR/checkpoints/ (0: none); "
                          "'minicnn debug --from' replays from the nearest one."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from_options(**kw):
    from minicnn.train import TrainConfig
    return TrainConfig(**{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__})


def default_out(cfg):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    arch = cfg.arch if len(cfg.arch) <= 24 else "custom"
    return os.path.join("runs", f"{arch}-lr{_lr_text(cfg.lr)}-s{cfg.seed}-{stamp}")


class Progress:
    """A click progress bar over steps with the running loss, plus one line per evaluation."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.bar = None
        self.running = math.nan
        self.tty = sys.stderr.isatty()

    def start(self, info):
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


@main.command("train")
@training_options
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to write (default: runs/<arch>-lr<lr>-s<seed>-<time>).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def train_command(out, quiet, **kw):
    """Train a network with mini-batch SGD and write a run directory.

    \b
    Example:
      minicnn train --lr 0.1 --epochs 3
      minicnn train --arch conv8k5-relu-maxpool2-fc10 --lr 0.03 --momentum 0.9 --out runs/a
    """
    from minicnn.train import train
    cfg = config_from_options(**kw)
    cfg.validate()
    out = out or default_out(cfg)
    progress = Progress(quiet)
    try:
        result = train(cfg, out=out, on_step=progress.step, on_eval=progress.eval, on_start=progress.start)
    finally:
        progress.close()
    last = result.evals[-1] if result.evals else None
    click.echo(f"{result.status}: {result.steps} steps in {result.wall_s:.1f} s "
               f"({result.steps / max(result.wall_s, 1e-9):.0f} steps/s, first step after {result.first_step_s:.2f} s)")
    if last:
        click.echo(f"final: val loss {last['val_loss']:.4f}, val acc {100 * last['val_acc']:.1f}%")
    click.echo(f"run directory: {out}")
    from minicnn.diagnose import diagnose
    from minicnn.runs import load_run
    click.echo("diagnosis: " + diagnose(load_run(out)).text)
    if result.status == "diverged":
        click.echo(f"diverged: {result.message}", err=True)
        sys.exit(EXIT_DIVERGED)
    if result.status == "interrupted":
        click.echo(f"interrupted: {result.message}", err=True)
        sys.exit(EXIT_INTERRUPTED)


@main.command("inspect")
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
    from minicnn.runs import load_run
    run = load_run(run_dir)
    d = diagnose(run)
    cfg = run.config.get("config", {})
    click.echo(f"run: {run.path}  ({run.config.get('spec', '?')}, lr {cfg.get('lr')}, "
               f"{len(run.steps.get('step', []))} steps, {run.summary.get('status', 'no summary: still running or killed')})")
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
        click.echo(" " * (width + 2) + "".join(f"{int(steps[j]):>13d}" + ("*" if j == i else " ") for j in range(lo, hi)))
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


from .debug import debug_command; main.add_command(debug_command)  # noqa: E402,E702  (cli/debug.py)
from .sweep import lr_find_command, sweep_command  # noqa: E402  (cli/sweep.py)
main.add_command(sweep_command)
main.add_command(lr_find_command)
from .explain import explain_command  # noqa: E402  (cli/explain.py)
main.add_command(explain_command)


if __name__ == "__main__":
    main()
