"""One SGD training step on the GPU: minicnn's CUDA kernels (minicnn/ops/cuda.py) against PyTorch.

    python benchmarks/bench_gpu.py --out gpu.json                 # needs a real CUDA GPU
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_gpu.py --smoke # validation only, simulator ok

Reference networks (conv 3x3 pad 1, max-pool 2x2 stride 2, no padding tricks):
    A = conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10 on 1x28x28
    B = conv32k3p1-relu-maxpool2-conv64k3p1-relu-maxpool2-fc10 on 3x32x32

The networks are minicnn.Network(spec, device="cuda"): all parameters in one flat device buffer
with views, gradients in a twin buffer, every activation preallocated per batch size. A step is
the training loop's: forward, loss (reduced on the device, one number read back), backward and one
SGD update over the flat buffers (momentum buffers on the device too).

1. Validate first: one step's loss, every gradient and the updated parameters of device "cuda"
   and of device "cpu" (Numba) against the NumPy reference (device "numpy", minicnn/ops/ref.py)
   in float64 on a tiny batch (OK / NOT OK with the max relative error).
2. Then time (float32): warm-up, then the median of --repeats steps, each bracketed by
   cuda.synchronize(), at batch 32, 128, 512, 1024; PyTorch on CUDA with the same architecture
   and torch.optim.SGD when torch with CUDA is importable (TF32 off unless --torch-tf32, so both
   compute in true float32; cudnn.benchmark on).
Prints a table (ms/step, images/s, ratio minicnn/torch) and writes JSON to --out.

--smoke: batch 2 only, validation plus one timed step (no warm-up, no torch), on the same layer
stacks with the input shrunk to 4x4 (--smoke-size; 8 takes ~8 minutes in the simulator, 0 keeps
28x28 / 32x32: far longer). It runs under the CUDA simulator on 2 cores, to
check that the script and the kernels work end to end (measured: 4 minutes, validation of cuda
and cpu against numpy included); the timing it prints is the simulator's.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# small grids (tiny validation batch) are intended here: no under-utilisation warnings
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

from reference_nets import NETS as _REFERENCE  # noqa: E402

from minicnn.errors import DeviceError  # noqa: E402

NETS = {name: dict(spec=spec, input=shape, classes=10) for name, (spec, shape) in _REFERENCE.items()}
LR, MOMENTUM = 0.01, 0.9
VALIDATE_TOL = 1e-10          # max relative error, float64


def fail(msg, code=1):
    print(f"bench_gpu: {msg}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------- one SGD step
def make(net, device, dtype, seed=0):
    """(Network, SGD) for a reference net on a device, PyTorch's default init from ``seed``."""
    from minicnn.network import Network
    from minicnn.sgd import SGD
    return (Network(net["spec"], net["input"], seed=seed, dtype=dtype, device=device),
            SGD(lr=LR, momentum=MOMENTUM))


def sgd_step(model, opt, x, y):
    """One training step as minicnn.trainer.Trainer takes it: forward and loss (read back: the loss
    is reduced on the device and one number comes to the host), backward into the flat gradient
    buffer, one update over the flat parameter buffer. x, y: host or device arrays."""
    loss = model.loss(x, y)
    model.backward()
    opt.step([model.flat_params], [model.flat_grads])
    return loss


