"""Every figure minicnn draws, in one place: a run's losses (loss.png), the inspection panels
(inspect.png), a grid of runs (sweeps, explain), the loss along one step (the debugger's slice),
the Hessian's eigenvalue density (the debugger's spectrum), the lr range test, and the text plots
the debugger prints. matplotlib is imported only when a
figure is drawn (it is slow to import).
"""
import math
import os
import textwrap

import numpy as np

from .series import smooth

# text plots (the debugger's slice): columns and rows of the character grid; widest histogram bar
TEXT_PLOT_W, TEXT_PLOT_H = 61, 15
TEXT_HIST_W = 40


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures go to files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path, dpi=110, rect=None):
    """Lay the figure out (within ``rect`` if given), write it to ``path``, close it; -> path."""
    fig.tight_layout(**({} if rect is None else {"rect": rect}))
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def draw_losses(ax, run, title=None):
    """Training loss per step (raw and smoothed) and train/val loss at evaluations on one axis."""
    steps, evals = run.steps, run.evals
    if "loss" in steps and len(steps["loss"]):
        s, loss = steps["step"], steps["loss"]
        ax.plot(s, loss, color="tab:blue", alpha=0.25, lw=0.7, label="batch loss")
        ax.plot(s, smooth(loss, max(1, len(loss) // 50)), color="tab:blue", lw=1.3, label="batch loss (smoothed)")
    if "step" in evals and len(evals["step"]):
        ax.plot(evals["step"], evals["train_loss"], "o-", color="tab:green", ms=3, label="train loss (eval)")
        ax.plot(evals["step"], evals["val_loss"], "s-", color="tab:red", ms=3, label="val loss")
    ax.axhline(np.log(max(2, run.config.get("num_classes", 10))), color="gray", ls=":", lw=0.8,
               label="ln(classes): constant prediction")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    finite = steps["loss"][np.isfinite(steps["loss"])] if "loss" in steps else np.array([])
    if finite.size:
        ax.set_ylim(0, max(3.0, min(float(np.percentile(finite, 99)) * 1.2, 20.0)))
    if title:
        ax.set_title(title, fontsize=9)


def plot_losses(run_or_path, path=None):
    """loss.png of a run: training and validation loss against steps (epochs on the top axis)."""
    from .rundir import load_run
    run = load_run(run_or_path) if isinstance(run_or_path, str) else run_or_path
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cfg = run.config.get("config", {})
    draw_losses(ax, run, title=f"{run.config.get('spec', '')}  lr={cfg.get('lr')}  "
                               f"{run.summary.get('status', '')}")
    spe = run.config.get("steps_per_epoch")
    if spe:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path or os.path.join(run.path, "loss.png"))


EVENT_COLORS = {"overshoot": "tab:orange", "spike": "tab:red", "oscillation": "tab:purple", "eos": "tab:brown",
                "dead": "black", "collapse": "tab:gray", "stall": "tab:olive", "diverged": "red",
                "overfit": "tab:cyan"}


def plot_inspect(run, diagnosis, path):
    """The multi-panel inspection figure: losses with events, gradient norms, update ratios, dead
    fractions, lambda_max against 2/lr (each layer's own lambda_max too when the trace has it), and
    the gradient noise scale B_noise against the batch size when the trace has it."""
    plt = pyplot()
    s = run.steps
    noise = "b_noise" in s
    fig, axes = plt.subplots(6 if noise else 5, 1, figsize=(9, 15.5 if noise else 13), sharex=True)
    _draw_inspect_losses(axes[0], run, diagnosis)
    steps = s.get("step", np.array([]))
    layers = [k[len("grad_norm."):] for k in s if k.startswith("grad_norm.")]
    for name in layers:
        axes[1].semilogy(steps, s[f"grad_norm.{name}"], lw=0.8, label=name)
        axes[2].semilogy(steps, s[f"update_ratio.{name}"], lw=0.8, label=name)
    axes[1].set_ylabel("gradient norm")
    axes[2].set_ylabel("|dw| / |w|")
    for k in s:
        if k.startswith("dead."):
            axes[3].plot(steps, s[k], lw=0.8, label=k[5:])
    axes[3].set_ylabel("dead ReLU fraction")
    axes[3].set_ylim(-0.02, 1.02)
    draw_sharpness(axes[4], s)
    if noise:
        draw_noise(axes[5], s, run.config.get("config", {}).get("batch_size"))
    axes[-1].set_xlabel("step")
    for a in axes[1:]:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6, loc="upper right", ncol=2)
    return _save(fig, path, dpi=100)


def _draw_inspect_losses(ax, run, diagnosis):
    draw_losses(ax, run, title=diagnosis.title)
    seen = set()
    for ev in diagnosis.events:
        c = EVENT_COLORS.get(ev.kind, "k")
        ax.axvspan(ev.step, max(ev.end, ev.step + 0.5), color=c, alpha=0.15,
                   label=None if ev.kind in seen else ev.kind)
        seen.add(ev.kind)
    if diagnosis.decisive_step is not None:
        ax.axvline(diagnosis.decisive_step, color="red", ls="--", lw=1, label="decisive step")
    ax.legend(fontsize=6, loc="upper right", ncol=2)


def _measured(steps, col):
    """(steps, values) of a column where it was measured (finite), e.g. every K steps."""
    v = np.asarray(col, dtype=np.float64)
    ok = np.isfinite(v)
    return steps[ok], v[ok]


# The sharpness panel's log axis starts this far below 2/lr: a dead layer's block reads ~1e-30, which
# would squash everything that matters (the values near 2/lr) into a sliver.
SHARPNESS_AXIS_DECADES = 4
# B_noise of one batch is the ratio of two noisy estimates (at batch 5 single readings spread over
# four decades); the panel draws the ratio of their moving averages over this many measurements,
# as McCandlish et al. average numerator and denominator, with the single readings faint behind.
NOISE_PLOT_WINDOW = 10


def draw_sharpness(ax, s):
    """lambda_max (and each layer's own lambda_max.<layer>, when measured) against 2/lr, log y."""
    steps = s.get("step", np.array([]))
    if "lambda_max" not in s:
        ax.text(0.5, 0.5, "no sharpness measured (use --sharpness-every K)", ha="center",
                va="center", transform=ax.transAxes, fontsize=8)
        ax.set_ylabel("sharpness")
        return
    x, lam = _measured(steps, s["lambda_max"])
    ax.plot(x, np.where(lam > 0, lam, np.nan), "o-", color="black", ms=3, lw=1.2, label="lambda_max")
    for k in s:
        if k.startswith("lambda_max."):
            x, lam = _measured(steps, s[k])
            label = f"{k[len('lambda_max.'):]} (its block)"
            ax.plot(x, np.where(lam > 0, lam, np.nan), "o-", ms=2, lw=0.8, label=label)
    limit = 2.0 / np.maximum(s["lr"], 1e-30)
    ax.plot(steps, limit, "k--", lw=0.8, label="2 / lr")
    ax.set_yscale("log")
    if np.isfinite(limit).any():
        ax.set_ylim(bottom=float(np.nanmin(limit)) * 10.0 ** -SHARPNESS_AXIS_DECADES)
    ax.set_ylabel("sharpness")


def draw_noise(ax, s, batch_size):
    """The gradient noise scale B_noise (all parameters and each layer), log y, against the batch
    size: above it the batch gradient is mostly noise."""
    steps = s.get("step", np.array([]))
    x, raw = _measured(steps, s["b_noise"])
    ax.plot(x, np.where(raw > 0, raw, np.nan), ".", color="black", alpha=0.25, ms=3, label="B_noise (one batch)")
    for suffix in [""] + [k[len("tr_sigma"):] for k in s if k.startswith("tr_sigma.")]:
        if f"grad_sq_unbiased{suffix}" not in s:
            continue
        x, num = _measured(steps, s[f"tr_sigma{suffix}"])
        _, den = _measured(steps, s[f"grad_sq_unbiased{suffix}"])
        num, den = smooth(num, NOISE_PLOT_WINDOW), smooth(den, NOISE_PLOT_WINDOW)
        bn = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        ax.plot(x, bn, "-", color="black" if not suffix else None, lw=1.4 if not suffix else 0.8,
                label=f"B_noise ({NOISE_PLOT_WINDOW}-reading average)" if not suffix else suffix[1:])
    if batch_size:
        ax.axhline(batch_size, color="tab:red", ls="--", lw=1, label=f"batch size {batch_size}")
    ax.set_yscale("log")
    ax.set_ylabel("gradient noise scale B_noise")


# one colour per diagnosis verdict (minicnn.diagnose) and for a run that raised
VERDICT_COLORS = {"healthy": "tab:green", "slow": "tab:olive", "overfitting": "tab:cyan",
                  "unstable": "tab:orange", "collapse": "tab:purple", "stuck": "tab:gray",
                  "diverged": "tab:red", "empty": "lightgray", "error": "black"}


def plot_grid(cells, path, title=None, panel_size=(3.4, 2.6), dpi=90):
    """One panel per run in a grid: training and validation loss against steps, each panel titled
    with its verdict and framed in the verdict's colour, the decisive step marked.

    cells: a list of dicts, one per panel:
        run            a Run or a run directory (None for a run that produced nothing)
        row, col       labels; rows and columns appear in order of first appearance
        verdict        optional; diagnose(run).verdict when missing
        decisive_step  optional; diagnose(run)'s when the verdict is missing too
        subtitle       optional second title line (e.g. the diagnosis title or an error)
        label          optional panel title (default "<verdict>")
    Used by ``minicnn sweep`` (rows architectures, columns learning rates) and to show runs side by side.
    """
    plt = pyplot()
    row_labels = list(dict.fromkeys(c.get("row", "") for c in cells))
    col_labels = list(dict.fromkeys(c.get("col", "") for c in cells))
    nr, nc = max(1, len(row_labels)), max(1, len(col_labels))
    fig, axes = plt.subplots(nr, nc, figsize=(panel_size[0] * nc, panel_size[1] * nr + 0.6), squeeze=False)
    used = set()
    legend_ax = None
    for cell in cells:
        i, j = row_labels.index(cell.get("row", "")), col_labels.index(cell.get("col", ""))
        used.add((i, j))
        if _grid_panel(axes[i][j], cell, panel_size, first_col=j == 0, last_row=i == nr - 1):
            legend_ax = legend_ax or axes[i][j]
    for i in range(nr):
        for j in range(nc):
            if (i, j) not in used:
                axes[i][j].axis("off")
    for j, lab in enumerate(col_labels):
        axes[0][j].annotate(lab, xy=(0.5, 1.0), xytext=(0, 26), xycoords="axes fraction",
                            textcoords="offset points", ha="center", va="bottom", fontsize=9, fontweight="bold")
    for i, lab in enumerate(row_labels):
        axes[i][0].annotate(lab, xy=(0, 0.5), xytext=(-42, 0), xycoords="axes fraction",
                            textcoords="offset points", ha="right", va="center", fontsize=9,
                            fontweight="bold", rotation=90)
    if legend_ax is not None:
        handles, labels = legend_ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=dpi, rect=(0.02, 0.05, 1, 0.96 if title else 1))


