"""Plain training logs (minicnn/logs.py, ``minicnn inspect LOG.csv``): loosely named columns, sparse,
unsorted, repeated and NaN rows, TensorBoard exports; every verdict the loss, lr and validation
columns allow, each saying only what the log shows; bad files as one-line errors."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn.cli.main import main
from minicnn.diagnose import diagnose
from minicnn.errors import DataError
from minicnn.logs import evidence_gaps, load_log

# what a diagnosis may only say with evidence a plain log does not have
UNSEEN = ("dead", "constant prediction", "probe", "ln 10", "same-batch loss", "update moved")


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join("" if v is None else str(v) for v in r) + "\n")
    return str(path)


def curve(kind, n=600, seed=0):
    """A synthetic loss curve of a kind (per-step loss and lr)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    lr = np.full(n, 0.05)
    noise = 0.03 * rng.standard_normal(n)
    if kind == "healthy":
        loss = 2.3 * np.exp(-t / 80) + 0.2 + noise
    elif kind == "slow":
        loss = 2.3 - 0.0003 * t + noise
    elif kind == "jumping":
        loss = 2.3 + noise + np.where(t % 25 == 7, 6.0, 0.0)
    elif kind == "jump":                                        # learns, an lr jump at 300, back at ln 10
        loss = np.where(t < 300, 2.3 * np.exp(-t / 80) + 0.2, 2.303) + noise
        lr = np.where(t == 300, 5.0, 0.05)
    elif kind == "diverge":
        loss = np.where(t < 400, 2.3 * np.exp(-t / 80) + 0.3, 0.4 * 1.5 ** (t - 400.0))
        loss = np.where(loss > 1e30, np.nan, loss + noise)
    return t, loss, lr


# ---------------------------------------------------------------- columns found by their names
def test_renamed_columns_and_an_lr_jump(tmp_path):
    t, loss, lr = curve("jump")
    rows = [(s, f"{v:.6f}", lr[s], f"{v + 0.1:.4f}" if s % 50 == 0 else None, (0.9 if s < 300 else 0.1)
             if s % 50 == 0 else None, 1000 + s) for s, v in zip(t, loss)]
    path = write_csv(tmp_path / "log.csv", ["Iteration", "Train Loss", "Learning Rate", "Val Loss", "val_accuracy",
                                            "wall"], rows)
    run = load_log([path])
    assert set(run.steps) == {"step", "loss", "lr"} and len(run.evals["step"]) == 12
    assert run.config["log"]["columns"]["loss"].endswith("'Train Loss'")
    assert run.config["log"]["not_read"] == ["wall"]
    d = diagnose(run)
    assert d.verdict == "unstable" and d.cause.name == "lr_spike", d.text
    assert "an outsized learning rate at step 300: 5, 100x the 0.05" in d.text, d.text
    assert "likely mechanism (nothing in this record measures it)" in d.text
    assert not [w for w in UNSEEN if w in d.text], d.text
    gaps = evidence_gaps(run)
    assert any("collapse onto a plateau" in g for g in gaps) and any("Recorder" in g for g in gaps)
    assert any("classes is unknown" in g for g in gaps)
    known = evidence_gaps(load_log([path], classes=10))        # told the classes: a constant prediction's loss
    assert any("near ln 10" in g and "possibly a collapse" in g for g in known), known


@pytest.mark.parametrize("kind,verdict", [("healthy", "healthy"), ("slow", "slow"), ("jumping", "unstable"),
                                          ("diverge", "diverged")])
def test_each_verdict_from_the_loss_alone_claims_nothing_unseen(tmp_path, kind, verdict):
    t, loss, _ = curve(kind)
    d = diagnose(load_log([write_csv(tmp_path / "l.csv", ["step", "loss"], zip(t, loss))]))
    assert d.verdict == verdict, d.text
    assert not [w for w in UNSEEN if w in d.text] and "lr nan" not in d.text, d.text
    if verdict == "diverged":
        first_nan = int(np.flatnonzero(np.isnan(loss))[0])
        assert 400 <= d.decisive_step < first_nan - 20, d.text        # the onset of the rise, not where it overflowed
        assert d.cause.name == "none", d.text                                 # nothing in a loss alone says why
    if verdict == "slow":
        assert "the size of the steps is not in this record" in d.text, d.text


def test_keras_csvlogger_per_epoch_overfitting(tmp_path):
    """epoch, accuracy, loss, val_accuracy, val_loss: one row per epoch, no step column."""
    e = np.arange(30)
    loss, val = 1.5 * np.exp(-e / 6) + 0.05, 1.0 * np.exp(-e / 6) + 0.4 + 0.03 * np.maximum(e - 12, 0)
    path = write_csv(tmp_path / "training.log", ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"],
                     [(i, 0.5 + i / 70, loss[i], 0.7, val[i]) for i in e])
    run = load_log([path])
    assert "one row per epoch" in " ".join(run.config["log"]["notes"])
    np.testing.assert_allclose(run.evals["train_loss"], loss)          # each evaluation's own epoch
    d = diagnose(run)
    assert d.verdict == "overfitting" and d.decisive_step == 12, d.text


