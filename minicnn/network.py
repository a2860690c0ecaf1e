"""Network: layers built from a spec, parameters in one flat buffer with PyTorch-layout views.

    net = Network.from_spec("small", input_shape=(1, 28, 28), seed=0)
    loss, grads = net.loss_and_grads(x, y)     # x: (N, C, H, W), y: (N,) int

Like llm.c, all parameters live in one allocation (``net.flat_params``) and ``net.params`` are
named views into it, in layer order: conv weight (F, C, K, K), conv bias (F,), dense weight
(O, D), dense bias (O,). Gradients live in a twin buffer (``net.flat_grads``, viewed as
``net.grads``; loss_and_grads hands it out and the next backward pass moves to another one while
the caller holds it). Flat buffers make the SGD update, gradient norms and gradient cosines one
vector operation each.

The ops come from a backend module with the same names in every backend:
``numpy`` (minicnn.ops.ref, the oracle), ``cpu`` (Numba, the default), ``cuda`` (Numba CUDA).
Work buffers for activations and gradients are allocated once per batch size and reused.
"""
import math
import os
import sys

import numpy as np

from .errors import ArgumentTypeError, ConfigError, SpecError
from .ops import DEVICES, get_backend, on_device  # noqa: F401  (DEVICES: the accepted device names)
from .spec import canonical_spec, parse_spec

INITS = ("torch", "he", "xavier", "dead")
# init "dead": He weights, every bias before a ReLU set to this, so every ReLU starts dead
# (inputs here are O(1), so pre-activations stay far below 0): a network initialised on the plateau.
DEAD_BIAS = -10.0


# A network is refused, before anything is allocated, when what it needs is more than the machine's
# physical memory: numpy would fail ("unable to allocate 2.46 TiB") or the machine would swap to a
# halt. A Network holds PARAM_COPIES parameter-sized arrays (parameters and gradients); training
# holds more (minicnn.config.TRAIN_PARAM_COPIES) and every batch size's activations.
PARAM_COPIES = 2
# Gradient buffers loss_and_grads keeps to move to while its caller holds the last ones (two
# alternate in a training loop; a third lets the caller keep the previous step's gradients too).
GRAD_BUFFERS = 3
# the batch size Network.evaluate works in (its buffers are kept beside the training batch's)
EVAL_BATCH = 500


def physical_memory():
    """Bytes of physical memory on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n):
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def check_memory(nbytes, what):
    """A one-line ConfigError when ``nbytes`` (for ``what``) exceed the machine's physical memory."""
    limit = physical_memory()
    if limit and nbytes > limit:
        raise ConfigError(f"{what} would take {format_bytes(nbytes)}, more than this machine's "
                          f"{format_bytes(limit)} of memory; accepted: what fits in memory (fewer filters, units "
                          f"or samples, a smaller batch)")


def check_input_shape(shape):
    """(C, H, W) as a tuple of ints: three positive integers, else a one-line error."""
    accepted = "input_shape must be (C, H, W), three positive integers"
    try:
        dims = tuple(shape)
    except TypeError:
        raise ArgumentTypeError(f"{accepted}, got {type(shape).__name__} {shape!r}") from None
    if not (len(dims) == 3 and all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1
                                   for d in dims)):
        raise SpecError(f"{accepted}, got {dims}")
    return tuple(int(d) for d in dims)


# --------------------------------------------------------------------------- layers
class Layer:
    """A layer: shapes fixed at build time; forward saves what backward needs.

    Each kind declares the buffers it works in for a batch of n (``buffers``); the Network
    allocates them once per batch size and hands them to the ops as keywords.
    """
    kind = ""
    param_shapes = ()
    forward_fused = False        # a ReLU whose forward the conv before it already applied
    backward_fused = False       # a ReLU whose backward the max-pool after it already applied
    skips_dx = False             # its backward(need_dx=False) computes no input gradient (conv, fc)
    first = False                # set by Network on the first layer: nothing needs its input gradient

    def __init__(self, name, in_shape):
        self.name = name
        self.in_shape = in_shape          # per-sample shape, e.g. (C, H, W)
        self.out_shape = in_shape
        self.params = []                  # views into the network's flat buffer
        self.grads = []

    def fan_in_out(self):
        return 0, 0

    def per_sample_grads(self, ops, ws, dout):
        """Per-sample gradients of this layer's parameters, given the gradient at its output
        dout: (N,) + out_shape (as ``backward`` gets it): one (N,) + param shape array per
        parameter, in ``param_shapes`` order (none for a layer without parameters)."""
        return ()

    # The R-operator (Pearlmutter 1994, "Fast exact multiplication by the Hessian"): the forward and
    # the backward pass differentiated along a direction of the parameters, for exact Hessian-vector
    # products (Network.hessian_vector_product). Host arrays only. A tangent None stands for zero.
    def r_forward(self, ops, rx, rparams):
        """Tangent of the output from the input's tangent rx: (N,) + in_shape (or None) and the
        parameters' (rparams, shaped as params); after forward. Keeps rx for r_backward."""
        return rx

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        """From the output gradient dout and its tangent rdout: (tangent of the input gradient, or None
        when need_dx is False; [tangent of each parameter's gradient])."""
        return rdout, []

    def buffers(self, n, ops, dtype):
        """{name: array} this layer writes for a batch of n: its output (unless fused into the
        layer before) and its input gradient (unless fused into the layer after)."""
        bufs = {}
        if not self.forward_fused:
            bufs["out"] = ops.empty((n,) + tuple(self.out_shape), dtype)
        if not self.backward_fused and not (self.first and self.skips_dx):
            bufs["dx"] = ops.empty((n,) + tuple(self.in_shape), dtype)
        return bufs


