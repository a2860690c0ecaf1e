"""NumPy reference implementation of every op: the oracle for the Numba kernels.

Clarity over speed. Each op is a ``<op>_forward`` / ``<op>_backward`` pair with the
same name and signature as in ``cpu.py`` and ``cuda.py`` (the contract: ``minicnn.ops.Backend``).
The results are computed here in plain NumPy and then, when the caller passes a buffer
(``out=``, ``dx=``, ...), copied into it.

Dimension glossary (used in every shape comment in minicnn):
    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

    OH = (H + 2P - K) // S + 1        (conv2d)
    OH = (H - K) // S + 1             (max-pool, no padding)

Parameter layouts are PyTorch's: conv weight (F, C, K, K), conv bias (F,),
dense weight (O, D), dense bias (O,).
"""
import contextlib

import numpy as np

# The reference computes every layer on its own: the Network does not fuse ReLUs into it.
FUSES_RELU = False
FUSES_POOL = False


def _into(buf, value):
    """``value`` written into the caller's buffer if one was given (returned), else ``value``."""
    if buf is None:
        return value
    if buf.shape != value.shape:
        raise ValueError(f"output buffer has shape {buf.shape}, the result {value.shape}")
    buf[...] = value
    return buf


def conv_out_size(size, k, stride, pad):
    """Output length of a convolution/pooling window sliding over ``size`` pixels."""
    return (size + 2 * pad - k) // stride + 1


# --------------------------------------------------------------------------- conv2d
def conv2d_workspace(x_shape, w_shape, stride, pad, dtype):
    """The reference needs no scratch space."""
    return None


