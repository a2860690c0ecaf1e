"""Issue 18 wired in: the trace's sharpness and gradient-noise columns against direct computations,
their replay bit for bit, the debugger's sharpness --per-layer / spectrum / noise, the gradient-noise
cause and the per-layer crossing line on synthetic traces."""
import math
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from minicnn import ConfigError, Stepper, load_run, train
from minicnn.cli.main import main
from minicnn.config import TrainConfig, sharpness_batch
from minicnn.data import load_shapes
from minicnn.diagnose import diagnose
from minicnn.hessian import HessianOperator, hutchinson_trace, layer_lambda_max, top_eigenvalues
from minicnn.noise import noise_stats
from minicnn.plots import plot_inspect
from minicnn.trace import NOISE_PER_LAYER, NOISE_TOTAL, SHARPNESS_TOL, SHARPNESS_VECTORS, columns, parse_sharpness
from minicnn.trainer import Trainer
from tests.test_diagnosis_causes import collapse_trace, synthetic_run

NET = "conv2k5s3-relu-fc12-relu-fc10"          # 3 parameter layers, ~1,900 parameters: dense-cheap instruments
KW = dict(arch=NET, batch_size=16, lr=0.3, trace="light", probe_every=0)
ALL = "lambda_max,topk:3,trace:6,layers"


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=192, n_val=32)


# ---------------------------------------------------------------- the columns
def test_parse_sharpness():
    assert parse_sharpness("layers") == {"lambda_max": None, "layers": None}
    assert parse_sharpness("trace,topk") == {"lambda_max": None, "topk": 3, "trace": 20}
    assert parse_sharpness("topk:5+trace:40") == {"lambda_max": None, "topk": 5, "trace": 40}
    for bad in ("hessian", "layers:2", "topk:1", "trace:x"):
        with pytest.raises(ConfigError, match="--sharpness"):
            parse_sharpness(bad)
    with pytest.raises(ConfigError, match="--noise-every needs --batch-size >= 2"):
        TrainConfig(noise_every=5, batch_size=1).validate()
    res = CliRunner().invoke(main, ["train", "--sharpness", "eigen", "--steps", "1"])
    assert res.exit_code == 2 and "unknown measure 'eigen'" in res.output


def test_sharpness_and_noise_columns_match_direct_computations(shapes):
    t = Trainer(data=shapes, steps=4, sharpness_every=3, sharpness=ALL, noise_every=2, **KW)
    sb = sharpness_batch(t.n, 0)
    recs, weights, batches = [], [], []
    for _ in range(4):
        weights.append(t.net.get_flat_params())
        batches.append(t.batch())
        recs.append(t.step())
    want = set(columns(t.net, "light", parse_sharpness(ALL), noise=True))
    for r in recs:
        assert set(r) - {"epoch", "time_s"} <= want
    assert [("lambda_max" in r, "b_noise" in r) for r in recs] == [(True, True), (False, False), (False, True),
                                                                   (True, False)]
    for i in (0, 3):
        r, op = recs[i], HessianOperator(t.net, shapes.x_train[sb], shapes.y_train[sb], flat_params=weights[i])
        # Lanczos' guarantee at SHARPNESS_TOL: each Ritz value within its residual, <= tol x lambda_max
        top = top_eigenvalues(op, k=3, tol=1e-8)
        bound = SHARPNESS_TOL * top.values[0]
        assert [r["lambda_max"], r["lambda_2"], r["lambda_3"]] == pytest.approx(top.values, abs=bound)
        h = hutchinson_trace(op, max_samples=6, min_samples=6, rel_se=0.0, seed=[0, SHARPNESS_VECTORS, i, 1])
        assert (r["hessian_trace"], r["hessian_trace_se"]) == pytest.approx((h.trace, h.stderr), rel=1e-12)
        for name, res in layer_lambda_max(op, tol=1e-8).items():
            assert r[f"lambda_max.{name}"] == pytest.approx(res.lambda_max, rel=SHARPNESS_TOL)
        assert r["two_over_lr"] == pytest.approx(2 / 0.3) and r["grad_evals"] == 3 * r["hvp_evals"] > 0
    for i in (0, 2):
        t.net.set_flat_params(weights[i])
        rep = noise_stats(t.net.per_sample_grads(*batches[i]), t.net.param_layers())
        for s in NOISE_TOTAL:
            assert recs[i][s] == pytest.approx(getattr(rep.total, s), rel=1e-9, abs=1e-12), s
        for s in NOISE_PER_LAYER:
            for name, st in rep.layers.items():
                assert recs[i][f"{s}.{name}"] == pytest.approx(getattr(st, s), rel=1e-9, abs=1e-12)


def test_noise_every_leaves_training_bit_identical(shapes):
    a = train(data=shapes, steps=14, on_step=(ra := []).append, **KW)
    b = train(data=shapes, steps=14, noise_every=1, on_step=(rb := []).append, **KW)
    assert a.losses == b.losses
    assert [r["grad_norm"] for r in ra] == [r["grad_norm"] for r in rb]
    assert all(math.isfinite(r["b_noise"]) or r["b_noise"] == math.inf for r in rb)


def test_replay_reproduces_every_sharpness_column_bit_for_bit(shapes, tmp_path):
    out = str(tmp_path / "run")
    train(out=out, data=shapes, steps=13, sharpness_every=3, sharpness=ALL, checkpoint_every=5, noise_every=4,
          **KW)
    steps = load_run(out).steps
    cols = [c for c in steps if c.startswith(("lambda_", "hessian_trace", "b_noise", "tr_sigma"))]
    s = Stepper.from_run(out, 5, data=shapes)        # from the checkpoint at 5: its warm starts are those of step 3
    assert s.replay["match"]
    for rec in s.step(7):
        for c in cols:
            if c in rec:
                assert rec[c] == steps[c][rec["step"]], (rec["step"], c)
    s.back(4)                                        # the in-memory snapshots carry the warm starts too
    assert s.step(1)[0]["lambda_max"] == steps["lambda_max"][9]
    plot_inspect(load_run(out), diagnose(load_run(out)), str(tmp_path / "inspect.png"))
    assert os.path.getsize(tmp_path / "inspect.png") > 1000


