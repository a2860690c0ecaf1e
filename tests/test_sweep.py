"""minicnn sweep: grid expansion, the summary and figure of a tiny grid, resume, failing runs, Dask."""
import csv
import os

import pytest
from click.testing import CliRunner

from minicnn.cli.main import main
from minicnn.config import TrainConfig
from minicnn.errors import ConfigError
from minicnn.sweep import SUMMARY_COLUMNS, expand_grid, is_done, run_name, run_one, run_sweep, sweep_cells
from tests.procs import children

TINY = dict(arch="tiny", n_train=256, n_val=64, steps=20, batch_size=32, eval_every=10, checkpoint_every=0)
TINY_ARGS = ["--n-train", "256", "--n-val", "64", "--steps", "20", "--batch-size", "32", "--eval-every", "10",
             "--checkpoint-every", "0"]
BAD_ARCH = "conv4-fc3"        # 3 outputs for 10 classes: train() raises ConfigError


def base(**kw):
    cfg = {k: v for k, v in {**TINY, **kw}.items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**cfg)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the grid
def test_expand_grid_order_and_names():
    tasks = expand_grid(base(), {"seed": [0, 1], "lr": [0.01, 0.1], "arch": ["tiny", "linear"]})
    assert len(tasks) == 8
    assert [t.name for t in tasks[:3]] == ["arch=tiny_lr=0.01_seed=0", "arch=tiny_lr=0.01_seed=1",
                                           "arch=tiny_lr=0.1_seed=0"]
    assert list(tasks[0].options) == ["arch", "lr", "seed"]
    assert tasks[-1].config["arch"] == "linear" and tasks[-1].config["lr"] == 0.1 and tasks[-1].config["seed"] == 1
    assert tasks[0].config["n_train"] == 256                         # the base passes through
    assert len({t.name for t in tasks}) == 8


def test_expand_grid_single_values_not_in_names():
    tasks = expand_grid(base(), {"arch": ["tiny"], "lr": [0.01, 0.1]})
    assert [t.name for t in tasks] == ["lr=0.01", "lr=0.1"]
    assert run_name({}) == "run"
    long = run_name({"arch": "conv16k3p1-relu-" * 20 + "fc10"})
    assert len(long) <= 120 and long != run_name({"arch": "conv16k3p1-relu-" * 21 + "fc10"})
    assert run_name({"lr_schedule": "0:0.01,500:1.0"}) == "lr_schedule=0-0.01-500-1.0"


@pytest.mark.parametrize("grid,msg", [
    ({"lr": [0.1, 0.1]}, "repeats"),
    ({"learning_rate": [0.1]}, "not a training option"),
    ({"lr": [0.1, -1.0]}, "--lr"),
    ({"lr": []}, "no values"),
])
def test_expand_grid_errors(grid, msg):
    with pytest.raises(ConfigError, match=msg):
        expand_grid(base(), grid)


@pytest.mark.parametrize("args,msg", [
    (["--lr", "0.1,abc"], "'--lr'"),
    (["--batch-size", "32,0"], "'--batch-size'"),
    (["--init", "torch,orthogonal"], "'--init'"),
    (["--lr", "0.1,,0.2"], "empty item"),
    (["--seeds", "0,x"], "'--seeds'"),
])
def test_cli_bad_list_value(tmp_path, args, msg):
    res = CliRunner().invoke(main, ["sweep", "--out", str(tmp_path / "s")] + args)
    assert res.exit_code == 2, res.output
    assert msg in res.output
    assert not os.path.exists(tmp_path / "s")


# ---------------------------------------------------------------- one run, in-process
def test_run_one_that_raises_is_an_error_row(tmp_path, monkeypatch):
    import sys
    train_module = sys.modules["minicnn.trainer"]

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")
    monkeypatch.setattr(train_module, "train", boom)
    row = run_one("r", base().to_dict(), str(tmp_path / "r"))
    assert row["status"] == "error" and row["error"] == "RuntimeError: kernel exploded"
    assert "Traceback" in (tmp_path / "r" / "error.txt").read_text()


def test_run_one_ships_files(tmp_path):
    row = run_one("r", base(steps=4).to_dict(), str(tmp_path / "r"), ship=True)
    assert row["status"] == "finished" and row["steps"] == 4
    assert not os.path.exists(tmp_path / "r")                 # trained elsewhere, files returned
    assert {"config.json", "steps.csv", "evals.csv", "summary.json"} <= set(row["files"])


