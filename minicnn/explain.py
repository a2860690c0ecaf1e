"""``minicnn explain``: the student's question, reproduced on the built-in data and answered.

    "I trained many simple CNNs with plain SGD at lr = 0.1. One trains fine, one's loss keeps
     jumping around and it never learns, one learns and then its training and validation loss
     suddenly rise and stay up on a plateau. What is going on?"

Four deterministic runs (a sweep: run in parallel, resumable), each diagnosed from its own trace:

    result = explain("runs/explain")         # or quick=True for the reduced size the tests use
    print(result.text)                       # the verdict and mechanism of each run, in numbers
    result.figure                            # explain.png: the four loss curves side by side

The first three are the question (plain SGD, lr = 0.1, the same data and seed; only the network
differs); the fourth answers the follow-up "is getting stuck on this plateau possible at every
learning rate?": a network initialised on the plateau stays there even at lr = 1e-4.
"""
import math
import os
from dataclasses import dataclass, field

from .errors import ConfigError

# lambda_max of the loss Hessian is measured every this many steps (power iteration on a fixed
# batch of 256; 2 x 10-30 gradient evaluations each), so lr * lambda_max can be compared with 2.
SHARPNESS_EVERY = 100


@dataclass
class Case:
    key: str        # run directory name
    label: str      # what the student saw (the panel title)
    expect: str     # the verdict this case reproduces
    config: dict    # TrainConfig fields
    setup: str      # what is different about this network, in a line
    answer: str     # what is going on behind the scenes (the mechanism; the numbers come from the run)


# Same data, seed, batch size and lr = 0.1 for the first three: only the network differs.
COMMON = dict(data="shapes", lr=0.1, batch_size=32, momentum=0.0, weight_decay=0.0, seed=0, trace="full",
              sharpness_every=SHARPNESS_EVERY)
FULL = dict(n_train=6000, n_val=1000, steps=900)
QUICK = dict(n_train=2000, n_val=500, steps=300)

CASES = [
    Case("1-stable", "lr 0.1: trains fine", "healthy",
         dict(arch="small"),
         "the default small CNN (two conv blocks with max-pooling, then fc10)",
         "lr x lambda_max stays below 2: every step lowers the loss of the valley it is in, and the "
         "occasional overshoot on one batch is noise the next steps absorb."),
    Case("2-jumping", "lr 0.1: jumps around, never learns", "unstable",
         dict(arch="linear", input_scale=10.0),
         "softmax regression (fc10) on the same images with pixels in [0, 10] instead of [0, 1] "
         "(un-normalised inputs)",
         "the curvature of this loss grows with the square of the input scale, so here lr x lambda_max is "
         "far above 2 from the first step: each step overshoots the valley it is in (the same-batch loss "
         "rises), lands somewhere no better, and the next step overshoots again. The weights cannot die "
         "(no ReLU), so the loss never settles: it jumps around far above ln 10 for the whole run."),
    Case("3-collapse", "lr 0.1: learns, then rises onto a plateau", "collapse",
         dict(arch="conv4k1-relu-conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10"),
         "a network whose first layer is a 1x1 convolution (4 units, each a single weight per pixel)",
         "as it learns the loss sharpens; one step with lr x curvature > 2 throws the weights off the "
         "valley onto a flat region (dead ReLUs / a constant prediction) where the gradient is near "
         "zero, so nothing pulls them back -- training and validation loss rise together and stay up."),
    Case("4-stuck-lr1e-4", "lr 0.0001: initialised on the plateau", "stuck",
         dict(arch="small", init="dead", lr=1e-4),
         "the default network with every ReLU dead at initialisation (biases -10)",
         "the plateau is a property of where the weights are, not of the learning rate: with every "
         "ReLU dead no gradient flows, and no learning rate -- not even 1e-4 -- gets the network off it."),
]


