"""minicnn.ops.cuda against the NumPy reference (minicnn.ops.ref), kernel by kernel, on tiny shapes.

Without a GPU these run in Numba's CUDA simulator, which must be switched on before numba is
first imported. The intended CI invocation is therefore a separate pytest process:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_ops_cuda.py

(tests/conftest.py also enables the simulator when no /dev/nvidiactl exists, so a plain
``pytest`` run includes these tests as long as nothing imported numba earlier.) On a machine with
a real GPU, ``python -m pytest tests/test_ops_cuda.py`` runs the same checks on the GPU. Without
either, the module is skipped with the reason.

The simulator runs every CUDA thread as a Python thread, so shapes are tiny and the launch sizes
are shrunk (TILE=4, RED_TPB=8, SPLIT_ROWS=16, MAX_BLOCKS=2: tiles that do not divide the sizes,
multi-block and split-K reductions, grid-stride loops); one test uses the production launch
sizes. float64 is checked to ~1e-12, float32 to ~1e-5. About 35 s in the simulator on 2 cores.
"""
import numpy as np
import pytest
from conftest import CUDA_SMALL_LAUNCH, skip_without_cuda

skip_without_cuda()

from numba import cuda  # noqa: E402

from minicnn.errors import DeviceError  # noqa: E402
from minicnn.ops import cuda as gpu  # noqa: E402
from minicnn.ops import ref  # noqa: E402

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
DEFAULT_LAUNCH = {name: getattr(gpu, name) for name in CUDA_SMALL_LAUNCH}   # the real-GPU sizes


@pytest.fixture(autouse=True)
def small_launch(cuda_small_launch):
    return cuda_small_launch


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()


def close(got, want, dtype):
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, want, **TOL[dtype])


# --------------------------------------------------------------------------- conv2d
# (stride, pad, dtype): all four stride/pad combinations in float64, two in float32.
CONV_CASES = [(1, 0, np.float64), (1, 1, np.float64), (2, 0, np.float64), (2, 1, np.float64),
              (1, 1, np.float32), (2, 1, np.float32)]


@pytest.mark.parametrize("stride,pad,dtype", CONV_CASES)
def test_conv2d_forward_backward(stride, pad, dtype):
    rng = np.random.default_rng(stride * 10 + pad)
    x = rng.standard_normal((2, 2, 5, 6)).astype(dtype)       # N=2, C=2, H=5, W=6 (not square)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)       # F=3, K=3
    b = rng.standard_normal(3).astype(dtype)
    out = gpu.conv2d_forward(dev(x), dev(w), dev(b), stride, pad)
    close(host(out), ref.conv2d_forward(x, w, b, stride, pad), dtype)

    dout = rng.standard_normal(out.shape).astype(dtype)
    want = ref.conv2d_backward(dout, x, w, stride, pad)
    got = gpu.conv2d_backward(dev(dout), dev(x), dev(w), stride, pad)
    for g, r in zip(got, want):
        close(host(g), r, dtype)


def test_conv2d_backward_into_preallocated_outputs_and_no_dx():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 4, 4))
    w = rng.standard_normal((2, 1, 3, 3))
    dout = rng.standard_normal((2, 2, 4, 4))
    dw, db = cuda.device_array((2, 1, 3, 3)), cuda.device_array(2)
    dx, dw2, db2 = gpu.conv2d_backward(dev(dout), dev(x), dev(w), 1, 1, dw=dw, db=db,
                                       need_dx=False)
    assert dx is None and dw2 is dw and db2 is db
    _, rdw, rdb = ref.conv2d_backward(dout, x, w, 1, 1)
    close(host(dw), rdw, np.float64)
    close(host(db), rdb, np.float64)
    with pytest.raises(ValueError, match="dw must have shape"):
        gpu.conv2d_backward(dev(dout), dev(x), dev(w), 1, 1, dw=cuda.device_array((2, 1, 3, 2)))


def test_production_launch_sizes(monkeypatch):
    """The default TILE / TPB / RED_TPB (real-GPU sizes) on one conv, dense and loss."""
    for name, value in DEFAULT_LAUNCH.items():
        monkeypatch.setattr(gpu, name, value)
    assert (gpu.TILE, gpu.TPB, gpu.RED_TPB) == (16, 128, 256)
    defaults = gpu
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    out = defaults.conv2d_forward(dev(x), dev(w), dev(b), 1, 1)
    close(host(out), ref.conv2d_forward(x, w, b, 1, 1), np.float64)
    dout = rng.standard_normal(out.shape)
    for g, r in zip(defaults.conv2d_backward(dev(dout), dev(x), dev(w), 1, 1),
                    ref.conv2d_backward(dout, x, w, 1, 1)):
        close(host(g), r, np.float64)
    logits, y = rng.standard_normal((3, 4)), np.array([0, 3, 1])
    loss, _ = defaults.softmax_cross_entropy_forward(dev(logits), dev(y))
    assert abs(host(loss)[0] - ref.softmax_cross_entropy_forward(logits, y)[0]) < 1e-12