class Conv2d(Layer):
    kind = "conv"
    skips_dx = True
    relu_fused = False           # set by Network when the next layer is a ReLU the backend fuses in
    pool = None                  # set by Network: the MaxPool2d layer after it (and its ReLU) fused in

    def __init__(self, name, in_shape, ls):
        super().__init__(name, in_shape)
        C, H, W = in_shape
        self.F, self.K, self.S, self.P = ls.out, ls.k, ls.stride, ls.pad
        OH = (H + 2 * self.P - self.K) // self.S + 1
        OW = (W + 2 * self.P - self.K) // self.S + 1
        if OH < 1 or OW < 1:
            raise SpecError(f"layer '{ls.token()}' does not fit its input {C}x{H}x{W}: output would be "
                            f"{OH}x{OW}; use a smaller kernel, more padding or a larger input")
        self.out_shape = (self.F, OH, OW)
        self.param_shapes = ((self.F, C, self.K, self.K), (self.F,))

    def fan_in_out(self):
        C = self.in_shape[0]
        return C * self.K * self.K, self.F * self.K * self.K

    def buffers(self, n, ops, dtype):
        bufs = super().buffers(n, ops, dtype)
        # scratch for the unfolded input and the products (backends that need any; layers share it)
        work = ops.conv2d_workspace((n,) + tuple(self.in_shape), self.param_shapes[0], self.S, self.P, dtype)
        if work is not None:
            bufs["work"] = work
        return bufs

    def forward(self, ops, ws, x):
        w, b = self.params
        self.x = x
        bufs = ws.out(self.name, "out", "work")
        if self.pool is None:
            return ops.conv2d_forward(x, w, b, self.S, self.P, relu=self.relu_fused, **bufs)
        p = self.pool                 # the pool's output and argmax land in its buffers
        pb = ws.out(p.name, "out", "argmax")
        out, p.out, p.argmax = ops.conv2d_forward(x, w, b, self.S, self.P, relu=self.relu_fused, pool=(p.K, p.S),
                                                  pool_out=pb.get("out"), argmax=pb.get("argmax"), **bufs)
        p.x_shape = out.shape
        return out

    def backward(self, ops, ws, dout, need_dx):
        w, _ = self.params
        dw, db = self.grads
        bufs = ws.out(self.name, "dx", "work") if need_dx else ws.out(self.name, "work")
        if self.pool is None:
            return ops.conv2d_backward(dout, self.x, w, self.S, self.P, dw=dw, db=db, need_dx=need_dx, **bufs)[0]
        p = self.pool                 # dout is the pool's output gradient (the ReLU and pool passed it on)
        return ops.conv2d_backward(dout, self.x, w, self.S, self.P, dw=dw, db=db, need_dx=need_dx, pool=(p.K, p.S),
                                   argmax=p.argmax, relu_pooled=p.out if self.relu_fused else None, **bufs)[0]

    def output_grad(self, ops, dout):
        """The gradient at this conv's own output, from the dout its backward gets: with a max-pool
        (and ReLU) fused in, that is the pool's output gradient, routed back here as the unfused
        layers would (the per-sample and R-operator passes need it)."""
        if self.pool is None:
            return dout
        p = self.pool
        return ops.maxpool2d_backward(dout, p.argmax, p.x_shape, relu_pooled=p.out if self.relu_fused else None)

    def per_sample_grads(self, ops, ws, dout):
        w, _ = self.params
        return ops.conv2d_weight_grad_per_sample(self.output_grad(ops, dout), self.x, w, self.S, self.P,
                                                 **ws.out(self.name, "work"))

    def r_forward(self, ops, rx, rparams):
        # conv is bilinear in (x, w): R{out} = conv(x, rw) + rb + conv(rx, w)
        (w, _), (rw, rb) = self.params, rparams
        self.rx = rx
        rout = ops.conv2d_forward(self.x, rw, rb, self.S, self.P)
        if rx is not None:
            rout += ops.conv2d_forward(rx, w, np.zeros(self.F, rx.dtype), self.S, self.P)
        return rout

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        # dw = corr(dout, x), db = sum(dout), dx = conv_T(dout, w):
        # R{dw} = corr(rdout, x) + corr(dout, rx), R{db} = sum(rdout), R{dx} = conv_T(rdout, w) + conv_T(dout, rw)
        (w, _), (rw, _) = self.params, rparams
        dout = self.output_grad(ops, dout)
        rdx, rdw, rdb = ops.conv2d_backward(rdout, self.x, w, self.S, self.P, need_dx=need_dx)
        if self.rx is not None or need_dx:
            dx2, dw2, _ = ops.conv2d_backward(dout, self.x if self.rx is None else self.rx, rw, self.S, self.P,
                                              need_dx=need_dx)
            if self.rx is not None:
                rdw = rdw + dw2
            if need_dx:
                rdx = rdx + dx2
        return rdx, [rdw, rdb]


class ReLU(Layer):
    kind = "relu"

    def forward(self, ops, ws, x):
        if self.forward_fused:
            self.out = x
        else:
            self.out = ops.relu_forward(x, **ws.out(self.name, "out"))
        return self.out

    def backward(self, ops, ws, dout, need_dx):
        if self.backward_fused:
            return dout
        return ops.relu_backward(dout, self.out, **ws.out(self.name, "dx"))

    def r_forward(self, ops, rx, rparams):
        return None if rx is None else ops.relu_backward(rx, self.out)        # the mask of the forward

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        return (ops.relu_backward(rdout, self.out) if need_dx else None), []