# ---------------------------------------------------------------- the debugger
def test_debug_sharpness_per_layer_spectrum_noise(tmp_path):
    png = tmp_path / "spec.png"
    script = f"step 2\nsharpness --per-layer\nspectrum 3 {png}\nnoise\nsharpness sideways\nhelp spectrum\n"
    res = CliRunner().invoke(main, ["debug", "--arch", NET, "--n-train", "192", "--n-val", "32", "--batch-size", "16",
                                    "--lr", "0.3", "--steps", "10"], input=script)
    out = res.output
    assert res.exit_code == 0, out
    m = re.search(r"lambda_max (\S+), lr 0.3, 2/lr 6.6667; lr\*lambda_max \S+ < 2: stable on a quadratic "
                  r"\((\d+) Hessian-vector products = (\d+) gradient evaluations", out)
    assert m and int(m.group(3)) == 3 * int(m.group(2))
    rows = re.findall(r"^  (conv1|fc1|fc2) +(\S+) +(\S+)  < 2", out, re.M)
    assert [r[0] for r in rows] == ["conv1", "fc1", "fc2"]
    assert all(float(lam) <= float(m.group(1)) * (1 + 1e-6) for _, lam, _ in rows)   # a block's top <= the whole's
    assert re.search(r"top 3 eigenvalues: (\S+), \S+, \S+ +\(lr\*lambda_1", out) and os.path.getsize(png) > 1000
    assert re.search(r"trace \(Hutchinson, 20 samples\): \S+ \+- \S+; per layer: conv1 \S+, fc1 \S+, fc2 ", out)
    table = re.findall(r"^  (all|conv1|fc1|fc2) +(\S+ +){4}\S+$", out, re.M)      # noise: 5 numbers per block
    assert [r[0] for r in table] == ["all", "conv1", "fc1", "fc2"]
    assert "batch 16 against B_noise" in out or "the noise swamps the estimated signal" in out
    assert "error: sharpness takes --per-layer or nothing, got 'sideways'" in out
    assert "eigenvalue density" in out


# ---------------------------------------------------------------- the diagnosis
def noise_columns(n, b_noise, every=10):
    step = np.arange(n)
    on = step % every == 0
    return {"tr_sigma": np.where(on, b_noise * 0.01, np.nan), "grad_sq_unbiased": np.where(on, 0.01, np.nan)}


def test_batch_far_below_the_noise_scale_is_a_cause():
    d = diagnose(synthetic_run(collapse_trace(**noise_columns(300, 100.0)), 8))
    assert d.verdict == "collapse" and d.cause.name == "gradient_noise", d.text
    assert "B_noise = tr(Sigma)/|g|^2 = 100 (averaged over 16 measurements, steps 0-150) against batches of 8" \
        in d.text and d.cause.change == {"kind": "lr_scale", "from_step": 150, "factor": 0.1}
    # not when the curvature alone explains it, nor at a noise scale near the batch, nor from too few measurements
    lam = np.where(np.arange(300) % 50 == 0, 30.0, np.nan)
    for steps, batch in ((dict(noise_columns(300, 100.0), lambda_max=lam), 8), (noise_columns(300, 16.0), 8),
                         (noise_columns(300, 100.0, every=40), 8)):
        assert diagnose(synthetic_run(collapse_trace(**steps), batch)).cause.name == "lr_too_high"
    d = diagnose(synthetic_run(collapse_trace(**noise_columns(300, 100.0)), 2))     # tiny batches stay tiny_batch
    assert d.cause.name == "tiny_batch" and "SNR B/B_noise 0.02" in d.text
    # without noise columns the existing choice is unchanged
    assert diagnose(synthetic_run(collapse_trace(), 8)).cause.name == "lr_too_high"


def test_which_layer_crossed_2_over_lr_first():
    step = np.arange(300)
    every = step % 20 == 0
    cols = {"lambda_max": np.where(every, np.where(step >= 100, 25.0, 5.0), np.nan),
            "lambda_max.conv1": np.where(every, np.where(step >= 140, 21.0, 1.0), np.nan),
            "lambda_max.fc1": np.where(every, np.where(step >= 100, 24.0, 4.0), np.nan),
            "lambda_max.fc2": np.where(every, 0.5, np.nan)}
    d = diagnose(synthetic_run(collapse_trace(**cols), 32))
    assert d.verdict == "collapse", d.text
    assert ("fc1 crossed 2/lr first: its own lr x lambda_max = 2.40 at step 100 (before the decisive step 150); "
            "then conv1 at step 140; never: fc2") in d.text
    low = {k: v / 20 if k != "lambda_max" else v for k, v in cols.items()}
    d = diagnose(synthetic_run(collapse_trace(**low), 32))
    assert ("no layer's own lambda_max had crossed 2/lr by the decisive step 150 (the largest: fc1, lr x lambda_max "
            "= 0.12 at step 100); the whole network's had, at step 100 (lr x lambda_max 2.50): the sharp direction "
            "spans layers") in d.text
    late = dict(low, **{"lambda_max.fc2": np.where(every, np.where(step >= 200, 30.0, 0.5), np.nan)})
    assert "; later fc2's did, at step 200" in diagnose(synthetic_run(collapse_trace(**late), 32)).text
    assert "crossed 2/lr" not in diagnose(synthetic_run(collapse_trace(), 32)).text
