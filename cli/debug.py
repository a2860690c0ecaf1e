"""``minicnn debug``: a pdb-like REPL over minicnn.Stepper (step, until, show, layer, whatif,
slice, sharpness, spectrum, noise, back, save, quit).

Interactive on a terminal (``help`` and tab completion from ``cmd.Cmd``); with ``--commands FILE``
or piped standard input it runs the commands one by one, echoing each after the prompt, so a
session's transcript is stable enough to assert on. A bad command prints one ``error: ...`` line
and the session goes on.
"""
import cmd
import math
import os
import sys
import time

import click
import numpy as np

from minicnn.config import SHARPNESS_SAMPLES
from minicnn.diagnose import COLLAPSE_MIN_STEPS, DEAD_LAYER, EOS_RATIO, STEP_EVENTS
from minicnn.plots import text_hist, text_plot
from minicnn.rundir import os_reason
from minicnn.stepper import HISTORY, SPECTRUM_K

from .options import config_from_options, training_options

# what a figure path given to a debugger command may end in (matplotlib picks the format from it)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")

PROMPT = "(minicnn) "
# 'step N' prints at most this many step lines (every k-th step when N is larger)
STEP_LINES = 20
# a long 'until' prints where it is every this many seconds
PROGRESS_EVERY_S = 2.0


class Every:
    """An on_step callback that prints a progress line at most every ``seconds``."""

    def __init__(self, seconds):
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self, rec):
        if time.monotonic() - self.last >= self.seconds:
            self.last = time.monotonic()
            click.echo(f"  ... {step_line(rec)}")


# --------------------------------------------------------------------------- formatting
def _g(v, p=6):
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{p}g}"


def step_line(rec):
    """One line per step: loss before -> after on the same batch, |g|, events."""
    after = rec.get("loss_after")
    loss = f"loss {rec['loss']:.6f}" + (f" -> {after:.6f}" if after is not None else "")
    parts = [f"step {rec['step']:>5}", f"lr {rec['lr']:<8g}", loss]
    if "grad_norm" in rec:
        parts.append(f"|g| {rec['grad_norm']:.4g}")
    if "lambda_max" in rec:
        parts.append(f"lambda_max {rec['lambda_max']:.4g}")
    ev = rec.get("events") or {}
    if ev:
        parts.append("events: " + ", ".join(ev))
    return "  ".join(parts)


def _stability(ratio):
    """lr * lambda against the stability limit 2 of gradient descent on a quadratic."""
    if not math.isfinite(ratio):
        return "(not finite)"
    return ">= 2: past the edge of stability" if ratio >= EOS_RATIO else "< 2: stable on a quadratic"


def _cost(hvps, grad_evals, seconds):
    return f"{hvps} Hessian-vector products = {grad_evals} gradient evaluations, {seconds:.2f} s"


def _parse_lrs(arg):
    text = arg.strip()
    if text.startswith("lr"):
        text = text[2:].lstrip(" =")
    vals = [v for v in text.replace(",", " ").split() if v]
    if not vals:
        raise click.UsageError("give learning rates: whatif lr=0.1,0.03")
    try:
        return [float(v) for v in vals]
    except ValueError:
        raise click.UsageError(f"bad learning rate in '{arg}'; e.g. whatif lr=0.1,0.03") from None


def _figure_arg(words, usage):
    """The figure path among a command's remaining words (None when none is given); anything else
    is a usage error (a mistyped number would otherwise become a file name)."""
    if not words:
        return None
    if len(words) > 1 or not words[0].lower().endswith(FIGURE_SUFFIXES):
        raise click.UsageError(f"{usage}: the figure path must end in {', '.join(FIGURE_SUFFIXES)}, "
                               f"got '{' '.join(words)}'")
    return words[0]


def _int_arg(arg, default, name):
    arg = arg.strip()
    if not arg:
        return default
    try:
        n = int(arg)
    except ValueError:
        raise click.UsageError(f"{name} takes a whole number, got '{arg}'") from None
    if n < 1:
        raise click.UsageError(f"{name} takes a number >= 1, got {n}")
    return n


