"""Options and helpers the commands share. Every command module imports this one; it imports no
command (so the group in main.py can import the commands without a cycle).

Exit codes: 0 ok, 1 bad input/data (or some runs of a sweep failed), 2 usage error, 3 the run
diverged (NaN/inf), 130 interrupted (Ctrl-C, SIGINT), 143 stopped by SIGTERM.
"""
import time

import click

EXIT_FAILED = 1                # bad input, or (sweep) some runs ended in an error
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130         # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
EXIT_TERMINATED = 143          # 128 + SIGTERM
# a spec longer than this is called "custom" in default run-directory names
MAX_ARCH_IN_NAME = 24


def lr_text(v):
    """A learning rate as it reads in names and tables: 0.1, 1e-05."""
    return f"{v:g}"


def training_options(f):
    """The options shared by every command that trains (train, and later sweep/debug)."""
    from minicnn import config as c
    from minicnn.data import DATA_HELP
    from minicnn.network import INITS
    from minicnn.ops import DEVICES
    from minicnn.sgd import SCHEDULE_HELP
    from minicnn.spec import PRESETS
    from minicnn.trace import SHARPNESS_TOPK, SHARPNESS_TRACE_SAMPLES
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
                     help=f"Epochs to train (default {c.DEFAULT_EPOCHS} unless --steps is given)."),
        click.option("--steps", type=click.IntRange(1), default=None, help="SGD steps to train (overrides --epochs)."),
        click.option("--init", type=click.Choice(INITS), default="torch", show_default=True,
                     help="Weight initialisation: PyTorch's default, He (Kaiming normal) or Xavier (Glorot uniform)."),
        click.option("--init-scale", type=click.FloatRange(0), default=1.0, show_default=True,
                     help="Multiply every initial parameter by this."),
        click.option("--init-from", type=click.Path(dir_okay=False), default=None,
                     help="Start from the weights of a PyTorch state_dict file (torch.save(model.state_dict(), "
                          "FILE.pt)), matched to --arch by names and shapes (needs PyTorch)."),
        click.option("--input-scale", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                     help="Multiply every input by this (e.g. 255: see what un-normalised pixels do)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for data, init and data order."),
        click.option("--eval-every", type=click.IntRange(1), default=None,
                     help="Steps between evaluations (default: once per epoch)."),
        click.option("--dtype", type=click.Choice(c.DTYPES), default="float32", show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                     help="cpu (Numba), numpy (the slow reference) or cuda (Numba CUDA)."),
        click.option("--trace", type=click.Choice(("auto",) + c.TRACE_LEVELS), default="auto", show_default=True,
                     help=f"Per-step trace detail (auto: full for runs up to {c.AUTO_FULL_TRACE_MAX_STEPS:,} steps, "
                          "else light)."),
        click.option("--probe-every", type=click.IntRange(0), default=c.PROBE_EVERY, show_default=True,
                     help=f"Every K steps, measure dead units and predictions on {c.PROBE_SIZE} fixed held-out "
                          "images (the diagnosis's evidence for dead layers and collapse; 0: never; needs a "
                          "trace)."),
        click.option("--sharpness-every", type=click.IntRange(0), default=0, show_default=True,
                     help=f"Every K steps, measure lambda_max of the loss Hessian on {c.SHARPNESS_SAMPLES} fixed "
                          "training images (0: never)."),
        click.option("--sharpness", type=SharpnessMeasures(), default="lambda_max", show_default=True,
                     help="What --sharpness-every measures, a comma list: lambda_max (always), "
                          f"topk[:K] (the top K eigenvalues, default {SHARPNESS_TOPK}), trace[:SAMPLES] "
                          f"(Hutchinson, default {SHARPNESS_TRACE_SAMPLES} samples, with its standard error), "
                          "layers (each layer's own lambda_max)."),
        click.option("--noise-every", type=click.IntRange(0), default=0, show_default=True,
                     help="Every K steps, measure gradient noise (B_noise, SNR, Cockpit's tests; per layer) from "
                          "the per-sample gradients of the step's training batch (0: never)."),
        click.option("--threads", type=click.IntRange(1), default=None, help="Numba threads (default: all cores)."),
        click.option("--checkpoint-every", type=click.IntRange(0), default=c.CHECKPOINT_EVERY, show_default=True,
                     help="Steps between checkpoints under RUN_DIR/checkpoints/ (0: none); "
                          "'minicnn debug --from' replays from the nearest one."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


class SharpnessMeasures(click.ParamType):
    """--sharpness: a comma list of measures, checked and normalised (minicnn.trace.parse_sharpness)."""
    name = "measures"

    def convert(self, value, param, ctx):
        from minicnn.errors import ConfigError
        from minicnn.trace import parse_sharpness, sharpness_text
        try:
            return sharpness_text(parse_sharpness(value))
        except ConfigError as e:
            self.fail(str(e), param, ctx)


def config_from_options(**kw):
    from minicnn.config import TrainConfig
    return TrainConfig(**{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__})


def arch_label(arch):
    """A network spec short enough for a directory name."""
    return arch if len(arch) <= MAX_ARCH_IN_NAME else "custom"


def timestamp():
    return time.strftime("%Y%m%d-%H%M%S")


