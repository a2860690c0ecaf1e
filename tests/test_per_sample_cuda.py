"""Per-sample gradients on device "cuda": the two kernels against the NumPy reference, and
Network.per_sample_grads against the CPU network, on tiny shapes.

Without a GPU these run in Numba's CUDA simulator (tests/conftest.py switches it on) with the small
launch sizes of conftest.CUDA_SMALL_LAUNCH (grid-stride loops over more elements than threads).
A few seconds in the simulator.
"""
import numpy as np
import pytest
from conftest import skip_without_cuda

skip_without_cuda()

from numba import cuda  # noqa: E402

from minicnn.network import Network  # noqa: E402
from minicnn.ops import cuda as gpu  # noqa: E402
from minicnn.ops import ref  # noqa: E402

TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(autouse=True)
def small_launch(cuda_small_launch):
    return cuda_small_launch


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


@pytest.mark.parametrize("stride,pad,dtype", [(1, 1, np.float64), (2, 0, np.float64), (1, 1, np.float32)])
def test_conv2d_weight_grad_per_sample(stride, pad, dtype):
    rng = np.random.default_rng(stride + pad)
    x = rng.standard_normal((2, 2, 5, 4)).astype(dtype)          # N=2, C=2, H=5, W=4
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)          # F=3, K=3
    OH, OW = (5 + 2 * pad - 3) // stride + 1, (4 + 2 * pad - 3) // stride + 1
    dout = rng.standard_normal((2, 3, OH, OW)).astype(dtype)
    want = ref.conv2d_weight_grad_per_sample(dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                             stride, pad)
    dw, db = cuda.device_array((2, 3, 2, 3, 3), dtype), cuda.device_array((2, 3), dtype)
    got = gpu.conv2d_weight_grad_per_sample(dev(dout), dev(x), dev(w), stride, pad, dw=dw, db=db)
    assert got[0] is dw and got[1] is db
    for g, e in zip(got, want):
        np.testing.assert_allclose(g.copy_to_host(), e, **TOL[dtype])


def test_dense_weight_grad_per_sample():
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal((3, 7)), rng.standard_normal((3, 4))
    for g, e in zip(gpu.dense_weight_grad_per_sample(dev(dout), dev(x)), ref.dense_weight_grad_per_sample(dout, x)):
        np.testing.assert_allclose(g.copy_to_host(), e, **TOL[np.float64])


def test_network_per_sample_grads_on_cuda():
    """A 1x4x4 conv-relu-pool-fc network, batch 3, float64: the same rows as device cpu."""
    arch, shape = "conv2k3p1-relu-maxpool2-fc3", (1, 4, 4)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3,) + shape), np.array([0, 2, 1])
    want = Network(arch, shape, seed=3, dtype=np.float64).per_sample_grads(x, y)
    net = Network(arch, shape, seed=3, dtype=np.float64, device="cuda")
    got = net.per_sample_grads(x, y)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.mean(axis=0), net.get_flat_grads(), rtol=1e-12, atol=1e-14)
    for i in range(len(y)):
        _, gi = net.loss_and_grads(x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(got[i], np.concatenate([g.ravel() for g in gi]), rtol=1e-12, atol=1e-14)