# --------------------------------------------------------------------------- the REPL
class DebugShell(cmd.Cmd):
    """Commands over a Stepper; every line of output goes through click.echo."""
    prompt = PROMPT
    doc_header = "commands (help COMMAND for each):"

    def __init__(self, stepper, out_dir="."):
        super().__init__(stdout=sys.stdout)
        self.s = stepper
        self.out_dir = out_dir
        self.errors = 0

    # ---------------------------------------------------------------- plumbing
    def onecmd(self, line):
        from minicnn.errors import MinicnnError
        try:
            return super().onecmd(line)
        except KeyboardInterrupt:
            click.echo(f"interrupted; at step {self.s.step_count}")
        except (MinicnnError, click.ClickException) as e:
            self.errors += 1
            click.echo(f"error: {e.format_message() if isinstance(e, click.ClickException) else e}")
        except OSError as e:              # a file that cannot be written (save, slice PNG): named, one line
            self.errors += 1
            click.echo(f"error: cannot write {e.filename}: {os_reason(e)}")
        except Exception as e:            # a debugger session survives anything a command does
            self.errors += 1
            click.echo(f"error: {type(e).__name__}: {e}")
        return False

    def default(self, line):
        self.errors += 1
        click.echo(f"error: unknown command '{line.split()[0]}'; type 'help' for the list")

    def emptyline(self):
        return False

    def run_script(self, lines):
        """Run commands one per line (blank lines and # comments skipped), echoing each."""
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            click.echo(PROMPT + line)
            if self.onecmd(line):
                return

    def _where(self):
        r = self.s.record
        last = f"last step {r['step']}" if r else "no step taken yet"
        return f"at step {self.s.step_count} ({last}; next lr {self.s.next_lr:g})"

    # ---------------------------------------------------------------- commands
    def do_step(self, arg):
        # the help text (the docstring) is set below the class from STEP_LINES
        n = _int_arg(arg, 1, "step")
        if n > self.s.trainer.total:
            self.s.step(n)                     # the library's one-line error: N beyond the run's length
        every = math.ceil(n / STEP_LINES)
        for i in range(n):
            rec = self.s.step(1)[0]
            if (i + 1) % every == 0 or i == n - 1:
                click.echo(step_line(rec))

    def do_until(self, arg):
        # the help text (the docstring) is set below the class from the diagnosis's thresholds
        words = arg.split()
        if not words:
            raise click.UsageError("until needs an event: " + self.EVENTS_HELP)
        limit = None
        if len(words) > 1 and words[-1].isdigit() and not (words[0] == "step" and len(words) == 2):
            limit = int(words.pop())
        res = self.s.until(" ".join(words), max_steps=limit, on_step=Every(PROGRESS_EVERY_S))
        if res.records:
            click.echo(step_line(res.records[-1]))
        if res.hit:
            click.echo(f"stopped at step {res.records[-1]['step']} after {res.steps} step(s): "
                       f"{res.event}: {res.evidence}")
        else:
            click.echo(f"no {res.event} in {res.steps} step(s)" + (f"; {res.evidence}" if res.evidence else ""))

    EVENTS_HELP = "overshoot, spike, dead, collapse, nan, eos, loss>X, loss<X, step N"

    def complete_until(self, text, line, begidx, endidx):
        return [e for e in STEP_EVENTS + ("loss>", "loss<", "step") if e.startswith(text)]

    def do_show(self, arg):
        """show: the full record of the last step (every trace column, and its events)."""
        r = self.s.record
        if r is None:
            click.echo(f"no step taken yet; {self._where()}")
            return
        click.echo(f"step {r['step']} (epoch {r['epoch']}):")
        width = max(len(k) for k in r)
        for k, v in r.items():
            if k == "events":
                continue
            click.echo(f"  {k:<{width}}  {_g(v, 8)}")
        ev = r.get("events") or {}
        click.echo("  events" + (":" if ev else ": none"))
        for k, v in ev.items():
            click.echo(f"    {k}: {v}")

    def do_layer(self, arg):
        """layer NAME: weights, gradient and activations of one layer, with text histograms:
        the current weights, on the batch the next step will use."""
        name = arg.strip()
        if not name:
            raise click.UsageError("layer needs a name: " + ", ".join(self.s.layer_names()))
        st = self.s.layer(name)
        click.echo(f"layer {name} ({st['kind']}, output {st['out_shape']}) at step {st['step']}, "
                   f"next batch loss {st['loss']:.6f}")
        if "dead" in st:
            click.echo(f"  dead units on the batch: {100 * st['dead']:.1f}%")
        keys = [k for k in ("weight", "weight.grad", "bias", "bias.grad", "activation") if k in st]
        click.echo(f"  {'':<12}{'size':>9}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}{'norm':>12}{'zeros':>8}")
        for k in keys:
            v = st[k]
            click.echo(f"  {k:<12}{v['size']:>9}"
                       + "".join(f"{_g(v[c], 4):>12}" for c in ("mean", "std", "min", "max", "norm"))
                       + f"{100 * v['zero_share']:>7.1f}%")
        for k in ("weight", "weight.grad", "activation"):
            if k in st:
                click.echo(f"  {k} histogram:")
                for line in text_hist(*st[k]["hist"]):
                    click.echo(line)

    def complete_layer(self, text, line, begidx, endidx):
        return [n for n in self.s.layer_names() if n.startswith(text)]

    def do_whatif(self, arg):
        """whatif lr=X[,Y,...]: redo the last step from the same state and batch with other
        learning rates and show the loss on that batch after each, without committing."""
        rows = self.s.whatif(_parse_lrs(arg))
        click.echo(f"step {self.s.record['step']}, same state and batch (not committed):")
        click.echo(f"  {'lr':>10}  {'loss':>10}  {'after':>10}  {'change':>10}  {'|update|':>10}  {'alpha':>7}")
        for r in rows:
            click.echo(f"  {r['lr']:>10g}  {r['loss']:>10.6f}  {r['loss_after']:>10.6f}  {r['change']:>+10.6f}  "
                       f"{_g(r['update_norm'], 4):>10}  {_g(r['alpha'], 3):>7}"
                       + ("  (committed)" if r["committed"] else ""))

    def do_slice(self, arg):
        """slice [PNG]: the loss on the last step's batch along its update direction, from -1 to +3
        step lengths (0: before the step, 1: where it landed), with the quadratic fitted from the
        gradient and the curvature lambda along that line; as a text plot and a PNG."""
        r = self.s.record
        png = _figure_arg(arg.split(), "slice [PNG]") or (os.path.join(self.out_dir, f"slice_step{r['step']}.png")
                                                          if r else None)
        s = self.s.slice(png=png)
        click.echo(f"step {s.step} (lr {s.lr:g}): loss on its batch along the update; * measured, . quadratic, "
                   f"S start, L landed, M 1-D minimum")
        marks = [("S", 0.0, s.f0), ("L", 1.0, s.landed)]
        if math.isfinite(s.min_alpha):
            marks.append(("M", s.min_alpha, float(s.losses[s.alphas == s.min_alpha][0])))
        for line in text_plot(s.alphas, [(".", s.quadratic), ("*", s.losses)], marks, ylim=s.view_range()):
            click.echo(line)
        click.echo(f"start {s.f0:.6f}; landed {s.landed:.6f} ({s.landed - s.f0:+.6f}); "
                   f"1-D minimum {np.nanmin(s.losses):.6f} at {s.min_alpha:g} step lengths")
        quad = f"quadratic: slope <g,d> {s.slope:+.4g}, curvature along d lambda {s.lam_dir:.4g}"
        if math.isfinite(s.quad_min_alpha):
            quad += f", its minimum at {s.quad_min_alpha:.3g} step lengths"
            if s.quad_min_alpha < 0.5:
                quad += " (the step went past the mirror point: overshoot)"
        else:
            quad += " (not convex along d: no minimum)"
        click.echo(quad)
        if s.png:
            click.echo(f"figure: {s.png}")

    def do_sharpness(self, arg):
        # docstring set below the class (the size of the fixed batch)
        flag = arg.strip()
        if flag not in ("", "--per-layer", "per-layer"):
            raise click.UsageError(f"sharpness takes --per-layer or nothing, got '{flag}'")
        sh = self.s.sharpness(per_layer=bool(flag))
        ratio = sh["lr_times_lambda"]
        click.echo(f"step {sh['step']}: lambda_max {sh['lambda_max']:.5g}, lr {sh['lr']:g}, "
                   f"2/lr {sh['two_over_lr']:.5g}; lr*lambda_max {ratio:.4g} {_stability(ratio)} "
                   f"({_cost(sh['hvp_evals'], sh['grad_evals'], sh['seconds'])})")
        if "layers" in sh:
            click.echo(f"  {'layer':<10}{'lambda_max':>12}{'lr*lambda':>11}  each layer's own block of the Hessian")
            for name, r in sh["layers"].items():
                click.echo(f"  {name:<10}{_g(r['lambda_max'], 5):>12}{_g(r['lr_times_lambda'], 4):>11}  "
                           f"{_stability(r['lr_times_lambda'])}")

    def do_spectrum(self, arg):
        """spectrum [K] [PNG]: the Hessian's spectrum now, on the fixed sharpness batch: the top K
        eigenvalues (default 5, Lanczos), the trace (Hutchinson, with its standard error, and
        each layer's block trace) and the eigenvalue density (stochastic Lanczos quadrature), drawn
        with a log y axis as PyHessian draws it."""
        words = arg.split()
        k = _int_arg(words[0], SPECTRUM_K, "spectrum") if words and words[0].lstrip("+-").isdigit() else SPECTRUM_K
        rest = words[1:] if words and words[0].lstrip("+-").isdigit() else words
        png = (_figure_arg(rest, "spectrum [K] [PNG]")
               or os.path.join(self.out_dir, f"spectrum_step{self.s.step_count}.png"))
        sp = self.s.spectrum(k=k, png=png)
        lr = sp["lr"]
        click.echo(f"step {sp['step']}: top {len(sp['top'])} eigenvalues: " + ", ".join(_g(v, 5) for v in sp["top"])
                   + f"  (lr*lambda_1 {lr * sp['top'][0]:.4g} against 2)")
        click.echo(f"trace (Hutchinson, {sp['samples']} samples): {sp['trace']:.5g} +- {sp['trace_se']:.2g}; "
                   "per layer: " + ", ".join(f"{n} {_g(t, 4)}" for n, (t, _) in sp["layer_traces"].items()))
        d = sp["density"]
        click.echo(f"density: {d.ritz_values.shape[1]} Lanczos steps, Ritz values {d.ritz_values.min():.4g} .. "
                   f"{d.ritz_values.max():.4g}; figure: {sp['png']}")
        click.echo(f"cost: {_cost(sp['hvps'], sp['grad_evals'], sp['seconds'])}")

    def do_noise(self, arg):
        """noise: gradient noise on the batch the next step will use, from its per-sample gradients:
        per layer and in all, the noise scale B_noise = tr(Sigma)/|g|^2 (the batch size beyond which
        larger batches stop paying off), |g|^2 (unbiased) and tr(Sigma), the SNR B/B_noise and
        Cockpit's norm test (the batch is large enough when it is below ~0.5-0.9)."""
        r = self.s.noise()
        rep, B = r["report"], r["batch_size"]
        click.echo(f"step {r['step']}: gradient noise on the next batch ({B} images), per-sample gradients")
        click.echo(f"  {'block':<10}{'B_noise':>10}{'|g|^2':>11}{'tr(Sigma)':>11}{'SNR':>9}{'norm test':>11}")
        for name, st in [("all", rep.total)] + list(rep.layers.items()):
            click.echo(f"  {name:<10}{_g(st.b_noise, 4):>10}{_g(st.grad_sq_unbiased, 4):>11}{_g(st.tr_sigma, 4):>11}"
                       f"{_g(st.snr, 3):>9}{_g(st.norm_test, 3):>11}")
        bn = rep.total.b_noise
        if math.isfinite(bn) and bn > 0:
            side = "mostly noise" if B < bn else "mostly signal"
            click.echo(f"batch {B} against B_noise {bn:.3g}: the batch gradient is {side} (SNR {B / bn:.3g})")
        else:
            click.echo(f"B_noise {_g(bn)}: the noise swamps the estimated signal on this batch")
        click.echo(f"cost: {r['seconds']:.3g} s")

    def do_back(self, arg):
        """back [N]: restore the state N steps ago (default 1); a bounded history is kept."""
        self.s.back(_int_arg(arg, 1, "back"))
        click.echo(f"back {self._where()}")

    def do_save(self, arg):
        """save PATH: write a checkpoint of the current state (weights, momentum, data position)."""
        path = arg.strip()
        if not path:
            raise click.UsageError("save needs a path, e.g. save state.npz")
        self.s.save(path)
        click.echo(f"saved step {self.s.step_count} to {path}")

    def do_where(self, arg):
        """where: the current step and the next learning rate."""
        click.echo(self._where())

    def do_quit(self, arg):
        """quit: leave the debugger."""
        return True

    do_exit = do_quit

    def do_EOF(self, arg):
        click.echo("")
        return True


