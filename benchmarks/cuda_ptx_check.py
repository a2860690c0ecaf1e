"""Compile every CUDA kernel minicnn launches to PTX, without a GPU: catches what the simulator
cannot (the simulator runs kernels as Python, so a construct Numba's CUDA target cannot type or
lower only fails on real hardware).

    pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12     # NVVM and NVRTC, no driver needed
    python benchmarks/cuda_ptx_check.py [--cc 9.0]

Step 1 (a child process under NUMBA_ENABLE_CUDASIM=1) trains a tiny network on device "cuda" for
two steps with the full trace, momentum and lambda_max, in float32 and float64, plus max-pool with
and without recorded geometry and per-sample gradients, and records the argument types of every kernel launch. Step 2
(this process, simulator off) compiles each (kernel, argument types) to PTX for --cc with
numba.cuda.compile_ptx and prints one line per kernel. Exit 1 if any fails.
"""
import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record(path):
    """Child: run the kernels in the simulator and pickle {kernel name: set of argument types}."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from numba import typeof
    from numba.cuda.simulator import kernel as simkernel

    seen = {}
    call = simkernel.FakeCUDAKernel.__call__

    def recording(self, *args):
        types = tuple(typeof(getattr(a, "_ary", a)) for a in args)
        seen.setdefault(self.fn.__name__, set()).add(types)
        return call(self, *args)

    simkernel.FakeCUDAKernel.__call__ = recording
    from minicnn.config import TrainConfig
    from minicnn.data import Dataset
    from minicnn.ops import cuda as gpu
    from minicnn.trainer import Trainer
    gpu.TPB, gpu.MAX_BLOCKS, gpu.TILE, gpu.RED_TPB, gpu.RED_ITEMS, gpu.SPLIT_ROWS = 32, 2, 4, 8, 2, 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    data = Dataset("tiny", x[:4], y[:4], x[4:], y[4:], 3)
    for dtype in ("float32", "float64"):
        t = Trainer(TrainConfig(arch="conv2k3p1-relu-maxpool2-fc3", lr=0.1, momentum=0.9, batch_size=2,
                                steps=2, trace="full", sharpness_every=1, dtype=dtype, device="cuda"), data=data)
        t.step()
        t.step()
        gpu.sum_of_squares(t.net.flat_params)
        t.net.per_sample_grads(x[:2].astype(dtype), y[:2])         # the per-sample weight-gradient kernels
        xd = gpu.to_device(x[:2].astype(dtype))
        out, arg = gpu.maxpool2d_forward(xd, 2, 2)
        gpu.maxpool2d_backward(out, arg, xd.shape, k=2, stride=2)
        gpu.maxpool2d_backward(out, gpu.to_device(arg.copy_to_host()), xd.shape)    # geometry unknown
    with open(path, "wb") as f:
        pickle.dump({k: sorted(v, key=str) for k, v in seen.items()}, f)


def _is_kernel(f):
    return hasattr(f, "py_func") and not getattr(f, "targetoptions", {}).get("device")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0: H100/H200)")
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record:
        return record(args.record)
    path = "/tmp/minicnn_cuda_launches.pkl"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    subprocess.run([sys.executable, __file__, "--record", path], env=env, check=True)
    with open(path, "rb") as f:
        seen = pickle.load(f)
    sys.path.insert(0, str(ROOT))
    from numba import cuda
    from numba.cuda import dispatcher

    from minicnn.ops import cuda as gpu
    cc = tuple(int(v) for v in args.cc.split("."))

    class Device:                    # device functions ask the (absent) driver for the target: answer it
        compute_capability = cc
    dispatcher.get_current_device = lambda: Device
    failed = 0
    for name in sorted(seen):
        kernel = getattr(gpu, name, None)
        if not _is_kernel(kernel):
            continue                 # device functions compile inside the kernels that call them
        for sig in seen[name]:
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
                print(f"OK     {name:32s} {len(ptx):7d} chars of PTX  {sig[0]}")
            except Exception as e:  # report every failure, then exit 1
                failed += 1
                print(f"FAILED {name:32s} {sig}\n       {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(f"{sum(len(v) for k, v in seen.items() if _is_kernel(getattr(gpu, k, None)))} "
          f"kernel signatures, {failed} failed, cc {args.cc}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