def test_lightning_sparse_metrics_and_json_lines(tmp_path):
    """Train and validation on different rows (empty cells: not logged); the same as JSON lines."""
    rows, records = [], []
    for s in range(200):
        rows.append((0, s, f"{2.3 * math.exp(-s / 40) + 0.1:.5f}", None, None))
        records.append({"step": s, "train": {"loss": 2.3 * math.exp(-s / 40) + 0.1}})
        if s % 50 == 49:
            rows.append((0, s, None, 0.5, 0.8))
            records.append({"step": s, "val": {"loss": 0.5, "acc": 0.8}})
    a = load_log([write_csv(tmp_path / "metrics.csv", ["epoch", "step", "train_loss_step", "val_loss", "val_acc"],
                            rows)])
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    b = load_log([str(path)])
    for run in (a, b):
        assert len(run.steps["step"]) == 200 and list(run.evals["step"]) == [49, 99, 149, 199]
        np.testing.assert_allclose(run.evals["train_loss"][1], run.steps["loss"][50:100].mean())
        assert not run.config["log"]["notes"][1:], run.config["log"]["notes"]       # nothing was dropped or sorted


def test_nan_unsorted_and_repeated_rows_are_handled_and_said(tmp_path):
    t, loss, _ = curve("healthy", n=300)
    first = [(s, loss[s] if s < 150 else 9.0) for s in range(200)]      # a run stopped at step 199 ...
    resumed = [(s, loss[s]) for s in range(150, 300)]                      # ... resumed from its step-150 checkpoint
    first = first[:20] + first[40:60] + first[20:40] + first[60:]        # some rows out of order
    rows = first + resumed + [(None, 1.0), (300, "nan")]
    run = load_log([write_csv(tmp_path / "l.csv", ["it", "loss"], rows)])
    notes = " ".join(run.config["log"]["notes"])
    assert "1 rows without a step dropped" in notes and "kept the last row of each step" in notes, notes
    assert "sorted by step" in notes and "1 rows with a non-finite loss" in notes, notes
    assert np.all(np.diff(run.steps["step"]) == 1) and len(run.steps["step"]) == 301
    np.testing.assert_allclose(run.steps["loss"][:300], loss)          # the resumed run's rows won
    assert diagnose(run).verdict == "diverged"                                  # the NaN at the end is a value


# ---------------------------------------------------------------- TensorBoard exports
def tb_export(path, steps, values):
    return write_csv(path, ["Wall time", "Step", "Value"], [(1.7e9 + s, s, v) for s, v in zip(steps, values)])


def test_tensorboard_exports_by_file_name_and_by_role(tmp_path):
    t, loss, _ = curve("healthy", n=300)
    train = tb_export(tmp_path / "run-version_0-tag-train_loss.csv", t, loss)
    val = tb_export(tmp_path / "run-validation-tag-epoch_loss.csv", t[::50], loss[::50] + 0.1)
    lr = tb_export(tmp_path / "run-version_0-tag-lr-SGD.csv", t[::100], [0.1, 0.05, 0.01])
    run = load_log([train, val, lr])
    assert set(run.config["log"]["columns"]) == {"loss", "val_loss", "lr"}
    np.testing.assert_array_equal(run.steps["lr"][[0, 99, 100, 299]], [0.1, 0.1, 0.05, 0.01])   # the lr in force
    assert len(run.evals["step"]) == 6
    a, b = tb_export(tmp_path / "a.csv", t, loss), tb_export(tmp_path / "b.csv", t[::50], loss[::50])
    res = CliRunner().invoke(main, ["inspect", f"loss={a}", "--val", b, "--no-plot"])
    assert res.exit_code == 0 and "val_loss from b.csv: 'Value'" in res.output, res.output
    assert "diagnosis: healthy" in res.output and "what this record cannot show" in res.output, res.output
    res = CliRunner().invoke(main, ["inspect", train, "--classes", "10"])           # the figure, beside the log
    assert res.exit_code == 0 and (tmp_path / "run-version_0-tag-train_loss.inspect.png").is_file(), res.output


# ---------------------------------------------------------------- bad input
def test_bad_files_are_one_line_errors(tmp_path):
    t, loss, _ = curve("healthy", n=20)
    cases = {
        "noloss.csv": ("step,accuracy,val_loss\n" + "".join(f"{s},0.5,1.0\n" for s in t), "no training-loss column"),
        "empty.csv": ("", "is empty"),
        "header.csv": ("step,loss\n", "no rows"),
        "numbers.csv": ("0,2.3\n1,2.2\n", "no header row"),
        "model.pt": (b"PK\x03\x04\x00\x00binary", "not a text table"),
        "events.out.tfevents.1.host": (b"\x18\x00\x00\x00", "TensorBoard event file"),
        "broken.jsonl": ('{"step": 0, "loss": 2.3}\n{"step": 1, "loss"\n', "not JSON lines"),
        "unnamed.csv": ("Wall time,Step,Value\n1,0,2.3\n", "does not say what it holds"),
    }
    for name, (content, why) in cases.items():
        p = tmp_path / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError, match=why):
            load_log([str(p)])
        res = CliRunner().invoke(main, ["inspect", str(p), "--no-plot"])
        err = [line for line in res.output.splitlines() if line.startswith("Error")]
        assert res.exit_code == 1 and len(err) == 1 and "Traceback" not in res.output, res.output
        assert why in err[0] and ("accepted" in err[0] or "loss=" in err[0]), err[0]
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "noloss.csv"), "--verify"])
    assert res.exit_code == 2 and "a log has none" in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "does not exist" in res.output
