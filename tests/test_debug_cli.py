"""`minicnn debug` driven by piped commands and command files, through click's CliRunner."""
import os
import re

import pytest
from click.testing import CliRunner

from minicnn.cli.main import main

FAST = ["--n-train", "256", "--n-val", "64", "--arch", "tiny", "--batch-size", "32"]
STEP_LINE = re.compile(r"^step +(\d+) +lr (\S+) +loss (\S+) -> (\S+)", re.M)


def debug(args, commands):
    return CliRunner().invoke(main, ["debug"] + args, input=commands)


def test_piped_session(tmp_path):
    script = "\n".join(["step 3", "show", "whatif lr=0.5,0.01", "bogus", "step x", "back 2", "step 2",
                        "layer fc9", f"slice {tmp_path / 's.png'}", "sharpness", "where", "quit", "step 5"]) + "\n"
    res = debug(FAST + ["--lr", "0.5", "--momentum", "0.9", "--steps", "50"], script)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "at step 0, before the first step" in out
    steps = STEP_LINE.findall(out)
    # 3 steps, then back 2 and the same 2 steps again, to the last printed digit
    assert [int(s[0]) for s in steps] == [0, 1, 2, 1, 2]
    assert steps[3:] == steps[1:3]
    # whatif at the run's own lr gives the committed step's loss after, as printed by `step`
    row = re.search(r"^ +0\.5 +(\S+) +(\S+) .*\(committed\)$", out, re.M)
    assert row and (row.group(1), row.group(2)) == (steps[2][2], steps[2][3])
    assert re.search(r"^ +0\.01 +\S+ +\S+ ", out, re.M)
    # each bad command: one error line, and the session went on
    assert out.count("error: ") == 3
    assert "error: unknown command 'bogus'; type 'help' for the list\n" in out
    assert "error: step takes a whole number, got 'x'\n" in out
    assert "error: no layer 'fc9'; layers: conv1, relu1, flatten1, fc1, relu2, fc2\n" in out
    assert "loss_after" in out and "events:" in out                  # show
    assert "S start, L landed" in out and os.path.isfile(tmp_path / "s.png")
    assert "lr*lambda_max" in out
    assert "at step 3 (last step 2; next lr 0.5)" in out             # where
    assert out.count("(minicnn) ") == 12                              # nothing after quit ran


def test_until_and_commands_file(tmp_path):
    f = tmp_path / "cmds.txt"
    f.write_text("# overshoot at lr 2 comes fast\nuntil overshoot 30\n\nuntil step 6\nuntil loss<0.0001 2\n")
    res = CliRunner().invoke(main, ["debug", "--commands", str(f), "--lr", "2", "--steps", "40"] + FAST)
    assert res.exit_code == 0, res.output
    m = re.search(r"stopped at step (\d+) after (\d+) step\(s\): overshoot: same-batch loss", res.output)
    assert m and int(m.group(1)) + 1 == int(m.group(2))
    assert "stopped at step 6 " in res.output
    assert "no loss<0.0001 in 2 step(s)" in res.output


def test_replay_from_run_dir(tmp_path):
    out = str(tmp_path / "run")
    res = CliRunner().invoke(main, ["train", "--lr", "0.5", "--steps", "14", "--checkpoint-every", "5",
                                    "--out", out, "-q"] + FAST)
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "step_0000000.npz", "step_0000005.npz", "step_0000010.npz"]
    res = debug(["--from", out, "--step", "8"], "show\nstep\n")
    assert res.exit_code == 0, res.output
    assert "replayed 4 step(s) from checkpoint at step 5" in res.output
    assert "loss and loss_after match the record bit for bit" in res.output
    recorded = open(os.path.join(out, "steps.csv")).read().splitlines()
    loss9 = float(recorded[1 + 9].split(",")[3])
    steps = STEP_LINE.findall(res.output)
    assert [int(s[0]) for s in steps] == [8, 9] and float(steps[1][2]) == pytest.approx(loss9, abs=5e-7)


def test_usage_errors():
    res = debug(["--step", "3"] + FAST, "")
    assert res.exit_code == 2 and "--step needs --from" in res.output
    res = debug(FAST + ["--steps", "5"], "help\nhelp whatif\n")
    assert res.exit_code == 0
    for cmd in ("step", "until", "show", "layer", "whatif", "slice", "sharpness", "back", "save", "quit"):
        assert cmd in res.output
    assert "without committing" in res.output


def test_tab_completion():
    from minicnn import Stepper
    from minicnn.cli.debug import DebugShell
    from minicnn.data import load_shapes
    shell = DebugShell(Stepper(data=load_shapes(seed=0, n_train=64, n_val=16), arch="tiny", steps=3))
    assert shell.completenames("wh") == ["whatif", "where"]
    assert shell.complete_layer("re", "layer re", 6, 8) == ["relu1", "relu2"]
    assert shell.complete_until("o", "until o", 6, 7) == ["overshoot"]
