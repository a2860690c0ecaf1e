"""Hessian instruments (minicnn.hessian) and the exact Hessian-vector product
(Network.hessian_vector_product) against the dense Hessian of small networks.

The dense Hessian is built column by column from centred differences of float64 gradients along
the coordinate axes, then symmetrised: the products (exact R-operator and the "fd" method) must
match it, and its eigenvalues, trace and blocks are what Lanczos, Hutchinson and SLQ must find from
products along other directions. With PyTorch installed the exact products are also checked
against its double backward on the shapes data, where finite differences cross ReLU kinks.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import ConfigError, Network
from minicnn.hessian import (
    EXACT_HVP_GRAD_EQUIV,
    HessianOperator,
    hutchinson_trace,
    lambda_max,
    layer_lambda_max,
    spectral_density,
    top_eigenvalues,
)
from tests.test_network import small_specs

# (spec, input shape, batch): a conv-pool-fc net and one with stride, padding and a hidden fc + relu
NETS = [("conv2k3-relu-maxpool2-fc3", (1, 6, 6), 8),
        ("conv2k3s2p1-relu-fc4-relu-fc3", (2, 5, 5), 6)]
DENSE_EPS = 1e-5


def dense_hessian(op):
    """(P, P) Hessian from centred differences of the gradient along each coordinate."""
    P = op.size
    H = np.empty((P, P))
    for j in range(P):
        e = np.zeros(P)
        e[j] = DENSE_EPS
        H[:, j] = (op.gradient(op.w + e) - op.gradient(op.w - e)) / (2 * DENSE_EPS)
    assert np.abs(H - H.T).max() <= 1e-6 * np.abs(H).max()
    return (H + H.T) / 2


@pytest.fixture(scope="module", params=[(net, dev) for net in NETS for dev in ("numpy", "cpu")],
                ids=lambda p: f"{p[0][0]}-{p[1]}")
def problem(request):
    (spec, shape, n), device = request.param
    rng = np.random.default_rng(0)
    net = Network.from_spec(spec, shape, seed=1, dtype=np.float32, device=device)
    x, y = rng.standard_normal((n,) + shape), rng.integers(0, 3, n)
    op = HessianOperator(net, x, y)
    return op, dense_hessian(op)


@settings(max_examples=15, deadline=None)
@given(spec=small_specs(), seed=st.integers(0, 10_000), device=st.sampled_from(["numpy", "cpu"]))
def test_network_hessian_vector_product_matches_finite_differences(spec, seed, device):
    """The R-operator against the centred difference of gradients along v (float64), on random
    networks; it also leaves the batch gradient in flat_grads."""
    spec, shape = spec
    net = Network.from_spec(spec, input_shape=shape, seed=seed, dtype=np.float64, device=device)
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((3,) + shape), rng.integers(0, net.num_classes, 3)
    v = rng.standard_normal(net.num_params)
    w = net.get_flat_params()
    hv = net.hessian_vector_product(x, y, v)
    _, g = net.loss_and_grads(x, y)
    np.testing.assert_array_equal(net.get_flat_grads(), np.concatenate([a.ravel() for a in g]))
    eps = 1e-6

    def grad(wt):
        net.set_flat_params(wt)
        net.loss(x, y)
        net.backward()
        return net.get_flat_grads()
    fd = (grad(w + eps * v) - grad(w - eps * v)) / (2 * eps)
    assert np.abs(hv - fd).max() <= 1e-6 * max(1e-3, np.abs(fd).max()), spec


def test_hvp_matches_the_dense_hessian(problem):
    op, H = problem
    rng = np.random.default_rng(1)
    fd = HessianOperator(op.twin, op.x, op.y, flat_params=op.w, method="fd")
    for _ in range(3):
        v = rng.standard_normal(op.size)
        want = H @ v
        h0, e0 = op.hvps, op.grad_evals
        got = op.hvp(v)
        assert (op.hvps - h0, op.grad_evals - e0) == (1, EXACT_HVP_GRAD_EQUIV)
        assert np.abs(got - want).max() <= 1e-7 * np.abs(want).max()
        e0 = fd.grad_evals
        assert np.abs(fd.hvp(v) - want).max() <= 1e-5 * np.abs(want).max()
        assert fd.grad_evals - e0 == 2


def test_top_eigenvalues_match_the_dense_hessian(problem):
    op, H = problem
    ev = np.linalg.eigvalsh(H)[::-1]
    res = top_eigenvalues(op, k=3)
    assert res.converged and res.hvps == res.steps and res.seconds > 0
    np.testing.assert_allclose(res.values, ev[:3], rtol=1e-3)           # within 0.1% (asked: 1%)
    for lam, v in zip(res.values, res.vectors):                         # unit Ritz vectors
        assert np.linalg.norm(v) == pytest.approx(1.0)
        assert np.linalg.norm(H @ v - lam * v) <= 2e-3 * abs(ev[0])
    assert lambda_max(op).lambda_max == pytest.approx(ev[0], rel=1e-3)


def test_hutchinson_trace_within_three_standard_errors(problem):
    op, H = problem
    res = hutchinson_trace(op, max_samples=60, seed=2)
    assert res.hvps == res.samples and 10 <= res.samples <= 60
    assert abs(res.trace - np.trace(H)) <= 3 * res.stderr, (res.trace, np.trace(H), res.stderr)
    assert sum(t for t, _ in res.layers.values()) == pytest.approx(res.trace, rel=1e-9, abs=1e-12)
    for name, sl in op.layers:
        t, se = res.layers[name]
        assert abs(t - np.trace(H[sl, sl])) <= 3 * se, name


def test_layer_blocks_match_the_dense_blocks(problem):
    op, H = problem
    results = layer_lambda_max(op)
    assert list(results) == [name for name, _ in op.layers]
    for name, sl in op.layers:
        block = op.restrict(name)
        assert block.size == sl.stop - sl.start
        v = np.random.default_rng(3).standard_normal(block.size)
        assert np.abs(block.hvp(v) - H[sl, sl] @ v).max() <= 1e-7 * np.abs(H[sl, sl] @ v).max()
        assert results[name].lambda_max == pytest.approx(np.linalg.eigvalsh(H[sl, sl])[-1], rel=1e-3), name
        assert results[name].hvps == results[name].steps


def test_spectral_density(problem):
    """With as many Lanczos steps as parameters the Ritz values are the whole spectrum; with fewer, the density
    integrates to 1,
    its mean (sum tau theta, times P) estimates the trace, and the extreme Ritz values bracket the
    spectrum from inside, the largest close to lambda_max."""
    op, H = problem
    ev = np.linalg.eigvalsh(H)
    full = spectral_density(op, steps=op.size, runs=1)
    ritz, tol = full.ritz_values[0], 1e-6 * np.abs(ev).max()
    # the Krylov space holds each distinct eigenvalue once (these H have a multiple eigenvalue 0:
    # parameters no sample's loss depends on, behind max-pool losers), so Lanczos may stop early
    assert all(np.abs(ritz - e).min() <= tol for e in ev)
    assert all(np.abs(ev - t).min() <= tol for t in ritz)
    assert full.ritz_weights.sum() == pytest.approx(1.0)
    assert full.hvps == full.ritz_values.shape[1] <= op.size

    d = spectral_density(op, steps=15, runs=4, seed=1)
    assert d.ritz_values.shape == (4, 15) and d.hvps == 60
    dx = d.grid[1] - d.grid[0]
    assert d.density.sum() * dx == pytest.approx(1.0, abs=1e-3)
    assert d.density.min() >= 0
    assert ev[0] - 1e-6 <= d.ritz_values.min() and d.ritz_values.max() <= ev[-1] + 1e-6
    assert d.ritz_values.max() == pytest.approx(ev[-1], rel=1e-3)
    tr = op.size * (d.ritz_values * d.ritz_weights).sum(axis=1)           # one trace estimate per run
    assert abs(tr.mean() - np.trace(H)) <= 4 * tr.std(ddof=1) / math.sqrt(len(tr)) + 1e-9


def test_operator_arguments():
    net = Network.from_spec("conv2k3-relu-fc3", (1, 5, 5), seed=0)
    x, y = np.zeros((2, 1, 5, 5)), np.array([0, 1])
    op = HessianOperator(net, x, y, flat_params=np.ones(net.num_params))
    assert np.all(op.w == 1) and np.all(net.get_flat_params() != 1)      # the network is not touched
    with pytest.raises(ConfigError, match="no parameter layer 'relu1'"):
        op.restrict("relu1")
    with pytest.raises(ConfigError, match="flat_params"):
        HessianOperator(net, x, y, flat_params=np.ones(3))
    with pytest.raises(ConfigError, match="v must have shape"):
        op.hvp(np.ones(3))
    with pytest.raises(ConfigError, match="k must be"):
        top_eigenvalues(op, k=0)
    with pytest.raises(ConfigError, match="unknown Hessian-vector product method"):
        HessianOperator(net, x, y, method="autograd")
    assert HessianOperator(net, x, y, layer="fc1").size == op.restrict("fc1").size == 3 * 2 * 3 * 3 + 3


def test_exact_hvp_matches_torch_double_backward():
    """On the shapes data (clipped pixels: exact zeros, so many pre-activations sit on kinks' doorstep)."""
    torch = pytest.importorskip("torch")
    from minicnn.synthetic import make_shapes
    from tests.test_torch_parity import torch_net
    torch.set_num_threads(2)
    rng = np.random.default_rng(4)
    net = Network.from_spec("conv3k3p1-relu-maxpool2-conv4k3-relu-fc5", (1, 12, 12), seed=2, dtype=np.float64)
    x, y = make_shapes(6, seed=1, size=12)
    x, y = x.astype(np.float64), y % 5
    op = HessianOperator(net, x, y)
    model = torch_net(net)
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    for _ in range(2):
        v = rng.standard_normal(op.size)
        vs = [torch.from_numpy(v[a:b].reshape(p.shape)) for a, b, p in zip(net.offsets, net.offsets[1:], params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        want = np.concatenate([h.detach().numpy().ravel() for h in hv])
        assert np.abs(op.hvp(v) - want).max() <= 1e-12 * np.abs(want).max()
