"""Issue 15's corpus: every bad input, broken file and signal answered cleanly.

Each bad input ends in one ``Error: ...`` line (no traceback, non-zero exit) or, through the API, one
ValueError/TypeError subclass whose message names the argument and what is accepted. Broken run
directories are named by file and line, or loaded as far as they are whole. Signals stop a run or a
sweep after the current step with every file written, and a stopped run resumes bit for bit.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn import SGD, ConfigError, DataError, MinicnnError, Network, Stepper, load_run, train
from minicnn.cli.main import main
from minicnn.data import load_shapes, validate
from minicnn.errors import ArgumentTypeError, SpecError
from minicnn.rundir import list_checkpoints
from minicnn.sgd import parse_schedule
from minicnn.sweep import run_one
from minicnn.trace import TIMING_COLUMNS
from tests.procs import children

RUN = ["--arch", "tiny", "--n-train", "200", "--n-val", "50", "--batch-size", "32"]
TINY = dict(arch="tiny", batch_size=32)


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=200, n_val=50)


def cli(args, input=None):
    return CliRunner().invoke(main, args, input=input)


def one_line_error(res, *needles, code=(1, 2)):
    """A clean failure: exit code in ``code``, no traceback, exactly one Error line holding ``needles``."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in code, res.output
    assert "Traceback" not in res.output
    errs = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errs) == 1, res.output
    for n in needles:
        assert n in errs[0], errs[0]
    return errs[0]