# ---------------------------------------------------------------- a tiny sweep through the CLI
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    args = ["sweep", "--arch", f"tiny,{BAD_ARCH}", "--lr", "0.05,0.5", "--workers", "2", "--out", out] + TINY_ARGS
    res = CliRunner().invoke(main, args)
    return out, args, res


def test_sweep_summary_and_figure(tiny_sweep):
    out, _, res = tiny_sweep
    assert res.exit_code == 1, res.output                  # some runs failed: non-zero, and how many
    assert "4 runs in" in res.output and "2 failed" in res.output and "2 of 4 runs failed" in res.output
    rows = read_csv(os.path.join(out, "summary.csv"))
    assert [r["name"] for r in rows] == ["arch=tiny_lr=0.05", "arch=tiny_lr=0.5", f"arch={BAD_ARCH}_lr=0.05",
                                         f"arch={BAD_ARCH}_lr=0.5"]
    cols = list(rows[0])
    assert cols[:3] == ["name", "arch", "lr"] and set(SUMMARY_COLUMNS) <= set(cols)
    for r in rows[:2]:
        assert r["status"] == "finished" and r["steps"] == "20"
        assert r["verdict"] in ("healthy", "slow", "unstable", "collapse", "stuck", "overfitting")
        for c in ("final_train_loss", "final_val_loss", "best_val_loss", "final_val_acc"):
            assert 0 <= float(r[c]) < 10
        assert float(r["best_val_loss"]) <= float(r["final_val_loss"])
        d = os.path.join(out, r["name"])
        assert {"config.json", "steps.csv", "evals.csv", "summary.json", "loss.png"} <= set(os.listdir(d))
    for r in rows[2:]:
        assert r["status"] == "error" and "10 classes" in r["error"] and r["verdict"] == ""
    assert os.path.getsize(os.path.join(out, "grid.png")) > 10_000
    # the printed table: one line per run, the error beside its row
    lines = [l for l in res.output.splitlines() if l.startswith(("tiny", BAD_ARCH))]
    assert len(lines) == 4 and "10 classes" in lines[3]


def test_sweep_resume_skips_finished(tiny_sweep):
    out, args, first = tiny_sweep
    assert first.exit_code == 1
    done = os.path.join(out, "arch=tiny_lr=0.05", "summary.json")
    before = os.stat(done).st_mtime_ns
    res = CliRunner().invoke(main, args + ["--no-plot"])
    assert res.exit_code == 1, res.output
    assert "resuming: 2 runs already finished, 2 to run" in res.output
    assert "2 runs in" in res.output                      # only the two failed runs again
    assert os.stat(done).st_mtime_ns == before
    rows = read_csv(os.path.join(out, "summary.csv"))
    assert [r["resumed"] for r in rows] == ["True", "True", "False", "False"]
    assert rows[0]["verdict"] != ""                        # rebuilt from the run directory


def test_is_done_compares_config(tiny_sweep):
    out, _, _ = tiny_sweep
    d = os.path.join(out, "arch=tiny_lr=0.05")
    cfg = base(lr=0.05).to_dict()
    assert is_done(d, cfg)
    assert is_done(d, {**cfg, "threads": 7})              # thread count does not change results
    assert not is_done(d, {**cfg, "steps": 21})           # a different run: run it again
    assert not is_done(os.path.join(out, f"arch={BAD_ARCH}_lr=0.05"), cfg)


def test_plot_grid_cells(tiny_sweep, tmp_path):
    from minicnn.plots import VERDICT_COLORS, plot_grid
    out, _, _ = tiny_sweep
    cells = [{"run": os.path.join(out, "arch=tiny_lr=0.05"), "row": "a", "col": "x"},     # diagnosed here
             {"run": os.path.join(out, "arch=tiny_lr=0.5"), "row": "a", "col": "y", "verdict": "unstable",
              "decisive_step": 5, "label": "B"},
             {"run": None, "row": "b", "col": "x", "verdict": "error", "subtitle": "it broke"}]
    path = plot_grid(cells, str(tmp_path / "g.png"), title="t")
    assert os.path.getsize(path) > 5_000
    assert {"healthy", "unstable", "collapse", "diverged", "error"} <= set(VERDICT_COLORS)