class MaxPool2d(Layer):
    kind = "maxpool"
    relu_fused = False           # set by Network when the previous layer is a ReLU: its backward is fused in
    conv_fused = False           # set by Network: the conv before it pools (forward) and takes its
                                 # gradient (backward); then this layer only passes them on

    def __init__(self, name, in_shape, ls):
        super().__init__(name, in_shape)
        C, H, W = in_shape
        self.K, self.S = ls.k, ls.stride
        OH, OW = (H - self.K) // self.S + 1, (W - self.K) // self.S + 1
        if OH < 1 or OW < 1:
            raise SpecError(f"layer '{ls.token()}' does not fit its input {C}x{H}x{W}; "
                            f"use a smaller pooling window")
        self.out_shape = (C, OH, OW)

    def buffers(self, n, ops, dtype):
        bufs = super().buffers(n, ops, dtype)
        bufs["argmax"] = ops.empty((n,) + tuple(self.out_shape), np.int32)
        return bufs

    def forward(self, ops, ws, x):
        if self.conv_fused:
            return self.out           # the conv's forward filled out, argmax and x_shape
        self.x_shape = x.shape
        self.out, self.argmax = ops.maxpool2d_forward(x, self.K, self.S, **ws.out(self.name, "out", "argmax"))
        return self.out

    def backward(self, ops, ws, dout, need_dx):
        if self.conv_fused:
            return dout
        return ops.maxpool2d_backward(dout, self.argmax, self.x_shape,
                                      relu_pooled=self.out if self.relu_fused else None, **ws.out(self.name, "dx"))

    def r_forward(self, ops, rx, rparams):
        if rx is None:                           # the tangent of each window's winner (host arrays)
            return None
        N, C = rx.shape[:2]
        win = np.asarray(self.argmax).reshape(N, C, -1).astype(np.intp)
        return np.take_along_axis(rx.reshape(N, C, -1), win, axis=2).reshape(self.out.shape)

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        return (ops.maxpool2d_backward(rdout, self.argmax, self.x_shape) if need_dx else None), []


class Flatten(Layer):
    kind = "flatten"

    def __init__(self, name, in_shape):
        super().__init__(name, in_shape)
        self.out_shape = (int(np.prod(in_shape)),)

    def buffers(self, n, ops, dtype):
        return {}                                           # views only

    def forward(self, ops, ws, x):
        return x.reshape(x.shape[0], self.out_shape[0])   # a view: C,H,W order, as torch.flatten

    def backward(self, ops, ws, dout, need_dx):
        return dout.reshape((dout.shape[0],) + tuple(self.in_shape))

    def r_forward(self, ops, rx, rparams):
        return None if rx is None else rx.reshape(rx.shape[0], self.out_shape[0])

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        return self.backward(ops, None, rdout, need_dx), []


class Dense(Layer):
    kind = "fc"
    skips_dx = True

    def __init__(self, name, in_shape, ls):
        super().__init__(name, in_shape)
        (D,) = in_shape
        self.out_shape = (ls.out,)
        self.param_shapes = ((ls.out, D), (ls.out,))

    def fan_in_out(self):
        return self.in_shape[0], self.out_shape[0]

    def forward(self, ops, ws, x):
        w, b = self.params
        self.x = x
        return ops.dense_forward(x, w, b, **ws.out(self.name, "out"))

    def backward(self, ops, ws, dout, need_dx):
        w, _ = self.params
        dw, db = self.grads
        bufs = ws.out(self.name, "dx") if need_dx else {}
        dx, _, _ = ops.dense_backward(dout, self.x, w, dw=dw, db=db, need_dx=need_dx, **bufs)
        return dx

    def per_sample_grads(self, ops, ws, dout):
        return ops.dense_weight_grad_per_sample(dout, self.x)

    def r_forward(self, ops, rx, rparams):
        # R{out} = x rw^T + rb + rx w^T
        (w, _), (rw, rb) = self.params, rparams
        self.rx = rx
        rout = ops.dense_forward(self.x, rw, rb)
        if rx is not None:
            rout += ops.dense_forward(rx, w, np.zeros(w.shape[0], rx.dtype))
        return rout

    def r_backward(self, ops, dout, rdout, rparams, need_dx):
        # R{dw} = rdout^T x + dout^T rx, R{db} = sum(rdout), R{dx} = rdout w + dout rw
        (w, _), (rw, _) = self.params, rparams
        rdx, rdw, rdb = ops.dense_backward(rdout, self.x, w, need_dx=need_dx)
        if self.rx is not None or need_dx:
            dx2, dw2, _ = ops.dense_backward(dout, self.x if self.rx is None else self.rx, rw, need_dx=need_dx)
            if self.rx is not None:
                rdw = rdw + dw2
            if need_dx:
                rdx = rdx + dx2
        return rdx, [rdw, rdb]


class FlatViews(list):
    """A list of arrays that are consecutive views of one flat buffer, ``flat_buffer`` (net.params,
    net.grads, the gradients loss_and_grads returns). SGD.step updates such lists through their
    buffers in one pass, as train() does with [flat_params], [flat_grads], until the list is changed
    (``changed``: set by every method that changes a list; then SGD.step updates its elements)."""
    # (slots, not a __dict__: SGD.step and _unshare_grads read these every step)
    __slots__ = ("flat_buffer", "layout", "originals", "changed", "handed_out", "counted", "free_refcounts",
                 "bound_refcounts", "layer_grads")

    @classmethod
    def of(cls, flat, layout):
        """Views of ``flat``; layout: [(start, stop, shape)] with Python ints (numpy integers
        made this several us slower)."""
        views = cls([flat[a:b].reshape(s) for a, b, s in layout])
        views.flat_buffer = flat
        views.layout = layout                   # two lists of one layout have the same shapes
        views.originals = tuple(views)          # the views as made
        views.changed = False
        return views

    def buffer(self):
        """flat_buffer, or None once the list was changed (an element replaced, added, removed or
        moved: then the buffer may no longer be what the list covers). One attribute read: checking
        the elements one by one cost ~0.5% of A's step at batch 1, twice a step in SGD.step."""
        return None if self.changed else self.flat_buffer

    def restore(self):
        """Undo any change: the views as made (_unshare_grads, on a list nothing else refers to)."""
        if self.changed:
            list.__setitem__(self, slice(None), self.originals)
            self.changed = False


