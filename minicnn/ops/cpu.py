"""Numba CPU kernels: the same ops, names and argument order as ``ref.py``, plus optional outputs.

Every public function is a thin Python wrapper: it checks shapes, allocates any output that was
not passed in (C-contiguous, dtype of the input) and calls one ``@njit`` kernel
``_<op>_kernel(outputs..., inputs..., sizes...)``. Passing preallocated outputs (``out=``,
``dx=``, ``dw=``, ...) lets the training loop run without allocating.

Dimension glossary (the same as ref.py):
    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

Kernel rules:
- ``cache=True`` everywhere, so sizes are arguments (module globals would be frozen into the cache).
- Determinism: every output element is written by exactly one ``prange`` iteration, which sums
  its terms in a fixed serial order. Results are therefore bit-identical between runs and do
  not depend on the number of threads. ``fastmath`` stays off (no reassociation, no FMA
  contraction), so the vectorised and the scalar remainder of a loop round identically.
- Reductions that would be a serial chain of dependent adds (a dot product, dw, db) keep one
  partial sum per lane (per output column j, or 16 fixed lanes), which vectorises without
  reassociation; the lanes are added up in a fixed order at the end.
- Convolution loops keep the innermost loop over the output column j (contiguous for stride 1),
  with its valid range precomputed from the padding so the inner loop has no branches.
"""
import numpy as np
from numba import njit, prange

from .ref import conv_out_size


# --------------------------------------------------------------------------- helpers
def _input(a, dtype=None):
    """A C-contiguous view (a copy only if needed) of an input array, optionally cast to dtype."""
    return np.ascontiguousarray(a, dtype=dtype)


def _output(buf, shape, dtype, name):
    """Return ``buf`` if it is a usable output of this shape and dtype, else allocate one.

    A wrong buffer raises rather than being silently replaced: the kernels do not check
    bounds, and a caller that passes a buffer expects the result to land in it.
    """
    if buf is None:
        return np.empty(shape, dtype=dtype)
    if buf.shape != tuple(shape) or buf.dtype != dtype or not buf.flags.c_contiguous or not buf.flags.writeable:
        raise ValueError(f"{name}: expected a writeable C-contiguous {np.dtype(dtype)} array of shape "
                         f"{tuple(shape)}, got {buf.dtype} {buf.shape}")
    return buf


def _float_dtype(x):
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")
    return x.dtype


@njit(cache=True)
def _valid_range(u, S, P, size, osize):
    """Output indices i in [0, osize) whose input index i*S + u - P lies in [0, size).

    Returns (lo, hi) for ``range(lo, hi)``; the range is empty when no index is valid.
    """
    lo = 0
    if P - u > 0:
        lo = (P - u + S - 1) // S                 # ceil((P - u) / S)
    hi = (size - 1 + P - u) // S + 1              # floor division: negative numerator -> empty range
    if hi > osize:
        hi = osize
    if hi < lo:
        hi = lo
    return lo, hi


# --------------------------------------------------------------------------- conv2d
@njit(parallel=True, cache=True)
def _conv2d_forward_kernel(out, x, w, b, N, C, H, W, F, K, S, P, OH, OW):
    # out: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K), b: (F,)
    # One iteration per output plane (n, f): out[n,f] = b[f] + sum_{c,u,v} w[f,c,u,v] * shifted x[n,c].
    for nf in prange(N * F):
        n = nf // F
        f = nf % F
        bf = b[f]
        for i in range(OH):
            for j in range(OW):
                out[n, f, i, j] = bf
        for c in range(C):
            for u in range(K):
                i_lo, i_hi = _valid_range(u, S, P, H, OH)
                for v in range(K):
                    j_lo, j_hi = _valid_range(v, S, P, W, OW)
                    wv = w[f, c, u, v]
                    for i in range(i_lo, i_hi):
                        h = i * S + u - P
                        for j in range(j_lo, j_hi):
                            out[n, f, i, j] += wv * x[n, c, h, j * S + v - P]


