"""Per-sample gradients: the ops (ref, cpu) and Network.per_sample_grads.

The reference is checked against the batch op it unsums (the per-sample dw, db sum to
conv2d_backward's / dense_backward's, and each equals the backward of that image alone); the Numba
kernels against the reference (float64 1e-12, float32 1e-5, Hypothesis shapes); the Network's
rows against loss_and_grads of each image alone (float64, Hypothesis networks), their mean against
the batch gradient. The CUDA kernels: tests/test_per_sample_cuda.py. The backend contract of the
new ops (same signature in ref, cpu, cuda and ops.Backend) is checked here.
"""
import inspect

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import ConfigError, Network
from minicnn.ops import Backend, cpu, ref
from tests.strategies import FEW_EXAMPLES, JIT_SETTINGS, conv_case, dense_case
from tests.test_network import small_specs

DTYPES = [np.float64, np.float32]
RTOL = {np.float64: 1e-12, np.float32: 1e-5}
NEW_OPS = ("conv2d_weight_grad_per_sample", "dense_weight_grad_per_sample")


def assert_close(got, expected, dtype):
    """max|got - expected| <= rtol * max(1, max|expected|), and the dtype is the input's."""
    assert got.dtype == dtype and got.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} > {RTOL[dtype]:.0e} * {scale:.3g}"


# --------------------------------------------------------------------------- the contract
def test_new_ops_have_the_same_signature_in_every_backend():
    from minicnn.ops import cuda as gpu  # the simulator (conftest) or a GPU; importing needs neither
    for name in NEW_OPS:
        want = inspect.signature(getattr(Backend, name))
        want = want.replace(parameters=list(want.parameters.values())[1:])      # drop self
        for mod in (ref, cpu, gpu):
            assert inspect.signature(getattr(mod, name)) == want, (mod.__name__, name)


# --------------------------------------------------------------------------- ops: reference
@FEW_EXAMPLES
@given(case=conv_case())
def test_ref_conv2d_per_sample_unsums_the_batch_backward(case):
    x, w, dout = case["x"], case["w"], case["dout"]
    _, _, _, _, _, _, S, P = case["shape"]
    dw, db = ref.conv2d_weight_grad_per_sample(dout, x, w, S, P)
    _, bdw, bdb = ref.conv2d_backward(dout, x, w, S, P)
    np.testing.assert_allclose(dw.sum(axis=0), bdw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db.sum(axis=0), bdb, rtol=1e-12, atol=1e-12)
    for n in range(x.shape[0]):
        _, dwn, dbn = ref.conv2d_backward(dout[n:n + 1], x[n:n + 1], w, S, P)
        np.testing.assert_allclose(dw[n], dwn, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db[n], dbn, rtol=1e-12, atol=1e-12)


@FEW_EXAMPLES
@given(case=dense_case())
def test_ref_dense_per_sample_unsums_the_batch_backward(case):
    x, w, dout = case["x"], case["w"], case["dout"]
    dw, db = ref.dense_weight_grad_per_sample(dout, x)
    _, bdw, bdb = ref.dense_backward(dout, x, w)
    np.testing.assert_allclose(dw.sum(axis=0), bdw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db.sum(axis=0), bdb, rtol=1e-12, atol=1e-12)
    for n in range(x.shape[0]):
        _, dwn, dbn = ref.dense_backward(dout[n:n + 1], x[n:n + 1], w)
        np.testing.assert_allclose(dw[n], dwn, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- ops: Numba CPU
@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=conv_case(), use_work=st.booleans())
def test_cpu_conv2d_per_sample_matches_ref(dtype, case, use_work):
    """With and without the forward's workspace (its cols reused), into NaN-filled buffers."""
    _, _, _, _, _, _, S, P = case["shape"]
    x, w, b, dout = (np.asarray(case[k], dtype=dtype) for k in ("x", "w", "b", "dout"))
    want = ref.conv2d_weight_grad_per_sample(dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64), S, P)
    kw = {}
    if use_work:
        kw["work"] = cpu.conv2d_workspace(x.shape, w.shape, S, P, dtype)
        cpu.conv2d_forward(x, w, b, S, P, **kw)
    dw = np.full(want[0].shape, np.nan, dtype)
    db = np.full(want[1].shape, np.nan, dtype)
    got = cpu.conv2d_weight_grad_per_sample(dout, x, w, S, P, dw=dw, db=db, **kw)
    assert got[0] is dw and got[1] is db
    for g, e in zip(got, want):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@JIT_SETTINGS
@given(case=dense_case())
def test_cpu_dense_per_sample_matches_ref(dtype, case):
    x, dout = (np.asarray(case[k], dtype=dtype) for k in ("x", "dout"))
    want = ref.dense_weight_grad_per_sample(dout.astype(np.float64), x.astype(np.float64))
    for g, e in zip(cpu.dense_weight_grad_per_sample(dout, x), want):
        assert_close(g, e, dtype)