def _changes_the_list(name):
    method = getattr(list, name)

    def changing(self, *args, **kwargs):
        self.changed = True
        return method(self, *args, **kwargs)
    changing.__name__, changing.__doc__ = name, method.__doc__
    return changing


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse"):
    setattr(FlatViews, _name, _changes_the_list(_name))
del _name


def _refcounts(views):
    """The reference counts of a FlatViews list and of what it ``counted``: its flat buffer, the
    array that owns their memory (every view made from them refers to it), its views (see
    _unshare_grads)."""
    return (sys.getrefcount(views), *map(sys.getrefcount, views.counted))


LAYER_KINDS = {"conv": Conv2d, "relu": ReLU, "maxpool": MaxPool2d, "flatten": Flatten, "fc": Dense}


def _share_transient(bufs, names, empty):
    """Let every conv workspace use one allocation (from ``empty``, the backend's) for each buffer in ``names``.

    Those buffers live only inside one conv2d_forward/backward call (layers run one at a time),
    so the layers can share them. Each shared buffer is sized for the largest layer.
    """
    works = [b for (_, kind), b in bufs.items() if kind == "work"]
    for name in names:
        owners = [w for w in works if name in w]
        if len(owners) < 2:
            continue
        flat = empty(max(w[name].size for w in owners), owners[0][name].dtype)
        for w in owners:
            w[name] = flat[:w[name].size].reshape(w[name].shape)


class _Workspace:
    """The buffers of one batch size, {(layer name, buffer name): array}, handed to the ops as
    out=/dx=/argmax=/work= keywords."""

    def __init__(self, bufs=None, batch=None):
        self.bufs = bufs or {}
        self.batch = batch
        self.outs = {}

    def out(self, layer_name, *names):
        """{name: buffer} of those of ``names`` the layer has: the same dict on every call (made
        once; a layer calls this every step), so callers pass it on and never change it."""
        kw = self.outs.get((layer_name, names))
        if kw is None:
            kw = self.outs[(layer_name, names)] = {n: self.bufs[(layer_name, n)] for n in names
                                                   if (layer_name, n) in self.bufs}
        return kw


