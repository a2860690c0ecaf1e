"""The NumPy reference (minicnn/ops/ref.py) against finite differences, in float64.

Each backward is checked on the scalar sum(forward(...) * dout), whose gradient is exactly what
the backward computes from dout. Inputs come from tests/strategies.py and are honest (away from
kinks and ties), so the tolerance stays tight: rel_error <= 1e-6.
"""
import numpy as np
from hypothesis import given

from minicnn.ops import ref
from tests.gradcheck import numeric_gradient, rel_error
from tests.strategies import JIT_SETTINGS, conv_case, dense_case, loss_case, pool_case, relu_case

TOL = 1e-6


# --------------------------------------------------------------------------- conv2d
@JIT_SETTINGS
@given(conv_case())
def test_conv2d_backward_matches_finite_differences(case):
    x, w, b, dout = case["x"], case["w"], case["b"], case["dout"]
    _, _, _, _, _, _, S, P = case["shape"]

    def f(_):
        return np.sum(ref.conv2d_forward(x, w, b, S, P) * dout)

    dx, dw, db = ref.conv2d_backward(dout, x, w, S, P)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert rel_error(dx, numeric_gradient(f, x)) <= TOL
    assert rel_error(dw, numeric_gradient(f, w)) <= TOL
    assert rel_error(db, numeric_gradient(f, b)) <= TOL


def _conv2d_loops(x, w, b, S, P):
    """The definition, one multiply-add at a time, with padding as an explicit bounds test."""
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    out = np.zeros((N, F, OH, OW))
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    total = b[f]
                    for c in range(C):
                        for u in range(K):
                            for v in range(K):
                                h, col = i * S + u - P, j * S + v - P
                                if 0 <= h < H and 0 <= col < W:
                                    total += w[f, c, u, v] * x[n, c, h, col]
                    out[n, f, i, j] = total
    return out


def test_conv2d_forward_matches_loop_definition():
    rng = np.random.default_rng(0)
    for S, P, K in [(1, 1, 3), (2, 2, 3), (3, 0, 2), (1, 3, 2)]:      # includes pad > K - 1
        x = rng.standard_normal((2, 3, 7, 6))
        w = rng.standard_normal((4, 3, K, K))
        b = rng.standard_normal(4)
        expected = _conv2d_loops(x, w, b, S, P)
        got = ref.conv2d_forward(x, w, b, S, P)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- max-pool
@JIT_SETTINGS
@given(pool_case())
def test_maxpool2d_backward_matches_finite_differences(case):
    x, dout = case["x"], case["dout"]
    _, _, _, _, K, S = case["shape"]

    def f(_):
        return np.sum(ref.maxpool2d_forward(x, K, S)[0] * dout)

    _, argmax = ref.maxpool2d_forward(x, K, S)
    dx = ref.maxpool2d_backward(dout, argmax, x.shape)
    assert argmax.dtype == np.int32
    assert rel_error(dx, numeric_gradient(f, x)) <= TOL


def test_maxpool2d_ties_pick_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4))
    out, argmax = ref.maxpool2d_forward(x, 2, 2)                  # all-equal windows
    np.testing.assert_array_equal(argmax[0, 0], [[0, 2], [8, 10]])
    x = np.array([[[[1.0, 5.0, 2.0],
                    [5.0, 5.0, 0.0],
                    [3.0, 4.0, 5.0]]]])
    out, argmax = ref.maxpool2d_forward(x, 2, 1)
    np.testing.assert_array_equal(out[0, 0], [[5.0, 5.0], [5.0, 5.0]])
    # window (0,0): 5 at (0,1) before (1,0), (1,1); window (0,1): (0,1); (1,0): (1,0); (1,1): (1,1)
    np.testing.assert_array_equal(argmax[0, 0], [[1, 1], [3, 4]])
    dx = ref.maxpool2d_backward(np.ones((1, 1, 2, 2)), argmax, x.shape)
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 0], [1, 1, 0], [0, 0, 0]])


# --------------------------------------------------------------------------- ReLU
@JIT_SETTINGS
@given(relu_case())
def test_relu_backward_matches_finite_differences(case):
    x, dout = case["x"], case["dout"]

    def f(_):
        return np.sum(ref.relu_forward(x) * dout)

    dx = ref.relu_backward(dout, ref.relu_forward(x))
    assert rel_error(dx, numeric_gradient(f, x)) <= TOL


def test_relu_kink_gets_zero_gradient():
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(ref.relu_backward(np.ones(3), ref.relu_forward(x)), [0.0, 0.0, 1.0])


# --------------------------------------------------------------------------- dense
@JIT_SETTINGS
@given(dense_case())
def test_dense_backward_matches_finite_differences(case):
    x, w, b, dout = case["x"], case["w"], case["b"], case["dout"]

    def f(_):
        return np.sum(ref.dense_forward(x, w, b) * dout)

    dx, dw, db = ref.dense_backward(dout, x, w)
    assert rel_error(dx, numeric_gradient(f, x)) <= TOL
    assert rel_error(dw, numeric_gradient(f, w)) <= TOL
    assert rel_error(db, numeric_gradient(f, b)) <= TOL


# --------------------------------------------------------------------------- loss
@JIT_SETTINGS
@given(loss_case())
def test_softmax_cross_entropy_backward_matches_finite_differences(case):
    logits, y = case["logits"], case["y"]

    def f(_):
        return ref.softmax_cross_entropy_forward(logits, y)[0]

    _, probs = ref.softmax_cross_entropy_forward(logits, y)
    dlogits = ref.softmax_cross_entropy_backward(probs, y)
    assert rel_error(dlogits, numeric_gradient(f, logits)) <= TOL


@JIT_SETTINGS
@given(loss_case())
def test_softmax_cross_entropy_forward_matches_definition(case):
    logits, y = case["logits"], case["y"]
    loss, probs = ref.softmax_cross_entropy_forward(logits, y)
    e = np.exp(logits)
    expected_probs = e / e.sum(axis=1, keepdims=True)
    expected_loss = -np.mean(np.log(expected_probs[np.arange(len(y)), y]))
    assert isinstance(loss, float)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_is_stable_for_large_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, -1000.0, -999.0]])
    loss, probs = ref.softmax_cross_entropy_forward(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(loss, np.log(1 + 2 * np.exp(-1.0)) / 2, rtol=1e-12)
