"""`minicnn explain --quick`: the question reproduced at a reduced size, each case with its verdict."""
import json
import os

import pytest
from click.testing import CliRunner

from minicnn.cli.main import main
from minicnn.explain import CASES, COLLAPSE_SEEDS, COLLAPSE_STEPS, QUICK, case_configs


def test_cases_are_plain_sgd_at_a_constant_lr():
    cfgs = [cfg for _, cfg in case_configs(quick=True)]
    question = cfgs[:3]
    assert all(c["lr"] == 0.1 and c["momentum"] == 0 and c["weight_decay"] == 0 for c in question)
    assert all(c["lr_schedule"] == "constant" for c in question)      # no injected step: case 3 is real
    same = {k for k in question[0] if all(c[k] == question[0][k] for c in question)}
    assert {"data", "n_train", "lr", "init"} <= same
    assert cfgs[2]["batch_size"] == 2 and cfgs[2]["steps"] == COLLAPSE_STEPS
    assert CASES[2].seeds == COLLAPSE_SEEDS and len(COLLAPSE_SEEDS) >= 3
    assert cfgs[3]["lr"] == 1e-4 and cfgs[3]["init"] == "dead"
    assert all(c["steps"] == QUICK["steps"] for i, c in enumerate(cfgs) if i != 2)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    r = CliRunner().invoke(main, ["explain", "--quick", "--out", str(out)])
    return out, r


def test_explain_quick_shows_each_verdict(explained):
    out, r = explained
    assert r.exit_code == 0, r.output
    for i, c in enumerate(CASES):
        for key in [f"{c.key}-seed{s}" for s in c.seeds] or [c.key]:
            row = json.loads((out / key / "summary.json").read_text())
            assert row["status"] == "finished"
        assert f"({i + 1}) {c.label}" in r.output
    assert "not reproduced" not in r.output, r.output    # every case reproduced its picture
    assert "progress, then collapse onto a plateau at step" in r.output     # case 3 learned first
    assert "seeds collapsed after learning" in r.output
    assert "unstable from the start" in r.output and "stuck from the start" in r.output
    assert "lr x lambda_max" in r.output
    assert os.path.getsize(out / "explain.png") > 10_000
    assert (out / "explain.txt").read_text().strip() in r.output


def test_explain_resumes(explained):
    out, _ = explained
    r = CliRunner().invoke(main, ["explain", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    n = sum(len(c.seeds) or 1 for c in CASES)
    assert f"resuming: {n} of {n} runs already done" in r.output