@dataclass
class ExplainResult:
    out: str
    cases: list                       # the Case objects, in order
    rows: list                        # sweep summary rows, in order
    diagnoses: list                   # minicnn.diagnose.Diagnosis per case
    figure: str = None
    text: str = ""
    matches: list = field(default_factory=list)   # verdict == case.expect, per case

    @property
    def all_match(self):
        return all(self.matches)


def case_configs(quick=False):
    """(case, TrainConfig dict) for each case."""
    from .train import TrainConfig
    size = QUICK if quick else FULL
    out = []
    for c in CASES:
        cfg = TrainConfig(**{**COMMON, **size, **c.config})
        cfg.validate()
        out.append((c, cfg.to_dict()))
    return out


def explain(out, quick=False, workers=None, rerun=False, on_start=None, on_result=None):
    """Run the four cases into ``out`` (skipping those already done), diagnose, draw, explain."""
    from .diagnose import diagnose
    from .plots import plot_grid
    from .runs import load_run
    from .sweep import Task, run_sweep

    tasks = [Task(c.key, cfg, {"case": c.key}) for c, cfg in case_configs(quick)]
    res = run_sweep(tasks, out, workers=workers, rerun=rerun, on_start=on_start, on_result=on_result)
    diagnoses, matches, cells = [], [], []
    for c, row in zip(CASES, res.rows):
        if row.get("status") == "error":
            raise ConfigError(f"explain: run {c.key} failed: {row.get('error')}")
        run = load_run(row["run_dir"])
        d = diagnose(run)
        diagnoses.append(d)
        matches.append(d.verdict == c.expect)
        cells.append({"run": run, "row": "plain SGD, same data and seed", "col": c.key, "label": c.label,
                      "verdict": d.verdict, "decisive_step": d.decisive_step, "subtitle": d.title})
    figure = plot_grid(cells, os.path.join(out, "explain.png"),
                       title="What is going on at lr = 0.1? (minicnn explain" + (" --quick)" if quick else ")"))
    result = ExplainResult(out, list(CASES), res.rows, diagnoses, figure, matches=matches)
    result.text = report(result)
    with open(os.path.join(out, "explain.txt"), "w") as f:
        f.write(result.text + "\n")
    return result


def _sharpness_line(run):
    """lr * lambda_max against 2 over the run, from the trace."""
    import numpy as np
    s = run.steps
    lam = s.get("lambda_max")
    if lam is None or not np.isfinite(lam).any():
        return None
    ok = np.isfinite(lam)
    prod = (s["lr"] * lam)[ok]
    steps = s["step"][ok].astype(int)
    j = int(np.argmax(prod))
    return (f"lr x lambda_max: {prod[0]:.2f} at step 0, largest {prod[j]:.2f} at step {steps[j]}, "
            f"{prod[-1]:.2f} at step {steps[-1]} (stable gradient descent needs < 2)")


def report(result):
    from .runs import load_run
    lines = ["The question: plain SGD at lr = 0.1 -- one network trains fine, one jumps around and never "
             "learns, one learns and then rises onto a plateau. Same data, same seed, same lr; what differs "
             "is where the weights are and how sharp the loss is there.", ""]
    for i, (c, row, d) in enumerate(zip(result.cases, result.rows, result.diagnoses)):
        cfg = row.get("run_dir") and load_run(row["run_dir"]).config.get("config", {})
        tick = "" if result.matches[i] else f"   [expected {c.expect}, got {d.verdict}]"
        lines.append(f"({i + 1}) {c.label}{tick}")
        lines.append(f"    network: {c.setup}; lr {cfg.get('lr'):g}, batch {cfg.get('batch_size')}, "
                     f"{row.get('steps')} steps; final val acc {100 * row.get('final_val_acc', math.nan):.1f}%")
        lines.append("    diagnosis: " + d.text.replace("\n", "\n    "))
        sl = _sharpness_line(load_run(row["run_dir"]))
        if sl:
            lines.append("    " + sl)
        lines.append("    what is going on: " + c.answer)
        lines.append("")
    lines.append(f"figure: {result.figure}")
    return "\n".join(lines)
