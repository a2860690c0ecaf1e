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
