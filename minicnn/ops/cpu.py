"""Numba CPU kernels: the same ops, names and argument order as ``ref.py``, plus optional outputs.

Every public function is a thin Python wrapper: it checks shapes, allocates any output that was
not passed in (C-contiguous, dtype of the first input; other inputs are cast to it) and calls
``@njit`` kernels ``_<name>_kernel(outputs..., inputs..., sizes...)``. Passing preallocated outputs (``out=``,
``dx=``, ``dw=``, ...) lets the training loop run without allocating its results; conv2d still
allocates padded scratch planes inside each call (see the conv2d section).

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
  partial sum per lane (per wide output index, or _DOT_LANES fixed lanes), which vectorises
  without reassociation; the lanes are added up in a fixed order at the end.
- Inner loops index 1-D views with the bare loop variable (``acc[q] += w * xs[q]`` where
  ``xs = xp[n, c, s0:s0 + L]``). Numba wraps negative indices, so an index like ``xs[q + s0]``
  costs a select per element and stops LLVM from vectorising: measured 10x slower.
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
    """Indices i in [0, osize) whose target index i*S + u - P lies in [0, size).

    Returns (lo, hi) for ``range(lo, hi)``; the range is empty when no index is valid.
    """
    lo = 0
    if P - u > 0:
        lo = (P - u + S - 1) // S                 # ceil((P - u) / S)
    hi = (size - 1 + P - u) // S + 1              # floor division: a negative numerator gives hi <= 0
    if hi > osize:
        hi = osize
    if hi < lo:
        hi = lo
    return lo, hi


# --------------------------------------------------------------------------- conv2d
# Every conv pass works on "wide" flat planes. The input is copied once into zero-padded planes
# xp: (N, C, Hp*Wp), Hp = H + 2P, Wp = W + 2P, and an output pixel (i, j) gets the wide index
# q = i*Wp + j. Then the input under kernel tap (u, v) of output q is xp[S*q + u*Wp + v]: for a
# fixed tap, all outputs of a plane read one evenly spaced run of xp, so the inner loop is a single
# long loop over q (about OH*Wp iterations instead of OW per row) that vectorises. The columns
# j >= OW of a wide row are computed and thrown away (Wp/OW - 1 extra work: 14% for 14x14, pad 1).
#
# dx is the same computation run backwards: dout is spread into planes of (H+K-1) x (W+K-1), each
# value at (i*S + K-1-P, j*S + K-1-P) (zeros between them when S > 1, cropped when P > K-1), and
# correlated with the weights transposed to (C, F) and flipped.
#
# Stride 1 is the fast path. Stride S > 1 is exact but slow: strided loads, about S times the work
# in the forward and dw passes (Wp ~ S*OW wide columns), S*S times in dx (the zeros between values).

@njit(cache=True)
def _axpy4(a0, a1, a2, a3, xs, w0, w1, w2, w3, L):
    # a0..a3: (L,) accumulators of 4 output channels, xs: (L,) input run shared by all four
    for q in range(L):
        xv = xs[q]
        a0[q] += w0 * xv
        a1[q] += w1 * xv
        a2[q] += w2 * xv
        a3[q] += w3 * xv


@njit(cache=True)
def _mul_add(acc, a, b, L):
    # acc, a, b: (L,);  acc += a * b elementwise
    for q in range(L):
        acc[q] += a[q] * b[q]


@njit(cache=True)
def _add_into(acc, a, L):
    # acc, a: (L,);  acc += a elementwise
    for q in range(L):
        acc[q] += a[q]


@njit(parallel=True, cache=True)
def _spread_kernel(dst, src, N, C, H, W, S, Q, Hd, Wd):
    # dst: (N, C, Hd*Wd) flat planes, src: (N, C, H, W)
    # dst[n, c, (h*S + Q)*Wd + w*S + Q] = src[n, c, h, w] where that lands inside the Hd x Wd plane;
    # every other entry is 0. S=1, Q=P zero-pads; S>1 dilates; Q<0 crops.
    w_lo, w_hi = _valid_range(Q, S, 0, Wd, W)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        plane = dst[n, c]
        for q in range(Hd * Wd):
            plane[q] = 0
        for h in range(H):
            a = h * S + Q
            if a >= 0 and a < Hd:
                row = plane[a * Wd:(a + 1) * Wd]
                for w in range(w_lo, w_hi):
                    row[w * S + Q] = src[n, c, h, w]


@njit(parallel=True, cache=True)
def _correlate_kernel(out, xp, w, b, N, CI, CO, K, S, Wp, OH, OW):
    # out: (N, CO, OH, OW), xp: (N, CI, Hp*Wp) padded input planes, w: (CO, CI, K, K), b: (CO,)
    # out[n,o,i,j] = b[o] + sum_{c,u,v} w[o,c,u,v] * xp[n, c, S*(i*Wp + j) + u*Wp + v]
    # (forward: CI=C, CO=F;  dx: CI=F, CO=C.)
    # One iteration per image n and block of 4 output channels: each input run is loaded once
    # for four accumulators. A partial last block repeats channel CO-1 and does not store it.
    L = (OH - 1) * Wp + OW                        # wide indices 0..L-1 cover every output pixel
    OB = (CO + 3) // 4
    for it in prange(N * OB):
        n = it // OB
        o0 = (it % OB) * 4
        o1 = min(o0 + 1, CO - 1)
        o2 = min(o0 + 2, CO - 1)
        o3 = min(o0 + 3, CO - 1)
        acc = np.empty((4, L), dtype=out.dtype)
        a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
        a0[:] = b[o0]
        a1[:] = b[o1]
        a2[:] = b[o2]
        a3[:] = b[o3]
        for c in range(CI):
            for u in range(K):
                for v in range(K):
                    s0 = u * Wp + v
                    w0, w1, w2, w3 = w[o0, c, u, v], w[o1, c, u, v], w[o2, c, u, v], w[o3, c, u, v]
                    if S == 1:                    # contiguous run: its own, faster specialisation
                        _axpy4(a0, a1, a2, a3, xp[n, c, s0:s0 + L], w0, w1, w2, w3, L)
                    else:
                        _axpy4(a0, a1, a2, a3, xp[n, c, s0:s0 + S * (L - 1) + 1:S], w0, w1, w2, w3, L)
        for k in range(4):
            if o0 + k < CO:
                for i in range(OH):
                    src = acc[k, i * Wp:i * Wp + OW]
                    dst = out[n, o0 + k, i]
                    for j in range(OW):
                        dst[j] = src[j]


@njit(parallel=True, cache=True)
def _conv2d_dw_kernel(dw, g, xp, N, C, F, K, S, Wp, OH, OW):
    # dw: (F, C, K, K), g: (N, F, OH*Wp) dout on wide planes (0 in columns j >= OW),
    # xp: (N, C, Hp*Wp) padded input planes
    # dw[f,c,u,v] = sum_{n,i,j} dout[n,f,i,j] * xp[n, c, S*(i*Wp + j) + u*Wp + v]
    # One iteration per (f, c). acc keeps one partial sum per tap and wide index, summed over n;
    # the valid indices are then added up in (i, j) order.
    L = (OH - 1) * Wp + OW
    for fc in prange(F * C):
        f = fc // C
        c = fc % C
        acc = np.zeros((K * K, L), dtype=dw.dtype)
        for n in range(N):
            gn = g[n, f, :L]
            for u in range(K):
                for v in range(K):
                    s0 = u * Wp + v
                    if S == 1:
                        _mul_add(acc[u * K + v], gn, xp[n, c, s0:s0 + L], L)
                    else:
                        _mul_add(acc[u * K + v], gn, xp[n, c, s0:s0 + S * (L - 1) + 1:S], L)
        for u in range(K):
            for v in range(K):
                lanes = acc[u * K + v]
                s = lanes[0]
                for i in range(OH):
                    for j in range(OW):
                        if i > 0 or j > 0:
                            s += lanes[i * Wp + j]
                dw[f, c, u, v] = s


@njit(parallel=True, cache=True)
def _conv2d_db_kernel(db, dout, N, F, M):
    # db: (F,), dout: (N, F, M) with M = OH*OW;  db[f] = sum over n, then over pixels in order
    for f in prange(F):
        acc = np.zeros(M, dtype=db.dtype)
        for n in range(N):
            _add_into(acc, dout[n, f], M)
        s = acc[0]
        for p in range(1, M):
            s += acc[p]
        db[f] = s


def conv2d_forward(x, w, b, stride, pad, out=None):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    """
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, b.shape, stride, pad)
    out = _output(out, (N, F, OH, OW), dt, "out")
    Hp, Wp = H + 2 * pad, W + 2 * pad
    xp = np.empty((N, C, Hp * Wp), dtype=dt)                       # padded input planes
    _spread_kernel(xp, x, N, C, H, W, 1, pad, Hp, Wp)
    _correlate_kernel(out, xp, w, b, N, C, F, K, stride, Wp, OH, OW)
    return out


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True):
    """Gradients of conv2d_forward; with need_dx=False (first layer) dx is skipped and None.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) or None, dw: (F, C, K, K), db: (F,)
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, (w.shape[0],), stride, pad)
    if dout.shape != (N, F, OH, OW):
        raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw = _output(dw, (F, C, K, K), dt, "dw")
    db = _output(db, (F,), dt, "db")
    Hp, Wp = H + 2 * pad, W + 2 * pad
    xp = np.empty((N, C, Hp * Wp), dtype=dt)                       # padded input planes
    _spread_kernel(xp, x, N, C, H, W, 1, pad, Hp, Wp)
    g = np.empty((N, F, OH * Wp), dtype=dt)                        # dout on wide planes
    _spread_kernel(g, dout, N, F, OH, OW, 1, 0, OH, Wp)
    _conv2d_dw_kernel(dw, g, xp, N, C, F, K, stride, Wp, OH, OW)
    _conv2d_db_kernel(db, dout.reshape(N, F, OH * OW), N, F, OH * OW)
    if not need_dx:
        return None, dw, db
    dx = _output(dx, (N, C, H, W), dt, "dx")
    Hd, Wd = H + K - 1, W + K - 1
    d = np.empty((N, F, Hd * Wd), dtype=dt)                        # dout spread, padded/cropped
    _spread_kernel(d, dout, N, F, OH, OW, stride, K - 1 - pad, Hd, Wd)
    wt = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])   # (C, F, K, K), flipped
    _correlate_kernel(dx, d, wt, np.zeros(C, dtype=dt), N, F, C, K, 1, Wd, H, W)
    return dx, dw, db


def _conv_sizes(x_shape, w_shape, b_shape, stride, pad):
    """Check conv arguments; return (N, C, H, W, F, K, OH, OW, S, P) with S, P as Python ints."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv2d: expected x (N, C, H, W) and w (F, C, K, K), got {x_shape} and {w_shape}")
    N, C, H, W = x_shape
    F, Cw, K, K2 = w_shape
    if Cw != C or K2 != K or K < 1 or F < 1 or tuple(b_shape) != (F,):
        raise ValueError(f"conv2d: shapes do not match: x {x_shape}, w {w_shape}, b {tuple(b_shape)}")
    if stride < 1 or pad < 0:
        raise ValueError(f"conv2d: need stride >= 1 and pad >= 0, got stride={stride} pad={pad}")
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    if OH < 1 or OW < 1:
        raise ValueError(f"conv2d: kernel {K} does not fit input {H}x{W} with pad {pad}")
    return N, C, H, W, F, K, OH, OW, int(stride), int(pad)


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
    k, stride = int(k), int(stride)
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
    N, C, H, W = (int(s) for s in x_shape)
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
# A dot product summed one term after another is a chain of dependent adds that cannot be
# vectorised without reassociation (fastmath). Instead each dot keeps LANES partial sums (lane l
# takes d = LANES*k + l), added up in lane order at the end: fixed order, vectorisable.
# LANES is passed in at run time on purpose: as a literal, LLVM unrolls the lane loop fully and
# then fails to vectorise it (measured 2-4x slower).
_DOT_LANES = 32