# --------------------------------------------------------------------------- network
class Network:
    """A feed-forward CNN: conv / relu / maxpool / flatten / fc layers, softmax cross-entropy loss."""

    def __init__(self, spec, input_shape, seed=0, dtype=np.float32, init="torch", init_scale=1.0,
                 device="cpu"):
        self.input_shape = check_input_shape(input_shape)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ArgumentTypeError(f"seed must be a whole number >= 0, got {type(seed).__name__} {seed!r}")
        if seed < 0:
            raise ConfigError(f"seed must be a whole number >= 0, got {seed}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            dtype = None
        if dtype not in (np.float32, np.float64):
            raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
        if init not in INITS:
            raise ConfigError(f"unknown init '{init}'; accepted: {', '.join(INITS)}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float, np.integer, np.floating)):
            raise ArgumentTypeError(f"init_scale must be a finite number >= 0, got {type(init_scale).__name__}")
        if not (np.isfinite(init_scale) and init_scale >= 0):
            raise ConfigError(f"init_scale must be a finite number >= 0, got {init_scale}")
        self.spec = canonical_spec(spec)
        self.dtype = dtype
        self.device = device
        self.seed, self.init, self.init_scale = seed, init, init_scale
        self.ops = get_backend(device)
        self.layers = self._build(parse_spec(spec), self.input_shape)
        if self.ops.FUSES_RELU:
            self._fuse_relus()
        self.layers[0].first = True
        self.num_classes = self.layers[-1].out_shape[0]

        # one flat buffer for all parameters, one for all gradients; per-layer views into them
        shapes = [s for layer in self.layers for s in layer.param_shapes]
        count = sum(math.prod(s) for s in shapes)
        check_memory(count * dtype.itemsize * PARAM_COPIES,
                     f"network {self.spec}: its {count:,} parameters and their gradients ({dtype.name})")
        self.param_names = [f"{layer.name}.{pn}" for layer in self.layers
                            for pn in ("weight", "bias")[:len(layer.param_shapes)]]
        sizes = [int(np.prod(s)) for s in shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        # on device "cuda" these are device arrays (and so are the views): parameters, gradients and
        # activations stay on the GPU; get_flat_params() / host_copy() bring copies to the host.
        self.flat_params = self.ops.zeros(self.offsets[-1], dtype)
        self._layout = [(int(a), int(b), tuple(s)) for a, b, s in zip(self.offsets, self.offsets[1:], shapes)]
        self.params = FlatViews.of(self.flat_params, self._layout)
        i = 0
        for layer in self.layers:
            n = len(layer.param_shapes)
            layer.params = self.params[i:i + n]
            i += n
        self._grads_pool = []        # the gradient buffers loss_and_grads may move to (see _unshare_grads)
        self._bind_grads(self._grad_buffer())      # self.flat_grads, self.grads, each layer's grads
        self.reset_parameters(seed, init, init_scale)
        self._ws = _Workspace()
        self._ws_cache = {}          # batch size -> its buffers (the last few sizes used)
        self.probs = None
        self._compiled_ahead = False
        self.logits = None
        self.labels = None

    def _fuse_relus(self):
        """conv -> relu: the conv writes relu(out); relu -> maxpool: the pool's backward applies
        the ReLU's mask. Each saves a pass over the activations (benchmarks/NOTES.md); the ReLU
        layer keeps its .out (the same buffer) for the trace's dead-unit fractions. Where the
        backend also fuses pools (FUSES_POOL): conv [-> relu] -> maxpool with windows that do not
        overlap (K <= S): the conv pools its output and takes the pool's gradient itself (no pass
        over the conv's output either way, no conv-output-sized gradient buffer)."""
        for prev, layer in zip(self.layers, self.layers[1:]):
            if prev.kind == "conv" and layer.kind == "relu":
                prev.relu_fused = layer.forward_fused = True
            if prev.kind == "relu" and layer.kind == "maxpool":
                layer.relu_fused = prev.backward_fused = True
        if not getattr(self.ops, "FUSES_POOL", False):
            return
        for i, conv in enumerate(self.layers):
            if conv.kind != "conv":
                continue
            j = i + 2 if conv.relu_fused else i + 1
            if j < len(self.layers) and self.layers[j].kind == "maxpool" and self.layers[j].K <= self.layers[j].S:
                pool = self.layers[j]
                conv.pool = pool
                pool.conv_fused = pool.backward_fused = True

    @classmethod
    def from_spec(cls, spec, input_shape, seed=0, dtype=np.float32, init="torch", init_scale=1.0, device="cpu"):
        """The same as ``Network(...)``: a network from a spec string or preset name."""
        return cls(spec, input_shape, seed=seed, dtype=dtype, init=init, init_scale=init_scale, device=device)

    @staticmethod
    def _build(specs, shape):
        layers, counts = [], {}
        for ls in specs:
            counts[ls.kind] = counts.get(ls.kind, 0) + 1
            name = {"maxpool": "pool"}.get(ls.kind, ls.kind) + str(counts[ls.kind])
            if ls.kind == "conv" and len(shape) != 3:
                raise SpecError(f"layer '{ls.token()}' needs a (C, H, W) input, got {shape}")
            cls = LAYER_KINDS[ls.kind]
            layer = cls(name, shape) if ls.kind in ("relu", "flatten") else cls(name, shape, ls)
            layers.append(layer)
            shape = layer.out_shape
        return layers

    # ----------------------------------------------------------------------- parameters
    def reset_parameters(self, seed=0, init="torch", init_scale=1.0):
        """Initialise every parameter from ``seed``, drawn in layer order in float64.

        torch:  PyTorch's default for Conv2d/Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                (kaiming_uniform_ with a=sqrt(5) reduces to that bound)
        he:     weight ~ N(0, 2/fan_in), bias 0          (Kaiming normal, fan_in, for ReLU)
        xavier: weight ~ U(-a, a), a = sqrt(6/(fan_in+fan_out)), bias 0   (Glorot uniform)
        dead:   he, but every layer feeding a ReLU gets bias DEAD_BIAS: all ReLUs start dead
                (for demonstrations: a network initialised on the flat plateau)
        Then every parameter is multiplied by init_scale.
        """
        rng = np.random.default_rng(seed)
        host = np.zeros(self.flat_params.size, self.dtype)      # drawn on the host, then copied in
        views = [host[a:b].reshape(p.shape) for a, b, p in zip(self.offsets, self.offsets[1:], self.params)]
        i = 0
        for li, layer in enumerate(self.layers):
            if not layer.params:
                continue
            w, b = views[i:i + 2]
            i += 2
            fan_in, fan_out = layer.fan_in_out()
            if init == "torch":
                bound = 1.0 / math.sqrt(fan_in)
                w[...] = rng.uniform(-bound, bound, size=w.shape)
                b[...] = rng.uniform(-bound, bound, size=b.shape)
            elif init in ("he", "dead"):
                w[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=w.shape)
                feeds_relu = li + 1 < len(self.layers) and self.layers[li + 1].kind == "relu"
                b[...] = DEAD_BIAS if (init == "dead" and feeds_relu) else 0
            else:
                a = math.sqrt(6.0 / (fan_in + fan_out))
                w[...] = rng.uniform(-a, a, size=w.shape)
                b[...] = 0
        top, limit = float(np.abs(host).max()) if host.size else 0.0, float(np.finfo(self.dtype).max)
        if top * float(init_scale) > limit:
            raise ConfigError(f"init_scale {init_scale:g} makes the largest initial weight {top * init_scale:.3g}, "
                              f"beyond {self.dtype.name}'s range ({limit:.3g}); accepted: init_scale up to "
                              f"{limit / top:.3g} for this network")
        host *= self.dtype.type(init_scale)
        self.set_flat_params(host)

    def set_params(self, arrays):
        """Copy a list of arrays (same order and shapes as ``params``) into the network."""
        try:
            arrays = list(arrays)
        except TypeError:
            raise ArgumentTypeError(f"set_params needs a list of {len(self.params)} arrays "
                                    f"({', '.join(self.param_names)}), got {type(arrays).__name__}") from None
        if len(arrays) != len(self.params):
            raise ConfigError(f"set_params got {len(arrays)} arrays; this network has {len(self.params)} "
                              f"({', '.join(self.param_names)})")
        for name, p, a in zip(self.param_names, self.params, arrays):
            a = np.asarray(a)
            if a.shape != p.shape:
                raise ConfigError(f"set_params: {name} has shape {tuple(p.shape)}, got {a.shape}")
            self.ops.copy_into(p, np.ascontiguousarray(a, dtype=self.dtype))

    def get_flat_params(self):
        """A host (NumPy) copy of all parameters, in flat_params order."""
        return self.ops.host_copy(self.flat_params)

    def get_flat_grads(self):
        """A host (NumPy) copy of the gradients of the last backward pass."""
        return self.ops.host_copy(self.flat_grads)

    def set_flat_params(self, flat):
        """Copy a flat host (or same-device) array into all parameters."""
        if tuple(np.shape(flat)) != (self.num_params,):
            raise ConfigError(f"set_flat_params: expected shape ({self.num_params},), got {tuple(np.shape(flat))}")
        self.ops.copy_into(self.flat_params, flat)

    def host_copy(self, a):
        """A NumPy copy of one of this network's arrays (a parameter, gradient or activation)."""
        return self.ops.host_copy(a)

    def state_dict(self):
        """{name: array copy}, names as PyTorch's (conv1.weight, conv1.bias, fc1.weight, ...)."""
        return {n: self.ops.host_copy(p) for n, p in zip(self.param_names, self.params)}

    def load_state_dict(self, state):
        if not hasattr(state, "keys"):
            raise ArgumentTypeError(f"load_state_dict needs a dict of arrays by name ({', '.join(self.param_names)}), "
                                    f"got {type(state).__name__}")
        missing = [n for n in self.param_names if n not in state]
        if missing:
            raise ConfigError(f"load_state_dict: missing {', '.join(missing)}")
        self.set_params([state[n] for n in self.param_names])

    def to_torch(self):
        """A torch nn.Sequential with this network's layers and a copy of its weights (needs PyTorch;
        see minicnn.torch.to_torch)."""
        from minicnn.torch import to_torch  # imports torch lazily: minicnn runs without it
        return to_torch(self)

    @property
    def num_params(self):
        return int(self.flat_params.size)

    def param_layers(self):
        """[(layer name, slice into flat_params)] for the layers that have parameters."""
        out, i = [], 0
        for layer in self.layers:
            n = len(layer.param_shapes)
            if n:
                out.append((layer.name, slice(int(self.offsets[i]), int(self.offsets[i + n]))))
            i += n
        return out

    def activation_bytes(self, n):
        """About the bytes the buffers of a batch of n take (each layer's output and input gradient, a
        conv's im2col columns), computed from the shapes without allocating anything."""
        total = 0
        for layer in self.layers:
            total += math.prod(layer.out_shape) + math.prod(layer.in_shape)
            if layer.kind == "conv":
                total += layer.in_shape[0] * layer.K * layer.K * layer.out_shape[1] * layer.out_shape[2]
        return int(n) * total * self.dtype.itemsize

    def summary(self):
        """Rows of (layer name, kind, output shape, number of parameters)."""
        rows = []
        for layer in self.layers:
            rows.append((layer.name, layer.kind, layer.out_shape, sum(int(np.prod(s)) for s in layer.param_shapes)))
        return rows

    # ----------------------------------------------------------------------- forward/backward
    def _check_input(self, x):
        if not (isinstance(x, np.ndarray) or on_device(x)):
            raise ArgumentTypeError(f"x must be a NumPy array of shape (N, {', '.join(map(str, self.input_shape))}), "
                                    f"got {type(x).__name__}; convert it with numpy.asarray")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ArgumentTypeError(f"x must hold real numbers (a float or integer array), got dtype {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(f"input must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if x.shape[0] == 0:
            raise ConfigError(f"x holds no samples (shape {tuple(x.shape)}); accepted: a batch of N >= 1")
        if on_device(x):                        # already a device array
            if x.dtype != self.dtype:
                raise ConfigError(f"a device input must be {self.dtype.name}, got {x.dtype}")
            return x
        if x.dtype != self.dtype or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=self.dtype)
        return x

    def _prepare(self, n):
        """Make the buffers of batch size n current (allocated on first use; the last few sizes
        are kept: the training batch, a last partial batch, the evaluation batch)."""
        if self._ws.batch == n:
            return
        cache = self._ws_cache
        if n not in cache:
            check_memory(self.activation_bytes(n) + self.num_params * self.dtype.itemsize * PARAM_COPIES,
                         f"network {self.spec}: the activations of a batch of {n:,} and the parameters")
            bufs, dt, empty = {}, self.dtype, self.ops.empty
            if on_device(self.flat_params):      # the batch and its labels are copied into these
                bufs[("input", "x")] = empty((n,) + self.input_shape, dt)
                bufs[("loss", "y")] = empty((n,), np.int64)
            for layer in self.layers:
                bufs.update({(layer.name, k): v for k, v in layer.buffers(n, self.ops, dt).items()})
            _share_transient(bufs, ("cols", "prod", "gt", "xp", "dwp"), empty)
            bufs[("loss", "probs")] = empty((n, self.num_classes), dt)
            bufs[("loss", "dlogits")] = empty((n, self.num_classes), dt)
            bufs[("loss", "loss_out")] = empty((1,), dt)
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[n] = bufs
        self._ws = _Workspace(cache[n], n)

    def _forward(self, x, upto=None):
        self._prepare(x.shape[0])
        x = self.ops.to_device(x, self._ws.bufs.get(("input", "x")))
        with self.ops.pass_scope():
            for layer in self.layers:
                x = layer.forward(self.ops, self._ws, x)
                if layer.name == upto:
                    return x
        self.logits = x
        return x

    def forward(self, x, upto=None):
        """Logits (N, classes) for a batch x: (N, C, H, W), as a new host array. ``upto``: a layer
        name (``[l.name for l in net.layers]``): that layer's output instead (the debugger's look inside)."""
        if upto is not None and upto not in {layer.name for layer in self.layers}:
            raise ConfigError(f"no layer '{upto}'; layers: {', '.join(layer.name for layer in self.layers)}")
        return self.ops.host_copy(self._forward(self._check_input(x), upto))

    def predict(self, x, batch_size=512):
        """Class predictions for any number of samples, in batches."""
        x = np.asarray(x)
        return np.concatenate([self.forward(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

    def _check_labels(self, y, n):
        if on_device(y):                        # already a device array (checked on the device by the loss kernel)
            if tuple(y.shape) != (n,) or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(f"labels must be an integer array of shape ({n},), got {y.dtype} {tuple(y.shape)}")
            return y
        y0 = y = np.asarray(y)
        if y.shape != (n,) or y.dtype.kind not in "iu":
            raise ConfigError(f"labels must be an integer array of shape ({n},), got {y.dtype} {y.shape}")
        y = np.ascontiguousarray(y, dtype=np.int64)
        if n and int(y.view(np.uint64).max()) >= self.num_classes:      # one pass: a negative label wraps around
            raise ConfigError(f"labels must be in 0..{self.num_classes - 1}, got {y0.min()}..{y0.max()}")
        return y

    def _labels_on_device(self, y):
        if not on_device(self.flat_params) or on_device(y):
            return y
        return self.ops.to_device(np.ascontiguousarray(y, dtype=np.int64), self._ws.bufs.get(("loss", "y")))

    def _loss(self, x, y):
        """Forward and loss of checked inputs; keeps probs and labels (on the device) for backward."""
        logits = self._forward(x)
        self.labels = self._labels_on_device(y)
        loss, self.probs = self.ops.softmax_cross_entropy_forward(logits, self.labels,
                                                                  **self._ws.out("loss", "probs", "loss_out"))
        return self.ops.item(loss)

    def loss(self, x, y):
        """Mean softmax cross-entropy of a batch (forward only). x: (N, C, H, W), y: (N,) int.
        Keeps what ``backward`` needs."""
        x = self._check_input(x)
        y = self._check_labels(y, x.shape[0])
        if not self._compiled_ahead:         # a backward pass is likely next
            self.compile_ahead()
        return self._loss(x, y)

    def compile_ahead(self):
        """Start compiling, in the background, what this network's backward pass will need: with the
        CPU backend and a cold Numba cache, the conv backward kernel in a child process, while this
        one compiles the forward pass (ops.Backend.compile_ahead). Returns at once; only the first
        call does anything. ``loss`` calls it; the Trainer calls it before its first evaluation."""
        if not self._compiled_ahead:
            self._compiled_ahead = True
            self.ops.compile_ahead(self.dtype, [layer.S for layer in self.layers if layer.kind == "conv"])

    def backward(self):
        """The backward pass of the last ``loss`` call: every gradient lands in ``flat_grads``
        (``grads`` are views into it), overwritten by the next call. Returns nothing."""
        if self.probs is None:
            raise ConfigError("backward needs a loss first: call net.loss(x, y)")
        self._unshare_grads()
        dout = self.ops.softmax_cross_entropy_backward(self.probs, self.labels, **self._ws.out("loss", "dlogits"))
        with self.ops.pass_scope():
            for i in range(len(self.layers) - 1, -1, -1):
                dout = self.layers[i].backward(self.ops, self._ws, dout, need_dx=i > 0)

    def loss_and_grads(self, x, y):
        """(mean cross-entropy, [gradient per parameter]) for a batch; the gradients are host arrays of
        the caller's own: views into one flat buffer (SGD.step updates all parameters in one pass)
        that no later call changes while the caller holds the list, a view or the buffer. On the host
        they are net.grads, the buffer net.flat_grads, with no copy: the next backward pass writes
        into another buffer if they are still held (see _unshare_grads), as PyTorch's backward
        gives p.grad a new tensor after zero_grad(set_to_none=True). Read net.grads / net.flat_grads
        afresh after this call rather than keeping them from before."""
        loss = self.loss(x, y)
        self.backward()
        if on_device(self.flat_grads):
            return loss, FlatViews.of(self.ops.host_copy(self.flat_grads), self._layout)
        grads = self.grads
        grads.handed_out = True
        return loss, grads

    def _grad_buffer(self):
        """A new gradient buffer: its FlatViews (what net.grads and loss_and_grads give out) and,
        apart, the views each layer's backward writes into (``layer_grads``; the conv ops' kept
        calls hold those, so the counts _unshare_grads checks do not depend on them)."""
        views = FlatViews.of(self.ops.zeros(self.offsets[-1], self.dtype), self._layout)
        own = [views.flat_buffer[a:b].reshape(s) for a, b, s in self._layout]     # (no local of the buffer)
        views.layer_grads, i = [], 0          # (layer, its grads) of the layers with parameters
        for layer in self.layers:
            n = len(layer.param_shapes)
            if n:
                views.layer_grads.append((layer, own[i:i + n]))
            i += n
        views.handed_out = False
        if not on_device(views.flat_buffer):
            flat = views.flat_buffer                  # (aligned: a view of the array that owns the memory)
            views.counted = (flat, flat if flat.base is None else flat.base, *views.originals)
            del flat                                  # (the counts below: no reference from this frame)
            self._grads_pool = self._grads_pool[1 - GRAD_BUFFERS:] + [views]
            views.free_refcounts = free = _refcounts(views)    # held by the pool and this frame only
            views.bound_refcounts = (free[0] + 1, free[1] + 1, *free[2:])   # and by net.grads, net.flat_grads
        return views

    def _bind_grads(self, views):
        """Make ``views`` (from _grad_buffer) the gradient buffer backward passes write into."""
        self.grads, self.flat_grads = views, views.flat_buffer
        for layer, grads in views.layer_grads:
            layer.grads = grads

    def _unshare_grads(self):
        """Before a backward pass writes the gradients: if loss_and_grads gave the current buffer
        out and anything besides this network still refers to it (the list, its buffer, any view
        of it: each with more references than when bound; a view made from a view refers to the
        array that owns the memory), move to one of the last GRAD_BUFFERS buffers that nothing
        refers to, else to a new one. This is NumPy's temporary-elision reasoning: with exactly
        the references it had when made, nothing can see it change (and a list the caller changed
        then dropped is made whole again). A training loop drops the gradients of step k-1 while
        step k runs, so two buffers alternate: no copy, no allocation (at batch 1 the copy this
        replaced cost ~3% of B's step, NOTES session 9)."""
        bound = self.grads
        if not bound.handed_out:
            return
        if (sys.getrefcount(bound) + 1 == bound.bound_refcounts[0]      # (+1: _refcounts' own argument) the
                and _refcounts(bound) == bound.bound_refcounts):         # list held, a loop's usual case, is
            bound.restore()                      # decided in one count. Nothing else sees the list: undo
            return                               # any change made to it
        for views in self._grads_pool:
            if views is not bound and _refcounts(views) == views.free_refcounts:
                views.restore()
                break
        else:
            views = self._grad_buffer()
        views.handed_out = False
        self._bind_grads(views)

    def per_sample_grads(self, x, y, out=None):
        """Per-sample gradients of the loss, one row per sample: G[i] = d loss_i / d w, with loss_i
        the cross-entropy of sample i alone, in flat_params order (``param_layers()`` slices the
        columns by layer). The batch gradient of the mean loss is their mean:
        G.mean(axis=0) == flat_grads (up to rounding).

        x: (N, C, H, W), y: (N,) int -> G: (N, num_params) float64 host array (``out``: a C-contiguous
        float64 array of that shape to fill instead). Memory: N * num_params floats.
        ``loss`` then ``per_sample_backward``: it leaves the batch gradient in ``flat_grads``.
        """
        self.loss(x, y)
        return self.per_sample_backward(out)

    def per_sample_backward(self, out=None):
        """``backward`` of the last ``loss`` call that also returns the per-sample gradients
        (see per_sample_grads): flat_grads gets exactly what ``backward`` would write (the same ops
        on the same buffers, bit for bit), so a training step can take its gradient from here on
        the steps where it measures gradient noise. The backward's input gradients do not depend
        on the sum over the batch; each parameter layer's per-sample op runs on the same output
        gradient as its backward. -> (N, num_params) float64 host array."""
        if self.probs is None:
            raise ConfigError("per_sample_backward needs a loss first: call net.loss(x, y)")
        self._unshare_grads()
        n = self.probs.shape[0]
        if out is None:
            out = np.empty((n, self.num_params))
        elif out.shape != (n, self.num_params) or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ConfigError(f"per_sample_grads: out must be a C-contiguous float64 array of shape "
                              f"({n}, {self.num_params}), got {out.dtype} {out.shape}")
        dout = self.ops.softmax_cross_entropy_backward(self.probs, self.labels, **self._ws.out("loss", "dlogits"))
        first = np.cumsum([0] + [len(layer.param_shapes) for layer in self.layers])   # each layer's first param
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            col = int(self.offsets[first[i]])
            for g in layer.per_sample_grads(self.ops, self._ws, dout):
                size = g.size // n
                out[:, col:col + size] = self.ops.host_copy(g).reshape(n, size)
                col += size
            dout = layer.backward(self.ops, self._ws, dout, need_dx=i > 0)
        out *= n             # the ops see d(mean loss)/d logits = (probs - onehot) / N
        return out

    def hessian_vector_product(self, x, y, v):
        """H v: the Hessian of the mean loss of the batch (x, y) at the current weights, times v.

        x: (N, C, H, W), y: (N,) int, v: (num_params,) in flat_params order -> (num_params,) host array
        in the network's dtype. Exact, without autograd or finite differences: Pearlmutter's
        R-operator, i.e. the forward pass and then the backward pass differentiated along v, each
        layer's tangent rule made of the same ops (``r_forward`` / ``r_backward``); ReLU masks and
        max-pool winners are those of the forward, as in PyTorch's double backward. Costs one
        forward and backward plus the tangent passes (about two more). Host devices (cpu, numpy)
        only. Like ``loss`` + ``backward``, it leaves the batch gradient in ``flat_grads``.
        """
        if on_device(self.flat_params):
            raise ConfigError("hessian_vector_product runs on device cpu or numpy; use a host copy of the "
                              "network (minicnn.hessian.HessianOperator makes one)")
        x = self._check_input(x)
        n = x.shape[0]
        self._loss(x, self._check_labels(y, n))
        self._unshare_grads()
        v = np.ascontiguousarray(v, dtype=self.dtype)
        if v.shape != (self.num_params,):
            raise ConfigError(f"hessian_vector_product: v must have shape ({self.num_params},), got {v.shape}")
        rparams = [v[a:b].reshape(p.shape) for a, b, p in zip(self.offsets, self.offsets[1:], self.params)]
        first = np.cumsum([0] + [len(layer.param_shapes) for layer in self.layers])   # each layer's first param
        r = None
        for i, layer in enumerate(self.layers):
            r = layer.r_forward(self.ops, r, rparams[first[i]:first[i + 1]])
        p = self.probs                        # d/dz of (p - onehot)/N along rz: p * (rz - <p, rz>) / N
        rd = p * (r - np.sum(p * r, axis=1, keepdims=True)) / n
        dout = self.ops.softmax_cross_entropy_backward(self.probs, self.labels, **self._ws.out("loss", "dlogits"))
        out = np.empty(self.num_params, self.dtype)
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            rd_in, rgrads = layer.r_backward(self.ops, dout, rd, rparams[first[i]:first[i + 1]], need_dx=i > 0)
            col = int(self.offsets[first[i]])
            for g in rgrads:
                out[col:col + g.size] = g.reshape(-1)
                col += g.size
            dout = layer.backward(self.ops, self._ws, dout, need_dx=i > 0)
            rd = rd_in
        return out

    def trace_stats(self):
        """Logit statistics of the last _loss call's batch (see ops logit_stats), and the dead
        fraction of every ReLU layer: {name: value}, reduced where the arrays live."""
        rec = self.ops.logit_stats(self.logits, self.probs, self.labels)
        for layer in self.layers:
            if layer.kind == "relu":
                rec[f"dead.{layer.name}"] = self.ops.dead_fraction(layer.out)
        return rec

    def evaluate(self, x, y, batch_size=EVAL_BATCH):
        """(mean loss, accuracy) over a whole dataset, in batches."""
        n = len(x)
        total, correct = 0.0, 0
        for i in range(0, n, batch_size):
            xb = self._check_input(x[i:i + batch_size])
            yb = np.ascontiguousarray(y[i:i + batch_size], dtype=np.int64)
            total += self._loss(xb, yb) * len(yb)
            correct += int((self.ops.host_copy(self.logits).argmax(1) == yb).sum())
        return total / n, correct / n

    def __repr__(self):
        return (f"Network('{self.spec}', input_shape={self.input_shape}, params={self.num_params}, "
                f"dtype={self.dtype.name}, device='{self.device}')")
