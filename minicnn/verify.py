"""A diagnosis checks its own advice: replay the run up to the decisive step, then train on both ways
-- as recorded, and with the suggested change -- from the same state and batches.

    v = verify("runs/x")                # the diagnosis's cause.change, replayed
    v.recorded.verdict, v.fixed.verdict # e.g. collapse, healthy
    v.matches                           # the as-recorded replay reproduced the recorded losses bit for bit
    print(v.text)

The kinds of change (minicnn.diagnose.causes): ``lr_at`` (the lr of a few steps set to another value:
an lr spike removed), ``lr_scale`` (the lr from a step on multiplied by a factor), both replayed from the
checkpoint before their first step, and ``restart`` (a config change -- inputs, initialisation,
momentum, weight decay -- that holds from step 0: both branches train from step 0).
"""
import math
from dataclasses import dataclass, field

import numpy as np

from .config import TrainConfig
from .diagnose import diagnose
from .errors import ConfigError
from .rundir import Run, list_checkpoints, load_run, mismatch_reason, not_replayable
from .series import smooth
from .trainer import Trainer

# Steps trained on each branch after the decisive step, unless asked otherwise: long enough for a
# collapse to show as a plateau (COLLAPSE_MIN_STEPS is 50) and for a recovered run to learn again.
VERIFY_STEPS = 300
# The fix worked when the fixed branch is not diagnosed as the original problem and its smoothed loss
# at the end is below the recorded branch's by at least this share.
FIX_GAIN = 0.1
_ERRSTATE = dict(over="ignore", invalid="ignore", divide="ignore")


@dataclass
class Branch:
    label: str
    records: list = field(default_factory=list)      # the replayed steps' trace records
    verdict: str = ""
    title: str = ""
    final_loss: float = math.nan                     # smoothed training loss at the end
    probe_acc: float = math.nan                      # held-out accuracy of the last probe


@dataclass
class Verification:
    run: str
    verdict: str                                     # the recorded run's
    cause: str
    fix: str
    start: int                                       # the first step trained both ways
    steps: int
    recorded: Branch
    fixed: Branch
    matches: bool                                    # the as-recorded branch reproduced the record bit for bit
    mismatch: str = ""
    png: str = None

    @property
    def fixed_it(self):
        return (self.fixed.verdict != self.verdict and np.isfinite(self.fixed.final_loss)
                and not self.fixed.final_loss > (1 - FIX_GAIN) * self.recorded.final_loss)

    @property
    def text(self):
        lines = [f"verify {self.run}: {self.verdict} (cause {self.cause}); the fix: {self.fix}",
                 f"  replayed to step {self.start}, then {self.steps} steps both ways from the same state and batches"]
        lines.append("  as recorded: " + ("reproduces the recorded losses bit for bit" if self.matches
                                          else f"differs from the record: {self.mismatch}"))
        for b in (self.recorded, self.fixed):
            lines.append(f"  {b.label:<12s} {b.verdict:<10s} final smoothed loss {b.final_loss:.4g}, "
                         f"probe accuracy {100 * b.probe_acc:.0f}%  ({b.title})")
        lines.append("  result: " + ("the fix removes the problem" if self.fixed_it else
                                     "the fix does not remove the problem in these steps"))
        return "\n".join(lines)


