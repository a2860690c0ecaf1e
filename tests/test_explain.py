"""`minicnn explain --quick`: the question reproduced at a reduced size, each case with its verdict."""
import json
import os

import pytest
from click.testing import CliRunner

from minicnn.cli.main import main
from minicnn.explain import CASES, QUICK, case_configs


def test_cases_are_plain_sgd_and_differ_only_in_the_network():
    cfgs = [cfg for _, cfg in case_configs(quick=True)]
    question = cfgs[:3]
    assert all(c["lr"] == 0.1 and c["momentum"] == 0 and c["weight_decay"] == 0 for c in question)
    assert cfgs[0]["lr_schedule"] == cfgs[1]["lr_schedule"] == "constant"
    assert cfgs[2]["lr_schedule"] == "0:0.1,100:10,101:0.1"     # case 3: lr 0.1 but for one injected step
    same = {k for k in question[0] if all(c[k] == question[0][k] for c in question)}
    assert {"data", "seed", "batch_size", "n_train", "steps"} <= same
    assert cfgs[3]["lr"] == 1e-4 and cfgs[3]["init"] == "dead"
    assert all(c["steps"] == QUICK["steps"] for c in cfgs)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    r = CliRunner().invoke(main, ["explain", "--quick", "--out", str(out)])
    return out, r


def test_explain_quick_shows_each_verdict(explained):
    out, r = explained
    assert r.exit_code == 0, r.output
    for i, c in enumerate(CASES):
        row = json.loads((out / c.key / "summary.json").read_text())
        assert row["status"] == "finished"
        assert f"({i + 1}) {c.label}" in r.output
    assert "expected" not in r.output, r.output          # every case reproduced its picture
    assert "unstable from the start" in r.output and "stuck from the start" in r.output
    assert "lr x lambda_max" in r.output
    assert os.path.getsize(out / "explain.png") > 10_000
    assert (out / "explain.txt").read_text().strip() in r.output


def test_explain_resumes(explained):
    out, _ = explained
    r = CliRunner().invoke(main, ["explain", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"resuming: {len(CASES)} of {len(CASES)} runs already done" in r.output