def conv2d_forward(x, w, b, stride, pad, out=None, work=None, relu=False, pool=None, pool_out=None, argmax=None):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    relu: return relu_forward(out) instead.
    pool: (window, stride): also max-pool the result, returning (out, pool_out, argmax) as
    (out, *maxpool2d_forward(out, window, stride, out=pool_out, argmax=argmax)).
    """
    if pool is not None:
        res = conv2d_forward(x, w, b, stride, pad, out=out, relu=relu)
        return (res, *maxpool2d_forward(res, pool[0], pool[1], out=pool_out, argmax=argmax))
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    res = np.empty((N, F, OH, OW), dtype=x.dtype)
    for i in range(OH):
        for j in range(OW):
            patch = xp[:, :, i * stride:i * stride + K, j * stride:j * stride + K]  # (N, C, K, K)
            res[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return _into(out, relu_forward(res) if relu else res)


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True, work=None, pool=None,
                    argmax=None, relu_pooled=None):
    """Gradients of conv2d_forward.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) (None when need_dx is False), dw: (F, C, K, K), db: (F,)
    pool: the forward's fused max-pool (window, stride): dout is the gradient of the pooled
    output, and the conv's is maxpool2d_backward(dout, argmax, ..., relu_pooled=relu_pooled).
    """
    if pool is not None:
        N, _, H, W = x.shape
        F, _, K, _ = w.shape
        shape = (N, F, conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad))
        dout = maxpool2d_backward(dout, argmax, shape, relu_pooled=relu_pooled, k=pool[0], stride=pool[1])
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, OH, OW = dout.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp = np.zeros_like(xp)
    dw_ = np.zeros_like(w)
    for i in range(OH):
        for j in range(OW):
            hs, ws = i * stride, j * stride
            patch = xp[:, :, hs:hs + K, ws:ws + K]             # (N, C, K, K)
            g = dout[:, :, i, j]                                # (N, F)
            dw_ += np.tensordot(g, patch, axes=([0], [0]))      # (F, C, K, K)
            if need_dx:
                dxp[:, :, hs:hs + K, ws:ws + K] += np.tensordot(g, w, axes=([1], [0]))
    dx_ = np.ascontiguousarray(dxp[:, :, pad:pad + H, pad:pad + W]) if need_dx else None
    return _into(dx, dx_) if need_dx else None, _into(dw, dw_), _into(db, dout.sum(axis=(0, 2, 3)))


def conv2d_weight_grad_per_sample(dout, x, w, stride, pad, dw=None, db=None, work=None):
    """Per-sample weight gradients of conv2d: conv2d_backward's dw, db before the sum over the batch.

    dw[n,f,c,u,v] = sum_{i,j} dout[n,f,i,j] * xpad[n,c,i*S+u,j*S+v],   db[n,f] = sum_{i,j} dout[n,f,i,j]

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K) (only its shape is used)
    -> dw: (N, F, C, K, K), db: (N, F);   dw.sum(axis=0) and db.sum(axis=0) are conv2d_backward's.
    work: not needed here (a backend may reuse the forward's im2col from it).
    """
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, OH, OW = dout.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dw_ = np.zeros((N, F, C, K, K), dtype=x.dtype)
    for i in range(OH):
        for j in range(OW):
            patch = xp[:, :, i * stride:i * stride + K, j * stride:j * stride + K]   # (N, C, K, K)
            dw_ += dout[:, :, i, j][:, :, None, None, None] * patch[:, None]      # (N, F, C, K, K)
    return _into(dw, dw_), _into(db, dout.sum(axis=(2, 3)))


# --------------------------------------------------------------------------- max-pool
def maxpool2d_forward(x, k, stride, out=None, argmax=None):
    """out[n,c,i,j] = max over the KxK window at (i*S, j*S); no padding.

    x: (N, C, H, W) -> out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32
    argmax holds the flat index (h*W + w) into the input plane of the winning
    element; on ties the first in row-major window order wins (as PyTorch's CPU
    kernel does).
    """
    N, C, H, W = x.shape
    OH, OW = conv_out_size(H, k, stride, 0), conv_out_size(W, k, stride, 0)
    res = np.empty((N, C, OH, OW), dtype=x.dtype)
    arg = np.empty((N, C, OH, OW), dtype=np.int32)
    for i in range(OH):
        for j in range(OW):
            win = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(N, C, k * k)
            a = win.argmax(axis=2)                               # (N, C) first max
            res[:, :, i, j] = np.take_along_axis(win, a[..., None], axis=2)[..., 0]
            arg[:, :, i, j] = (i * stride + a // k) * W + (j * stride + a % k)
    return _into(out, res), _into(argmax, arg)


def maxpool2d_backward(dout, argmax, x_shape, dx=None, relu_pooled=None, k=None, stride=None):
    """Route each output gradient to the input element that won the max.

    dout: (N, C, OH, OW), argmax: (N, C, OH, OW) -> dx: x_shape = (N, C, H, W)
    relu_pooled: the forward's out when the pooled input was a ReLU's output: the ReLU's backward
    is applied too (a winner was active exactly when its pooled value is > 0).
    k, stride: not needed here (argmax says where each gradient goes).
    """
    N, C, H, W = x_shape
    if relu_pooled is not None:
        dout = relu_backward(dout, relu_pooled)
    res = np.zeros((N, C, H * W), dtype=dout.dtype)
    flat_idx = argmax.reshape(N, C, -1)
    flat_g = dout.reshape(N, C, -1)
    for n in range(N):
        for c in range(C):
            np.add.at(res[n, c], flat_idx[n, c], flat_g[n, c])
    return _into(dx, res.reshape(N, C, H, W))


# --------------------------------------------------------------------------- ReLU
def relu_forward(x, out=None):
    """out = max(x, 0); any shape."""
    return _into(out, np.maximum(x, 0))


def relu_backward(dout, out, dx=None):
    """dx = dout where the unit was active (out > 0); the kink x = 0 gets 0, as in PyTorch."""
    return _into(dx, dout * (out > 0))


# --------------------------------------------------------------------------- dense
def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    return _into(out, x @ w.T + b)


def dense_backward(dout, x, w, dx=None, dw=None, db=None, need_dx=True):
    """dout: (N, O), x: (N, D), w: (O, D) -> dx: (N, D) (None when need_dx is False), dw: (O, D), db: (O,)"""
    return (_into(dx, dout @ w) if need_dx else None), _into(dw, dout.T @ x), _into(db, dout.sum(axis=0))


def dense_weight_grad_per_sample(dout, x, dw=None, db=None):
    """Per-sample weight gradients of the dense layer: dense_backward's dw, db before the batch sum.

    dout: (N, O), x: (N, D) -> dw: (N, O, D) with dw[n] = outer(dout[n], x[n]), db: (N, O) = dout
    """
    return _into(dw, dout[:, :, None] * x[:, None, :]), _into(db, np.array(dout, copy=True))


# --------------------------------------------------------------------------- loss
def softmax_cross_entropy_forward(logits, y, probs=None, loss_out=None):
    """Mean cross-entropy of softmax(logits) against integer labels, computed stably.

    logits: (N, L), y: (N,) int -> loss: float, probs: (N, L)
    loss = mean_n [ logsumexp(logits[n]) - logits[n, y[n]] ]
    loss_out: not used on the host (the loss is returned as a float).
    """
    z = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    loss = float(np.mean(logsumexp - z[np.arange(len(y)), y]))
    return loss, _into(probs, np.exp(z - logsumexp[:, None]))


def softmax_cross_entropy_backward(probs, y, dlogits=None):
    """d(mean loss)/d logits = (probs - onehot(y)) / N.   probs: (N, L) -> dlogits: (N, L)"""
    N = probs.shape[0]
    d = probs.copy()
    d[np.arange(N), y] -= 1
    return _into(dlogits, d / N)


def pass_scope():
    """Nothing to set around a pass of NumPy ops (see Backend.pass_scope)."""
    return contextlib.nullcontext()


def compile_ahead(dtype, conv_strides):
    """Nothing to compile (see Backend.compile_ahead)."""


# --------------------------------------------------------------------------- SGD
def sgd_update(params, grads, bufs, lr, momentum, weight_decay, dampening, nesterov, first_step, work=None):
    """torch.optim.SGD's step, in place, on lists of arrays (one entry per parameter tensor):

        g   = grad + weight_decay * p
        buf = g  if first_step  else  momentum * buf + (1 - dampening) * g   (momentum != 0)
        d   = g + momentum * buf  if nesterov  else  buf                      (d = g if momentum == 0)
        p  += -lr * d

    bufs: momentum buffers (updated in place; None when momentum == 0); grads are left unchanged.
    work: a dict the caller keeps between steps; the intermediate arrays live in it, so that no
    step after the first allocates anything parameter-sized.
    """
    work = {} if work is None else work

    def scratch(i, name, like):
        a = work.get((i, name))
        if a is None or a.shape != like.shape or a.dtype != like.dtype:
            a = work[(i, name)] = np.empty_like(like)
        return a

    for i, (p, g) in enumerate(zip(params, grads)):
        d = g
        if weight_decay:
            d = np.multiply(p, weight_decay, out=scratch(i, "decayed", p))
            d += g                                              # g + weight_decay * w
        if momentum:
            buf = bufs[i]
            if first_step:
                buf[...] = d
            else:
                buf *= momentum
                buf += np.multiply(d, 1 - dampening, out=scratch(i, "damped", p))
            if nesterov:
                nd = np.multiply(buf, momentum, out=scratch(i, "nesterov", p))
                nd += d                                         # d + momentum * buf
                d = nd
            else:
                d = buf
        p += np.multiply(d, -lr, out=scratch(i, "delta", p))


# --------------------------------------------------------------------------- trace reductions
# What the per-step trace measures (minicnn.trace), reduced to a few numbers per step. On the GPU
# these are kernels (cuda.py) so that only the numbers cross to the host.
def segment_dots(pairs, bounds):
    """Dot products of flat vectors, per segment, accumulated in float64.

    pairs: [(a, b), ...] with a, b: (n,); bounds: (S+1,) segment edges (the network's parameter
    layers) -> (len(pairs), S) float64 array, out[i, s] = sum a[q] * b[q] over bounds[s] <= q < bounds[s+1].
    """
    out = np.empty((len(pairs), len(bounds) - 1))
    for i, (a, b) in enumerate(pairs):
        for s in range(len(bounds) - 1):
            sl = slice(int(bounds[s]), int(bounds[s + 1]))
            out[i, s] = np.dot(a[sl].astype(np.float64), b[sl].astype(np.float64))
    return out


def dead_fraction(relu_out):
    """Share of units (positions c,h,w or neurons) that are zero for every sample of the batch.
    relu_out: (N, ...) -> float"""
    a = np.asarray(relu_out).reshape(relu_out.shape[0], -1)
    return float(1.0 - np.count_nonzero(a.any(axis=0)) / a.shape[1])


def logit_stats(logits, probs, y):
    """Largest |logit|, mean softmax entropy, share of the batch predicted as the top class, accuracy.
    logits, probs: (N, L), y: (N,) -> dict of floats"""
    logits, probs = np.asarray(logits), np.asarray(probs)
    pred = logits.argmax(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)
    counts = np.bincount(pred, minlength=logits.shape[1])
    return {"logit_max": float(np.abs(logits).max()), "entropy": float(ent.mean()),
            "top_class_share": float(counts.max() / len(pred)), "batch_acc": float((pred == y).mean())}


# --------------------------------------------------------------------------- arrays
# Where a backend's arrays live. Host backends (this one and cpu.py) use NumPy arrays; cuda.py has
# the same functions for device arrays. Network and SGD use only these.
# The buffers a network keeps (parameters, gradients, activations, scratch) start on a 64-byte
# boundary: a cache line, and one AVX-512 vector. NumPy's own allocations are only 16-byte aligned,
# each at a different offset in its line from run to run, and a vector load or store that straddles
# two lines costs more. Paired whole steps, all buffers aligned against NumPy's (NOTES session 10):
# 0.97-0.98 at batch 1-8 for B, 0.98-0.99 at batch 128.
ALIGN = 64


def empty(shape, dtype):
    """np.empty(shape, dtype), starting on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def zeros(shape, dtype):
    a = empty(shape, dtype)
    a.fill(0)
    return a


def to_device(a, out=None):
    """An input batch as this backend's array (``out``: a preallocated buffer to reuse, if given)."""
    if out is None:
        return a
    out[...] = a
    return out


def host_copy(a):
    """A NumPy copy of a backend array (weights, gradients, activations for checkpoints and display)."""
    return np.array(a, copy=True)


def copy_into(dst, src):
    """dst[...] = src, from a backend array or a host array."""
    dst[...] = src


def subtract(out, a, b):
    """out = a - b (same-shape arrays)."""
    np.subtract(a, b, out=out)


def item(v):
    """A loss as a Python float."""
    return float(v)