@njit(parallel=True, cache=True)
def _conv2d_backward_dx_kernel(dx, dout, w, N, C, H, W, F, K, S, P, OH, OW):
    # dx: (N, C, H, W), dout: (N, F, OH, OW), w: (F, C, K, K)
    # One iteration per input plane (n, c): scatter every dout[n,f] back through w[f,c]
    # (a transposed convolution), in the order f, u, v, i, j.
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for h in range(H):
            for x_col in range(W):
                dx[n, c, h, x_col] = 0
        for f in range(F):
            for u in range(K):
                i_lo, i_hi = _valid_range(u, S, P, H, OH)
                for v in range(K):
                    j_lo, j_hi = _valid_range(v, S, P, W, OW)
                    wv = w[f, c, u, v]
                    for i in range(i_lo, i_hi):
                        h = i * S + u - P
                        for j in range(j_lo, j_hi):
                            dx[n, c, h, j * S + v - P] += wv * dout[n, f, i, j]


@njit(parallel=True, cache=True)
def _conv2d_backward_dw_kernel(dw, db, dout, x, N, C, H, W, F, K, S, P, OH, OW):
    # dw: (F, C, K, K), db: (F,), dout: (N, F, OH, OW), x: (N, C, H, W)
    # One iteration per filter f. dw[f,c,u,v] = sum_{n,i,j} dout[n,f,i,j] * xpad[n,c,i*S+u,j*S+v]
    # is accumulated in one partial sum per output column j (acc), added up in j order at the end;
    # db[f] likewise with one partial sum per output pixel.
    for f in prange(F):
        acc = np.zeros((C, K, K, OW), dtype=dw.dtype)
        acc_b = np.zeros(OH * OW, dtype=db.dtype)
        for n in range(N):
            for i in range(OH):
                for j in range(OW):
                    acc_b[i * OW + j] += dout[n, f, i, j]
            for c in range(C):
                for u in range(K):
                    i_lo, i_hi = _valid_range(u, S, P, H, OH)
                    for i in range(i_lo, i_hi):
                        h = i * S + u - P
                        for v in range(K):
                            j_lo, j_hi = _valid_range(v, S, P, W, OW)
                            for j in range(j_lo, j_hi):
                                acc[c, u, v, j] += dout[n, f, i, j] * x[n, c, h, j * S + v - P]
        for c in range(C):
            for u in range(K):
                for v in range(K):
                    s = acc[c, u, v, 0]
                    for j in range(1, OW):
                        s += acc[c, u, v, j]
                    dw[f, c, u, v] = s
        s = acc_b[0]
        for p in range(1, OH * OW):
            s += acc_b[p]
        db[f] = s


def conv2d_forward(x, w, b, stride, pad, out=None):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    """
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, C, H, W, F, K, OH, OW = _conv_sizes(x.shape, w.shape, b.shape, stride, pad)
    out = _output(out, (N, F, OH, OW), dt, "out")
    _conv2d_forward_kernel(out, x, w, b, N, C, H, W, F, K, stride, pad, OH, OW)
    return out


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True):
    """Gradients of conv2d_forward; with need_dx=False (first layer) dx is skipped and None.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) or None, dw: (F, C, K, K), db: (F,)
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    N, C, H, W, F, K, OH, OW = _conv_sizes(x.shape, w.shape, (w.shape[0],), stride, pad)
    if dout.shape != (N, F, OH, OW):
        raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw = _output(dw, (F, C, K, K), dt, "dw")
    db = _output(db, (F,), dt, "db")
    _conv2d_backward_dw_kernel(dw, db, dout, x, N, C, H, W, F, K, stride, pad, OH, OW)
    if not need_dx:
        return None, dw, db
    dx = _output(dx, (N, C, H, W), dt, "dx")
    _conv2d_backward_dx_kernel(dx, dout, w, N, C, H, W, F, K, stride, pad, OH, OW)
    return dx, dw, db


