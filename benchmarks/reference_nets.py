"""The benchmarks' reference networks and the random batches they are timed on (one place for
bench_cpu, bench_gpu, ab_cpu and ab_plan). Import after threads_env: this imports numpy."""
import numpy as np

NETS = {                        # name -> (minicnn spec, input shape); 10 classes
    "A": ("conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10", (1, 28, 28)),
    "B": ("conv32k3p1-relu-maxpool2-conv64k3p1-relu-maxpool2-fc10", (3, 32, 32)),
}


def random_batch(shape, n):
    """(x, y) of n images: float32 standard normal inputs and int64 labels in 0..9, drawn from
    default_rng(n) (the same batch for every framework and revision timed on it)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y
