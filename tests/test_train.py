"""The training loop: run directory, determinism, divergence, interruption, schedules."""
import math
import os

import numpy as np
import pytest

from minicnn import TrainConfig, load_run, train
from minicnn.data import load_shapes
from minicnn.trainer import batch_indices

SMALL = dict(n_train=512, n_val=128, batch_size=32, arch="conv4k3p1-relu-maxpool2-fc10")


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=512, n_val=128)


def test_run_directory_contents(tmp_path, shapes):
    out = str(tmp_path / "run")
    r = train(out=out, data=shapes, steps=40, lr=0.1, eval_every=20, **SMALL)
    assert r.status == "finished" and r.steps == 40
    for f in ("config.json", "steps.csv", "evals.csv", "checkpoint.npz", "summary.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    run = load_run(out)
    assert len(run.steps["loss"]) == 40
    assert list(run.evals["step"]) == [0, 20, 40]
    assert run.summary["status"] == "finished"
    cfg = TrainConfig.from_dict(run.config["config"])
    assert cfg.lr == 0.1 and cfg.steps == 40
    # numpy reads the trace in one call
    arr = np.genfromtxt(os.path.join(out, "steps.csv"), delimiter=",", names=True)
    assert arr["loss"].shape == (40,)
    np.testing.assert_array_equal(arr["loss"], run.steps["loss"])


def test_same_seed_same_losses_bit_for_bit(shapes):
    a = train(data=shapes, steps=30, seed=3, **SMALL)
    b = train(data=shapes, steps=30, seed=3, **SMALL)
    c = train(data=shapes, steps=30, seed=4, **SMALL)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_learns_on_builtin_data():
    data = load_shapes(seed=0, n_train=2000, n_val=256)
    r = train(data=data, epochs=4, lr=0.1, trace="off", batch_size=32, arch="small")
    assert r.evals[-1]["val_loss"] < r.evals[0]["val_loss"] - 0.5
    assert r.evals[-1]["val_acc"] > 0.4


def test_divergence_stops_and_keeps_trace(tmp_path, shapes):
    out = str(tmp_path / "div")
    r = train(out=out, data=shapes, steps=200, lr=1e20, **SMALL)
    assert r.status == "diverged"
    assert not math.isfinite(r.losses[-1])
    run = load_run(out)
    assert len(run.steps["loss"]) == r.steps < 200
    assert run.summary["status"] == "diverged"


def test_interrupt_keeps_every_step(tmp_path, shapes):
    out = str(tmp_path / "int")

    def stop_at_7(rec):
        if rec["step"] == 7:
            raise KeyboardInterrupt

    r = train(out=out, data=shapes, steps=100, on_step=stop_at_7, **SMALL)
    assert r.status == "interrupted"
    run = load_run(out)
    assert list(run.steps["step"]) == list(range(8))
    assert run.summary["status"] == "interrupted"


def test_piecewise_schedule_reaches_the_step(tmp_path, shapes):
    train(out=str(tmp_path / "pw"), data=shapes, steps=12, lr=0.1, lr_schedule="0:0.01,5:0.5,6:0.01", **SMALL)
    lrs = load_run(str(tmp_path / "pw")).steps["lr"]
    assert lrs[4] == 0.01 and lrs[5] == 0.5 and lrs[6] == 0.01


def test_batches_cover_each_epoch_once():
    idx = batch_indices(103, 10, seed=1, epoch=2)
    assert len(idx) == 11 and len(idx[-1]) == 3
    assert sorted(np.concatenate(idx)) == list(range(103))
    assert not np.array_equal(np.concatenate(idx), np.concatenate(batch_indices(103, 10, 1, 3)))


def test_train_starts_compiling_the_backward_before_its_first_evaluation(shapes, monkeypatch):
    """train() asks the backend to compile the backward ahead (ops.compile_ahead: a child process
    with a cold Numba cache) before anything of the first step or the step-0 evaluation runs, so
    that the child works while this process compiles the forward pass; once per network."""
    from minicnn.network import Network
    from minicnn.ops import cpu
    events = []
    monkeypatch.setattr(cpu, "compile_ahead", lambda dtype, strides: events.append(("ahead", np.dtype(dtype).name,
                                                                                     list(strides))))
    loss = Network._loss
    monkeypatch.setattr(Network, "_loss", lambda self, x, y: events.append("loss") or loss(self, x, y))
    train(data=shapes, steps=3, eval_every=2, **SMALL)
    assert events[0] == ("ahead", "float32", [1]) and events.count(events[0]) == 1 and "loss" in events
