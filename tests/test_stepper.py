"""minicnn.Stepper: the same steps as train(), what-if without committing, rewind, slices, replay."""
import math
import os

import numpy as np
import pytest

from minicnn import MinicnnError, Stepper, load_run, train
from minicnn import diagnose as dg
from minicnn.data import load_shapes
from minicnn.errors import ConfigError
from minicnn.rundir import list_checkpoints

TINY = dict(arch="tiny", batch_size=32)


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=256, n_val=64)


def test_steps_are_train_steps_bit_for_bit(shapes):
    """The Stepper drives the same Trainer as train(): identical records, momentum and all."""
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-3, steps=12, **TINY)
    r = train(data=shapes, on_step=(seen := []).append, **kw)
    s = Stepper(data=shapes, **kw)
    recs = s.step(12)
    assert [x["loss"] for x in recs] == r.losses
    for a, b in zip(recs, seen):
        for k in ("loss_after", "grad_norm", "grad_cos", "alpha", "dead.relu1"):
            assert _same(a.get(k, math.nan), b.get(k, math.nan)), (a["step"], k)
    assert s.step_count == 12 and s.record is recs[-1]


def test_whatif_at_own_lr_reproduces_committed_step_and_commits_nothing(shapes):
    kw = dict(lr=0.5, momentum=0.9, steps=30, **TINY)
    s = Stepper(data=shapes, **kw)
    s.step(4)
    committed = s.record
    rows = s.whatif(lr=[0.5, 0.05, 0.0])
    assert rows[0]["committed"] and not rows[1]["committed"]
    assert rows[0]["loss"] == committed["loss"]
    assert rows[0]["loss_after"] == committed["loss_after"]            # bit for bit
    assert rows[1]["loss_after"] != committed["loss_after"]
    assert rows[2]["loss_after"] == committed["loss"]                  # lr 0: the weights did not move
    assert s.record is committed and s.step_count == 4
    # nothing was committed: the run continues exactly as one that never asked
    twin = Stepper(data=shapes, **kw)
    twin.step(4)
    assert [r["loss"] for r in s.step(3)] == [r["loss"] for r in twin.step(3)]


def test_back_then_step_reproduces_the_same_losses(shapes):
    s = Stepper(data=shapes, lr=0.4, momentum=0.5, steps=30, history=5, **TINY)
    first = s.step(6)
    assert s.back(4) == 2
    assert s.record["step"] == 1 and s.record is first[1]
    again = s.step(4)
    for a, b in zip(again, first[2:]):
        keys = ("step", "loss", "loss_after", "grad_cos")
        assert tuple(a[k] for k in keys) == tuple(b[k] for k in keys)
    with pytest.raises(MinicnnError, match="in memory"):
        s.back(6)                       # history holds 5


def test_until_stops_at_the_event(shapes):
    s = Stepper(data=shapes, lr=2.0, steps=40, **TINY)
    u = s.until("overshoot", max_steps=30)
    assert u.hit and s.record["step"] == u.steps - 1
    r = s.record
    assert r["loss_after"] - r["loss"] > max(dg.OVERSHOOT_ABS, dg.OVERSHOOT_REL * r["loss"])
    assert all("overshoot" not in x["events"] for x in u.records[:-1])
    u = s.until("step 5")
    assert u.hit and s.record["step"] == 5
    u = s.until("loss<0.0001", max_steps=3)
    assert not u.hit and u.steps == 3 and s.record["step"] == 8
    with pytest.raises(ConfigError, match="unknown event"):
        s.until("sideways")
    with pytest.raises(ConfigError, match="already taken"):
        s.until("step 3")
    # no sharpness schedule in the run: `until eos` measures lambda_max itself every few steps
    s = Stepper(data=shapes, lr=2.0, steps=40, **TINY)
    u = s.until("eos", max_steps=15)
    assert u.hit and s.record["step"] == 0
    assert s.record["lr"] * s.record["lambda_max"] >= dg.EOS_RATIO
    assert u.records[-1]["lambda_max"] == Stepper(data=shapes, lr=2.0, steps=40, **TINY).sharpness()["lambda_max"]


def test_slice_goes_through_the_step(shapes, tmp_path):
    s = Stepper(data=shapes, lr=2.0, steps=40, **TINY)
    s.step(2)
    r = s.record
    png = str(tmp_path / "slice.png")
    sl = s.slice(png=png)
    assert sl.f0 == r["loss"] and sl.landed == r["loss_after"]                 # a = 0 and a = 1, bit for bit
    assert sl.alphas[0] == -1.0 and sl.alphas[-1] == 3.0
    assert sl.quadratic[sl.alphas == 0.0][0] == sl.f0
    assert sl.slope == pytest.approx(r["predicted_change"], rel=1e-4)           # <g, d> in float64 vs float32
    assert sl.landed > sl.f0 and sl.min_alpha < 1.0                             # this step overshot
    assert os.path.getsize(png) > 1000
    # the slice left the state alone
    nxt = s.step(1)[0]
    twin = Stepper(data=shapes, lr=2.0, steps=40, **TINY)
    assert nxt["loss"] == twin.step(3)[-1]["loss"]