def verify(run_dir, steps=VERIFY_STEPS, png=None):
    """Replay ``run_dir`` to its decisive step and train ``steps`` steps both ways; see the module docstring."""
    run = load_run(run_dir)
    if not_replayable(run):
        raise ConfigError(not_replayable(run))
    d = diagnose(run)
    change = d.cause.change
    if d.verdict in ("healthy", "empty"):
        raise ConfigError(f"{run_dir}: the diagnosis is '{d.verdict}': there is nothing to fix and verify")
    if change is None:
        raise ConfigError(f"{run_dir}: the diagnosis ({d.verdict}, cause {d.cause.name}) suggests no change that "
                          f"can be replayed; --verify replays lr, input, initialisation, momentum and weight-decay "
                          f"fixes")
    if not list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir}: no checkpoints to replay from (trained with --checkpoint-every 0); "
                          f"train again with --checkpoint-every K")
    if "update_ratio." not in "".join(run.steps):
        raise ConfigError(f"{run_dir}: the trace is too light to verify (trace 'off'); train with --trace light "
                          f"or full")
    cfg = TrainConfig.from_dict(run.config["config"])
    start = 0 if change["kind"] == "restart" else int(change["from_step"])
    n = max(1, min(int(steps), int(run.steps["step"][-1]) + 1 - start)) if start <= run.steps["step"][-1] else 1
    with np.errstate(**_ERRSTATE):
        trainer = _replay_to(run_dir, cfg, start)
        snapshot = trainer.state()
        recorded = _train(trainer, n, "as recorded")
        matches, mismatch = _compare(recorded.records, run)
        if not matches:
            mismatch += f" ({mismatch_reason(run, trainer.data.describe())})"
        if change["kind"] == "restart":
            trainer = Trainer(TrainConfig(**{**cfg.to_dict(), **change["config"]}))
        else:
            trainer.load_state(snapshot)
        fixed = _train(trainer, n, "with the fix", _lr_override(trainer, change))
    for b in (recorded, fixed):
        _judge(b, run, start)
    v = Verification(run_dir, d.verdict, d.cause.name, d.cause.fix, start, n, recorded, fixed, matches, mismatch)
    if png:
        from .plots import plot_verify
        v.png = plot_verify(v, run, png)
    return v


def _replay_to(run_dir, cfg, start):
    """A Trainer in the state right before step ``start``, from the nearest checkpoint at or before it."""
    trainer = Trainer(cfg)
    ckpts = [(k, p) for k, p in list_checkpoints(run_dir) if k <= start]
    if ckpts:
        trainer.resume(ckpts[-1][1])
    while trainer.step_count < start:
        trainer.step(record=False)
    return trainer


def _lr_override(trainer, change):
    """step -> lr of the fixed branch (None: the schedule's)."""
    if change["kind"] == "lr_at":
        spike = set(change["steps"])
        return lambda t: change["lr"] if t in spike else None
    if change["kind"] == "lr_scale":
        return lambda t: trainer.schedule(t) * change["factor"] if t >= change["from_step"] else None
    return lambda t: None


def _train(trainer, n, label, lr_of=lambda t: None):
    b = Branch(label)
    for _ in range(n):
        rec = trainer.step(lr=lr_of(trainer.step_count))
        b.records.append(rec)
        if not math.isfinite(rec["loss"]):
            break
    return b


def _compare(records, run):
    """Whether every replayed loss equals the recorded one, bit for bit (and where not, the first)."""
    where = {int(t): i for i, t in enumerate(run.steps["step"])}
    for rec in records:
        i = where.get(rec["step"])
        if i is None:
            return True, ""
        a, b = float(rec["loss"]), float(run.steps["loss"][i])
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            return False, f"step {rec['step']}: loss {a!r} replayed, {b!r} recorded"
    return True, ""


def _judge(branch, run, start):
    """The branch's verdict: the recorded steps before ``start`` and the branch's own after, diagnosed."""
    cols = list(run.steps)
    before = {c: np.asarray(run.steps[c][:start], dtype=np.float64) for c in cols}
    mine = {c: np.array([float(r.get(c, math.nan)) for r in branch.records]) for c in cols}
    steps = {c: np.concatenate([before[c], mine[c]]) for c in cols}
    d = diagnose(Run(run.path, run.config, steps, {}, {}))
    branch.verdict, branch.title = d.verdict, d.title
    loss = smooth(steps["loss"], 20)
    branch.final_loss = float(loss[-1]) if len(loss) else math.nan
    acc = mine.get("probe_acc", np.array([]))
    acc = acc[np.isfinite(acc)]
    branch.probe_acc = float(acc[-1]) if len(acc) else math.nan