def _grid_panel(ax, cell, panel_size, first_col, last_row):
    """One panel of plot_grid; returns whether it drew a run's curves."""
    from .rundir import load_run
    run = cell.get("run")
    verdict, decisive = cell.get("verdict"), cell.get("decisive_step")
    if isinstance(run, str):
        run = load_run(run) if os.path.isfile(os.path.join(run, "config.json")) else None
    if run is not None and run.steps and verdict is None:
        from .diagnose import diagnose
        d = diagnose(run)
        verdict, decisive = d.verdict, d.decisive_step
        cell = {"subtitle": d.title, **cell}
    verdict = verdict or "error"
    color = VERDICT_COLORS.get(verdict, "black")
    drawn = run is not None and bool(run.steps)
    if drawn:
        draw_losses(ax, run)
        if decisive is not None and _finite(decisive):
            ax.axvline(float(decisive), color=color, ls="--", lw=1.2, label="decisive step")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    sub = str(cell.get("subtitle") or "")
    if sub and not drawn:      # nothing to plot: the message fills the panel
        ax.text(0.5, 0.5, textwrap.fill(sub, 36), ha="center", va="center", transform=ax.transAxes, fontsize=7)
        sub = ""
    sub = textwrap.shorten(sub, width=int(12 * panel_size[0]), placeholder="...") if sub else ""
    label = cell.get("label") or verdict
    ax.set_title(label + ("\n" + sub if sub else ""), fontsize=8, color=color,
                 fontweight="bold" if verdict != "healthy" else "normal")
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.0)
    ax.set_facecolor(_tint(color))
    ax.tick_params(labelsize=7)
    ax.xaxis.label.set_size(7)
    ax.yaxis.label.set_size(7)
    if not first_col:
        ax.set_ylabel("")
    if not last_row:
        ax.set_xlabel("")
    return drawn