# ---------------------------------------------------------------- the command line: one line each
BAD_TRAIN = [
    (["--epochs", "inf"], "--epochs must be a finite number"),
    (["--epochs", "1e300"], "more than"),
    (["--steps", "99999999999999999999"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--arch", "conv99999999-fc10"], "more than this machine's"),
    (["--arch", "fc99999999999"], "parameters and their gradients"),
    (["--lr-schedule", "cosine:-1"], "gives lr"),
    (["--lr-schedule", "linear:-0.5"], "gives lr"),
    (["--lr-schedule", "exp:-1"], "gives lr"),
    (["--lr-schedule", "step:2:-1"], "gives lr"),
    (["--lr-schedule", "exp:nan"], "gives lr"),
    (["--lr-schedule", "5:0.1,2:0.2"], "2 comes after 5"),
    (["--lr-schedule", "0:0.1,5:-1"], "finite numbers >= 0"),
    (["--input-scale", "1e300"], "beyond the float32 range"),
    (["--input-scale", "1e39"], "beyond the float32 range"),
    (["--input-scale", "1e-300"], "below the smallest normal float32"),
    (["--init-scale", "1e40"], "beyond float32's range"),
    (["--dtype", "float64", "--init-scale", "inf"], "--init-scale must be a finite number"),
    (["--n-val", "1000000000000"], "more than this machine's"),
    (["--sharpness", "bogus"], "unknown measure 'bogus'"),
    (["--sharpness", "topk:30000"], "2..64"),
    (["--sharpness", "trace:1"], "2..10,000"),
    (["--sharpness", "layers:3"], "unknown measure 'layers:3'"),
    (["--noise-every", "-1"], "--noise-every"),
    (["--noise-every", "5", "--batch-size", "1"], "needs --batch-size >= 2"),
]


@pytest.mark.parametrize("args,msg", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_bad_value_is_one_line(tmp_path, args, msg):
    length = [] if "--epochs" in args or "--steps" in args else ["--steps", "10"]
    one_line_error(cli(["train", "--out", str(tmp_path / "r")] + length + RUN + args), msg)
    assert not os.path.exists(tmp_path / "r")           # nothing left behind by a refused run


def test_activations_larger_than_memory_refused_before_allocating(net):
    from minicnn.config import check_train_memory
    with pytest.raises(ConfigError, match="the activations of a batch of 1,000,000,000.* more than this machine's"):
        check_train_memory(net, 10 ** 9)


def test_epochs_inf_in_sweep_and_api(tmp_path):
    one_line_error(cli(["sweep", "--epochs", "inf", "--out", str(tmp_path / "s")] + RUN), "--epochs")
    one_line_error(cli(["sweep", "--seeds", "1,,2", "--out", str(tmp_path / "s")] + RUN), "--seeds")
    one_line_error(cli(["sweep", "--out", str(tmp_path / "s")] + RUN + ["--arch", "tiny,conv"]), "bad layer 'conv'")
    one_line_error(cli(["sweep", "--steps", "9", "--out", str(tmp_path / "s")] + RUN + ["--lr-schedule", "step:2:-1"]),
                   "gives lr")
    with pytest.raises(ConfigError, match="--epochs must be a finite number"):
        train(epochs=math.inf, **TINY)


def test_out_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [("/proc/minicnn-run", "cannot write the run directory"),
             (str(tmp_path / "file" / "run"), "part of the path is a file"),
             ("/dev/null", "not a folder")]
    for out, msg in cases:
        one_line_error(cli(["train", "--steps", "2", "--out", out] + RUN), msg)
    one_line_error(cli(["explain", "--quick", "--out", "/dev/null"]), "cannot write the sweep directory")
    one_line_error(cli(["sweep", "--steps", "2", "--out", str(tmp_path / "file" / "s")] + RUN), "is a file")
    one_line_error(cli(["lr-find", "--steps", "5", "--out", "/proc/x"] + RUN), "cannot write --out")


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0,
                    reason="needs setpriv and root to drop to user nobody (root ignores a folder's mode bits)")
def test_out_in_a_read_only_folder_as_an_unprivileged_user():
    base = tempfile.mkdtemp(prefix="minicnn-ro-")
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        for out in (ro, os.path.join(ro, "run")):
            p = subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                                "from minicnn.cli.main import main; main()", "train", "--out", out, "--steps", "2"]
                               + RUN, capture_output=True, text=True, timeout=120, cwd=base)
            assert p.returncode == 1, p.stdout + p.stderr
            assert "Traceback" not in p.stderr
            assert f"Error: cannot write the run directory {out}: permission denied" in p.stderr
    finally:
        os.chmod(os.path.join(base, "ro"), 0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------- broken run directories
@pytest.fixture(scope="module")
def good_run(tmp_path_factory, shapes):
    out = str(tmp_path_factory.mktemp("runs") / "good")
    train(out=out, n_train=200, n_val=50, steps=12, checkpoint_every=5, eval_every=6, lr=0.2, momentum=0.9, **TINY)
    return out


def broken(good_run, tmp_path, name="r"):
    d = str(tmp_path / name)
    shutil.copytree(good_run, d)
    return d


def write_lines(path, change):
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    with open(path, "wb") as f:
        f.write(b"\n".join(change(lines)))


DAMAGE = [
    ("steps.csv", lambda ls: ls[:3] + [os.urandom(200).replace(b"\n", b"")] + ls[3:], "line 4: binary data"),
    ("steps.csv", lambda ls: ls[:5] + [b"hello,world"] + ls[5:], "line 6: 2 cells"),
    ("steps.csv", lambda ls: ls[:2] + [ls[2].replace(b",", b",abc,", 1).replace(b",", b"", 1)] + ls[3:],
     "line 3: column"),
    ("steps.csv", lambda ls: ls[:4] + [ls[2]] + ls[4:], "follows step"),
    ("evals.csv", lambda ls: ls[:2] + [b"1,2,x,4,5,6"] + ls[2:], "line 3: column train_loss holds 'x'"),
    ("config.json", lambda ls: ls[:3], "config.json: not valid JSON"),
    ("summary.json", lambda ls: [b"\x00\xff garbage"], "summary.json: binary data"),
    ("summary.json", lambda ls: [b"[1, 2]"], "holds a JSON list"),
    ("steps.csv", lambda ls: [os.urandom(300).replace(b"\n", b"") + b"\xff"], "line 1: binary data"),
]


@pytest.mark.parametrize("name,change,msg", DAMAGE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DAMAGE)])
def test_damaged_file_is_named_with_its_line(good_run, tmp_path, name, change, msg):
    d = broken(good_run, tmp_path)
    write_lines(os.path.join(d, name), change)
    err = one_line_error(cli(["inspect", d, "--no-plot"]), name, msg)
    assert "the file is damaged" in err or "binary" in err
    with pytest.raises(DataError, match=name):
        load_run(d)


