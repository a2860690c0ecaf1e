"""Device "cuda" end to end: Network, training with the full trace, checkpoints, the CLI, against
device "cpu" from the same weights.

Without a GPU this runs in Numba's CUDA simulator (tests/conftest.py switches it on), with tiny
shapes and the small launch sizes of conftest.CUDA_SMALL_LAUNCH: a 1x4x4 input, batch 2, one
conv of 2 filters. CPU and CUDA agree to float32 rounding (their sums run in different orders),
and a CUDA run is bit-identical to itself (replay from a checkpoint). About a minute in the
simulator.
"""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import skip_without_cuda

skip_without_cuda()

from minicnn.cli.main import main  # noqa: E402
from minicnn.config import TrainConfig  # noqa: E402
from minicnn.data import Dataset  # noqa: E402
from minicnn.network import Network  # noqa: E402
from minicnn.rundir import list_checkpoints, load_checkpoint  # noqa: E402
from minicnn.rundir import read_table as read_trace  # noqa: E402
from minicnn.trainer import Trainer, train  # noqa: E402

ARCH = "conv2k3p1-relu-maxpool2-fc3"
SHAPE = (1, 4, 4)
F32 = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(autouse=True)
def small_launch(cuda_small_launch):
    return cuda_small_launch


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 3, 12)
    return Dataset("tiny", x[:8], y[:8], x[8:], y[8:], 3)


def test_network_api_on_cuda():
    """Same init as the CPU network; loss, gradients (host arrays), logits, evaluation and
    state_dict round trips agree; device inputs are taken as they are."""
    from numba import cuda
    cpu = Network(ARCH, SHAPE, seed=3)
    gpu = Network(ARCH, SHAPE, seed=3, device="cuda")
    assert repr(gpu).endswith("device='cuda')")
    np.testing.assert_array_equal(gpu.get_flat_params(), cpu.get_flat_params())
    d = tiny_data()
    x, y = d.x_train[:2], d.y_train[:2]
    lc, gc = cpu.loss_and_grads(x, y)
    lg, gg = gpu.loss_and_grads(x, y)
    assert lg == pytest.approx(lc, rel=1e-6)
    for a, b in zip(gg, gc):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, **F32)
    np.testing.assert_allclose(gpu.forward(cuda.to_device(x)), cpu.forward(x), **F32)
    state = {k: v * 2 for k, v in cpu.state_dict().items()}
    gpu.load_state_dict(state)
    for k, v in gpu.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    cpu.load_state_dict(state)
    (vl_g, va_g), (vl_c, va_c) = gpu.evaluate(d.x_val, d.y_val), cpu.evaluate(d.x_val, d.y_val)
    assert vl_g == pytest.approx(vl_c, rel=1e-5) and va_g == va_c


# what a measurement cost (seconds, and Lanczos steps, which a float32 rounding apart may change by one)
COST_COLUMNS = ("time_s", "sharpness_s", "noise_s", "hvp_evals", "grad_evals")


def _run(tmp_path, device, **kw):
    cfg = TrainConfig(arch=ARCH, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=2, steps=2,
                      trace="full", sharpness_every=1, sharpness="topk:2,layers", noise_every=1, checkpoint_every=1,
                      device=device, **kw)
    out = str(tmp_path / device)
    res = train(cfg, out=out, data=tiny_data())
    assert res.status == "finished", res.message
    return out


def test_training_on_cuda_matches_cpu_and_replays(tmp_path):
    """Two steps with momentum and weight decay, full trace, lambda_max (top 2, per layer) and gradient
    noise: every trace column but the costs, the evaluations and the final weights and momentum agree
    with the CPU run; resuming the CUDA run from its step-1 checkpoint gives step 1's loss bit for bit."""
    runs = {dev: _run(tmp_path, dev) for dev in ("cpu", "cuda")}
    tc, tg = (read_trace(os.path.join(runs[d], "steps.csv")) for d in ("cpu", "cuda"))
    assert tc.keys() == tg.keys() and len(tg["loss"]) == 2
    for col in tc:
        if col not in COST_COLUMNS:
            np.testing.assert_allclose(tg[col], tc[col], rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=col)
    for col in ("loss", "grad_norm", "update_norm", "loss_after", "dead.relu1", "logit_max", "entropy"):
        np.testing.assert_allclose(tg[col], tc[col], **F32, err_msg=col)
    ec, eg = (read_trace(os.path.join(runs[d], "evals.csv")) for d in ("cpu", "cuda"))
    np.testing.assert_allclose(eg["val_loss"], ec["val_loss"], **F32)

    nets = {d: Network(ARCH, SHAPE) for d in runs}
    for d, net in nets.items():
        assert load_checkpoint(os.path.join(runs[d], "checkpoint.npz"), net) == 2
    np.testing.assert_allclose(nets["cuda"].get_flat_params(), nets["cpu"].get_flat_params(), **F32)
    with np.load(os.path.join(runs["cuda"], "checkpoint.npz")) as z:
        assert "momentum/0" in z.files

    ckpt = dict(list_checkpoints(runs["cuda"]))[1]
    t = Trainer(TrainConfig(arch=ARCH, lr=0.1, momentum=0.9, weight_decay=1e-3, batch_size=2, steps=2,
                            trace="off", device="cuda"), data=tiny_data())
    assert t.resume(ckpt) == 1
    assert t.step()["loss"] == tg["loss"][1]


def test_cli_train_and_debug_on_cuda(tmp_path):
    d = tiny_data()
    npz = str(tmp_path / "tiny.npz")
    np.savez(npz, x=d.x_train, y=d.y_train, x_val=d.x_val, y_val=d.y_val)
    common = ["--data", npz, "--arch", ARCH, "--batch-size", "2", "--device", "cuda"]
    out = str(tmp_path / "run")
    res = CliRunner().invoke(main, ["train", "--steps", "2", "--trace", "light", "--out", out, "-q"] + common)
    assert res.exit_code == 0, res.output
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["status"] == "finished"
    res = CliRunner().invoke(main, ["debug", "--steps", "4"] + common,
                             input="step\nwhatif 0.05\nlayer conv1\nquit\n")
    assert res.exit_code == 0, res.output
    assert "error: " not in res.output, res.output
    assert "   0.05 " in res.output and "weight" in res.output


def test_no_gpu_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    from minicnn.ops import cuda as gpu
    monkeypatch.setattr(gpu.cuda, "is_available", lambda: False)
    for cmd in (["train", "--steps", "1"], ["lr-find", "--steps", "20"], ["debug"], ["sweep", "--lr", "0.1"],
                ["explain", "--quick"]):
        res = CliRunner().invoke(main, cmd + ["--device", "cuda"], input="quit\n")
        assert res.exit_code == 1, (cmd, res.output)
        assert "no CUDA GPU found; use --device cpu" in res.output
        assert "Traceback" not in res.output
