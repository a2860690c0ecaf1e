"""Slow end-to-end run on the real MNIST files (issue 8): `python -m pytest -m slow`.

The command a user types, through click: the default network, 3 epochs, must reach >= 98.5% on
the official 10k test set. Reads ../shared/data/mnist in place; skipped when the files are absent.
"""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from minicnn.cli.main import main

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.mark.slow
def test_mnist_default_network_three_epochs(tmp_path):
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not present in {REAL_MNIST}")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--data", "mnist", "--data-dir", str(REAL_MNIST), "--lr", "0.02",
                                  "--momentum", "0.9", "--lr-schedule", "cosine", "--epochs", "3", "--trace", "light",
                                  "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["final_eval"]["epoch"] == pytest.approx(3.0)
    assert summary["final_eval"]["val_acc"] >= 0.985, summary["final_eval"]
    assert "healthy" in r.output