@njit(parallel=True, cache=True)
def _dense_forward_kernel(out, x, w, b, N, D, O, LANES):
    # out: (N, O), x: (N, D), w: (O, D), b: (O,);   out[n,o] = dot(x[n], w[o]) + b[o]
    DL = D - D % LANES
    for n in prange(N):
        acc = np.empty(LANES, dtype=out.dtype)
        xr = x[n, :DL].reshape((DL // LANES, LANES))
        for o in range(O):
            wr = w[o, :DL].reshape((DL // LANES, LANES))
            acc[:] = 0
            for k in range(DL // LANES):
                _mul_add(acc, xr[k], wr[k], LANES)
            s = acc[0]
            for lane in range(1, LANES):
                s += acc[lane]
            for d in range(DL, D):
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
        db[o] = 0
        for d in range(D):
            dw[o, d] = 0
        for n in range(N):
            g = dout[n, o]
            db[o] += g
            for d in range(D):
                dw[o, d] += g * x[n, d]


def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, D, O = _dense_sizes(x.shape, w.shape, b.shape)
    out = _output(out, (N, O), dt, "out")
    _dense_forward_kernel(out, x, w, b, N, D, O, _DOT_LANES)
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
        s = np.exp(logits[n, 0] - m)              # sum of exp(z), in the input dtype
        for l in range(1, L):
            s += np.exp(logits[n, l] - m)
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
