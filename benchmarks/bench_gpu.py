"""One SGD training step on the GPU: minicnn's CUDA kernels (minicnn/ops/cuda.py) against PyTorch.

    python benchmarks/bench_gpu.py --out gpu.json                 # needs a real CUDA GPU
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/bench_gpu.py --smoke # validation only, simulator ok

Reference networks (conv 3x3 pad 1, max-pool 2x2 stride 2, no padding tricks):
    A = conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10 on 1x28x28
    B = conv32k3p1-relu-maxpool2-conv64k3p1-relu-maxpool2-fc10 on 3x32x32

The networks are wired here directly from the ops in minicnn/ops/cuda.py (no Network class): all
parameters in one flat device buffer with views, gradients in a twin buffer, momentum buffers in a
third, every activation preallocated per batch size. A step is forward, loss (reduced on the
device), backward and one sgd_update over the flat buffers; nothing is copied to the host.

1. Validate first: one step's loss, every gradient and the updated parameters against
   minicnn/ops/ref.py in float64 on a tiny batch (OK / NOT OK with the max relative error).
2. Then time (float32): warm-up, then the median of --repeats steps, each bracketed by
   cuda.synchronize(), at batch 32, 128, 512, 1024; PyTorch on CUDA with the same architecture
   and torch.optim.SGD when torch with CUDA is importable (TF32 off unless --torch-tf32, so both
   compute in true float32; cudnn.benchmark on).
Prints a table (ms/step, images/s, ratio minicnn/torch) and writes JSON to --out.

--smoke: batch 2 only, validation plus one timed step (no warm-up, no torch), on the same layer
stacks with the input shrunk to 4x4 (--smoke-size; 8 takes ~8 minutes in the simulator, 0 keeps
28x28 / 32x32: far longer). It runs under the CUDA simulator in about 3 minutes on 2 cores, to
check that the script and the kernels work end to end; the timing it prints is the simulator's.
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

from minicnn.errors import DeviceError  # noqa: E402
from minicnn.ops import ref  # noqa: E402

NETS = {
    "A": dict(input=(1, 28, 28), convs=(16, 32), classes=10),
    "B": dict(input=(3, 32, 32), convs=(32, 64), classes=10),
}
K, PAD, POOL = 3, 1, 2
LR, MOMENTUM = 0.01, 0.9
VALIDATE_TOL = 1e-10          # max relative error, float64


def fail(msg, code=1):
    print(f"bench_gpu: {msg}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------- network description
def param_shapes(net):
    """[(F, C, K, K), (F,), ..., (L, D), (L,)] in layer order (PyTorch layouts)."""
    C, H, W = net["input"]
    shapes = []
    for F in net["convs"]:
        shapes += [(F, C, K, K), (F,)]
        C, H, W = F, H // POOL, W // POOL
    shapes += [(net["classes"], C * H * W), (net["classes"],)]
    return shapes


def init_params(net, rng, dtype):
    """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    params = []
    shapes = param_shapes(net)
    for w_shape, b_shape in zip(shapes[::2], shapes[1::2]):
        bound = 1.0 / np.sqrt(np.prod(w_shape[1:]))
        params.append(rng.uniform(-bound, bound, w_shape).astype(dtype))
        params.append(rng.uniform(-bound, bound, b_shape).astype(dtype))
    return params