# --------------------------------------------------------------------------- max-pool
@pytest.mark.parametrize("k,stride,dtype", [(2, 2, np.float64), (3, 2, np.float64),
                                            (3, 2, np.float32)])
def test_maxpool2d(k, stride, dtype):
    rng = np.random.default_rng(k)
    # values on a coarse grid so that windows contain ties: argmax must pick the first
    # in row-major window order, as ref (and PyTorch's CPU kernel) do
    x = rng.integers(-3, 4, size=(2, 2, 5, 6)).astype(dtype)
    out, argmax = gpu.maxpool2d_forward(dev(x), k, stride)
    rout, rargmax = ref.maxpool2d_forward(x, k, stride)
    close(host(out), rout, dtype)
    assert host(argmax).dtype == np.int32
    np.testing.assert_array_equal(host(argmax), rargmax)

    dout = rng.standard_normal(rout.shape).astype(dtype)
    want = ref.maxpool2d_backward(dout, rargmax, x.shape)
    dx = gpu.maxpool2d_backward(dev(dout), argmax, x.shape)
    close(host(dx), want, dtype)
    # an argmax array that did not come from maxpool2d_forward carries no window geometry:
    # the widest-window fallback must give the same bits
    dx_fallback = gpu.maxpool2d_backward(dev(dout), dev(rargmax), x.shape)
    np.testing.assert_array_equal(host(dx_fallback), host(dx))


