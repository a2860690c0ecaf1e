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