def _finite(v):
    try:
        return np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _tint(color, amount=0.08):
    """A very light version of a colour for a panel's background."""
    from matplotlib.colors import to_rgb
    r, g, b = to_rgb(color)
    return (1 - amount * (1 - r), 1 - amount * (1 - g), 1 - amount * (1 - b))


# --------------------------------------------------------------------------- the debugger
def plot_slice(s, path):
    """The slice as a figure: measured loss, the fitted quadratic, start, landing and minimum."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(s.alphas, s.losses, "o-", ms=3, label="loss on the step's batch")
    if np.isfinite(s.quadratic).all():
        ax.plot(s.alphas, s.quadratic, "--", label=f"quadratic from gradient and curvature (lambda {s.lam_dir:.3g})")
    ax.axvline(0, color="grey", lw=0.8)
    ax.plot([0], [s.f0], "ks", label=f"start {s.f0:.4g}")
    ax.plot([1], [s.landed], "r^", ms=9, label=f"landed (lr {s.lr:g}) {s.landed:.4g}")
    if math.isfinite(s.min_alpha):
        ax.axvline(s.min_alpha, color="green", lw=0.8, ls=":", label=f"1-D minimum at {s.min_alpha:.2f} step lengths")
    ax.set_ylim(*s.view_range())
    ax.set_xlabel("step lengths along the update (0 = before, 1 = after)")
    ax.set_ylabel("batch loss")
    ax.set_title(f"step {s.step}: the loss along the update direction")
    ax.legend(fontsize=8)
    return _save(fig, path)


def text_hist(counts, edges, width=TEXT_HIST_W):
    top = max(int(np.max(counts)), 1)
    return [f"    [{edges[i]:+10.4g}, {edges[i + 1]:+10.4g})  {'#' * int(round(width * c / top)):<{width}} {int(c)}"
            for i, c in enumerate(counts)]


def text_plot(x, series, marks=(), ylim=None, width=TEXT_PLOT_W, height=TEXT_PLOT_H):
    """A character plot. series: [(char, y values)], drawn in order (later on top); marks:
    [(char, x, y)] single points drawn last; ylim: (lo, hi), default the range of the first
    series. Returns the lines, y axis labelled on the left, integer x values ticked below."""
    if ylim is None:
        y0 = np.asarray(series[0][1], dtype=np.float64)
        y0 = y0[np.isfinite(y0)]
        ylim = (float(y0.min()), float(y0.max())) if len(y0) else (0.0, 1.0)
    lo, hi = ylim
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = float(x[0]), float(x[-1])
    def col(xv):
        return int(round((xv - x0) / (x1 - x0) * (width - 1)))
    grid = [[" "] * width for _ in range(height)]

    def put(ch, xv, yv):
        if not (math.isfinite(xv) and math.isfinite(yv)) or yv < lo or yv > hi:
            return
        c, r = col(xv), height - 1 - int(round((yv - lo) / (hi - lo) * (height - 1)))
        if 0 <= c < width and 0 <= r < height:
            grid[r][c] = ch
    if x0 <= 0 <= x1:
        for r in range(height):
            grid[r][col(0.0)] = "|"
    for ch, y in series:
        for xv, yv in zip(x, y):
            put(ch, float(xv), float(yv))
    for ch, xv, yv in marks:
        put(ch, xv, yv)
    lines = []
    for r, row in enumerate(grid):
        label = f"{hi - (hi - lo) * r / (height - 1):10.4f}" if r in (0, height // 2, height - 1) else " " * 10
        lines.append(f"{label} |{''.join(row)}")
    ticks, labels = [" "] * width, [" "] * (width + 4)
    for k in range(math.ceil(x0), math.floor(x1) + 1):
        ticks[col(k)] = "^"
        for j, ch in enumerate(f"{k:g}"):
            if col(k) + j < len(labels):
                labels[col(k) + j] = ch
    lines.append(" " * 12 + "".join(ticks))
    lines.append(" " * 12 + "".join(labels).rstrip())
    return lines


def plot_density(dens, path, top=None, lr=None, title=None):
    """The Hessian's eigenvalue density (minicnn.hessian.DensityResult) with a log y axis, as
    PyHessian draws it; the top eigenvalues (``top``) and 2/lr (``lr``) marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    floor = max(float(dens.density.max()) * 1e-8, 1e-300)
    ax.semilogy(dens.grid, np.maximum(dens.density, floor), color="tab:blue", lw=1.2, label="density (SLQ)")
    if top is not None:
        for i, v in enumerate(top):
            ax.axvline(v, color="tab:orange", lw=0.8, ls=":", label="top eigenvalues (Lanczos)" if i == 0 else None)
    if lr:
        ax.axvline(2.0 / lr, color="black", lw=1, ls="--", label=f"2 / lr = {2.0 / lr:.3g}")
    ax.set_ylim(floor, None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title(title or "Hessian eigenvalue density", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- the lr range test
def plot_lr_find(res, path, lr=None):
    """Smoothed loss against lr (log scale) with the suggested lr, the blow-up lr, 2/lambda_max at
    initialisation and (optionally) the user's lr marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(res.lrs, res.losses, color="tab:blue", alpha=0.25, lw=0.8, label="batch loss")
    ax.plot(res.lrs, res.smoothed, color="tab:blue", lw=1.6, label="smoothed loss")
    ax.set_xscale("log")
    finite = res.smoothed[np.isfinite(res.smoothed)]
    raw = res.losses[np.isfinite(res.losses)]
    if finite.size:
        lo, hi = float(min(np.min(finite), np.percentile(raw, 5))), float(finite[0])
        ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo) - 0.05), max(hi, lo) * 1.6 + 0.1)
    marks = [(res.suggested_lr, "tab:green", "-", f"suggested (steepest descent) {res.suggested_lr:.3g}"),
             (res.min_loss_lr, "tab:olive", ":", f"loss minimum {res.min_loss_lr:.3g}"),
             (res.blowup_lr, "tab:red", "-", f"loss starts to blow up {res.blowup_lr:.3g}"),
             (res.two_over_lambda, "black", "--", f"2/lambda_max at init {res.two_over_lambda:.3g}")]
    if lr is not None:
        marks.append((lr, "tab:purple", "-.", f"your lr {lr:g}"))
    for x, c, ls, label in marks:
        if x is not None and math.isfinite(x) and x > 0:
            ax.axvline(x, color=c, ls=ls, lw=1.3, label=label)
    if res.suggested_lr and math.isfinite(res.suggested_lr):
        i = int(np.argmin(np.abs(np.log(res.lrs) - np.log(res.suggested_lr))))
        ax.plot([res.lrs[i]], [res.smoothed[i]], "o", color="tab:green", ms=6)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("cross-entropy loss")
    spec = res.config.get("arch", "")
    ax.set_title(f"lr range test: {spec}, batch {res.config.get('batch_size')}, "
                 f"momentum {res.config.get('momentum')}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


# --------------------------------------------------------------------------- verify
def plot_verify(v, run, path):
    """The recorded run's loss, and from the replayed step on both branches: as recorded and with the fix."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    s = run.steps
    ax.plot(s["step"], smooth(s["loss"], 20), color="lightgray", lw=1.2, label="the recorded run (smoothed)")
    for b, color in ((v.recorded, "tab:red"), (v.fixed, "tab:green")):
        steps = [r["step"] for r in b.records]
        ax.plot(steps, smooth([r["loss"] for r in b.records], 20), color=color, lw=1.4,
                label=f"{b.label}: {b.verdict}")
    ax.axvline(v.start, color="black", ls="--", lw=0.9, label=f"replayed to step {v.start}")
    ax.axhline(np.log(max(2, run.config.get("num_classes", 10))), color="gray", ls=":", lw=0.8,
               label="ln(classes): constant prediction")
    finite = np.asarray(s["loss"])[np.isfinite(s["loss"])]
    if finite.size:
        ax.set_ylim(0, max(3.0, min(float(np.percentile(finite, 99)) * 1.2, 20.0)))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"verify: {v.fix}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)