# help texts that state the library's thresholds
DebugShell.do_until.__doc__ = (
    "until EVENT [MAX_STEPS]: step until EVENT, MAX_STEPS steps, the end of the run, or NaN.\n"
    f"        EVENT: overshoot (the loss on the step's own batch rose), spike, dead (a ReLU layer >= "
    f"{100 * DEAD_LAYER:.0f}%\n        dead), collapse (constant prediction for {COLLAPSE_MIN_STEPS} steps), nan, "
    f"eos (lr * lambda_max >= {EOS_RATIO:g}),\n        loss>X, loss<X, step N.")
DebugShell.do_step.__doc__ = (
    f"step [N]: take N SGD steps (default 1, at most the run's length), one line each as they go (for N > "
    f"{STEP_LINES}:\n        every k-th step, k = N / {STEP_LINES}, and the last): lr, the loss on the step's "
    f"batch before ->\n        after the step, the gradient norm, events. Ctrl-C stops after the current step.")
DebugShell.do_sharpness.__doc__ = (f"sharpness [--per-layer]: lambda_max of the loss Hessian now (fixed batch of "
                                   f"{SHARPNESS_SAMPLES}), against 2/lr;\n        --per-layer: also each parameter "
                                   f"layer's own lambda_max (its block of the Hessian).")