# --------------------------------------------------------------------------- minicnn on the GPU
class GpuNet:
    """The reference network built from minicnn.ops.cuda, all buffers on the device."""

    def __init__(self, net, params, gpu):
        self.net, self.gpu, self.cuda = net, gpu, gpu.cuda
        self.dtype = params[0].dtype
        self.shapes = [p.shape for p in params]
        flat = np.concatenate([p.ravel() for p in params])
        self.flat_params = self.cuda.to_device(flat)
        self.flat_grads = self.cuda.device_array(flat.size, dtype=self.dtype)
        self.flat_bufs = self.cuda.device_array(flat.size, dtype=self.dtype)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        self.first_step = True
        self.N = None

    def _views(self, flat):
        views, at = [], 0
        for s in self.shapes:
            n = int(np.prod(s))
            views.append(flat[at:at + n].reshape(*s))
            at += n
        return views

    def alloc(self, N):
        """Every activation and gradient buffer for batch size N (once per batch size)."""
        if self.N == N:
            return
        c = self.cuda
        dt = self.dtype
        C, H, W = self.net["input"]
        self.layers = []
        for F in self.net["convs"]:
            OH, OW = H // POOL, W // POOL
            self.layers.append(dict(
                in_shape=(N, C, H, W),
                conv=c.device_array((N, F, H, W), dtype=dt),        # k3 p1: same size
                relu=c.device_array((N, F, H, W), dtype=dt),
                pool=c.device_array((N, F, OH, OW), dtype=dt),
                argmax=c.device_array((N, F, OH, OW), dtype=np.int32),
                dpool=c.device_array((N, F, H, W), dtype=dt),         # d(relu out)
                drelu=c.device_array((N, F, H, W), dtype=dt),         # d(conv out)
                dx=c.device_array((N, C, H, W), dtype=dt) if self.layers else None,
            ))
            C, H, W = F, OH, OW
        L = self.net["classes"]
        last = self.layers[-1]
        self.flat_in = last["pool"].reshape(N, C * H * W)
        self.dflat = c.device_array((N, C * H * W), dtype=dt)
        self.dflat4 = self.dflat.reshape(N, C, H, W)
        self.logits = c.device_array((N, L), dtype=dt)
        self.probs = c.device_array((N, L), dtype=dt)
        self.dlogits = c.device_array((N, L), dtype=dt)
        self.loss = c.device_array(1, dtype=dt)
        self.N = N

    def forward_loss(self, x, y):
        """x: (N, C, H, W), y: (N,) int device arrays -> loss (1,) device array."""
        g = self.gpu
        a = x
        for i, lay in enumerate(self.layers):
            w, b = self.params[2 * i], self.params[2 * i + 1]
            g.conv2d_forward(a, w, b, 1, PAD, out=lay["conv"])
            g.relu_forward(lay["conv"], out=lay["relu"])
            g.maxpool2d_forward(lay["relu"], POOL, POOL, out=lay["pool"], argmax=lay["argmax"])
            a = lay["pool"]
        g.dense_forward(self.flat_in, self.params[-2], self.params[-1], out=self.logits)
        g.softmax_cross_entropy_forward(self.logits, y, probs=self.probs, loss_out=self.loss)
        return self.loss

    def backward(self, x, y):
        """Gradients of the last forward_loss into flat_grads."""
        g = self.gpu
        g.softmax_cross_entropy_backward(self.probs, y, dlogits=self.dlogits)
        g.dense_backward(self.dlogits, self.flat_in, self.params[-2], dx=self.dflat,
                         dw=self.grads[-2], db=self.grads[-1])
        d = self.dflat4
        for i in range(len(self.layers) - 1, -1, -1):
            lay = self.layers[i]
            g.maxpool2d_backward(d, lay["argmax"], lay["relu"].shape, dx=lay["dpool"])
            g.relu_backward(lay["dpool"], lay["relu"], dx=lay["drelu"])
            inp = x if i == 0 else self.layers[i - 1]["pool"]
            g.conv2d_backward(lay["drelu"], inp, self.params[2 * i], 1, PAD, dx=lay["dx"],
                              dw=self.grads[2 * i], db=self.grads[2 * i + 1], need_dx=i > 0)
            d = lay["dx"]

    def step(self, x, y):
        """One SGD step (forward, loss, backward, update); returns the loss device array."""
        loss = self.forward_loss(x, y)
        self.backward(x, y)
        self.gpu.sgd_update(self.flat_params, self.flat_grads, self.flat_bufs, LR, MOMENTUM,
                            0.0, 0.0, False, self.first_step)
        self.first_step = False
        return loss