def test_layer_sharpness_save(shapes, tmp_path):
    s = Stepper(data=shapes, lr=0.1, steps=10, **TINY)
    s.step(2)
    st = s.layer("fc1")
    w = s.net.params[s.net.param_names.index("fc1.weight")]
    assert st["weight"]["norm"] == pytest.approx(float(np.linalg.norm(w.astype(np.float64))))
    assert sum(st["weight"]["hist"][0]) == w.size
    assert st["activation"]["size"] == 32 * 32
    assert 0 <= s.layer("relu1")["dead"] <= 1
    with pytest.raises(ConfigError, match="layers: conv1"):
        s.layer("conv9")
    sh = s.sharpness()
    assert math.isfinite(sh["lambda_max"]) and sh["two_over_lr"] == 20.0
    path = s.save(str(tmp_path / "state.npz"))
    with np.load(path) as z:
        assert int(z["step"]) == 2 and int(z["extra/pos"]) == 2


def test_from_run_replays_to_the_recorded_step(shapes, tmp_path):
    out = str(tmp_path / "run")
    train(out=out, data=shapes, lr=0.5, momentum=0.9, steps=25, checkpoint_every=10, sharpness_every=10, **TINY)
    assert [k for k, _ in list_checkpoints(out)] == [0, 10, 20]
    s = Stepper.from_run(out, 17, data=shapes)
    rep = s.replay
    assert rep["match"] and rep["checkpoint_step"] == 10 and rep["replayed_steps"] == 8
    steps = load_run(out).steps
    assert s.record["step"] == 17
    for k in ("loss", "loss_after", "grad_cos", "alpha"):
        assert s.record[k] == steps[k][17], k                     # the whole record, bit for bit
    assert s.step(1)[0]["loss"] == steps["loss"][18]
    assert s.step(2)[-1]["lambda_max"] == steps["lambda_max"][20]  # the sharpness warm start came along
    # a record that does not match is reported, with the step where it first differs
    path = os.path.join(out, "steps.csv")
    lines = open(path).read().splitlines()
    cells = lines[1 + 15].split(",")
    cells[3] = repr(float(cells[3]) + 1e-6)
    lines[1 + 15] = ",".join(cells)
    open(path, "w").write("\n".join(lines) + "\n")
    rep = Stepper.from_run(out, 16, data=shapes).replay
    assert not rep["match"] and rep["first_mismatch"][:2] == (15, "loss")
    assert rep["reason"]
    with pytest.raises(ConfigError, match="not in this run"):
        Stepper.from_run(out, 99, data=shapes)


def test_step_events_use_diagnose_thresholds():
    base = {"step": 0, "lr": 0.1, "loss": 1.0}
    assert dg.step_events(base) == {}
    assert "overshoot" in dg.step_events({**base, "loss_after": 1.0 + 1.01 * dg.OVERSHOOT_REL})
    assert "overshoot" not in dg.step_events({**base, "loss_after": 1.0 + 0.99 * dg.OVERSHOOT_REL})
    assert "nan" in dg.step_events({**base, "loss": math.nan})
    prev = [{"loss": 0.4}] * 10
    spike = max(0.4 * dg.SPIKE_FACTOR, 0.4 + dg.SPIKE_ABS)
    assert "spike" in dg.step_events({**base, "loss": spike + 0.01}, prev)
    assert "spike" not in dg.step_events({**base, "loss": spike - 0.01}, prev)
    big = dg.BATCH_EVIDENCE_MIN              # a training batch this large may stand in for the probe
    assert "dead" in dg.step_events({**base, "dead.relu1": dg.DEAD_LAYER}, batch_size=big)
    assert "dead" not in dg.step_events({**base, "dead.relu1": 1.0}, batch_size=2)        # a batch of 2 says nothing
    assert "dead" in dg.step_events({**base, "probe_loss": 1.0, "probe_dead.relu1": dg.DEAD_LAYER}, batch_size=2)
    assert "eos" in dg.step_events({**base, "lambda_max": dg.EOS_RATIO / 0.1})
    assert "eos" not in dg.step_events({**base, "lambda_max": 0.99 * dg.EOS_RATIO / 0.1})
    h = math.log(10)
    flat = {**base, "loss": h, "top_class_share": 1.0}
    n = dg.COLLAPSE_MIN_STEPS
    assert "collapse" in dg.step_events(flat, [flat] * (n - 1), h, batch_size=big)
    assert "collapse" not in dg.step_events(flat, [flat] * (n - 2), h, batch_size=big)
    assert "collapse" not in dg.step_events(flat, [flat] * (n - 1), h, batch_size=2)
    probe = {**base, "probe_loss": h, "probe_top_class_share": 1.0}
    every = 10                               # probe rows every 10 steps, spanning COLLAPSE_MIN_STEPS
    recs = [probe if (i % every == 0) else base for i in range(n + 1)]   # the last one a probe step
    assert "collapse" in dg.step_events(recs[-1], recs[:-1], h, batch_size=2)


def _same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))