def _conv_sizes(x_shape, w_shape, b_shape, stride, pad):
    """Check conv argument shapes; return (N, C, H, W, F, K, OH, OW)."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv2d: expected x (N, C, H, W) and w (F, C, K, K), got {x_shape} and {w_shape}")
    N, C, H, W = x_shape
    F, Cw, K, K2 = w_shape
    if Cw != C or K2 != K or K < 1 or tuple(b_shape) != (F,):
        raise ValueError(f"conv2d: shapes do not match: x {x_shape}, w {w_shape}, b {tuple(b_shape)}")
    if stride < 1 or pad < 0:
        raise ValueError(f"conv2d: need stride >= 1 and pad >= 0, got stride={stride} pad={pad}")
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    if OH < 1 or OW < 1:
        raise ValueError(f"conv2d: kernel {K} does not fit input {H}x{W} with pad {pad}")
    return N, C, H, W, F, K, OH, OW


# --------------------------------------------------------------------------- max-pool
@njit(parallel=True, cache=True)
def _maxpool2d_forward_kernel(out, argmax, x, N, C, H, W, K, S, OH, OW):
    # out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32, x: (N, C, H, W)
    # Strict '>' while scanning the window row-major: on ties the first element wins.
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for i in range(OH):
            for j in range(OW):
                h0 = i * S
                w0 = j * S
                best = x[n, c, h0, w0]
                best_idx = h0 * W + w0
                for u in range(K):
                    for v in range(K):
                        val = x[n, c, h0 + u, w0 + v]
                        if val > best:
                            best = val
                            best_idx = (h0 + u) * W + w0 + v
                out[n, c, i, j] = best
                argmax[n, c, i, j] = best_idx


@njit(parallel=True, cache=True)
def _maxpool2d_backward_kernel(dx, dout, argmax, N, C, H, W, OH, OW):
    # dx: (N, C, H, W), dout: (N, C, OH, OW), argmax: (N, C, OH, OW)
    # One iteration per plane (n, c); overlapping windows add up in row-major output order.
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for h in range(H):
            for x_col in range(W):
                dx[n, c, h, x_col] = 0
        for i in range(OH):
            for j in range(OW):
                a = argmax[n, c, i, j]
                dx[n, c, a // W, a % W] += dout[n, c, i, j]


def maxpool2d_forward(x, k, stride, out=None, argmax=None):
    """out[n,c,i,j] = max over the KxK window at (i*S, j*S); no padding.

    x: (N, C, H, W) -> out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32
    argmax is the flat index h*W + w of the winner in its input plane; ties: first in row-major order.
    """
    x = _input(x)
    dt = _float_dtype(x)
    if x.ndim != 4 or k < 1 or stride < 1:
        raise ValueError(f"maxpool2d: expected x (N, C, H, W), k >= 1, stride >= 1; got {x.shape}, {k}, {stride}")
    N, C, H, W = x.shape
    OH, OW = conv_out_size(H, k, stride, 0), conv_out_size(W, k, stride, 0)
    if OH < 1 or OW < 1:
        raise ValueError(f"maxpool2d: window {k} does not fit input {H}x{W}")
    out = _output(out, (N, C, OH, OW), dt, "out")
    argmax = _output(argmax, (N, C, OH, OW), np.int32, "argmax")
    _maxpool2d_forward_kernel(out, argmax, x, N, C, H, W, k, stride, OH, OW)
    return out, argmax


def maxpool2d_backward(dout, argmax, x_shape, dx=None):
    """Route each output gradient to the input element that won the max.

    dout: (N, C, OH, OW), argmax: (N, C, OH, OW) int32 -> dx: x_shape = (N, C, H, W)
    """
    dout = _input(dout)
    dt = _float_dtype(dout)
    argmax = _input(argmax, np.int32)
    N, C, H, W = x_shape
    if dout.ndim != 4 or dout.shape[:2] != (N, C) or argmax.shape != dout.shape:
        raise ValueError(f"maxpool2d_backward: dout {dout.shape} / argmax {argmax.shape} do not match x {tuple(x_shape)}")
    _, _, OH, OW = dout.shape
    dx = _output(dx, (N, C, H, W), dt, "dx")
    _maxpool2d_backward_kernel(dx, dout, argmax, N, C, H, W, OH, OW)
    return dx


# --------------------------------------------------------------------------- ReLU
@njit(parallel=True, cache=True)
def _relu_forward_kernel(out, x, size):
    # out: (size,), x: (size,)  (flat views of any shape)
    # 'x < 0' rather than 'x > 0' so that NaN and -0.0 pass through, as np.maximum(x, 0) does.
    for p in prange(size):
        v = x[p]
        out[p] = 0 if v < 0 else v


@njit(parallel=True, cache=True)
def _relu_backward_kernel(dx, dout, out, size):
    # dx: (size,), dout: (size,), out: (size,)  (flat views of any shape)
    for p in prange(size):
        dx[p] = dout[p] * (out[p] > 0)


def relu_forward(x, out=None):
    """out = max(x, 0); any shape."""
    x = _input(x)
    dt = _float_dtype(x)
    out = _output(out, x.shape, dt, "out")
    _relu_forward_kernel(out.reshape(-1), x.reshape(-1), x.size)
    return out


def relu_backward(dout, out, dx=None):
    """dx = dout where the unit was active (out > 0); the kink x = 0 gets 0, as in PyTorch. Any shape."""
    dout = _input(dout)
    dt = _float_dtype(dout)
    out = _input(out, dt)
    if out.shape != dout.shape:
        raise ValueError(f"relu_backward: dout {dout.shape} and out {out.shape} differ")
    dx = _output(dx, dout.shape, dt, "dx")
    _relu_backward_kernel(dx.reshape(-1), dout.reshape(-1), out.reshape(-1), dout.size)
    return dx


# --------------------------------------------------------------------------- dense
@njit(parallel=True, cache=True)
def _dense_forward_kernel(out, x, w, b, N, D, O):
    # out: (N, O), x: (N, D), w: (O, D), b: (O,)
    # Each dot product keeps 16 lane partial sums (lane l takes d = 16*k + l), added in lane
    # order, then the tail, then the bias: vectorisable and independent of the hardware.
    D16 = D - D % 16
    for n in prange(N):
        acc = np.empty(16, dtype=out.dtype)
        for o in range(O):
            for lane in range(16):
                acc[lane] = 0
            for d0 in range(0, D16, 16):
                for lane in range(16):
                    acc[lane] += x[n, d0 + lane] * w[o, d0 + lane]
            s = acc[0]
            for lane in range(1, 16):
                s += acc[lane]
            for d in range(D16, D):
                s += x[n, d] * w[o, d]
            out[n, o] = s + b[o]


@njit(parallel=True, cache=True)
def _dense_backward_dx_kernel(dx, dout, w, N, D, O):
    # dx: (N, D), dout: (N, O), w: (O, D);   dx[n] = sum_o dout[n,o] * w[o], in o order.
    for n in prange(N):
        for d in range(D):
            dx[n, d] = 0
        for o in range(O):
            g = dout[n, o]
            for d in range(D):
                dx[n, d] += g * w[o, d]


@njit(parallel=True, cache=True)
def _dense_backward_dw_kernel(dw, db, dout, x, N, D, O):
    # dw: (O, D), db: (O,), dout: (N, O), x: (N, D);   dw[o] = sum_n dout[n,o] * x[n], in n order.
    for o in prange(O):
        for d in range(D):
            dw[o, d] = 0
        s = dout[0, o] * 0 if N == 0 else dout[0, o]
        for n in range(N):
            g = dout[n, o]
            if n > 0:
                s += g
            for d in range(D):
                dw[o, d] += g * x[n, d]
        db[o] = s


def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, D, O = _dense_sizes(x.shape, w.shape, b.shape)
    out = _output(out, (N, O), dt, "out")
    _dense_forward_kernel(out, x, w, b, N, D, O)
    return out


def dense_backward(dout, x, w, dx=None, dw=None, db=None, need_dx=True):
    """dout: (N, O), x: (N, D), w: (O, D) -> dx: (N, D) or None (need_dx=False), dw: (O, D), db: (O,)"""
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    N, D, O = _dense_sizes(x.shape, w.shape, (w.shape[0],))
    if dout.shape != (N, O):
        raise ValueError(f"dense_backward: expected dout of shape {(N, O)}, got {dout.shape}")
    dw = _output(dw, (O, D), dt, "dw")
    db = _output(db, (O,), dt, "db")
    _dense_backward_dw_kernel(dw, db, dout, x, N, D, O)
    if not need_dx:
        return None, dw, db
    dx = _output(dx, (N, D), dt, "dx")
    _dense_backward_dx_kernel(dx, dout, w, N, D, O)
    return dx, dw, db


def _dense_sizes(x_shape, w_shape, b_shape):
    """Check dense argument shapes; return (N, D, O)."""
    if len(x_shape) != 2 or len(w_shape) != 2 or w_shape[1] != x_shape[1] or tuple(b_shape) != (w_shape[0],):
        raise ValueError(f"dense: shapes do not match: x {x_shape}, w {w_shape}, b {tuple(b_shape)}")
    return x_shape[0], x_shape[1], w_shape[0]


# --------------------------------------------------------------------------- loss
@njit(cache=True)
def _softmax_cross_entropy_forward_kernel(probs, logits, y, N, L):
    # probs: (N, L), logits: (N, L), y: (N,) int.  Returns the mean loss (float64 sum, n order).
    # loss_n = logsumexp(logits[n]) - logits[n, y[n]], computed on z = logits[n] - max(logits[n]).
    total = 0.0
    for n in range(N):
        label = y[n]
        if label < 0 or label >= L:
            raise ValueError("softmax_cross_entropy: label out of range 0..L-1")
        m = logits[n, 0]
        for l in range(1, L):
            if logits[n, l] > m:
                m = logits[n, l]
        s = probs.dtype.type(0) if False else logits[n, 0] * 0      # zero of the input dtype
        for l in range(L):
            e = np.exp(logits[n, l] - m)
            probs[n, l] = e
            s += e
        logsumexp = np.log(s)
        for l in range(L):
            probs[n, l] = np.exp((logits[n, l] - m) - logsumexp)
        total += logsumexp - (logits[n, label] - m)
    if N == 0:
        return np.nan
    return total / N


@njit(cache=True)
def _softmax_cross_entropy_backward_kernel(dlogits, probs, y, N, L):
    # dlogits: (N, L), probs: (N, L), y: (N,) int;   dlogits = (probs - onehot(y)) / N
    for n in range(N):
        label = y[n]
        if label < 0 or label >= L:
            raise ValueError("softmax_cross_entropy: label out of range 0..L-1")
        for l in range(L):
            p = probs[n, l]
            if l == label:
                p -= 1
            dlogits[n, l] = p / N


def softmax_cross_entropy_forward(logits, y, probs=None):
    """Mean cross-entropy of softmax(logits) against integer labels, computed stably.

    logits: (N, L), y: (N,) int -> loss: float, probs: (N, L)
    """
    logits = _input(logits)
    dt = _float_dtype(logits)
    y = _labels(y, logits.shape)
    N, L = logits.shape
    probs = _output(probs, (N, L), dt, "probs")
    loss = _softmax_cross_entropy_forward_kernel(probs, logits, y, N, L)
    return float(loss), probs


def softmax_cross_entropy_backward(probs, y, dlogits=None):
    """d(mean loss)/d logits = (probs - onehot(y)) / N.   probs: (N, L), y: (N,) -> dlogits: (N, L)"""
    probs = _input(probs)
    dt = _float_dtype(probs)
    y = _labels(y, probs.shape)
    N, L = probs.shape
    dlogits = _output(dlogits, (N, L), dt, "dlogits")
    _softmax_cross_entropy_backward_kernel(dlogits, probs, y, N, L)
    return dlogits


def _labels(y, logits_shape):
    """Labels as a contiguous int32/int64 array of shape (N,) (other integer types become int64)."""
    y = np.asarray(y)
    if y.dtype not in (np.int32, np.int64):
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"labels must be integers, got {y.dtype}")
        y = y.astype(np.int64)
    y = np.ascontiguousarray(y)
    if len(logits_shape) != 2 or y.shape != (logits_shape[0],):
        raise ValueError(f"softmax_cross_entropy: logits {logits_shape} and labels {y.shape} do not match")
    return y
