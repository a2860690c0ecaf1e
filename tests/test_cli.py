"""The command line through click's CliRunner: a short run and every error path."""
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn.cli.main import main

FAST = ["--n-train", "256", "--n-val", "64", "--arch", "conv4k3p1-relu-maxpool2-fc10", "--batch-size", "32"]


def run(args):
    return CliRunner().invoke(main, args)


def test_train_short_run(tmp_path):
    out = str(tmp_path / "r")
    res = run(["train", "--lr", "0.1", "--steps", "16", "--eval-every", "8", "--out", out] + FAST)
    assert res.exit_code == 0, res.output
    assert "val acc" in res.output and "finished: 16 steps" in res.output
    assert os.path.isfile(os.path.join(out, "loss.png"))


def test_diverged_run_exit_code(tmp_path):
    res = run(["train", "--init-scale", "1e30", "--steps", "100", "--out", str(tmp_path / "d")] + FAST)
    assert res.exit_code == 3
    assert "diverged" in res.output


@pytest.mark.parametrize("args,msg", [
    (["--arch", "conv16-pool2-fc10"], "bad layer 'pool2'"),
    (["--lr", "-1"], "--lr"),
    (["--lr-schedule", "cosinus"], "bad --lr-schedule"),
    (["--data", "nope.npz"], "not found"),
    (["--data", "imagenet"], "unknown dataset"),
    (["--batch-size", "0"], "--batch-size"),
    (["--init", "orthogonal"], "--init"),
    (["--arch", "conv4-fc3"], "classes"),
])
def test_bad_input_one_line_error(tmp_path, args, msg):
    res = run(["train", "--steps", "2", "--out", str(tmp_path / "x")] + FAST + args)
    assert res.exit_code in (1, 2), res.output
    assert msg in res.output
    assert "Traceback" not in res.output
    err_lines = [l for l in res.output.splitlines() if l.startswith("Error")]
    assert len(err_lines) == 1


def test_bad_npz_data(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.full((10, 4, 4), np.nan), y=np.zeros(10, int))
    res = run(["train", "--data", str(p), "--steps", "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "NaN" in res.output and "Traceback" not in res.output


def test_help_lists_options():
    res = run(["train", "--help"])
    for opt in ("--data", "--arch", "--lr", "--lr-schedule", "--momentum", "--weight-decay", "--batch-size",
                "--epochs", "--steps", "--init", "--init-scale", "--seed", "--out", "--eval-every"):
        assert opt in res.output