@click.command("debug")
@training_options
@click.option("--from", "from_run", type=click.Path(exists=True, file_okay=False), default=None,
              help="A run directory to replay (its config.json replaces the training options).")
@click.option("--step", "at_step", type=click.IntRange(0), default=None,
              help="With --from: the recorded step to rebuild (default: the last one).")
@click.option("--commands", type=click.File("r"), default=None,
              help="Run the commands in this file (one per line) instead of prompting.")
@click.option("--history", type=click.IntRange(1), default=None,
              help=f"Steps 'back' can undo (default {HISTORY}).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for slice and spectrum figures (default: the --from run directory, else the current one).")
def debug_command(from_run, at_step, commands, history, out, **kw):
    """Step through SGD like pdb: step, until EVENT, show, layer, whatif, slice, sharpness, spectrum,
    noise, back.

    Starts before step 0 of the run the training options describe, or, with --from RUN_DIR
    --step T, right after step T of a recorded run, rebuilt by replay from its nearest checkpoint
    and checked against the recorded loss. Reads commands from --commands FILE or piped standard
    input when given; 'help' lists them.

    \b
    Example:
      minicnn debug --lr 0.5 --arch tiny
      minicnn debug --from runs/x --step 1412
      printf 'until overshoot\\nwhatif lr=0.1,0.03\\nslice\\n' | minicnn debug --lr 1.0
    """
    from minicnn.stepper import Stepper
    history = history or HISTORY
    if at_step is not None and not from_run:
        raise click.UsageError("--step needs --from RUN_DIR")
    if from_run:
        from minicnn.rundir import load_run
        if at_step is None:
            steps = load_run(from_run).steps.get("step")
            if steps is None or not len(steps):
                raise click.ClickException(f"{from_run}: no steps recorded")
            at_step = int(steps[-1])
        s = Stepper.from_run(from_run, at_step, history=history)
        _echo_start(s)
        _echo_replay(s.replay)
        click.echo(step_line(s.record))
        out = out or from_run
    else:
        cfg = config_from_options(**kw)
        cfg.validate()
        s = Stepper(cfg, history=history)
        _echo_start(s)
        click.echo("at step 0, before the first step; 'help' lists the commands")
        out = out or "."
    shell = DebugShell(s, out_dir=out)
    if commands is not None:
        shell.run_script(commands)
    elif not sys.stdin.isatty():
        shell.run_script(sys.stdin)
    else:
        try:
            import readline  # noqa: F401  (line editing and tab completion)
        except ImportError:
            pass
        while True:
            try:
                shell.cmdloop()
                break
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-C) type quit to leave")


