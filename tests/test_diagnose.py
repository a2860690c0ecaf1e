"""Diagnosis on problems with known answers and on engineered runs with a known truth."""
import math

import numpy as np
import pytest

from minicnn import Network, load_run, train
from minicnn.data import load_shapes
from minicnn.diagnose import diagnose
from minicnn.hessian import EXACT_HVP_GRAD_EQUIV, HessianOperator
from minicnn.trace import Sharpness, alpha_from_step


# ------------------------------------------------------------------ known answers
@pytest.mark.parametrize("t_star", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_alpha_on_an_exact_quadratic(t_star):
    # q(t) = (t - t*)^2 along the step: f0 = t*^2, f1 = (1 - t*)^2, q'(t) = 2(t - t*)
    a = alpha_from_step(t_star ** 2, (1 - t_star) ** 2, -2 * t_star, 2 * (1 - t_star))
    assert math.isclose(a, 1 / t_star - 1, rel_tol=1e-12, abs_tol=1e-12)
    # alpha > 1 exactly when the loss rose (past the mirror point t = 2 t*); at t* = 0.5 the step
    # lands on the mirror point itself (alpha = 1 up to rounding: lstsq gave 1 + 4e-16 on one BLAS)
    if not math.isclose(a, 1.0, abs_tol=1e-12):
        assert (a > 1) == ((1 - t_star) ** 2 > t_star ** 2 and 1 > 2 * t_star)


def test_alpha_undefined_on_concave_or_uphill():
    assert math.isnan(alpha_from_step(1.0, 0.0, -0.5, -2.0))   # concave along the step
    assert math.isnan(alpha_from_step(1.0, 2.0, 1.0, 3.0))     # the step went uphill


def dense_hessian(net, x, y, eps=1e-5):
    """The full Hessian of the loss by centred differences of (analytic) gradients, float64."""
    w0 = net.flat_params.copy()
    n = w0.size
    H = np.empty((n, n))
    for i in range(n):
        for sgn, store in ((1, "p"), (-1, "m")):
            net.flat_params[...] = w0
            net.flat_params[i] += sgn * eps
            _, g = net.loss_and_grads(x, y)
            flat = np.concatenate([v.ravel() for v in g])
            if store == "p":
                gp = flat
            else:
                gm = flat
        H[:, i] = (gp - gm) / (2 * eps)
    net.flat_params[...] = w0
    return 0.5 * (H + H.T)


@pytest.mark.parametrize("spec", ["fc3", "conv2k3-relu-fc3"])
def test_lambda_max_matches_dense_hessian(spec):
    rng = np.random.default_rng(0)
    net = Network.from_spec(spec, (1, 5, 5), seed=1, dtype=np.float64, init_scale=3.0, device="numpy")
    x = rng.standard_normal((16, 1, 5, 5))
    y = rng.integers(0, 3, 16)
    top = np.linalg.eigvalsh(dense_hessian(net, x, y))[-1]
    sharp = Sharpness(net, x, y, seed=0)
    lam, evals = sharp()
    assert abs(lam - top) <= 0.01 * abs(top), (lam, top)
    assert evals >= EXACT_HVP_GRAD_EQUIV and evals % EXACT_HVP_GRAD_EQUIV == 0
    # the next measurement starts half from the last top eigenvector: at the same weights it converges sooner
    lam2, evals2 = sharp()
    assert abs(lam2 - top) <= 0.01 * abs(top) and evals2 < evals, (lam2, evals2, evals)


# ------------------------------------------------------------------ engineered runs
@pytest.fixture(scope="module")
def shapes():
    return load_shapes(seed=0, n_train=4000, n_val=500)


def test_first_order_prediction_is_minus_lr_g_squared(tmp_path, shapes):
    out = str(tmp_path / "r")
    train(out=out, data=shapes, steps=15, lr=0.05, batch_size=32, trace="full")
    s = load_run(out).steps
    np.testing.assert_allclose(s["predicted_change"], -0.05 * s["grad_norm"] ** 2, rtol=1e-4)
    np.testing.assert_allclose(s["loss_change"], s["loss_after"] - s["loss"], rtol=1e-12)


def test_injected_huge_step_is_flagged_at_exactly_that_step(tmp_path, shapes):
    out = str(tmp_path / "inject")
    train(out=out, data=shapes, steps=240, lr=0.1, lr_schedule="0:0.1,150:10,151:0.1", batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "collapse", d.text
    assert d.decisive_step == 150, d.text
    assert any(e.kind == "overshoot" and e.step == 150 for e in d.events)
    assert not any(e.kind in ("overshoot", "spike") and e.step < 150 and "lr 10" in e.evidence for e in d.events)
    assert "step 150" in d.text and "dead" in d.text


def test_collapse_names_the_step_that_killed_the_relus_even_when_it_lowered_its_batch_loss():
    """A batch of 2 with one confidently wrong image (loss 14) takes the step that kills every ReLU:
    its own batch's loss FALLS (to ln 10, the constant prediction), while an earlier harmless step
    raised its batch's loss more. The decisive step is the outsized update, not the largest rise."""
    from minicnn.rundir import Run
    rng = np.random.default_rng(0)
    n, kill, noisy = 400, 300, 290
    step = np.arange(n)
    loss = 2.3 - 2.0 * step / kill + 0.02 * rng.standard_normal(n)          # learning until the kill
    after = loss - 0.01
    ratio = np.full(n, 0.01)
    loss[noisy], after[noisy], ratio[noisy] = 0.4, 1.9, 0.03                 # a rise of 1.5, small update
    loss[kill], after[kill], ratio[kill] = 14.0, math.log(10), 0.4           # the kill: loss falls
    loss[kill + 1:] = after[kill + 1:] = math.log(10) + 0.01 * rng.standard_normal(n - kill - 1)
    grad = np.where(step > kill, 0.0, 0.5)
    # on the batch of 2, units read dead and the batch one class before the kill too (noise); the probe
    # (every 10 steps, 256 held-out images) tells the truth: dead and constant only after the kill
    probed = step % 10 == 0
    steps = {"step": step, "lr": np.full(n, 0.1), "loss": loss, "loss_after": after,
             "update_ratio.conv1": ratio, "grad_norm.conv1": grad, "grad_norm": grad,
             "dead.relu1": np.full(n, 0.98), "top_class_share": np.full(n, 1.0),
             "probe_loss": np.where(probed, np.where(step > kill, math.log(10), 1.0), np.nan),
             "probe_dead.relu1": np.where(probed, np.where(step > kill, 1.0, 0.3), np.nan),
             "probe_top_class_share": np.where(probed, np.where(step > kill, 1.0, 0.2), np.nan)}
    run = Run("synthetic", {"config": {"batch_size": 2}, "label_entropy": math.log(10)}, steps, {}, {})
    d = diagnose(run)
    assert d.verdict == "collapse", d.text
    assert d.decisive_step == kill, d.text
    assert "40% of its norm" in d.text and "14 -> 2.3" in d.text


def test_init_that_kills_every_relu_is_stuck_from_the_start(tmp_path, shapes):
    out = str(tmp_path / "dead")
    train(out=out, data=shapes, steps=120, lr=1e-4, init="dead", batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "stuck", d.text
    assert "dead from step 0" in d.text and "ln 10" in d.text


def test_well_tuned_run_is_healthy_without_events(tmp_path, shapes):
    out = str(tmp_path / "ok")
    train(out=out, data=shapes, steps=300, lr=0.05, batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "healthy", d.text
    # No events at all: the isolated same-batch rises of SGD noise are counted, not flagged.
    assert [str(e) for e in d.events] == []
    assert "isolated" in d.text or "0% of steps" in d.text


def test_diverged_run(tmp_path, shapes):
    out = str(tmp_path / "div")
    train(out=out, data=shapes, steps=50, lr=1e20, batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "diverged" and d.decisive_step is not None


def test_sharpness_in_trace(tmp_path, shapes):
    out = str(tmp_path / "sharp")
    train(out=out, data=shapes, steps=6, lr=0.1, batch_size=32, sharpness_every=3, arch="conv4k3p1-relu-maxpool2-fc10")
    s = load_run(out).steps
    assert np.isfinite(s["lambda_max"][[0, 3]]).all() and np.isnan(s["lambda_max"][[1, 2, 4, 5]]).all()
    assert (s["two_over_lr"][[0, 3]] == 20).all() and (s["hvp_evals"][[0, 3]] >= 2).all()


def test_thrown_from_a_huge_start_onto_ln10_is_not_healthy(tmp_path, shapes):
    # He init x 6: the loss starts in the hundreds and the first steps kill every ReLU; falling from
    # 300 to ln 10 is not learning (measured against the constant predictor's loss)
    out = str(tmp_path / "thrown")
    train(out=out, data=shapes, steps=80, lr=0.1, init="he", init_scale=6.0, batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "collapse", d.text
    assert d.decisive_step <= 2 and "before it could learn" in d.title, d.text
    assert "ln 10" in d.text and "dead" in d.text


def test_linear_model_on_unnormalised_inputs_is_unstable(tmp_path, shapes):
    out = str(tmp_path / "jumping")
    train(out=out, data=shapes, steps=300, lr=0.1, arch="linear", input_scale=10.0, batch_size=32)
    d = diagnose(load_run(out))
    assert d.verdict == "unstable", d.text
    assert "jumps around" in d.title and "raised the loss on their own batch" in d.text


def test_lambda_max_is_the_most_positive_eigenvalue_not_the_largest_magnitude():
    # a saddle: the most negative eigenvalue dominates in magnitude; lambda_max must still be +2
    net = Network.from_spec("fc3", (1, 2, 2), seed=0, dtype=np.float64, device="numpy")
    n = net.flat_params.size
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.linspace(-5.0, 2.0, n)
    H = (q * eig) @ q.T

    class Quadratic(HessianOperator):
        def hvp(self, v):
            self.hvps += 1
            self.grad_evals += EXACT_HVP_GRAD_EQUIV
            return H @ v

    sharp = Sharpness(net, np.zeros((2, 1, 2, 2)), np.zeros(2, dtype=np.int64), seed=0)
    sharp.op = Quadratic(net, sharp.op.x, sharp.op.y)
    lam, evals = sharp()
    assert abs(lam - 2.0) <= 0.01 * 2.0, lam
    assert evals > 0
