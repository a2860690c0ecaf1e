"""The learning-rate range test: the analysis of a known curve, and a tiny run through the CLI."""
import json
import math
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn.cli.main import main
from minicnn.errors import ConfigError
from minicnn.lrfind import analyse, ema, exp_lrs, lr_find


def test_exp_lrs_and_ema():
    lrs = exp_lrs(1e-4, 1.0, 5)
    np.testing.assert_allclose(lrs, [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(ema([3.0] * 10), 3.0)            # bias-corrected: no warm-up ramp
    assert ema([1.0, np.inf])[-1] == np.inf


def test_analyse_known_curve():
    # falls fastest at lr 0.01 (a sigmoid in log lr), bottoms out, then rises as lr^2 from ~0.3
    lrs = exp_lrs(1e-4, 10.0, 300)
    x = np.log10(lrs)
    loss = 2.3 - 1.5 / (1 + np.exp(-4 * (x + 2))) + 3 * lrs ** 2
    sm, suggested, min_lr, blowup = analyse(lrs, loss, beta=0.0)  # beta 0: no smoothing, exact curve
    np.testing.assert_allclose(sm, loss)
    assert 0.007 < suggested < 0.014
    assert suggested < min_lr < blowup
    # blow-up: the loss has given back half of the 1.5 nats it had fallen
    i = int(np.argmin(np.abs(lrs - blowup)))
    assert loss[i] >= loss.min() + 0.5 * (loss[0] - loss.min()) > loss[i - 1]


def test_analyse_nan_is_blowup():
    lrs = exp_lrs(1e-3, 10.0, 50)
    loss = np.linspace(2.3, 1.0, 50)
    loss[40:] = np.nan
    _, suggested, min_lr, blowup = analyse(lrs, loss, beta=0.0)
    assert blowup == pytest.approx(lrs[40]) and suggested < min_lr <= lrs[39]


def test_lr_find_rejects_bad_range():
    with pytest.raises(ConfigError, match="--lr-min"):
        lr_find(arch="tiny", n_train=64, n_val=32, lr_min=1.0, lr_max=0.1)


def test_lr_find_cli_tiny(tmp_path):
    out = str(tmp_path / "lrf")
    res = CliRunner().invoke(main, ["lr-find", "--arch", "tiny", "--n-train", "512", "--n-val", "32",
                                    "--batch-size", "32", "--steps", "60", "--lr-min", "1e-3", "--lr-max", "30",
                                    "--sharpness-samples", "16", "--lr", "0.1", "--threads", "1", "--out", out])
    assert res.exit_code == 0, res.output
    with open(os.path.join(out, "lr_find.json")) as f:
        r = json.load(f)
    # a tiny net at lr 30 is far past any stable step: the loss must blow up inside the range
    assert math.isfinite(r["blowup_lr"]) and r["blowup_lr"] < 30
    assert 1e-3 < r["suggested_lr"] < r["blowup_lr"]
    assert r["lambda_max"] > 0 and r["two_over_lambda"] == pytest.approx(2 / r["lambda_max"])
    assert "suggested lr (steepest descent)" in res.output and "--lr 0.1: lr 0.1 is" in res.output
    assert os.path.getsize(os.path.join(out, "lr_find.png")) > 10_000
    rows = np.genfromtxt(os.path.join(out, "lr_find.csv"), delimiter=",", names=True)
    assert len(rows) == r["steps"] and rows["lr"][0] == pytest.approx(1e-3)
    assert np.all(np.diff(rows["lr"]) > 0)
