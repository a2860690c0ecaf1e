"""Gradient-noise statistics (minicnn.noise): against Cockpit's and McCandlish et al.'s formulas
written out literally, on synthetic per-sample gradients with a known covariance (unbiasedness
over many batches), and on softmax regression, whose per-sample gradients are known in closed form
and whose noise covariance over a finite data set is exact.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import ConfigError, Network
from minicnn.noise import GSNR_EPS, NoiseStats, block_stats, gradient_noise, noise_stats, record_columns


def cockpit_formulas(G):
    """Cockpit's norm, inner-product and orthogonality tests (squared) and mean GSNR, transcribed
    from cockpit/quantities/{norm_test,inner_test,ortho_test,mean_gsnr}.py. Cockpit's per-sample
    gradients ("batch_grad") are those of the mean loss: g_i / B. -> {name: (value, scale)}: the
    tests in their moment form are differences of terms of size ``scale``, so they are compared to
    rounding relative to that scale (for P = 1 the orthogonal variance is exactly 0, and the moment
    form gives +-1e-17)."""
    B = G.shape[0]
    batch_grad = G / B
    grad = batch_grad.sum(axis=0)
    grad_l2_squared = grad @ grad
    batch_l2_squared = (batch_grad ** 2).sum(axis=1)
    batch_dot = batch_grad @ batch_grad.T
    big = B ** 2 * batch_l2_squared.sum() / (B - 1) / B / grad_l2_squared
    var_l1 = (B ** 2 * batch_l2_squared.sum() - B * grad_l2_squared) / (B - 1)
    norm_test_sq = var_l1 / B / grad_l2_squared
    projections = B * batch_dot.sum(axis=1)
    var_proj = ((projections ** 2).sum() - B * grad_l2_squared ** 2) / (B - 1)
    inner_sq = var_proj / B / grad_l2_squared ** 2
    var_orth = (B ** 2 * batch_l2_squared.sum() - (projections ** 2 / grad_l2_squared).sum()) / (B - 1)
    ortho_sq = var_orth / B / grad_l2_squared
    sum_grad_squared = (batch_grad ** 2).sum(axis=0)
    gsnr = float(np.mean(grad ** 2 / (B * sum_grad_squared - grad ** 2 + GSNR_EPS)))
    return dict(norm_test=(norm_test_sq, big), orthogonality_test=(ortho_sq, big),
                inner_product_test=(inner_sq, (projections ** 2).sum() / (B - 1) / B / grad_l2_squared ** 2),
                gsnr_mean=(gsnr, None))


def mccandlish_formulas(G):
    """McCandlish et al. 2018, Appendix A: unbiased |G|^2 and S = tr(Sigma) from the squared norms
    of a small (B_small = 1, averaged over the batch) and a big (B_big = B) batch gradient."""
    B = G.shape[0]
    big = float(np.sum(G.mean(axis=0) ** 2))
    small = float(np.mean(np.sum(G ** 2, axis=1)))
    grad_sq = (B * big - small) / (B - 1)
    S = (small - big) / (1 - 1 / B)
    return dict(grad_sq_unbiased=grad_sq, tr_sigma=S, b_noise=S / grad_sq), small


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(2, 9), P=st.integers(1, 12),
       signal=st.sampled_from([0.1, 1.0, 5.0]))
def test_matches_cockpit_and_mccandlish_formulas(seed, B, P, signal):
    rng = np.random.default_rng(seed)
    G = signal * rng.standard_normal(P) + rng.standard_normal((B, P))
    st_ = noise_stats(G).total
    for name, (want_sq, scale) in cockpit_formulas(G).items():
        got = getattr(st_, name)
        if scale is None:
            assert got == pytest.approx(want_sq, rel=1e-7), name      # its moment form rounds at ~1e-9
        else:
            assert got ** 2 == pytest.approx(want_sq, rel=1e-9, abs=1e-12 * scale), name
    want, small = mccandlish_formulas(G)       # its moment form: differences of terms of size `small`
    for name in ("tr_sigma", "grad_sq_unbiased"):
        assert getattr(st_, name) == pytest.approx(want[name], rel=1e-9, abs=1e-12 * small), name
    if st_.grad_sq_unbiased <= 0:
        assert st_.b_noise == math.inf
    else:
        rel = 1e-9 + 1e-12 * small * (1 / st_.tr_sigma + 1 / st_.grad_sq_unbiased)
        assert st_.b_noise == pytest.approx(want["b_noise"], rel=rel)
    assert st_.grad_sq == pytest.approx(float(np.sum(G.mean(0) ** 2)), rel=1e-12)
    # the relations the module docstring states
    assert st_.norm_test ** 2 == pytest.approx(st_.tr_sigma / (B * st_.grad_sq), rel=1e-9)
    if st_.grad_sq_unbiased > 0:
        assert st_.snr == pytest.approx(B / st_.b_noise, rel=1e-9)


def test_per_layer_blocks_add_up_to_the_total():
    rng = np.random.default_rng(0)
    G = rng.standard_normal(7) + rng.standard_normal((6, 7))
    layers = [("a", slice(0, 3)), ("b", slice(3, 7))]
    rep = noise_stats(G, layers)
    assert list(rep.layers) == ["a", "b"]
    for attr in ("tr_sigma", "grad_sq", "grad_sq_unbiased"):      # traces and squared norms are additive
        assert sum(getattr(s, attr) for s in rep.layers.values()) == pytest.approx(getattr(rep.total, attr), rel=1e-12)
    assert rep.layers["b"] == noise_stats(G[:, 3:7]).total
    rec = rep.record()
    assert rec["b_noise"] == rep.total.b_noise and rec["norm_test.a"] == rep.layers["a"].norm_test
    assert "batch_size" not in rec and len(rec) == 3 * (len(NoiseStats.__dataclass_fields__) - 1)
    assert list(rec) == record_columns(["a", "b"])
    assert list(rep.record(["b_noise", "snr"])) == record_columns(["a", "b"], ["b_noise", "snr"]) == [
        "b_noise", "b_noise.a", "b_noise.b", "snr", "snr.a", "snr.b"]


def test_unbiased_on_gaussian_per_sample_gradients_with_known_covariance():
    """g_i ~ N(mu, Sigma) with Sigma known: over 4000 batches of 8, the mean of tr_sigma is tr Sigma
    and of grad_sq_unbiased is |mu|^2 (within 4 standard errors), while grad_sq is |mu|^2 + tr Sigma / B;
    the noise scale of the averaged estimates (as McCandlish et al. average them) is tr Sigma / |mu|^2."""
    rng = np.random.default_rng(1)
    P, B, T = 10, 8, 4000
    A = rng.standard_normal((P, P)) * 0.5
    Sigma = A @ A.T
    mu = rng.standard_normal(P) * 0.7
    g = mu + rng.standard_normal((T, B, P)) @ A.T                     # each g_i ~ N(mu, A A^T)
    stats = [block_stats(b.mean(axis=0), b - b.mean(axis=0)) for b in g]
    tr = np.array([s.tr_sigma for s in stats])
    gsu = np.array([s.grad_sq_unbiased for s in stats])
    gs = np.array([s.grad_sq for s in stats])

    def within(samples, want, k=4.0):
        se = samples.std(ddof=1) / math.sqrt(len(samples))
        assert abs(samples.mean() - want) <= k * se, (samples.mean(), want, se)

    within(tr, np.trace(Sigma))
    within(gsu, mu @ mu)
    within(gs, mu @ mu + np.trace(Sigma) / B)
    assert tr.mean() / gsu.mean() == pytest.approx(np.trace(Sigma) / (mu @ mu), rel=0.05)


def test_softmax_regression_per_sample_gradients_and_their_covariance():
    """fc3 on 3x3 inputs (softmax regression): per-sample gradients are (p_i - e_yi) x_i^T and
    p_i - e_yi in closed form. Over a finite data set of M samples the per-sample gradient of a
    uniformly drawn sample has the data set's (population) covariance exactly, so batches drawn with
    replacement must give E[tr_sigma] = its trace and E[grad_sq_unbiased] = |full-data gradient|^2."""
    rng = np.random.default_rng(2)
    M, B, T = 64, 8, 3000
    net = Network.from_spec("fc3", (1, 3, 3), seed=0, dtype=np.float64, device="numpy")
    x = rng.standard_normal((M, 1, 3, 3))
    y = rng.integers(0, 3, M)
    G_all = net.per_sample_grads(x, y)
    logits = x.reshape(M, 9) @ net.params[0].T + net.params[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(3)[y]
    closed = np.concatenate([(r[:, :, None] * x.reshape(M, 1, 9)).reshape(M, -1), r], axis=1)
    np.testing.assert_allclose(G_all, closed, rtol=1e-12, atol=1e-14)

    mean = G_all.mean(axis=0)
    tr_pop = float(((G_all - mean) ** 2).sum(axis=1).mean())        # tr of the population covariance
    idx = rng.integers(0, M, size=(T, B))
    reps = [noise_stats(G_all[i], net.param_layers()) for i in idx]
    tr = np.array([rp.total.tr_sigma for rp in reps])
    gsu = np.array([rp.layers["fc1"].grad_sq_unbiased for rp in reps])
    for samples, want in ((tr, tr_pop), (gsu, float(mean @ mean))):
        se = samples.std(ddof=1) / math.sqrt(T)
        assert abs(samples.mean() - want) <= 4 * se, (samples.mean(), want, se)


def test_edge_cases():
    with pytest.raises(ConfigError, match="B >= 2"):
        noise_stats(np.ones((1, 3)))
    same = noise_stats(np.tile([1.0, 2.0], (4, 1))).total            # no noise at all
    assert same.tr_sigma == 0 and same.b_noise == 0 and same.snr == math.inf and same.norm_test == 0
    zero = noise_stats(np.zeros((3, 2))).total                        # no gradient at all
    assert math.isnan(zero.b_noise) and math.isnan(zero.norm_test) and zero.gsnr_mean == 0
    pure = noise_stats(np.array([[1.0, 0.0], [-1.0, 0.0]])).total    # mean 0: all noise
    assert pure.b_noise == math.inf and pure.norm_test == math.inf


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_gradient_noise_on_a_network(device):
    rng = np.random.default_rng(3)
    net = Network.from_spec("conv2k3-relu-maxpool2-fc3", (1, 6, 6), seed=1, dtype=np.float32, device=device)
    x, y = rng.standard_normal((5, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, 5)
    rep = gradient_noise(net, x, y)
    want = noise_stats(net.per_sample_grads(x, y), net.param_layers())
    assert rep.total == want.total and rep.layers == want.layers and list(rep.layers) == ["conv1", "fc1"]
    assert rep.seconds > 0 and np.isfinite(rep.total.b_noise)
    assert set(rep.as_dict()) == {"total", "layers", "seconds"}
