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


# --------------------------------------------------------------------------- CUDA (GPU or simulator)
# The simulator runs every CUDA thread as a Python thread, so the CUDA tests shrink the launch
# sizes (tiles that do not divide the sizes, multi-block and split-K reductions, grid-stride
# loops) and use tiny shapes. These sizes are valid on a real GPU too.
CUDA_SMALL_LAUNCH = dict(TPB=32, MAX_BLOCKS=2, TILE=4, RED_TPB=8, RED_ITEMS=2, RED_MAX_BLOCKS=256,
                         SPLIT_ROWS=16)


def skip_without_cuda():
    """Skip the calling test module when there is neither a GPU nor the CUDA simulator."""
    from numba import config as numba_config
    if not numba_config.ENABLE_CUDASIM:
        from numba import cuda
        if not cuda.is_available():
            pytest.skip("no CUDA GPU and the CUDA simulator is off: run with NUMBA_ENABLE_CUDASIM=1",
                        allow_module_level=True)


@pytest.fixture
def cuda_small_launch(monkeypatch):
    """minicnn.ops.cuda with CUDA_SMALL_LAUNCH launch sizes for the duration of a test."""
    from minicnn.ops import cuda as gpu
    for name, value in CUDA_SMALL_LAUNCH.items():
        monkeypatch.setattr(gpu, name, value)
    return gpu
