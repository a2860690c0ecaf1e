"""``minicnn explain``: the student's question, reproduced on the built-in data and answered.

    "I trained many simple CNNs with plain SGD at lr = 0.1. One trains fine, one's loss keeps
     jumping around and it never learns, one learns and then its training and validation loss
     suddenly rise and stay up on a plateau. What is going on?"

Four deterministic runs (a sweep: run in parallel, resumable), each diagnosed from its own trace:

    result = explain("runs/explain")         # or quick=True for the reduced size the tests use
    print(result.text)                       # the verdict and mechanism of each run, in numbers
    result.figure                            # explain.png: the four loss curves side by side

The first three are the question: plain SGD at lr = 0.1 on the same data with the same seed and
batch size. (1) is the default network; (2) is softmax regression on un-normalised inputs, whose
loss is far sharper; (3) is the default network with ONE step at lr 10 injected at step 100
-- a stand-in for the outsized step that throws a real run off its valley, because no network
tried at a constant lr 0.1 on the built-in data collapsed after learning within a demo-sized run
(see INJECT_LR). The fourth answers the follow-up "is getting stuck on this plateau possible at
every learning rate?": a network initialised on the plateau stays there even at lr = 1e-4.
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


# Same data, seed, batch size and lr = 0.1 for the first three; what differs is in each Case.
COMMON = dict(data="shapes", lr=0.1, batch_size=32, momentum=0.0, weight_decay=0.0, seed=0, trace="full",
              sharpness_every=SHARPNESS_EVERY)
# case 3's single outsized step (100x the lr). At a constant lr 0.1 no network tried on the built-in
# data (about 40 configurations: wider, deeper, bottlenecked, larger init, larger inputs, smaller
# batches) learned and then stayed on a plateau within a demo-sized run: they either died in the
# first steps or recovered from every catapult. So the demo injects the step, and says so.
INJECT_LR = 10.0
# ... at this step, when the network has learned (loss ~1 from 2.3) but is not settled. With the
# demo's 2,000 training images it kills every unit of relu1 and relu2 (same-batch loss 0.62 -> 941):
# a plateau with exactly zero gradient below the classifier, left never. Measured on 6,000 images the
# network was further along at step 100, 0.1-4% of relu1 survived (lr 10 or 30), and those few units
# pulled it off the plateau 100-550 steps later -- a plateau is only permanent when nothing survives.
INJECT_STEP = 100
FULL = dict(n_train=2000, n_val=1000, steps=600)   # same data and first steps as QUICK
QUICK = dict(n_train=2000, n_val=500, steps=300)

CASES = [
    Case("1-stable", "lr 0.1: trains fine", "healthy",
         dict(arch="small"),
         "the default small CNN (two conv blocks with max-pooling, then fc10)",
         "lr x lambda_max is below 2 for most of the run: each step lowers the loss of the valley it is in, "
         "and the occasional overshoot on one batch is noise the next steps absorb. Where lr x lambda_max "
         "does pass 2 (the edge of stability), the overshoot along that one sharp direction moves the "
         "weights to a flatter region, and the loss carries on down."),
    Case("2-jumping", "lr 0.1: jumps around, never learns", "unstable",
         dict(arch="linear", input_scale=10.0),
         "softmax regression (fc10) on the same images with pixels in [0, 10] instead of [0, 1] "
         "(un-normalised inputs)",
         "the curvature of this loss grows with the square of the input scale, so here lr x lambda_max is "
         "far above 2 from the first step: each step overshoots the valley it is in (the same-batch loss "
         "rises), lands somewhere no better, and the next step overshoots again. The weights cannot die "
         "(no ReLU), so the loss never settles: it jumps around far above ln 10 for the whole run."),
    Case("3-collapse", "lr 0.1: learns, then rises onto a plateau", "collapse",
         dict(arch="small", lr_schedule="INJECT"),
         "the default network at lr 0.1, except ONE step at lr 10 at step 100 (a stand-in for "
         "the one outsized step -- lr x curvature far above 2 -- that throws a real run off its valley)",
         "the big step overshoots so far that it lands where most ReLUs output 0 for every input and the "
         "network predicts one class: a flat region where the gradient is near zero, so nothing pulls the "
         "weights back -- training and validation loss jump up together to ln 10 and stay there."),
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


def case_configs(quick=False, device="cpu"):
    """(case, TrainConfig dict) for each case, trained on ``device``."""
    from .train import TrainConfig
    size = QUICK if quick else FULL
    out = []
    for c in CASES:
        fields = {**COMMON, **size, **c.config, "device": device}
        if fields.get("lr_schedule") == "INJECT":      # one step at INJECT_LR at step INJECT_STEP
            t = INJECT_STEP
            fields["lr_schedule"] = f"0:{fields['lr']:g},{t}:{INJECT_LR:g},{t + 1}:{fields['lr']:g}"
        cfg = TrainConfig(**fields)
        cfg.validate()
        out.append((c, cfg.to_dict()))
    return out


def explain(out, quick=False, workers=None, rerun=False, on_start=None, on_result=None, device="cpu"):
    """Run the four cases into ``out`` (skipping those already done), diagnose, draw, explain."""
    from .diagnose import diagnose
    from .plots import plot_grid
    from .runs import load_run
    from .sweep import Task, run_sweep

    tasks = [Task(c.key, cfg, {"case": c.key}) for c, cfg in case_configs(quick, device)]
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
             "is how sharp the loss is where the weights are (lr x lambda_max against 2), and whether a step "
             "lands on a flat region it cannot leave.", ""]
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
