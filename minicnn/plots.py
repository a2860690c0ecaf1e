"""Matplotlib figures from runs. Imported only when a figure is drawn (matplotlib is slow to import)."""
import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(values, window):
    """Trailing moving average (NaN-aware) over ``window`` steps."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    ok = np.isfinite(v)
    c = np.cumsum(np.where(ok, v, 0.0))
    k = np.cumsum(ok)
    c = np.concatenate([[0.0], c])
    k = np.concatenate([[0], k])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    cnt = k[idx] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[idx] - c[lo]) / np.maximum(cnt, 1), np.nan)


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
    from .runs import load_run
    run = load_run(run_or_path) if isinstance(run_or_path, str) else run_or_path
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cfg = run.config.get("config", {})
    draw_losses(ax, run, title=f"{run.config.get('spec', '')}  lr={cfg.get('lr')}  "
                               f"{run.summary.get('status', '')}")
    spe = run.config.get("steps_per_epoch")
    if spe:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    import os
    path = path or os.path.join(run.path, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


EVENT_COLORS = {"overshoot": "tab:orange", "spike": "tab:red", "oscillation": "tab:purple", "eos": "tab:brown",
                "dead": "black", "collapse": "tab:gray", "stall": "tab:olive", "diverged": "red",
                "overfit": "tab:cyan"}


def plot_inspect(run, diagnosis, path):
    """The multi-panel inspection figure: losses with events, gradient norms, update ratios,
    dead fractions, and lambda_max against 2/lr."""
    plt = _plt()
    s = run.steps
    fig, axes = plt.subplots(5, 1, figsize=(9, 13), sharex=True)
    ax = axes[0]
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
    if "lambda_max" in s:
        ok = np.isfinite(s["lambda_max"])
        axes[4].semilogy(steps[ok], s["lambda_max"][ok], "o-", ms=3, label="lambda_max")
        axes[4].semilogy(steps, 2.0 / np.maximum(s["lr"], 1e-30), "k--", lw=0.8, label="2 / lr")
    else:
        axes[4].text(0.5, 0.5, "no sharpness measured (use --sharpness-every K)", ha="center",
                     va="center", transform=axes[4].transAxes, fontsize=8)
    axes[4].set_ylabel("sharpness")
    axes[4].set_xlabel("step")
    for a in axes[1:]:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    import os
    import textwrap
    from .runs import load_run
    plt = _plt()
    row_labels = list(dict.fromkeys(c.get("row", "") for c in cells))
    col_labels = list(dict.fromkeys(c.get("col", "") for c in cells))
    nr, nc = max(1, len(row_labels)), max(1, len(col_labels))
    fig, axes = plt.subplots(nr, nc, figsize=(panel_size[0] * nc, panel_size[1] * nr + 0.6), squeeze=False)
    used = set()
    legend_ax = None
    for cell in cells:
        i, j = row_labels.index(cell.get("row", "")), col_labels.index(cell.get("col", ""))
        ax = axes[i][j]
        used.add((i, j))
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
        if run is not None and run.steps:
            draw_losses(ax, run)
            if decisive is not None and _finite(decisive):
                ax.axvline(float(decisive), color=color, ls="--", lw=1.2, label="decisive step")
            legend_ax = legend_ax or ax
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        sub = str(cell.get("subtitle") or "")
        if sub and (run is None or not run.steps):      # nothing to plot: the message fills the panel
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
        if j > 0:
            ax.set_ylabel("")
        if i < nr - 1:
            ax.set_xlabel("")
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
    fig.tight_layout(rect=(0.02, 0.05, 1, 0.96 if title else 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