def test_steps_cut_mid_line_loads_the_whole_rows(good_run, tmp_path):
    d = broken(good_run, tmp_path)
    p = os.path.join(d, "steps.csv")
    with open(p, "rb") as f:
        raw = f.read()
    with open(p, "wb") as f:
        f.write(raw[:raw.rindex(b"\n", 0, len(raw) - 1) + 30])          # into the last row
    os.remove(os.path.join(d, "summary.json"))
    run = load_run(d)
    assert list(run.steps["step"]) == list(range(11))
    assert any("its last line was cut mid-row" in w and "11 whole rows" in w for w in run.warnings)
    res = cli(["inspect", d, "--no-plot"])
    assert res.exit_code == 0 and "cut mid-row" in res.output and "no summary: still running or killed" in res.output


def test_config_without_its_config_is_said(good_run, tmp_path):
    d = broken(good_run, tmp_path)
    write_lines(os.path.join(d, "config.json"), lambda ls: [b"{}"])
    res = cli(["inspect", d, "--no-plot"])
    assert res.exit_code == 0 and "holds no run configuration (no 'config' object)" in res.output
    one_line_error(cli(["debug", "--from", d]), "has no 'config' object")


def test_resume_names_the_corrupt_checkpoints_it_skips(good_run, tmp_path):
    d = broken(good_run, tmp_path)
    for f in ("checkpoint.npz", "checkpoints/step_0000010.npz"):
        with open(os.path.join(d, f), "wb") as fh:
            fh.write(b"PK\x03\x04 cut")
    res = cli(["train", "--resume", d, "--steps", "14", "-q"])
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "skipped: checkpoint " + os.path.join(d, "checkpoint.npz") + " is corrupt" in res.output
    assert "skipped: checkpoint " + os.path.join(d, "checkpoints", "step_0000010.npz") + " is corrupt" in res.output
    assert "resuming from step 5 of 14" in res.output and len(load_run(d).steps["step"]) == 14


def test_summary_counts_more_steps_than_the_trace(good_run, tmp_path):
    d = broken(good_run, tmp_path)
    write_lines(os.path.join(d, "steps.csv"), lambda ls: ls[:7] + [b""])
    res = cli(["inspect", d, "--no-plot"])
    assert res.exit_code == 0 and "summary.json says 12 steps but steps.csv holds 6" in res.output


@pytest.mark.parametrize("how", ["empty", "header only", "missing"])
def test_no_trace_says_no_steps_recorded(good_run, tmp_path, how):
    d = broken(good_run, tmp_path)
    p = os.path.join(d, "steps.csv")
    if how == "missing":
        os.remove(p)
    else:
        write_lines(p, lambda ls: ls[:1] + [b""] if how == "header only" else [b""])
    res = cli(["inspect", d, "--no-plot"])
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "no steps recorded" in res.output and "0 steps" not in res.output
    one_line_error(cli(["debug", "--from", d]), "no steps recorded")