def _echo_start(s):
    t, net = s.trainer, s.net
    click.echo(f"data: {t.data.describe()}")
    click.echo(f"net:  {net.spec}  ({net.num_params:,} parameters, {net.dtype.name}, {net.device}); "
               f"{t.total:,} steps, {t.steps_per_epoch:,} per epoch, trace {t.level}; lr {s.cfg.lr:g} "
               f"({s.cfg.lr_schedule}), momentum {s.cfg.momentum:g}")


def _echo_replay(r):
    src = (f"checkpoint at step {r['checkpoint_step']}" if r["checkpoint_step"] is not None
           else "the initial weights (no readable checkpoint at or before it)" if r.get("skipped")
           else "the initial weights (no checkpoints in the run)")
    for line in r.get("warnings", []):
        click.echo(f"warning: {line}")
    for line in r.get("skipped", []):
        click.echo(f"skipped: {line}")
    click.echo(f"replayed {r['replayed_steps']} step(s) from {src} in {r['seconds']:.2f} s")
    cols = "loss" + (" and loss_after" if "loss_after" in r else "")
    if r["match"]:
        click.echo(f"step {r['step']}: replayed loss {r['loss']!r} = recorded {r['recorded_loss']!r}: "
                   f"{cols} match the record bit for bit at every replayed step")
    else:
        t, col, got, want = r["first_mismatch"]
        click.echo(f"step {r['step']}: replayed loss {r['loss']!r}, recorded {r['recorded_loss']!r}: "
                   f"DOES NOT MATCH; first difference at step {t} ({col} {got!r} vs recorded {want!r}, "
                   f"diff {got - want:+.3g})")
        click.echo(f"why: {r['reason']}")