@pytest.mark.parametrize("shape", [(40, 16, 14, 14, 32, 3, 1, 1), (24, 3, 12, 12, 8, 3, 2, 1)])
def test_cpu_per_sample_parallel_kernels_are_bit_identical_to_serial(shape):
    """Sizes past _PARALLEL_MIN: 1 thread (serial twins) and 2 threads give the same bits, and
    both match the reference."""
    N, C, H, W, F, K, S, P = shape
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, K, K))
    OH, OW = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    dout = rng.standard_normal((N, F, OH, OW))
    xd, dd = rng.standard_normal((N, 3000)), rng.standard_normal((N, 10))
    assert x.size >= cpu._PARALLEL_MIN or N * 3000 * 10 >= cpu._PARALLEL_MIN
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            runs.append([*cpu.conv2d_weight_grad_per_sample(dout, x, w, S, P),
                         *cpu.dense_weight_grad_per_sample(dd, xd)])
    finally:
        numba.set_num_threads(before)
    for a, c in zip(runs[0], runs[-1]):
        np.testing.assert_array_equal(a, c)
    want = [*ref.conv2d_weight_grad_per_sample(dout, x, w, S, P), *ref.dense_weight_grad_per_sample(dd, xd)]
    for g, e in zip(runs[0], want):
        assert_close(g, e, np.float64)


# --------------------------------------------------------------------------- Network
def flat(grads):
    return np.concatenate([g.ravel() for g in grads])


@settings(max_examples=15, deadline=None)
@given(spec=small_specs(), seed=st.integers(0, 10_000), n=st.integers(2, 5),
       device=st.sampled_from(["numpy", "cpu"]))
def test_network_per_sample_grads_are_the_single_image_gradients(spec, seed, n, device):
    """Row i = loss_and_grads of image i alone; the mean of the rows = the batch gradient, which
    the call also leaves in flat_grads (float64)."""
    spec, shape = spec
    net = Network.from_spec(spec, input_shape=shape, seed=seed, dtype=np.float64, device=device)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape)
    y = rng.integers(0, net.num_classes, n)
    G = net.per_sample_grads(x, y)
    assert G.shape == (n, net.num_params) and G.dtype == np.float64
    batch = net.get_flat_grads()
    _, grads = net.loss_and_grads(x, y)
    np.testing.assert_allclose(batch, flat(grads), rtol=0, atol=0)
    scale = max(1e-300, np.abs(batch).max())
    assert np.abs(G.mean(axis=0) - batch).max() <= 1e-12 * scale
    for i in range(n):
        _, gi = net.loss_and_grads(x[i:i + 1], y[i:i + 1])
        gi = flat(gi)
        assert np.abs(G[i] - gi).max() <= 1e-12 * max(1.0, np.abs(gi).max()), (spec, i)


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_per_sample_backward_leaves_the_same_gradient_bits_as_backward(device):
    """A training step may take its gradient from per_sample_backward on noise-measuring steps:
    flat_grads must be bit-identical to backward's (float32, the default network)."""
    rng = np.random.default_rng(5)
    x, y = rng.random((7, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 7)
    net = Network.from_spec("small", (1, 28, 28), seed=4, dtype=np.float32, device=device)
    la = net.loss(x, y)
    net.backward()
    want = net.get_flat_grads()
    lb = net.loss(x, y)
    G = net.per_sample_backward()
    assert la == lb
    np.testing.assert_array_equal(net.get_flat_grads(), want)
    assert G.shape == (7, net.num_params)
    with pytest.raises(ConfigError, match="needs a loss first"):
        Network.from_spec("small", (1, 28, 28)).per_sample_backward()


def test_network_per_sample_grads_float32_and_devices_agree():
    """The default network in float32 on cpu and numpy, against the float64 result; out= is filled."""
    rng = np.random.default_rng(0)
    x, y = rng.random((6, 1, 28, 28)), rng.integers(0, 10, 6)
    want = Network.from_spec("small", (1, 28, 28), seed=2, dtype=np.float64, device="numpy").per_sample_grads(x, y)
    for device in ("numpy", "cpu"):
        net = Network.from_spec("small", (1, 28, 28), seed=2, dtype=np.float32, device=device)
        out = np.full((6, net.num_params), np.nan)
        got = net.per_sample_grads(x.astype(np.float32), y, out=out)
        assert got is out
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_network_per_sample_grads_rejects_bad_out_and_labels():
    net = Network.from_spec("conv2k3-relu-fc3", (1, 5, 5), seed=0, dtype=np.float64)
    x = np.zeros((2, 1, 5, 5))
    with pytest.raises(ConfigError, match="out must be"):
        net.per_sample_grads(x, np.array([0, 1]), out=np.zeros((2, net.num_params), np.float32))
    with pytest.raises(ConfigError, match="labels"):
        net.per_sample_grads(x, np.array([0, 7]))