# --------------------------------------------------------------------------- ReLU
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    x.flat[::7] = 0                                   # the kink: ReLU'(0) = 0, as in PyTorch
    out = gpu.relu_forward(dev(x))
    close(host(out), ref.relu_forward(x), dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    close(host(gpu.relu_backward(dev(dout), out)), ref.relu_backward(dout, ref.relu_forward(x)),
          dtype)


# --------------------------------------------------------------------------- dense
@pytest.mark.parametrize("N,dtype", [(5, np.float64), (40, np.float64), (5, np.float32)])
def test_dense(N, dtype):
    """N=40 > SPLIT_ROWS: dw = dout.T @ x is reduced over the batch in 3 split-K chunks."""
    rng = np.random.default_rng(N)
    D, O = 7, 3
    x = rng.standard_normal((N, D)).astype(dtype)
    w = rng.standard_normal((O, D)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype)
    out = gpu.dense_forward(dev(x), dev(w), dev(b))
    close(host(out), ref.dense_forward(x, w, b), dtype)
    dout = rng.standard_normal((N, O)).astype(dtype)
    for g, r in zip(gpu.dense_backward(dev(dout), dev(x), dev(w)), ref.dense_backward(dout, x, w)):
        close(host(g), r, dtype)


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy(dtype):
    """N=11 rows with RED_TPB=8: two blocks, so the two-stage reduction runs. Logits up to
    ~1e3 would overflow a naive exp: the max-shift must keep everything finite."""
    rng = np.random.default_rng(1)
    N, L = 11, 4
    logits = (rng.standard_normal((N, L)) * 300).astype(dtype)
    y = rng.integers(0, L, size=N)
    rloss, rprobs = ref.softmax_cross_entropy_forward(logits, y)
    loss, probs = gpu.softmax_cross_entropy_forward(dev(logits), dev(y))
    assert loss.shape == (1,)
    close(host(loss), np.array([rloss], dtype=dtype), dtype)
    close(host(probs), rprobs, dtype)
    dlogits = gpu.softmax_cross_entropy_backward(probs, dev(y))
    close(host(dlogits), ref.softmax_cross_entropy_backward(rprobs, y), dtype)


# --------------------------------------------------------------------------- SGD, sum of squares
def sgd_torch_rule(p, g, buf, lr, momentum, weight_decay, dampening, nesterov, first_step):
    """torch.optim.SGD's update for one tensor, in NumPy; returns (p, buf)."""
    d = g + weight_decay * p if weight_decay else g
    if momentum:
        buf = d.copy() if first_step else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


@pytest.mark.parametrize("momentum,weight_decay,dampening,nesterov,dtype", [
    (0.0, 0.0, 0.0, False, np.float64),        # plain SGD (no buffers)
    (0.9, 0.0, 0.0, False, np.float64),        # heavy ball
    (0.9, 5e-4, 0.0, True, np.float64),        # Nesterov + weight decay
    (0.5, 1e-2, 0.3, False, np.float64),       # dampening + weight decay
    (0.9, 5e-4, 0.0, True, np.float32),
])
def test_sgd_update(momentum, weight_decay, dampening, nesterov, dtype):
    rng = np.random.default_rng(2)
    n, lr = 37, 0.1
    p = rng.standard_normal(n).astype(dtype)
    p_dev = dev(p)
    buf, buf_dev = None, (cuda.device_array(n, dtype=dtype) if momentum else None)
    for step in range(3):
        g = rng.standard_normal(n).astype(dtype)
        g_dev = dev(g)
        gpu.sgd_update(p_dev, g_dev, buf_dev, lr, momentum, weight_decay, dampening, nesterov,
                       first_step=step == 0)
        p, buf = sgd_torch_rule(p, g, buf, lr, momentum, weight_decay, dampening, nesterov,
                                step == 0)
        np.testing.assert_array_equal(host(g_dev), g)          # grads are left alone
        close(host(p_dev), p.astype(dtype), dtype)
        if momentum:
            close(host(buf_dev), buf.astype(dtype), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sum_of_squares(dtype):
    """100 elements with RED_TPB=8, RED_ITEMS=2: 7 blocks, then a second stage."""
    x = np.random.default_rng(4).standard_normal((4, 25)).astype(dtype)
    got = gpu.sum_of_squares(dev(x))
    assert got.shape == (1,)
    close(host(got), np.array([np.sum(x.astype(np.float64) ** 2)]), dtype)


# --------------------------------------------------------------------------- trace reductions
def test_segment_dots():
    """Per-layer dot products of flat vectors (float32 in, float64 out), segments of uneven
    sizes incl. one shorter than a block and one spanning several block strides."""
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal(61).astype(np.float32) for _ in range(2))
    bounds = np.array([0, 3, 40, 61])
    got = gpu.segment_dots([(dev(a), dev(b)), (dev(a), dev(a))], bounds)
    want = ref.segment_dots([(a, b), (a, a)], bounds)
    assert got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_dead_fraction():
    """Units zero for every sample are dead; one live sample keeps a unit alive; NaN is alive."""
    rng = np.random.default_rng(9)
    a = np.maximum(rng.standard_normal((3, 2, 3, 5)), 0).astype(np.float32)
    a[:, 0] = 0                                  # channel 0 dead
    a[:, 1, 0, :] = 0
    a[2, 1, 0, 1] = 0.5                          # alive through one sample
    a[0, 1, 2, 4] = np.nan
    got = gpu.dead_fraction(dev(a))
    assert got == pytest.approx(ref.dead_fraction(a), abs=1e-15) and got >= 0.5


def test_logit_stats():
    """Including a tie for the arg-max (the first wins, as numpy's argmax) and a one-hot row."""
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((7, 4)).astype(np.float32)
    logits[2] = [1.0, 3.0, 3.0, -1.0]
    _, probs = ref.softmax_cross_entropy_forward(logits, np.zeros(7, dtype=np.int64))
    probs = probs.astype(np.float32)
    probs[5] = [0, 0, 1, 0]
    y = rng.integers(0, 4, 7)
    got = gpu.logit_stats(dev(logits), dev(probs), dev(y))
    want = ref.logit_stats(logits, probs, y)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k


# --------------------------------------------------------------------------- determinism, errors
def test_bit_identical_reruns():
    """Fixed-order reductions (split-K dw, db, loss, norms): same bits on every run."""
    rng = np.random.default_rng(5)
    x, w = dev(rng.standard_normal((2, 2, 5, 5)).astype(np.float32)), \
        dev(rng.standard_normal((3, 2, 3, 3)).astype(np.float32))
    dout = dev(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    logits, y = dev(rng.standard_normal((11, 4)).astype(np.float32)), dev(rng.integers(0, 4, 11))
    runs = []
    for _ in range(2):
        _, dw, db = gpu.conv2d_backward(dout, x, w, 1, 1, need_dx=False)
        loss, _ = gpu.softmax_cross_entropy_forward(logits, y)
        runs.append([host(a) for a in (dw, db, loss, gpu.sum_of_squares(dw))])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_require_gpu(monkeypatch):
    gpu.require_gpu()                                    # simulator or GPU: available
    monkeypatch.setattr(gpu.cuda, "is_available", lambda: False)
    assert gpu.is_available() is False
    with pytest.raises(DeviceError, match="no CUDA GPU found; use --device cpu"):
        gpu.require_gpu()