def rel_error(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def validate(name, net, N, seed=0):
    """One float64 step (momentum, first step) on "cuda" and on "cpu" (Numba) against "numpy"
    (minicnn/ops/ref.py): loss, every gradient, every updated parameter. Prints OK / NOT OK."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N,) + net["input"])
    y = rng.integers(0, net["classes"], N)
    results = {}
    for device in ("numpy", "cpu", "cuda"):
        model, opt = make(net, device, np.float64, seed)
        loss = sgd_step(model, opt, x, y)
        results[device] = (loss, model.get_flat_grads(), model.get_flat_params(), model)
    rloss, rgrads, rnew, rmodel = results["numpy"]
    ok = True
    checks = {}
    shape = "x".join(map(str, net["input"]))
    print(f"validate net {name} on {shape}, batch {N}, float64, against the NumPy reference "
          f"(loss {rloss:.12f})")
    for device in ("cuda", "cpu"):
        loss, grads, new, _ = results[device]
        rows = [("loss", rel_error(np.array(loss), np.array(rloss)))]
        for pname, (a, b) in zip(rmodel.param_names, zip(rmodel.offsets, rmodel.offsets[1:])):
            rows.append((f"grad {pname}", rel_error(grads[a:b], rgrads[a:b])))
            rows.append((f"sgd  {pname}", rel_error(new[a:b], rnew[a:b])))
        for what, err in rows:
            good = err <= VALIDATE_TOL
            ok &= good
            print(f"  {'OK    ' if good else 'NOT OK'} {device:4s} {what:18s} max rel error {err:.2e}")
            checks[f"{device} {what}"] = err
    return ok, checks


# --------------------------------------------------------------------------- timing
def time_minicnn(net, gpu, N, warmup, repeats, seed=0):
    cuda = gpu.cuda
    model, opt = make(net, "cuda", np.float32, seed)
    rng = np.random.default_rng(seed)
    x = cuda.to_device(rng.standard_normal((N,) + net["input"]).astype(np.float32))
    y = cuda.to_device(rng.integers(0, net["classes"], N))
    for _ in range(warmup):
        sgd_step(model, opt, x, y)
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sgd_step(model, opt, x, y)
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, model.loss(x, y)


def torch_cuda():
    """The torch module if it is importable and sees a CUDA GPU, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def time_torch(torch, net, N, warmup, repeats, tf32, seed=0):
    nn = torch.nn
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    from minicnn.spec import parse_spec
    host, _ = make(net, "cpu", np.float32, seed)          # the same initial weights as minicnn's
    layers = []
    C = net["input"][0]
    for ls in parse_spec(net["spec"]):
        if ls.kind == "conv":
            layers.append(nn.Conv2d(C, ls.out, ls.k, stride=ls.stride, padding=ls.pad))
            C = ls.out
        elif ls.kind == "relu":
            layers.append(nn.ReLU())
        elif ls.kind == "maxpool":
            layers.append(nn.MaxPool2d(ls.k, ls.stride))
        elif ls.kind == "fc":
            fc = [layer for layer in host.layers if layer.kind == "fc"][sum(isinstance(m, nn.Linear) for m in layers)]
            layers += [nn.Flatten(), nn.Linear(fc.in_shape[0], ls.out)]      # Flatten: a no-op on (N, D)
    model = nn.Sequential(*layers).cuda()
    with torch.no_grad():
        for p, v in zip(model.parameters(), host.state_dict().values()):
            p.copy_(torch.from_numpy(v))
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.from_numpy(rng.standard_normal((N,) + net["input"]).astype(np.float32)).cuda()
    y = torch.from_numpy(rng.integers(0, net["classes"], N)).cuda()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# --------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--nets", default="A,B", help="comma-separated subset of A,B (default A,B)")
    ap.add_argument("--batches", default="32,128,512,1024",
                    help="comma-separated batch sizes to time (default 32,128,512,1024)")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per case (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (JIT, cudnn)")
    ap.add_argument("--validate-batch", type=int, default=4,
                    help="batch size of the float64 validation step (default 4)")
    ap.add_argument("--torch-tf32", action="store_true",
                    help="let PyTorch use TF32 (faster, less precise); default: true float32")
    ap.add_argument("--smoke", action="store_true",
                    help="batch 2 only: validate and time a single step; runs in the simulator")
    ap.add_argument("--smoke-size", type=int, default=4,
                    help="with --smoke: input height/width, a multiple of 4 (default 4; "
                         "0 = the real 28 / 32)")
    return ap.parse_args(argv)


def select(args):
    """(nets, batches) to run; --smoke shrinks both (and the inputs) for the simulator."""
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        fail(f"unknown net(s) {', '.join(unknown)}; accepted: {', '.join(NETS)}", 2)
    batches = [int(b) for b in args.batches.split(",")]
    nets = {n: NETS[n] for n in nets}
    if args.smoke:
        batches, args.validate_batch, args.warmup, args.repeats = [2], 2, 0, 1
        if args.smoke_size:
            if args.smoke_size < 4 or args.smoke_size % 4:
                fail(f"--smoke-size must be a multiple of 4 (two 2x2 pools), got {args.smoke_size}", 2)
            nets = {n: dict(net, input=(net["input"][0], args.smoke_size, args.smoke_size))
                    for n, net in nets.items()}
    return nets, batches


def gpu_backend(args):
    """minicnn's CUDA backend, checked: a GPU (or, for --smoke only, the simulator)."""
    from minicnn.ops import cuda as gpu  # imports numba.cuda
    try:
        gpu.require_gpu()
    except DeviceError:
        fail("no CUDA GPU found (numba.cuda.is_available() is False); this benchmark needs one "
             "(NUMBA_ENABLE_CUDASIM=1 ... --smoke runs the validation in the simulator)")
    from numba import config as numba_config
    simulator = bool(numba_config.ENABLE_CUDASIM)
    if simulator and not args.smoke:
        fail("the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1): timings would be meaningless; "
             "use --smoke to validate only, or run on a real GPU")
    if simulator:
        # every simulated thread is a Python thread: smaller tiles keep the smoke run short
        gpu.TPB, gpu.MAX_BLOCKS, gpu.TILE, gpu.RED_TPB = 64, 4, 8, 64
    return gpu, simulator


def main(argv=None):
    args = parse_args(argv)
    nets, batches = select(args)
    gpu, simulator = gpu_backend(args)
    try:
        device_name = gpu.cuda.get_current_device().name
        device_name = device_name.decode() if isinstance(device_name, bytes) else str(device_name)
    except Exception:
        device_name = "unknown"
    torch = None if args.smoke else torch_cuda()
    print(f"device: {device_name}{' (CUDA simulator)' if simulator else ''}; "
          f"torch: {torch.__version__ + ' (CUDA)' if torch else 'not available with CUDA'}")

    report = dict(device=device_name, simulator=simulator, smoke=args.smoke, dtype="float32",
                  lr=LR, momentum=MOMENTUM, warmup=args.warmup, repeats=args.repeats,
                  torch=torch.__version__ if torch else None, torch_tf32=args.torch_tf32,
                  launch=dict(TPB=gpu.TPB, MAX_BLOCKS=gpu.MAX_BLOCKS, TILE=gpu.TILE, RED_TPB=gpu.RED_TPB,
                              SPLIT_ROWS=gpu.SPLIT_ROWS),
                  inputs={n: list(net["input"]) for n, net in nets.items()},
                  python=platform.python_version(), validation={}, results=[])

    validate_all(args, nets, report)
    time_all(args, nets, batches, gpu, torch, report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def validate_all(args, nets, report):
    all_ok = True
    for name in nets:
        t0 = time.perf_counter()
        ok, errs = validate(name, nets[name], args.validate_batch)
        print(f"  ({time.perf_counter() - t0:.1f} s)")
        report["validation"][name] = dict(ok=ok, batch=args.validate_batch, max_rel_error=errs)
        all_ok &= ok
    if not all_ok:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        fail("validation against ref.py failed (NOT OK above); not timing")


def time_all(args, nets, batches, gpu, torch, report):
    header = (f"{'net':3s} {'batch':>5s} {'minicnn ms':>11s} {'torch ms':>9s} "
              f"{'minicnn img/s':>13s} {'torch img/s':>11s} {'ratio':>6s}")
    print("\none SGD step (forward, loss, backward, update), float32, median of "
          f"{args.repeats} after {args.warmup} warm-up; ratio = minicnn ms / torch ms")
    print(header)
    for name in nets:
        for N in batches:
            ms, loss = time_minicnn(nets[name], gpu, N, args.warmup, args.repeats)
            tms = time_torch(torch, nets[name], N, args.warmup, args.repeats,
                             args.torch_tf32) if torch else None
            row = dict(net=name, batch=N, minicnn_ms=ms, minicnn_img_s=N / ms * 1e3,
                       torch_ms=tms, torch_img_s=N / tms * 1e3 if tms else None,
                       ratio=ms / tms if tms else None, final_loss=loss)
            report["results"].append(row)
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(f"{name:3s} {N:5d} {ms:11.3f} {fmt(tms, '9.3f'):>9s} "
                  f"{row['minicnn_img_s']:13.0f} {fmt(row['torch_img_s'], '11.0f'):>11s} "
                  f"{fmt(row['ratio'], '6.2f'):>6s}")


if __name__ == "__main__":
    main()