# --------------------------------------------------------------------------- NumPy reference step
def ref_step(net, params, x, y):
    """(loss, grads, new params) of one SGD step with ref.py (first step: buf = grad)."""
    cache, a = [], x
    for i in range(len(net["convs"])):
        w, b = params[2 * i], params[2 * i + 1]
        conv = ref.conv2d_forward(a, w, b, 1, PAD)
        relu = ref.relu_forward(conv)
        pool, argmax = ref.maxpool2d_forward(relu, POOL, POOL)
        cache.append((a, relu, argmax))
        a = pool
    flat = a.reshape(len(x), -1)
    logits = ref.dense_forward(flat, params[-2], params[-1])
    loss, probs = ref.softmax_cross_entropy_forward(logits, y)
    grads = [None] * len(params)
    dflat, grads[-2], grads[-1] = ref.dense_backward(
        ref.softmax_cross_entropy_backward(probs, y), flat, params[-2])
    d = dflat.reshape(a.shape)
    for i in range(len(net["convs"]) - 1, -1, -1):
        inp, relu, argmax = cache[i]
        d = ref.relu_backward(ref.maxpool2d_backward(d, argmax, relu.shape), relu)
        d, grads[2 * i], grads[2 * i + 1] = ref.conv2d_backward(d, inp, params[2 * i], 1, PAD)
    new_params = [p - LR * g for p, g in zip(params, grads)]     # momentum: first step buf = g
    return loss, grads, new_params


def rel_error(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def validate(name, net, gpu, N, seed=0):
    """One float64 step on the GPU against ref.py; prints OK / NOT OK per tensor."""
    cuda = gpu.cuda
    rng = np.random.default_rng(seed)
    params = init_params(net, rng, np.float64)
    x = rng.standard_normal((N,) + net["input"])
    y = rng.integers(0, net["classes"], N)
    rloss, rgrads, rnew = ref_step(net, params, x, y)

    model = GpuNet(net, params, gpu)
    model.alloc(N)
    loss = float(model.step(cuda.to_device(x), cuda.to_device(y)).copy_to_host()[0])
    checks = [("loss", rel_error(np.array(loss), np.array(rloss)))]
    layer_names = [f"conv{i + 1}" for i in range(len(net["convs"]))] + ["fc"]
    names = [f"{layer}.{pname}" for layer in layer_names for pname in ("w", "b")]
    for nm, g, rg in zip(names, model.grads, rgrads):
        checks.append((f"grad {nm}", rel_error(g.copy_to_host(), rg)))
    new = model._views(model.flat_params)
    for nm, p, rp in zip(names, new, rnew):
        checks.append((f"sgd  {nm}", rel_error(p.copy_to_host(), rp)))
    ok = True
    shape = "x".join(map(str, net["input"]))
    print(f"validate net {name} on {shape}, batch {N}, float64: loss {loss:.12f} "
          f"(ref {rloss:.12f})")
    for what, err in checks:
        good = err <= VALIDATE_TOL
        ok &= good
        print(f"  {'OK    ' if good else 'NOT OK'} {what:14s} max rel error {err:.2e}")
    return ok, {c[0]: c[1] for c in checks}


# --------------------------------------------------------------------------- timing
def time_minicnn(net, gpu, N, warmup, repeats, seed=0):
    cuda = gpu.cuda
    rng = np.random.default_rng(seed)
    model = GpuNet(net, init_params(net, rng, np.float32), gpu)
    model.alloc(N)
    x = cuda.to_device(rng.standard_normal((N,) + net["input"]).astype(np.float32))
    y = cuda.to_device(rng.integers(0, net["classes"], N))
    for _ in range(warmup):
        model.step(x, y)
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.step(x, y)
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    loss = float(model.forward_loss(x, y).copy_to_host()[0])
    return statistics.median(times) * 1e3, loss


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
    rng = np.random.default_rng(seed)
    params = init_params(net, rng, np.float32)
    C = net["input"][0]
    layers = []
    for F in net["convs"]:
        layers += [nn.Conv2d(C, F, K, padding=PAD), nn.ReLU(), nn.MaxPool2d(POOL)]
        C = F
    layers += [nn.Flatten(), nn.Linear(params[-2].shape[1], net["classes"])]
    model = nn.Sequential(*layers).cuda()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(torch.from_numpy(v))
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
def main(argv=None):
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
    args = ap.parse_args(argv)

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

    from minicnn.ops import cuda as gpu        # imports numba.cuda
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

    all_ok = True
    for name in nets:
        t0 = time.perf_counter()
        ok, errs = validate(name, nets[name], gpu, args.validate_batch)
        print(f"  ({time.perf_counter() - t0:.1f} s)")
        report["validation"][name] = dict(ok=ok, batch=args.validate_batch, max_rel_error=errs)
        all_ok &= ok
    if not all_ok:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        fail("validation against ref.py failed (NOT OK above); not timing")

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
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
