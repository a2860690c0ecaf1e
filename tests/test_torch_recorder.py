"""minicnn.torch.Recorder: a PyTorch training loop recorded as a minicnn run directory.

The recorded trace must be minicnn's own trace of the same network, weights and batches (a minicnn
Trainer started from the torch model's state_dict), column by column within float32 rounding;
recording must not change the training it records (bit for bit, with BatchNorm, dropout and Adam);
an injected one-step lr jump in a torch loop must be diagnosed at that step; and what minicnn cannot
do with a recorded run (replay it) must be said in one line.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn import ConfigError, Network, config, load_run, trace
from minicnn.cli.main import main
from minicnn.config import probe_batch
from minicnn.data import load_shapes
from minicnn.rundir import load_checkpoint
from minicnn.sgd import SGD
from minicnn.sweep import run_row
from minicnn.trainer import Trainer

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
mt = pytest.importorskip("minicnn.torch")

# float32 rounding: the two sides compute the same float32 forward/backward with different
# summation orders; over a few SGD steps their numbers agree to ~1e-6 relative (measured: 3e-6 at
# worst, the gradient cosine). Differences of nearly equal numbers (loss_change) are compared to
# the loss they are a change of.
RTOL = 1e-5
JUMP_NET = "conv8k5-relu-maxpool2-conv16k3-relu-fc32-relu-fc10"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=600, n_val=100)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def torch_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


# ---------------------------------------------------------------- the same trace as minicnn's
def test_recorder_matches_minicnns_own_trace(tmp_path, shapes):
    """A minicnn Trainer and a recorded torch loop from the same weights, on the same batches: every
    column of steps.csv agrees within float32 rounding (discrete ones exactly)."""
    model, T = small_cnn(), 12
    torch.save(model.state_dict(), tmp_path / "init.pt")
    spec = mt.from_torch(model, (1, 28, 28)).spec
    t = Trainer(data=shapes, arch=spec, init_from=str(tmp_path / "init.pt"), lr=0.1, momentum=0.9, batch_size=32,
                steps=T, trace="full", probe_every=5, probe_size=64)
    idx = probe_batch(len(shapes.y_val), 0, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = mt.Recorder(model, opt, out=tmp_path / "rec", level="full", probe=(shapes.x_val[idx], shapes.y_val[idx]),
                      probe_every=5, checkpoint_every=0)
    ours = []
    for _ in range(T):
        x, y = t.batch()
        ours.append(t.step())
        rec.step(torch_step(model, opt, torch.from_numpy(x), torch.from_numpy(y)), torch.from_numpy(x),
                 torch.from_numpy(y))
    rec.close()
    got = load_run(str(tmp_path / "rec")).steps
    assert list(got) == trace.columns(t.net, "full", False, probe=True)
    loss = np.array([r["loss"] for r in ours])
    for c in got:
        if c in ("time_s", "epoch"):
            continue
        want = np.array([r.get(c, math.nan) for r in ours])
        assert np.array_equal(np.isnan(want), np.isnan(got[c])), c          # the same steps measured
        ok = ~np.isnan(want)
        if c.startswith(("dead.", "probe_dead.")) or c in ("step", "lr", "top_class_share", "batch_acc", "probe_acc",
                                                           "probe_top_class_share"):
            np.testing.assert_array_equal(got[c][ok], want[ok], err_msg=c)
        elif c == "loss_change":
            np.testing.assert_allclose(got[c][ok], want[ok], rtol=0, atol=RTOL * loss.max(), err_msg=c)
        else:
            np.testing.assert_allclose(got[c][ok], want[ok], rtol=RTOL, err_msg=c)
    assert np.isfinite(got["alpha"]).sum() >= T // 2 and np.isfinite(got["probe_loss"]).sum() == 3


@pytest.mark.parametrize("level", ["off", "light"])
def test_columns_are_minicnns_at_every_level(tmp_path, shapes, level):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(shapes.x_train[:16]), torch.from_numpy(shapes.y_train[:16])
    with mt.Recorder(model, opt, out=tmp_path, level=level, checkpoint_every=0) as rec:
        r = rec.step(torch_step(model, opt, x, y), x, y)
    net = mt.from_torch(model, (1, 28, 28))
    assert list(load_run(str(tmp_path)).steps) == trace.columns(net, level, False)
    assert ("grad_norm.conv1" in r) == (level == "light") and "loss_after" not in r


def test_defaults_are_minicnns():
    assert (mt.PROBE_EVERY, mt.PROBE_SIZE, mt.CHECKPOINT_EVERY) == (config.PROBE_EVERY, config.PROBE_SIZE,
                                                                    config.CHECKPOINT_EVERY)


# ---------------------------------------------------------------- a diagnosis of a torch loop
def test_an_lr_jump_in_a_torch_loop_is_named_at_its_step(tmp_path):
    """A torch loop whose scheduler multiplies the lr by 180 for step 150 (0.05 -> 9): minicnn inspect
    names the collapse, the step and the cause from the Recorder's run directory."""
    data = load_shapes(seed=0, n_train=3000, n_val=300)
    model = Network(JUMP_NET, (1, 28, 28), seed=0).to_torch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 180.0 if t == 150 else 1.0)
    idx = probe_batch(300, 0, 256)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(3000, generator=g)[:93 * 32] for _ in range(3)])    # 93 batches an epoch
    with mt.Recorder(model, opt, out=tmp_path / "run", probe=(data.x_val[idx], data.y_val[idx]),
                     val_data=(data.x_val, data.y_val), eval_every=100, checkpoint_every=50) as rec:
        for t in range(260):
            b = order[t * 32:(t + 1) * 32]
            loss = torch_step(model, opt, x[b], y[b])
            sched.step()
            rec.step(loss, x[b], y[b], epoch=t // 93)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "run"), "--no-plot"])
    assert res.exit_code == 0, res.output
    assert "collapse onto a plateau at step 150" in res.output, res.output
    assert "an outsized learning rate at step 150: 9, 180x the 0.05" in res.output, res.output
    assert "recorded by minicnn.torch.Recorder" in res.output, res.output
    row = run_row(str(tmp_path / "run"))                 # sweep summaries read it too
    assert (row["status"], row["verdict"], row["decisive_step"]) == ("finished", "collapse", 150)
    assert row["final_val_acc"] < 0.2 and len(load_run(str(tmp_path / "run")).evals["step"]) == 4


# ---------------------------------------------------------------- recording leaves training alone
class Custom(nn.Module):
    """Not an nn.Sequential: BatchNorm, dropout, one ReLU module called twice, max-pool as a function."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.bn, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        h = F.max_pool2d(self.act(self.bn(self.conv(x))), 2)
        return self.head(self.drop(self.act(h.flatten(1))))


def custom_run(shapes, out=None, steps=8):
    torch.manual_seed(2)
    model = Custom()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = (mt.Recorder(model, opt, out=out, level="full", probe=(shapes.x_val[:32], shapes.y_val[:32]),
                       probe_every=2, val_data=(shapes.x_val, shapes.y_val), eval_every=3, checkpoint_every=4)
           if out else None)
    losses = []
    for t in range(steps):
        x, y = (torch.from_numpy(a[t * 16:(t + 1) * 16]) for a in (shapes.x_train, shapes.y_train))
        loss = torch_step(model, opt, x, y)
        losses.append(loss.item())
        if rec:
            rec.step(loss, x, y)
    if rec:
        rec.close()
    return losses, model.state_dict(), rec


def test_recording_changes_nothing_in_the_training(tmp_path, shapes):
    """Bit for bit the same losses and final state (BatchNorm statistics included) as the loop
    without a Recorder, although the full trace runs the model again and dropout draws random numbers."""
    bare, bare_state, _ = custom_run(shapes)
    recorded, state, rec = custom_run(shapes, out=tmp_path)
    assert recorded == bare
    assert all(torch.equal(state[k], bare_state[k]) for k in bare_state)
    steps = load_run(str(tmp_path)).steps
    assert {"grad_norm.conv1", "update_ratio.fc1", "dead.relu1", "dead.relu2", "alpha", "probe_dead.relu2"} \
        <= set(steps)
    assert "minicnn network" in rec.unavailable and "probe" not in rec.unavailable
    # the gradient norm over every trained parameter (BatchNorm's too) is at least the layers' together
    assert np.all(steps["grad_norm"] ** 2 >= steps["grad_norm.conv1"] ** 2 + steps["grad_norm.fc1"] ** 2 - 1e-9)


# ---------------------------------------------------------------- checkpoints and what minicnn cannot do
def test_checkpoints_load_into_minicnn_and_debug_says_what_it_cannot_replay(tmp_path, shapes):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    states = {}
    with mt.Recorder(model, opt, out=tmp_path / "run", checkpoint_every=3) as rec:
        for t in range(7):
            states[t] = {k: v.clone() for k, v in model.state_dict().items()}
            x, y = (torch.from_numpy(a[t * 8:(t + 1) * 8]) for a in (shapes.x_train, shapes.y_train))
            rec.step(torch_step(model, opt, x, y), x, y)
            if t == 2:
                momentum_before_3 = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    spec = load_run(str(tmp_path / "run")).config["spec"]
    net, sgd = Network(spec, (1, 28, 28)), SGD()
    assert load_checkpoint(str(tmp_path / "run/checkpoints/step_0000003.npz"), net, sgd) == 3   # before step 3
    for a, b in zip(net.params, states[3].values()):
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(sgd.state_dict()["buffers"], momentum_before_3):
        np.testing.assert_array_equal(a, b.numpy())
    mt.load_state_dict_file(net, tmp_path / "run/checkpoints/step_0000006.pt")
    np.testing.assert_array_equal(net.params[0], states[6]["0.weight"].numpy())

    res = CliRunner().invoke(main, ["debug", "--from", str(tmp_path / "run"), "--step", "5"])
    err = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert res.exit_code == 1 and len(err) == 1 and "Traceback" not in res.output, res.output
    assert "cannot be replayed" in err[0] and f"minicnn debug --arch {spec} --init-from" in err[0], err[0]
    assert "step_0000003.pt --lr 0.1" in err[0], err[0]


def test_a_model_that_does_not_convert_is_said_so(tmp_path, shapes):
    custom_run(shapes, out=tmp_path, steps=2)
    res = CliRunner().invoke(main, ["debug", "--from", str(tmp_path)])
    assert res.exit_code == 1 and "accepted: an nn.Sequential" in res.output, res.output
    assert load_run(str(tmp_path)).config["spec"] is None


# ---------------------------------------------------------------- bad input
def test_bad_input_is_one_line(tmp_path, shapes):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(shapes.x_train[:8]), torch.from_numpy(shapes.y_train[:8])
    bad = [dict(optimizer="sgd"), dict(level="fast"), dict(probe=(x,)), dict(eval_every=5), dict(probe_every=0)]
    for kw in bad:
        args = {"model": model, "optimizer": opt, "out": tmp_path / "x", **kw}
        with pytest.raises(ConfigError) as e:
            mt.Recorder(**args)
        assert "\n" not in str(e.value) and ("accepted" in str(e.value) or "needs" in str(e.value)), str(e.value)
    rec = mt.Recorder(model, opt, out=tmp_path / "early", checkpoint_every=0)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(ConfigError, match="after optimizer.step"):
        rec.step(loss, x, y)                              # before optimizer.step(): the contract, said
    rec = mt.Recorder(model, opt, out=tmp_path / "scaled", level="full", checkpoint_every=0)
    with pytest.raises(ConfigError, match="loss_fn"):
        rec.step(2 * torch_step(model, opt, x, y), x, y)  # not the loss the full trace would recompute


def test_without_torch_the_recorder_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)                   # import torch now raises ImportError
    with pytest.raises(ConfigError, match=r"^PyTorch is not installed; pip install 'minicnn\[torch\]'$"):
        mt.Recorder(None, None, out=tmp_path)


def test_plain_logs_and_inspect_need_no_torch(tmp_path):
    (tmp_path / "log.csv").write_text("step,loss\n" + "".join(f"{s},{2.3 - s / 100}\n" for s in range(100)))
    code = ("import sys; from minicnn.logs import load_log; from minicnn.diagnose import diagnose; "
            f"d = diagnose(load_log([{str(tmp_path / 'log.csv')!r}])); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(d.verdict)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "healthy"


def test_recording_never_starts_numbas_thread_pool(tmp_path):
    """In one process with PyTorch, Numba's thread pool slowed PyTorch's steps eightfold (see
    Recorder): a full trace with a probe uses only serial Numba kernels, so no threading layer is
    ever launched (numba.threading_layer() raises until one is)."""
    code = f"""
import numba, torch
import minicnn.torch as mt
torch.manual_seed(0)
nn, F = torch.nn, torch.nn.functional
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
with mt.Recorder(model, opt, out={str(tmp_path)!r}, level="full", probe=(x, y), probe_every=1) as rec:
    for _ in range(3):
        opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
        rec.step(loss, x, y)
try:
    numba.threading_layer()
    print("launched")
except ValueError:
    print("not launched")
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "not launched"
