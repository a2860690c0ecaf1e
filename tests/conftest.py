"""Shared fixtures. Backends: 'numpy' is the reference; 'cpu' the Numba kernels."""
import os

# CUDA kernels are tested on every machine: without a GPU driver, run them in Numba's CUDA
# simulator. This must happen before numba is first imported (no minicnn module imports numba
# at import time, so conftest is early enough).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest

BACKENDS = ["numpy", "cpu"]


@pytest.fixture(params=BACKENDS)
def device(request):
    return request.param


def random_batch(rng, n, shape, classes=10, dtype=np.float64):
    x = rng.standard_normal((n,) + tuple(shape)).astype(dtype)
    y = rng.integers(0, classes, size=n)
    return x, y