def test_sweep_cells_layout():
    from minicnn.sweep import SweepResult
    rows = [{"name": f"{a}{l}{s}", "arch": a, "lr": l, "seed": s, "run_dir": None, "status": "finished",
             "verdict": "healthy"} for a in ("small", "wide") for l in (0.01, 0.1) for s in (0, 1)]
    cells = sweep_cells(SweepResult("o", rows, options=["arch", "lr", "seed"]))
    assert len(cells) == 8
    assert [c["row"] for c in cells[:4]] == ["arch=small"] * 4
    assert [c["col"] for c in cells[:4]] == ["lr=0.01 seed=0", "lr=0.01 seed=1", "lr=0.1 seed=0", "lr=0.1 seed=1"]


# ---------------------------------------------------------------- Dask
def test_dask_scheduler_and_workers(tmp_path):
    distributed = pytest.importorskip("distributed", reason="dask distributed is not installed (minicnn[dask])")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        tasks = expand_grid(base(), {"lr": [0.05, 0.5], "arch": ["tiny", BAD_ARCH]})
        out = str(tmp_path / "d")
        seen = []
        res = run_sweep(tasks, out, scheduler=cluster.scheduler_address,
                        on_result=lambda row, done, n: seen.append((row["name"], done, n)))
        assert res.ran == 4 and len(seen) == 4 and sorted(d for _, d, _ in seen) == [1, 2, 3, 4]
        assert [r["status"] for r in res.rows] == ["finished", "finished", "error", "error"]
        pids = {r["worker_pid"] for r in res.rows}
        assert os.getpid() not in pids and len(pids) == 1     # ran in the cluster's worker process
        d = os.path.join(out, "arch=tiny_lr=0.05")
        assert {"config.json", "steps.csv", "summary.json"} <= set(os.listdir(d))   # shipped back
        assert os.path.isfile(os.path.join(out, f"arch={BAD_ARCH}_lr=0.5", "error.txt"))
        # the same sweep again: nothing to run
        again = run_sweep(tasks, out, scheduler=cluster.scheduler_address)
        assert again.ran == 2 and again.skipped == 2
        rows = read_csv(os.path.join(out, "summary.csv"))
        assert len(rows) == 4 and rows[0]["verdict"]


def test_dask_unreachable_scheduler(tmp_path, monkeypatch):
    pytest.importorskip("distributed", reason="dask distributed is not installed (minicnn[dask])")
    import minicnn.sweep
    monkeypatch.setattr(minicnn.sweep, "SCHEDULER_TIMEOUT_S", 2)
    res = CliRunner().invoke(main, ["sweep", "--scheduler", "tcp://127.0.0.1:9", "--out", str(tmp_path / "s")]
                             + TINY_ARGS)
    assert res.exit_code == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in res.output


def test_run_one_diverged_is_a_row_with_its_message(tmp_path):
    row = run_one("d", base(init_scale=1e30, steps=10).to_dict(), str(tmp_path / "d"))
    assert row["status"] == "diverged" and row["verdict"] == "diverged"
    assert "loss became" in row["error"] and row["decisive_step"] is not None


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"      # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_exit_when_the_sweep_process_is_killed(tmp_path):
    """SIGKILL to the sweep alone (not its process group): its workers notice and exit, instead of
    training on as orphans."""
    import subprocess
    import sys
    import time
    out = tmp_path / "s"
    args = [sys.executable, "-c", "from minicnn.cli.main import main; main()", "sweep", "--seeds", "0,1",
            "--workers", "2", "--out", str(out), "-q", "--no-plot", "--arch", "tiny", "--n-train", "256",
            "--n-val", "64", "--steps", "1000000", "--trace", "light", "--checkpoint-every", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("*/steps.csv"))) < 2:
            time.sleep(0.2)
        assert len(list(out.glob("*/steps.csv"))) == 2, "the workers did not start training"
        workers = children(proc.pid)
        assert len(workers) >= 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_running(c) for c in workers):
        time.sleep(0.2)
    left = [c for c in workers if _running(c)]
    for c in left:
        os.kill(c, 9)
    assert not left, f"workers still running after the sweep was killed: {left}"