def test_corrupt_checkpoint_is_named_and_replay_uses_the_one_before(good_run, tmp_path):
    d = broken(good_run, tmp_path)
    ck = dict(list_checkpoints(d))
    with open(ck[10], "rb") as f:
        raw = f.read()
    with open(ck[10], "wb") as f:
        f.write(raw[:len(raw) // 2])                            # truncated
    with open(ck[5], "w") as f:
        f.write("not a checkpoint")                             # garbage
    s = Stepper.from_run(d, 11)
    assert s.replay["match"] and s.replay["checkpoint_step"] == 0 and s.replay["replayed_steps"] == 12
    assert [line.split(" is ")[0] for line in s.replay["skipped"]] == [f"checkpoint {ck[10]}", f"checkpoint {ck[5]}"]
    assert all("corrupt or truncated" in line for line in s.replay["skipped"])
    res = cli(["debug", "--from", d, "--step", "11"], input="quit\n")
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert f"skipped: checkpoint {ck[10]} is corrupt or truncated" in res.output
    assert "replayed 12 step(s) from checkpoint at step 0" in res.output and "bit for bit" in res.output


# ---------------------------------------------------------------- values no longer accepted silently
def test_every_schedule_checked_at_every_step():
    for spec in ("cosine:-1", "linear:-0.5", "exp:-1", "step:2:-1", "exp:nan", "warmup:5+exp:-2"):
        with pytest.raises(ConfigError, match="every step's lr must be a finite number >= 0"):
            parse_schedule(spec, 0.1, 100)
    with pytest.raises(ConfigError, match="2 comes after 5"):
        parse_schedule("5:0.1,2:0.2", 0.1, 100)
    assert parse_schedule("exp:1.01", 0.1, 100)(99) == pytest.approx(0.1 * 1.01 ** 99)   # legal ones still are


def test_input_overflowing_at_step_0_is_diagnosed_as_such(tmp_path):
    res = cli(["train", "--init-scale", "1e30", "--steps", "5", "--out", str(tmp_path / "d"), "-q"] + RUN)
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert "diagnosis: non-finite from step 0" in res.output and "overshot" not in res.output


def test_existing_run_refused_then_overwrite_and_resume(tmp_path):
    out = str(tmp_path / "r")
    args = ["train", "--out", out, "-q", "--checkpoint-every", "5"] + RUN
    assert cli(args + ["--steps", "12"]).exit_code == 0
    one_line_error(cli(args + ["--steps", "4"]), "already holds a run", "--overwrite", "--resume")
    assert len(load_run(out).steps["step"]) == 12                         # untouched
    res = cli(args + ["--steps", "4", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [k for k, _ in list_checkpoints(out)] == [0]                   # the old run's checkpoints are gone
    assert len(load_run(out).steps["step"]) == 4
    one_line_error(cli(["train", "--resume", out, "-q"]), "has taken all its 4 steps")
    one_line_error(cli(["train", "--resume", out, "--lr", "0.5"]), "lr is 0.1 there, 0.5 asked")
    one_line_error(cli(["train", "--resume", out, "--out", str(tmp_path / "x")]), "--resume RUN_DIR continues")
    res = cli(["train", "--resume", out, "--steps", "9", "-q"])
    assert res.exit_code == 0 and "resuming from step 4 of 9" in res.output
    assert load_run(out).summary["steps"] == 9 and load_run(out).summary["resumed_from"] == 4


def test_clamped_values_are_warned_once_and_recorded(tmp_path):
    out = str(tmp_path / "r")
    res = cli(["train", "--out", out, "--steps", "2", "-q", "--threads", "1000", "--data-dir", "/dev/null"] + RUN
              + ["--batch-size", "512"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: --batch-size 512: used 200 instead") == 1
    assert res.output.count("warning: --threads 1000: used") == 1
    assert res.output.count("warning: --data-dir /dev/null: used None instead, --data shapes does not use it") == 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["batch_size"] == 200 and cfg["adjusted"]["batch_size"]["asked"] == 512
    assert cfg["config"]["threads"] == cfg["adjusted"]["threads"]["used"] < 1000


def test_data_smaller_than_asked_or_of_one_class(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                     # the default run directory, runs/..., is made (and removed) here
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((30, 8, 8), np.float32), y=np.arange(30) % 3)
    one_line_error(cli(["train", "--data", str(p), "--n-train", "100", "--steps", "2", "--arch", "fc3"]),
                   "--n-train 100 is more than the 27 train samples", "accepted: 1..27")
    np.savez(p, x=np.zeros((30, 8, 8), np.float32), y=np.zeros(30, int))
    one_line_error(cli(["train", "--data", str(p), "--steps", "2", "--arch", "fc3"]), "a single class")
    from PIL import Image
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / "cat" / f"{i}.png")
    one_line_error(cli(["train", "--data", str(folder), "--steps", "2", "--arch", "fc2"]),
                   "a single class (cat)", "one subfolder per class")
    t = tmp_path / "t.npz"
    t.write_text("x,y\n1,2\n")
    one_line_error(cli(["train", "--data", str(t), "--steps", "2"]), "is not a .npz archive (it is a text file)")
    assert not os.path.exists(tmp_path / "runs")            # the folders made for a refused run are gone again


# ---------------------------------------------------------------- the API: ValueError / TypeError naming the argument
@pytest.fixture(scope="module")
def net():
    return Network.from_spec("tiny", input_shape=(1, 28, 28), seed=0)


def batch(n=4):
    return np.zeros((n, 1, 28, 28), np.float32), np.arange(n) % 10


API = [
    (lambda n: SGD(momentum=2), ConfigError, "SGD momentum must be a finite number in [0, 1)"),
    (lambda n: SGD(momentum=1.0), ConfigError, "the momentum buffer never decays"),
    (lambda n: SGD(dampening=2), ConfigError, "SGD dampening must be a finite number in [0, 1]"),
    (lambda n: SGD(lr="0.1"), TypeError, "SGD lr must be"),
    (lambda n: SGD().step(n.params, n.loss_and_grads(*batch())[1], lr=-1), ConfigError, "SGD lr must be"),
    (lambda n: SGD().step(n.params, n.loss_and_grads(*batch())[1][:-1]), ConfigError, "6 params but 5 grads"),
    (lambda n: SGD().step(n.params, [g.T for g in n.loss_and_grads(*batch())[1]]), ConfigError, "grads[0] has shape"),
    (lambda n: SGD().step(n.params[0], n.params[0]), TypeError, "params must be a list"),
    (lambda n: n.loss_and_grads(*batch(0)), ConfigError, "x holds no samples"),
    (lambda n: n.loss_and_grads(batch()[0].tolist(), batch()[1]), TypeError, "x must be a NumPy array"),
    (lambda n: n.set_params(None), TypeError, "set_params needs a list of 6 arrays"),
    (lambda n: Network.from_spec(spec=123, input_shape=(1, 28, 28)), TypeError, "spec must be a string"),
    (lambda n: Network.from_spec("tiny", input_shape=(1, 28.5, 28)), SpecError, "three positive integers"),
    (lambda n: Network.from_spec("tiny", input_shape=28), TypeError, "input_shape must be (C, H, W)"),
    (lambda n: Network.from_spec("tiny", input_shape=(1, 28, 28), init_scale="big"), TypeError, "init_scale"),
    (lambda n: train(lr=0.1, steps=2.5, **TINY), TypeError, "--steps must be a whole number"),
    (lambda n: train(momentum=1, steps=2, **TINY), ConfigError, "--momentum must be in [0, 1)"),
    (lambda n: n.loss(batch()[0].astype(complex), batch()[1]), TypeError, "x must hold real numbers"),
    (lambda n: n.load_state_dict(None), TypeError, "load_state_dict needs a dict"),
    (lambda n: Network.from_spec("tiny", input_shape=(1, 28, 28), seed=-1), ConfigError, "seed must be a whole"),
    (lambda n: Network.from_spec("tiny", input_shape=(1, 28, 28), seed="a"), TypeError, "seed must be a whole"),
    (lambda n: train(bogus=1), ConfigError, "unknown config keys: bogus"),
    (lambda n: parse_schedule(123, 0.1, 10), TypeError, "--lr-schedule must be a string"),
    (lambda n: __import__("minicnn").load_data(123), TypeError, "data must be a name or a path"),
    (lambda n: validate(np.zeros((3, 4, 4)), np.array([0, -1, 9]), "x"), DataError,
     "labels must be class indices >= 0, got labels from -1 to 9"),
]


@pytest.mark.parametrize("call,kind,msg", API, ids=[m for _, _, m in API])
def test_api_error_names_the_argument(net, call, kind, msg):
    with pytest.raises(kind) as e:
        call(net)
    assert isinstance(e.value, MinicnnError) and isinstance(e.value, ValueError)
    assert msg in str(e.value) and "\n" not in str(e.value)
    if kind is TypeError:
        assert isinstance(e.value, ArgumentTypeError)


def test_labels_message_with_a_class_count():
    with pytest.raises(DataError, match=r"labels must be class indices in 0\.\.4, got labels from 0 to 7"):
        validate(np.zeros((3, 4, 4)), np.array([0, 1, 7]), "x", num_classes=5)


# ---------------------------------------------------------------- the debugger: bounded, streamed, interruptible
def test_debug_step_bounded_and_streamed():
    script = ("step 99999999999999999999\nuntil step 99999999999\nuntil overshoot 1000000\nstep 45\nwhere\n"
              "save /proc/x.npz\nslice /dev/null/y.png\n")
    res = cli(["debug", "--steps", "50", "--lr", "0.1"] + RUN, input=script)
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "error: step count must be in 0..50 (the run's length), got 99999999999999999999" in res.output
    assert "error: step 99999999999 is past the end of the run (steps 0..49)" in res.output
    assert "error: a step limit must be in 1..50" in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("step ")]
    assert len(lines) == 15 and lines[-1].startswith("step    44")   # every 3rd of 45 steps, as they go
    assert "at step 45 (last step 44" in res.output
    assert "error: cannot write the folder /proc" in res.output
    assert "error: cannot write /dev/null/y.png: part of the path is a file" in res.output


def test_debug_figure_paths_and_spectrum_size():
    script = "spectrum 100000\nspectrum abc\nspectrum 3 x y\nslice foo\n"
    res = cli(["debug", "--steps", "5"] + RUN, input=script)
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "error: spectrum: k must be a whole number in 1..64 (as --sharpness topk:K), got 100000" in res.output
    assert "error: spectrum [K] [PNG]: the figure path must end in .png, .pdf, .svg, got 'abc'" in res.output
    assert "got 'x y'" in res.output
    assert "error: slice [PNG]: the figure path must end in .png, .pdf, .svg, got 'foo'" in res.output
    assert not os.path.exists("abc") and not os.path.exists("foo")


def test_debug_ctrl_c_returns_to_the_prompt(shapes):
    from minicnn.cli.debug import DebugShell
    shell = DebugShell(Stepper(data=shapes, steps=40, **TINY))
    calls = []

    def interrupt(rec):
        calls.append(rec["step"])
        if len(calls) == 3:
            raise KeyboardInterrupt
    shell.s.trainer.step = _wrap(shell.s.trainer.step, interrupt)
    runner = CliRunner()
    with runner.isolation() as (_, _, out):
        shell.onecmd("step 30")
        shell.onecmd("where")
    text = out.getvalue().decode()
    assert "interrupted; at step 2" in text and "at step 2 (last step 1" in text


def _wrap(step, after):
    def wrapped(*a, **k):
        rec = step(*a, **k)
        after(rec)
        return rec
    return wrapped


# ---------------------------------------------------------------- resume: bit for bit
def same_trace(a, b):
    """Every steps.csv column but the timings equal bit for bit (NaN where NaN), and the same evaluations."""
    ra, rb = load_run(a), load_run(b)
    assert list(ra.steps) == list(rb.steps)
    for c in ra.steps:
        if c not in TIMING_COLUMNS:
            assert np.array_equal(ra.steps[c], rb.steps[c], equal_nan=True), c
    for c in ra.evals:
        assert np.array_equal(ra.evals[c], rb.evals[c], equal_nan=True), c


FULL = dict(lr=0.2, momentum=0.9, lr_schedule="cosine", sharpness_every=10, checkpoint_every=5, eval_every=7,
            trace="full", steps=16, **TINY)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shapes):
    out = str(tmp_path_factory.mktemp("straight") / "r")
    train(out=out, data=shapes, **FULL)
    return out


@pytest.mark.parametrize("at", [0, 11])
def test_interrupted_then_resumed_is_bit_for_bit(straight, tmp_path, shapes, at):
    out = str(tmp_path / "r")

    def stop(rec):
        if rec["step"] == at:
            raise KeyboardInterrupt
    r = train(out=out, data=shapes, on_step=stop, **FULL)
    assert r.status == "interrupted" and r.steps == at + 1 and r.checkpoint.endswith(f"step_{at + 1:07d}.npz")
    assert load_run(out).summary["status"] == "interrupted"
    r2 = train(out=out, data=shapes, resume=True)
    assert r2.status == "finished" and r2.resumed_from == at + 1 and r2.steps == 16
    same_trace(straight, out)


def test_killed_run_resumes_from_its_last_periodic_checkpoint(straight, tmp_path, shapes):
    out = str(tmp_path / "r")
    shutil.copytree(straight, out)                    # as if killed at step 13: no summary, a row cut,
    for f in ("summary.json", "checkpoint.npz"):      # and checkpoints up to 10
        os.remove(os.path.join(out, f))
    os.remove(os.path.join(out, "checkpoints", "step_0000015.npz"))
    write_lines(os.path.join(out, "steps.csv"), lambda ls: ls[:14] + [ls[14][:20]])
    write_lines(os.path.join(out, "evals.csv"), lambda ls: ls[:3] + [b""])      # evaluations at 0 and 7
    r = train(out=out, data=shapes, resume=True, **FULL)
    assert r.resumed_from == 10 and r.status == "finished"
    same_trace(straight, out)


def test_resume_to_more_steps_and_what_it_refuses(tmp_path, shapes):
    kw = dict(lr=0.2, momentum=0.9, checkpoint_every=4, eval_every=5, **TINY)
    long = str(tmp_path / "long")
    train(out=long, data=shapes, steps=16, **kw)
    out = str(tmp_path / "r")
    train(out=out, data=shapes, steps=11, **kw)
    train(out=out, data=shapes, resume=True, steps=16)                      # a finished run, more steps
    a, b = load_run(long), load_run(out)
    for c in a.steps:
        if c not in TIMING_COLUMNS:
            assert np.array_equal(a.steps[c], b.steps[c], equal_nan=True), c
    assert list(b.evals["step"]) == [0, 5, 10, 11, 15, 16]                  # the old end's evaluation stays
    assert json.load(open(os.path.join(out, "config.json")))["resumed"] == [{"from_step": 11, "steps_total": 16}]
    cos = str(tmp_path / "cos")
    train(out=cos, data=shapes, steps=6, lr_schedule="cosine", **kw)
    with pytest.raises(ConfigError, match="depends on the run's length"):
        train(out=cos, data=shapes, resume=True, steps=12)
    with pytest.raises(ConfigError, match="lr is 0.2 there, 0.3 asked"):
        train(out=cos, data=shapes, resume=True, lr=0.3, steps=6)
    div = str(tmp_path / "div")
    train(out=div, data=shapes, steps=5, init_scale=1e30, **kw)
    with pytest.raises(ConfigError, match="diverged"):
        train(out=div, data=shapes, resume=True, steps=10)


def test_sweep_run_resumes_an_interrupted_run(straight, tmp_path):
    from minicnn import TrainConfig
    out = str(tmp_path / "r")
    cfg = TrainConfig(data="shapes", n_train=200, n_val=50, **FULL)
    train(cfg, out=out, on_step=lambda rec: _raise(rec["step"] == 8))
    cfg = cfg.to_dict()
    row = run_one("r", cfg, out)
    assert row["status"] == "finished" and row["resumed_from"] == 9
    same_trace(straight, out)


def _raise(cond):
    if cond:
        raise KeyboardInterrupt


# ---------------------------------------------------------------- signals, through real processes
CMD = [sys.executable, "-c", "from minicnn.cli.main import main; main()"]
SIG_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def launch(args, cwd):
    """The CLI in a process of its own group, SIGINT at its default (a background shell ignores it)."""
    return subprocess.Popen(CMD + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_rows(paths, rows, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        counts = [sum(1 for _ in open(p)) - 1 if os.path.isfile(p) else -1 for p in paths]
        if min(counts) >= rows:
            return counts
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError(f"no {rows} steps in {paths} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_train_stops_after_the_step_and_resumes(tmp_path, sig, shapes):
    out = str(tmp_path / "r")
    args = ["train", "--out", out, "--steps", "100000", "--trace", "full", "--checkpoint-every", "50", "-q"] + RUN
    proc = launch(args, tmp_path)
    wait_for_rows([os.path.join(out, "steps.csv")], 5, proc)
    os.kill(proc.pid, sig)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == SIG_EXIT[sig], text
    assert "Traceback" not in text and f"minicnn train --resume {out}" in text
    s = json.load(open(os.path.join(out, "summary.json")))
    k = s["steps"]
    assert s["status"] == "interrupted" and s["stopped_by"] == signal.Signals(sig).name
    assert len(load_run(out).steps["step"]) == k                        # every step taken is recorded
    assert os.path.isfile(os.path.join(out, "checkpoints", f"step_{k:07d}.npz"))
    assert all(os.path.isfile(os.path.join(out, f)) for f in ("checkpoint.npz", "loss.png", "evals.csv"))
    res = cli(["train", "--resume", out, "--steps", str(k + 4), "-q"])
    assert res.exit_code == 0, res.output
    ref = str(tmp_path / "ref")
    train(out=ref, data=shapes, steps=k + 4, trace="full", checkpoint_every=50, **TINY)
    same_trace(ref, out)


def test_sigkill_to_train_loses_no_whole_step(tmp_path, shapes):
    out = str(tmp_path / "r")
    args = ["train", "--out", out, "--steps", "100000", "--trace", "full", "--checkpoint-every", "10", "-q"] + RUN
    proc = launch(args, tmp_path)
    wait_for_rows([os.path.join(out, "steps.csv")], 12, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    run = load_run(out)                                          # loads whatever is whole
    n = len(run.steps["step"])
    assert run.summary == {} and n >= 12
    res = cli(["inspect", out, "--no-plot"])
    assert res.exit_code == 0 and "no summary: still running or killed" in res.output
    # the last whole checkpoint: the one before step 10 * (n // 10), or, when the kill came between
    # that step's row and its checkpoint (n a multiple of 10), the one before
    last = max(k for k, _ in list_checkpoints(out) if k <= n)
    assert last in (10 * (n // 10), 10 * (n // 10) - 10 if n % 10 == 0 else -1), (n, last)
    res = cli(["train", "--resume", out, "--steps", str(n + 3), "-q"])
    assert res.exit_code == 0 and f"resuming from step {last}" in res.output, res.output
    ref = str(tmp_path / "ref")
    train(out=ref, data=shapes, steps=n + 3, trace="full", checkpoint_every=10, **TINY)
    same_trace(ref, out)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("sig,group,workers", [(signal.SIGINT, False, 1), (signal.SIGTERM, False, 1),
                                               (signal.SIGINT, True, 2), (signal.SIGTERM, True, 1)],
                         ids=["SIGINT-sweep", "SIGTERM-sweep", "SIGINT-group", "SIGTERM-group"])
def test_signal_to_a_sweep_stops_every_run_and_writes_every_row(tmp_path, sig, group, workers):
    out = str(tmp_path / "s")
    args = ["sweep", "--seeds", "0,1,2", "--workers", str(workers), "--out", out, "-q", "--no-plot", "--steps",
            "100000", "--trace", "light", "--checkpoint-every", "0"] + RUN
    proc = launch(args, tmp_path)
    wait_for_rows([os.path.join(out, f"seed={s}", "steps.csv") for s in range(workers)], 3, proc)
    pids = [c for c in children(proc.pid) if "resource_tracker" not in open(f"/proc/{c}/cmdline").read()]
    (os.killpg if group else os.kill)(proc.pid, sig)
    text = proc.communicate(timeout=90)[0]
    assert proc.returncode == SIG_EXIT[sig], text
    assert "Traceback" not in text and "run the same command again to resume" in text
    rows = list(__import__("csv").DictReader(open(os.path.join(out, "summary.csv"))))
    assert [r["name"] for r in rows] == ["seed=0", "seed=1", "seed=2"]
    assert [r["status"] for r in rows] == ["interrupted"] * 3
    for r in rows[:workers]:                           # the runs under way: stopped after a step, all written
        s = json.load(open(os.path.join(out, r["name"], "summary.json")))
        assert s["status"] == "interrupted" and int(r["steps"]) == s["steps"] >= 3
        assert len(load_run(os.path.join(out, r["name"])).steps["step"]) == s["steps"]
        assert os.path.isfile(os.path.join(out, r["name"], "checkpoints", f"step_{s['steps']:07d}.npz"))
    assert [r["error"] for r in rows[workers:]] == ["stopped before it started"] * (3 - workers)
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in pids):
        time.sleep(0.1)
    assert not [w for w in pids if os.path.exists(f"/proc/{w}")], "workers left running"


@pytest.mark.parametrize("value", ["abc", "-5", "inf"])
def test_a_bad_spin_setting_is_one_line_and_exit_1(tmp_path, value):
    """MINICNN_SPIN_US (how long the thread team waits spinning) is read when the CPU kernels load:
    anything but a number of microseconds >= 0 stops the command with one line."""
    env = dict(os.environ, MINICNN_SPIN_US=value)
    r = subprocess.run(CMD + ["train", "--out", str(tmp_path / "r"), "--steps", "1", "-q"] + RUN, cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "MINICNN_SPIN_US must be a number of microseconds >= 0" in lines[0], lines
