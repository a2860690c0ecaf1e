"""Numba CPU kernels: the same ops, names and argument order as ``ref.py``, plus optional outputs.

Every public function is a thin Python wrapper: it checks shapes, allocates any output that was
not passed in (C-contiguous, dtype of the first input; other inputs are cast to it) and calls
``@njit`` kernels ``_<name>_kernel(outputs..., inputs..., sizes...)``. Passing preallocated outputs
(``out=``, ``dx=``, ``dw=``, ...) and, for conv2d, a ``work=`` workspace (``conv2d_workspace``) lets
the training loop run without allocating anything per step.

Dimension glossary (the same as ref.py):
    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

Where the time goes (benchmarks/NOTES.md): almost all FLOPs are in the three conv matrix products
(forward, dW, dX), which go to numpy's BLAS; the Numba kernels here move data around them
(im2col, col2im, layout swaps) and do the cheap layers. Each parallel kernel has a serial twin
used for small work, since a parallel launch costs more than a small kernel.

Kernel rules:
- ``cache=True`` everywhere, so sizes are arguments (module globals would be frozen into the cache).
- Determinism: every output element is written by exactly one loop iteration, which sums its
  terms in a fixed serial order; a parallel kernel and its serial twin share one body function.
  BLAS products are split into column blocks fixed by the shapes (not the thread count), and
  partial sums over blocks are added in block order. Results are therefore bit-identical between
  runs and do not depend on the number of threads. ``fastmath`` stays off (no reassociation).
- Reductions that would be a serial chain of dependent adds keep one partial sum per lane,
  which vectorises without reassociation; the lanes are added up in a fixed order at the end.
- Inner loops index 1-D views with the bare loop variable (``acc[q] += a[q]`` on slices).
  Numba wraps negative indices, so an index like ``xs[q + s0]`` costs a select per element and
  stops LLVM from vectorising: measured 10x slower.
"""
import itertools
import os

import numba
import numpy as np
from numba import njit, prange

from .blas import find_blas_threads

# Array helpers and two trace reductions: NumPy does them well on the host.
# So is the SGD update (element-wise; ref.sgd_update works in place, in arrays kept between steps).
from .ref import (  # noqa: F401
    conv_out_size,
    copy_into,
    dead_fraction,
    empty,
    host_copy,
    item,
    logit_stats,
    sgd_update,
    subtract,
    to_device,
    zeros,
)

# Threading layer: Numba's default here is OpenMP, whose worker threads spin after each parallel
# loop; on a 2-core machine that spin steals the core from the BLAS call that follows and, when
# other processes share the cores, makes every parallel launch wait for a time slice (measured:
# im2col 1.8 ms with workqueue against 11.9 ms with OpenMP under load). The workqueue layer
# sleeps instead. Only set when the user has not chosen one, and it takes effect only if no
# parallel Numba code has run yet in this process and numba.set_num_threads has not been called:
# import this module before either (minicnn.train.set_threads does). Measured: the benchmark
# called set_num_threads first and so timed B at batch 32 on OpenMP, 30-34 ms against 21-26.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Fusions this backend offers the Network: conv2d_forward(relu=True) and
# maxpool2d_backward(relu_pooled=...) (a ReLU's forward into the conv before it, its backward into
# the max-pool after it: one pass over the activations less each way).
FUSES_RELU = True


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


# Each parallel kernel has a serial twin (same body function, so bit-identical results): a
# parallel launch costs 5-10 us on an idle machine and ~65 us when other processes share the
# cores (measured, workqueue layer), against 0.4 us for a serial call, so small work (batch 1-8)
# runs serially. _PARALLEL_MIN: elements touched by a call below which it stays serial (about
# 50-100 us of serial copying).
_PARALLEL_MIN = 1 << 17


def _parallel(size):
    """Whether a kernel touching ``size`` elements should run its parallel version."""
    return size >= _PARALLEL_MIN and numba.get_num_threads() > 1


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



# --------------------------------------------------------------------------- BLAS products
# The conv products go to numpy's BLAS (OpenBLAS) from Python. OpenBLAS's own threads synchronise
# with busy waits; on a 2-core machine shared with other processes one product then waits for the
# other thread's time slice (measured: a 32x145x28672 product took 3-24 ms with 2 OpenBLAS threads
# against 5 ms split in two halves over 2 Python threads with OpenBLAS at 1 thread). So each
# product runs with OpenBLAS at one thread, and a long one is split into _SPLIT fixed column
# blocks, run on Numba's thread count of Python threads (numpy releases the GIL in matmul).
# The split does not depend on the thread count, so neither do the results.
_SPLIT = 2
_SPLIT_MIN_MACS = 1 << 23         # multiply-adds below which a product is one call (~0.2 ms on one
                                  # thread at ~50 GFLOP/s; a thread hand-off costs ~20-50 us)


class _Products:
    """Runs the conv matrix products: OpenBLAS at one thread, long ones split over a thread pool."""

    def __init__(self):
        self.blas = find_blas_threads()
        self.pool = None

    def _pool(self):
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=_SPLIT - 1, thread_name_prefix="minicnn-blas")
        return self.pool

    def run(self, calls):
        """calls: a list of (a, b, out) products out = a @ b, independent of each other."""
        old = None
        if self.blas is not None:
            old = self.blas[0]()
            if old != 1:
                self.blas[1](1)
        try:
            if len(calls) > 1 and numba.get_num_threads() > 1:
                err = np.geterr()          # NumPy's error state is per thread: carry the caller's over
                futures = [self._pool().submit(_matmul_with_errstate, err, a, b, o) for a, b, o in calls[1:]]
                np.matmul(*calls[0][:2], out=calls[0][2])
                for fut in futures:
                    fut.result()
            else:
                for a, b, o in calls:
                    np.matmul(a, b, out=o)
        finally:
            if old is not None and old != 1:
                self.blas[1](old)


def _matmul_with_errstate(err, a, b, out):
    with np.errstate(**err):
        np.matmul(a, b, out=out)


_products = _Products()


def _blocks(M, macs_per_col):
    """Column blocks [(lo, hi)] of a product's long dimension M: _SPLIT of them when the product
    (M * macs_per_col multiply-adds) is large. Fixed by the shapes, never by the thread count."""
    if M * macs_per_col < _SPLIT_MIN_MACS:
        return [(0, M)]
    edges = [M * k // _SPLIT for k in range(_SPLIT + 1)]
    return list(itertools.pairwise(edges))


# --------------------------------------------------------------------------- conv2d
# Convolution as matrix products (im2col + BLAS), batch folded into the long dimension:
#
#   cols: (CKK + 1, N*OH*OW)   row r = (c*K + u)*K + v holds xpad[n, c, i*S+u, j*S+v] at column
#                              n*OH*OW + i*OW + j; the last row is all ones (it carries the bias)
#   wb:   (F, CKK + 1)         w reshaped to (F, C*K*K), with b as the last column
#
#   forward   out (F, N*OH*OW)   = wb @ cols                     then swapped to (N, F, OH, OW)
#   dW, db    dwb (F, CKK + 1)   = dout (F, N*OH*OW) @ cols.T    (dout swapped from (N, F, ...))
#   dX        dcols (CKK, N*OH*OW) = w.T @ dout                  then col2im (a gather, below)
#
# One large product per pass rather than one per image: BLAS runs near its peak on them even at
# small batches, and the three products are all the FLOPs. The Numba kernels only move data, each
# output element written by one prange iteration. Determinism: a BLAS product sums each element
# in an order fixed by the shapes and BLAS's thread count (OpenBLAS splits the rows and columns
# of the result between threads, never the summed dimension), so results repeat bit for bit.
#
# The caller may pass ``work`` (conv2d_workspace): the cols, product and transposed-gradient
# buffers, allocated once per batch size. The forward pass fills work["cols"]; a backward pass
# given the same work reuses them instead of recomputing im2col.

def conv2d_workspace(x_shape, w_shape, stride, pad, dtype):
    """Scratch buffers for conv2d_forward/backward on inputs of x_shape (reuse across calls).

    x_shape: (N, C, H, W), w_shape: (F, C, K, K) -> dict of arrays (WR = row width of a product
    column block: W + 2P for stride 1 (wide rows), OW otherwise; M = N*OH*WR):
      cols (CKK+1, M), prod (max(F, CKK), M), gt (F, M), wb (F, CKK+1), dwb (_SPLIT, F, CKK+1),
      xp (N, C, (H+2P)*(W+2P) + K) padded planes (stride 1 only)
    """
    N, C, H, W = x_shape
    F, _, K, _ = w_shape
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    WR = W + 2 * pad if stride == 1 else OW
    CKK, M = C * K * K, N * OH * WR
    xp_len = (H + 2 * pad) * (W + 2 * pad) + K if stride == 1 else 0
    return {"cols": np.empty((CKK + 1, M), dtype), "prod": np.empty((max(F, CKK), M), dtype),
            "gt": np.empty((F, M), dtype), "wb": np.empty((F, CKK + 1), dtype),
            "dwb": np.empty((_SPLIT, F, CKK + 1), dtype), "xp": np.empty((N, C, xp_len), dtype),
            "key": (tuple(x_shape), tuple(w_shape), stride, pad)}


@njit(parallel=True, cache=True)
def _im2col_kernel(cols, x, N, C, H, W, K, S, P, OH, OW):
    # cols: (C*K*K + 1, N*OH*OW), x: (N, C, H, W)
    # cols[(c*K+u)*K+v, n*OH*OW + i*OW + j] = x[n, c, i*S+u-P, j*S+v-P] (0 outside); last row = 1.
    M = OH * OW
    CKK = C * K * K
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        if c == 0:
            ones = cols[CKK, n * M:(n + 1) * M]
            for q in range(M):
                ones[q] = 1
        for u in range(K):
            i_lo, i_hi = _valid_range(u, S, P, H, OH)
            for v in range(K):
                j_lo, j_hi = _valid_range(v, S, P, W, OW)
                row = cols[(c * K + u) * K + v, n * M:(n + 1) * M]
                for i in range(OH):
                    dst = row[i * OW:(i + 1) * OW]
                    if i < i_lo or i >= i_hi:
                        for j in range(OW):
                            dst[j] = 0
                        continue
                    src = x[n, c, i * S + u - P]
                    for j in range(j_lo):
                        dst[j] = 0
                    if S == 1:
                        L = j_hi - j_lo
                        if L > 0:
                            _copy_run(dst[j_lo:j_hi], src[j_lo + v - P:j_hi + v - P], L)
                    else:
                        for j in range(j_lo, j_hi):
                            dst[j] = src[j * S + v - P]
                    for j in range(max(j_hi, j_lo), OW):
                        dst[j] = 0


@njit(cache=True)
def _copy_run(dst, src, L):
    # dst, src: (L,)
    for q in range(L):
        dst[q] = src[q]


@njit(parallel=True, cache=True)
def _col2im_kernel(dx, dcols, N, C, H, W, K, S, P, OH, OW):
    # dx: (N, C, H, W), dcols: (C*K*K, N*OH*OW)
    # dx[n,c,h,w] = sum over taps (u, v) in order of dcols[(c*K+u)*K+v, n, i, j] where h = i*S+u-P,
    # w = j*S+v-P (a gather: each dx element is summed by one iteration in a fixed order).
    M = OH * OW
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for h in range(H):
            dst = dx[n, c, h]
            for w in range(W):
                dst[w] = 0
            for u in range(K):
                a = h + P - u                     # = i*S
                if a < 0 or a % S != 0 or a // S >= OH:
                    continue
                i = a // S
                for v in range(K):
                    row = dcols[(c * K + u) * K + v, n * M + i * OW:n * M + (i + 1) * OW]
                    if S == 1:
                        j_lo, j_hi = _valid_range(v, 1, P, W, OW)   # j with 0 <= j+v-P < W
                        L = j_hi - j_lo
                        if L > 0:
                            _add_into(dst[j_lo + v - P:j_hi + v - P], row[j_lo:j_hi], L)
                    else:
                        for w in range(W):
                            bb = w + P - v
                            if bb >= 0 and bb % S == 0 and bb // S < OW:
                                dst[w] += row[bb // S]


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


@njit(cache=True)
def _im2col_wide_body(cols, xp, x, N, C, H, W, K, P, OH, nc):
    # Stride 1. cols: (C*K*K + 1, N*OH*Wp), xp: (N, C, Hp*Wp + K) scratch, x: (N, C, H, W)
    # xp[n, c] is the zero-padded plane (plus K zeros of tail); then row (c, u, v) of image n is
    # the run xp[n, c, u*Wp + v : u*Wp + v + OH*Wp]: column i*Wp + j holds xpad[i+u, j+v] for
    # j < OW (the "wide" columns OW <= j < Wp hold neighbours and are dropped later). Last row = 1.
    # one iteration (nc) of the loop in _im2col_wide_kernel / _im2col_wide_serial
    Hp, Wp = H + 2 * P, W + 2 * P
    Mw = OH * Wp
    CKK = C * K * K
    n = nc // C
    c = nc % C
    plane = xp[n, c]
    for q in range(Hp * Wp + K):
        plane[q] = 0
    for h in range(H):
        _copy_run(plane[(h + P) * Wp + P:(h + P) * Wp + P + W], x[n, c, h], W)
    if c == 0:
        ones = cols[CKK, n * Mw:(n + 1) * Mw]
        for q in range(Mw):
            ones[q] = 1
    for u in range(K):
        for v in range(K):
            s0 = u * Wp + v
            _copy_run(cols[(c * K + u) * K + v, n * Mw:(n + 1) * Mw], plane[s0:s0 + Mw], Mw)


@njit(parallel=True, cache=True)
def _im2col_wide_kernel(cols, xp, x, N, C, H, W, K, P, OH):
    for nc in prange(N * C):
        _im2col_wide_body(cols, xp, x, N, C, H, W, K, P, OH, nc)


@njit(cache=True)
def _im2col_wide_serial(cols, xp, x, N, C, H, W, K, P, OH):
    for nc in range(N * C):
        _im2col_wide_body(cols, xp, x, N, C, H, W, K, P, OH, nc)


@njit(cache=True)
def _col2im_wide_body(dx, dxp, dcols, N, C, H, W, K, P, OH, nc):
    # Stride 1, the transpose of _im2col_wide_kernel. dx: (N, C, H, W), dxp: (N, C, Hp*Wp + K)
    # scratch, dcols: (C*K*K, N*OH*Wp), zero in the wide columns.
    # dxp[n, c, u*Wp + v + q] += dcols[(c, u, v), n, q] over taps (u, v) in order, then cropped.
    # one iteration (nc) of the loop in _col2im_wide_kernel / _col2im_wide_serial
    Hp, Wp = H + 2 * P, W + 2 * P
    Mw = OH * Wp
    n = nc // C
    c = nc % C
    plane = dxp[n, c]
    for q in range(Hp * Wp + K):
        plane[q] = 0
    for u in range(K):
        for v in range(K):
            s0 = u * Wp + v
            _add_into(plane[s0:s0 + Mw], dcols[(c * K + u) * K + v, n * Mw:(n + 1) * Mw], Mw)
    for h in range(H):
        _copy_run(dx[n, c, h], plane[(h + P) * Wp + P:(h + P) * Wp + P + W], W)


@njit(parallel=True, cache=True)
def _col2im_wide_kernel(dx, dxp, dcols, N, C, H, W, K, P, OH):
    for nc in prange(N * C):
        _col2im_wide_body(dx, dxp, dcols, N, C, H, W, K, P, OH, nc)


@njit(cache=True)
def _col2im_wide_serial(dx, dxp, dcols, N, C, H, W, K, P, OH):
    for nc in range(N * C):
        _col2im_wide_body(dx, dxp, dcols, N, C, H, W, K, P, OH, nc)


@njit(cache=True)
def _rows_to_nchw_body(out, prod, N, F, OH, OW, WR, RELU, nf):
    # out: (N, F, OH, OW), prod: (F, N*OH*WR);  out[n, f, i, j] = prod[f, n, i, j] for j < OW,
    # through ReLU when RELU (the ReLU layer fused into this pass: 'v < 0 -> 0', as relu_forward)
    # one iteration (nf) of the loop in _rows_to_nchw_kernel / _rows_to_nchw_serial
    n = nf // F
    f = nf % F
    base = n * OH * WR
    for i in range(OH):
        if RELU:
            _relu_run(out[n, f, i], prod[f, base + i * WR:base + i * WR + OW], OW)
        else:
            _copy_run(out[n, f, i], prod[f, base + i * WR:base + i * WR + OW], OW)


@njit(cache=True)
def _relu_run(dst, src, L):
    # dst, src: (L,);  dst = relu(src)
    for q in range(L):
        v = src[q]
        dst[q] = 0 if v < 0 else v


@njit(parallel=True, cache=True)
def _rows_to_nchw_kernel(out, prod, N, F, OH, OW, WR, RELU):
    for nf in prange(N * F):
        _rows_to_nchw_body(out, prod, N, F, OH, OW, WR, RELU, nf)


@njit(cache=True)
def _rows_to_nchw_serial(out, prod, N, F, OH, OW, WR, RELU):
    for nf in range(N * F):
        _rows_to_nchw_body(out, prod, N, F, OH, OW, WR, RELU, nf)


@njit(cache=True)
def _nchw_to_rows_body(gt, dout, N, F, OH, OW, WR, nf):
    # gt: (F, N*OH*WR), dout: (N, F, OH, OW);  gt[f, n, i, j] = dout[n, f, i, j], 0 for j >= OW
    # one iteration (nf) of the loop in _nchw_to_rows_kernel / _nchw_to_rows_serial
    n = nf // F
    f = nf % F
    base = n * OH * WR
    for i in range(OH):
        row = gt[f, base + i * WR:base + (i + 1) * WR]
        _copy_run(row, dout[n, f, i], OW)
        for j in range(OW, WR):
            row[j] = 0


@njit(parallel=True, cache=True)
def _nchw_to_rows_kernel(gt, dout, N, F, OH, OW, WR):
    for nf in prange(N * F):
        _nchw_to_rows_body(gt, dout, N, F, OH, OW, WR, nf)


@njit(cache=True)
def _nchw_to_rows_serial(gt, dout, N, F, OH, OW, WR):
    for nf in range(N * F):
        _nchw_to_rows_body(gt, dout, N, F, OH, OW, WR, nf)


@njit(cache=True)
def _pack_wb_kernel(wb, w2, b, F, CKK):
    # wb: (F, CKK+1), w2: (F, CKK), b: (F,);  wb = [w2 | b]
    for f in range(F):
        for r in range(CKK):
            wb[f, r] = w2[f, r]
        wb[f, CKK] = b[f]


@njit(cache=True)
def _unpack_wb_kernel(dw2, db, dwb, F, CKK, B):
    # dw2: (F, CKK), db: (F,), dwb: (>= B, F, CKK+1) partial sums;  [dw2 | db] = sum_k dwb[k], k in order
    for f in range(F):
        for r in range(CKK):
            s = dwb[0, f, r]
            for k in range(1, B):
                s += dwb[k, f, r]
            dw2[f, r] = s
        s = dwb[0, f, CKK]
        for k in range(1, B):
            s += dwb[k, f, CKK]
        db[f] = s


def _conv_work(work, x_shape, w_shape, stride, pad, dt):
    if work is None:
        return conv2d_workspace(x_shape, w_shape, stride, pad, dt)
    if work["key"] != (tuple(x_shape), tuple(w_shape), stride, pad) or work["cols"].dtype != dt:
        raise ValueError(f"conv2d: work was made for {work['key']} {work['cols'].dtype}, "
                         f"not {(tuple(x_shape), tuple(w_shape), stride, pad)} {np.dtype(dt)}")
    return work


def _im2col(work, x, N, C, H, W, K, S, P, OH, OW):
    if S == 1:
        kernel = _im2col_wide_kernel if _parallel(work["cols"].size) else _im2col_wide_serial
        kernel(work["cols"], work["xp"], x, N, C, H, W, K, P, OH)
    else:
        _im2col_kernel(work["cols"], x, N, C, H, W, K, S, P, OH, OW)


def conv2d_forward(x, w, b, stride, pad, out=None, work=None, relu=False):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    work: optional conv2d_workspace(x.shape, w.shape, S, P, dtype); its cols are left filled.
    relu: return relu_forward(out) instead (a following ReLU layer fused into the output pass).
    """
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, b.shape, stride, pad)
    out = _output(out, (N, F, OH, OW), dt, "out")
    work = _conv_work(work, x.shape, w.shape, stride, pad, dt)
    CKK = C * K * K
    WR = W + 2 * pad if stride == 1 else OW
    _im2col(work, x, N, C, H, W, K, stride, pad, OH, OW)
    _pack_wb_kernel(work["wb"], w.reshape(F, CKK), b, F, CKK)
    prod, cols, wb = work["prod"][:F], work["cols"], work["wb"]
    blocks = _blocks(cols.shape[1], F * (CKK + 1))
    _products.run([(wb, cols[:, lo:hi], prod[:, lo:hi]) for lo, hi in blocks])   # (F, N*OH*WR)
    (_rows_to_nchw_kernel if _parallel(prod.size) else _rows_to_nchw_serial)(out, prod, N, F, OH, OW, WR, bool(relu))
    return out


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True, work=None):
    """Gradients of conv2d_forward; with need_dx=False (first layer) dx is skipped and None.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) or None, dw: (F, C, K, K), db: (F,)
    work: the workspace that the forward pass of this same x filled (its cols are reused);
    without it the cols are recomputed.
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, (w.shape[0],), stride, pad)
    if dout.shape != (N, F, OH, OW):
        raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw = _output(dw, (F, C, K, K), dt, "dw")
    db = _output(db, (F,), dt, "db")
    CKK = C * K * K
    WR = W + 2 * pad if stride == 1 else OW
    if work is None:
        work = _conv_work(None, x.shape, w.shape, stride, pad, dt)
        _im2col(work, x, N, C, H, W, K, stride, pad, OH, OW)
    else:
        work = _conv_work(work, x.shape, w.shape, stride, pad, dt)
    gt, dwb, cols = work["gt"], work["dwb"], work["cols"]
    to_rows = _nchw_to_rows_kernel if _parallel(gt.size) else _nchw_to_rows_serial
    to_rows(gt, dout, N, F, OH, OW, WR)                            # (F, N*OH*WR), 0 in wide columns
    blocks = _blocks(cols.shape[1], F * (CKK + 1))                # partial [dW | db] per block,
    _products.run([(gt[:, lo:hi], cols[:, lo:hi].T, dwb[k]) for k, (lo, hi) in enumerate(blocks)])
    _unpack_wb_kernel(dw.reshape(F, CKK), db, dwb, F, CKK, len(blocks))   # summed in block order
    if not need_dx:
        return None, dw, db
    dx = _output(dx, (N, C, H, W), dt, "dx")
    dcols = work["prod"][:CKK]
    wt = w.reshape(F, CKK).T
    _products.run([(wt, gt[:, lo:hi], dcols[:, lo:hi]) for lo, hi in _blocks(gt.shape[1], F * CKK)])  # (CKK, N*OH*WR)
    if stride == 1:
        kernel = _col2im_wide_kernel if _parallel(dcols.size) else _col2im_wide_serial
        kernel(dx, work["xp"], dcols, N, C, H, W, K, pad, OH)
    else:
        _col2im_kernel(dx, dcols, N, C, H, W, K, stride, pad, OH, OW)
    return dx, dw, db


# Per-sample weight gradients (the gradient-noise instruments): the dW product of conv2d_backward
# with the batch kept apart. Image n owns the columns n*Mn .. (n+1)*Mn of gt and cols (Mn = OH*WR),
# so its [dW | db] is gt[:, block n] @ cols[:, block n].T, an (F, Mn) x (Mn, CKK+1) product: a stack
# of N products, one BLAS call each (numpy's matmul over the stacked strided views), the stack split
# into the _blocks fixed by the shapes and run as the conv products are (_Products: OpenBLAS at one
# thread, the blocks on a thread pool). The same multiply-adds as the batch dW product. Measured
# (A's conv2 at batch 32, float32, busy machine): 2.7 ms, against 67 ms for a Numba kernel of
# lane-blocked dot products over the same runs (prange over images) and 210 ms for one stacked
# matmul with OpenBLAS's own two threads.
def conv2d_weight_grad_per_sample(dout, x, w, stride, pad, dw=None, db=None, work=None):
    """Per-sample weight gradients of conv2d: conv2d_backward's dw, db before the sum over the batch.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K) (only its shape is used)
    -> dw: (N, F, C, K, K), db: (N, F)
    work: the workspace that the forward pass of this same x filled (its cols are reused; its
    transient gt is overwritten); without it the cols are recomputed.
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout = _input(dout, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, (w.shape[0],), stride, pad)
    if dout.shape != (N, F, OH, OW):
        raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw = _output(dw, (N, F, C, K, K), dt, "dw")
    db = _output(db, (N, F), dt, "db")
    CKK = C * K * K
    WR = W + 2 * pad if stride == 1 else OW
    if work is None:
        work = _conv_work(None, x.shape, w.shape, stride, pad, dt)
        _im2col(work, x, N, C, H, W, K, stride, pad, OH, OW)
    else:
        work = _conv_work(work, x.shape, w.shape, stride, pad, dt)
    gt, cols = work["gt"], work["cols"]
    (_nchw_to_rows_kernel if _parallel(gt.size) else _nchw_to_rows_serial)(gt, dout, N, F, OH, OW, WR)
    Mn = OH * WR
    a = gt.reshape(F, N, Mn).transpose(1, 0, 2)                    # (N, F, Mn): image n's dout rows
    b = cols.reshape(CKK + 1, N, Mn).transpose(1, 2, 0)            # (N, Mn, CKK+1): its im2col, transposed
    dwb = np.empty((N, F, CKK + 1), dt)                            # [dW | db] per image
    _products.run([(a[lo:hi], b[lo:hi], dwb[lo:hi]) for lo, hi in _blocks(N, F * (CKK + 1) * Mn)])
    dw.reshape(N, F, CKK)[...] = dwb[:, :, :CKK]
    db[...] = dwb[:, :, CKK]
    return dw, db


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
@njit(cache=True)
def _maxpool2d_forward_body(out, argmax, x, N, C, H, W, K, S, OH, OW, nc):
    # out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32, x: (N, C, H, W)
    # Strict '>' while scanning the window row-major: on ties the first element wins.
    # One iteration (nc) of the loop in _maxpool2d_forward_kernel / _maxpool2d_forward_serial.
    # Indexing 1-D row views (not x[n, c, h, w]) and a 2x2 special case: 2-3x faster (NOTES.md).
    n = nc // C
    c = nc % C
    for i in range(OH):
        h0 = i * S
        orow = out[n, c, i]
        arow = argmax[n, c, i]
        if K == 2:
            r0 = x[n, c, h0]
            r1 = x[n, c, h0 + 1]
            for j in range(OW):
                w0 = j * S
                best = r0[w0]
                k = 0
                if r0[w0 + 1] > best:
                    best = r0[w0 + 1]
                    k = 1
                if r1[w0] > best:
                    best = r1[w0]
                    k = W
                if r1[w0 + 1] > best:
                    best = r1[w0 + 1]
                    k = W + 1
                orow[j] = best
                arow[j] = h0 * W + w0 + k
        else:
            for j in range(OW):
                w0 = j * S
                best = x[n, c, h0, w0]
                best_idx = h0 * W + w0
                for u in range(K):
                    row = x[n, c, h0 + u]
                    for v in range(K):
                        val = row[w0 + v]
                        if val > best:
                            best = val
                            best_idx = (h0 + u) * W + w0 + v
                orow[j] = best
                arow[j] = best_idx


@njit(parallel=True, cache=True)
def _maxpool2d_forward_kernel(out, argmax, x, N, C, H, W, K, S, OH, OW):
    for nc in prange(N * C):
        _maxpool2d_forward_body(out, argmax, x, N, C, H, W, K, S, OH, OW, nc)


@njit(cache=True)
def _maxpool2d_forward_serial(out, argmax, x, N, C, H, W, K, S, OH, OW):
    for nc in range(N * C):
        _maxpool2d_forward_body(out, argmax, x, N, C, H, W, K, S, OH, OW, nc)


@njit(cache=True)
def _maxpool2d_backward_body(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK, nc):
    # dx: (N, C, H, W), dout: (N, C, OH, OW), argmax: (N, C, OH, OW), pooled: (N, C, OH, OW)
    # One iteration per plane (n, c); overlapping windows add up in row-major output order.
    # MASK: the input came from a ReLU; its backward is fused in: a gradient reaches the winner
    # only where the pooled value (= the ReLU's output there) is > 0, as relu_backward.
    # one iteration (nc) of the loop in _maxpool2d_backward_kernel / _maxpool2d_backward_serial
    n = nc // C
    c = nc % C
    plane = dx[n, c].reshape(H * W)
    for q in range(H * W):
        plane[q] = 0
    for i in range(OH):
        drow = dout[n, c, i]
        arow = argmax[n, c, i]
        if MASK:
            prow = pooled[n, c, i]
            for j in range(OW):
                plane[arow[j]] += drow[j] * (prow[j] > 0)
        else:
            for j in range(OW):
                plane[arow[j]] += drow[j]


@njit(parallel=True, cache=True)
def _maxpool2d_backward_kernel(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK):
    for nc in prange(N * C):
        _maxpool2d_backward_body(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK, nc)


@njit(cache=True)
def _maxpool2d_backward_serial(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK):
    for nc in range(N * C):
        _maxpool2d_backward_body(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK, nc)


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
    kernel = _maxpool2d_forward_kernel if _parallel(x.size) else _maxpool2d_forward_serial
    kernel(out, argmax, x, N, C, H, W, k, stride, OH, OW)
    return out, argmax


def maxpool2d_backward(dout, argmax, x_shape, dx=None, relu_pooled=None, k=None, stride=None):
    """Route each output gradient to the input element that won the max.

    dout: (N, C, OH, OW), argmax: (N, C, OH, OW) int32 -> dx: x_shape = (N, C, H, W)
    relu_pooled: (N, C, OH, OW), the forward's out, when the pooled input a was a ReLU's output:
    returns relu_backward(maxpool2d_backward(dout, ...), a) in one pass (the ReLU's backward fused).
    k, stride: not needed here (argmax says where each gradient goes).
    """
    dout = _input(dout)
    dt = _float_dtype(dout)
    argmax = _input(argmax, np.int32)
    N, C, H, W = (int(s) for s in x_shape)
    if dout.ndim != 4 or dout.shape[:2] != (N, C) or argmax.shape != dout.shape:
        raise ValueError(f"maxpool2d_backward: dout {dout.shape} / argmax {argmax.shape} "
                         f"do not match x {tuple(x_shape)}")
    _, _, OH, OW = dout.shape
    dx = _output(dx, (N, C, H, W), dt, "dx")
    kernel = _maxpool2d_backward_kernel if _parallel(dx.size) else _maxpool2d_backward_serial
    mask = relu_pooled is not None
    pooled = _input(relu_pooled, dt) if mask else dout
    if pooled.shape != dout.shape:
        raise ValueError(f"maxpool2d_backward: relu_pooled {pooled.shape} does not match dout {dout.shape}")
    kernel(dx, dout, argmax, pooled, N, C, H, W, OH, OW, mask)
    return dx


# --------------------------------------------------------------------------- ReLU
@njit(parallel=True, cache=True)
def _relu_forward_kernel(out, x, size):
    # out: (size,), x: (size,)  (flat views of any shape)
    # 'x < 0' rather than 'x > 0' so that NaN and -0.0 pass through, as np.maximum(x, 0) does.
    for p in prange(size):
        v = x[p]
        out[p] = 0 if v < 0 else v


@njit(cache=True)
def _relu_forward_serial(out, x, size):
    # out: (size,), x: (size,);  the serial twin of _relu_forward_kernel
    for p in range(size):
        v = x[p]
        out[p] = 0 if v < 0 else v


@njit(parallel=True, cache=True)
def _relu_backward_kernel(dx, dout, out, size):
    # dx: (size,), dout: (size,), out: (size,)  (flat views of any shape)
    for p in prange(size):
        dx[p] = dout[p] * (out[p] > 0)


@njit(cache=True)
def _relu_backward_serial(dx, dout, out, size):
    # dx: (size,), dout: (size,), out: (size,);  the serial twin of _relu_backward_kernel
    for p in range(size):
        dx[p] = dout[p] * (out[p] > 0)


def relu_forward(x, out=None):
    """out = max(x, 0); any shape."""
    x = _input(x)
    dt = _float_dtype(x)
    out = _output(out, x.shape, dt, "out")
    kernel = _relu_forward_kernel if _parallel(x.size) else _relu_forward_serial
    kernel(out.reshape(-1), x.reshape(-1), x.size)
    return out


def relu_backward(dout, out, dx=None):
    """dx = dout where the unit was active (out > 0); the kink x = 0 gets 0, as in PyTorch. Any shape."""
    dout = _input(dout)
    dt = _float_dtype(dout)
    out = _input(out, dt)
    if out.shape != dout.shape:
        raise ValueError(f"relu_backward: dout {dout.shape} and out {out.shape} differ")
    dx = _output(dx, dout.shape, dt, "dx")
    kernel = _relu_backward_kernel if _parallel(dout.size) else _relu_backward_serial
    kernel(dx.reshape(-1), dout.reshape(-1), out.reshape(-1), dout.size)
    return dx


# --------------------------------------------------------------------------- dense
# Large products run on one-thread BLAS, as the convolutions' (see _Products): one call per
# product, so each element's sum runs in an order fixed by the shapes. The Numba loops below were
# 4-5x slower than sgemm there (B's fc at batch 32, x: 32 x 4096, w: 10 x 4096: forward and
# backward 1.49 ms against 0.34 ms), but they win on tiny products, where a BLAS call's fixed cost
# dominates (A's fc at batch 1: 0.028 against 0.10 ms). _BLAS_MIN: N*D*O from which BLAS is used.
_BLAS_MIN = 1 << 16
#
# A dot product summed one term after another is a chain of dependent adds that cannot be
# vectorised without reassociation (fastmath). Instead each dot keeps LANES partial sums (lane l
# takes d = LANES*k + l), added up in lane order at the end: fixed order, vectorisable.
# LANES is passed in at run time on purpose: as a literal, LLVM unrolls the lane loop fully and
# then fails to vectorise it (measured 2-4x slower).
_DOT_LANES = 32


@njit(cache=True)
def _dense_forward_body(out, x, w, b, N, D, O, LANES, n):
    # out: (N, O), x: (N, D), w: (O, D), b: (O,);   out[n,o] = dot(x[n], w[o]) + b[o]
    # one iteration (n) of the loop in _dense_forward_serial
    DL = D - D % LANES
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


@njit(cache=True)
def _dense_forward_serial(out, x, w, b, N, D, O, LANES):
    for n in range(N):
        _dense_forward_body(out, x, w, b, N, D, O, LANES, n)


@njit(cache=True)
def _dense_backward_dx_body(dx, dout, w, N, D, O, n):
    # dx: (N, D), dout: (N, O), w: (O, D);   dx[n] = sum_o dout[n,o] * w[o], in o order.
    # one iteration (n) of the loop in _dense_backward_dx_serial
    for d in range(D):
        dx[n, d] = 0
    for o in range(O):
        g = dout[n, o]
        for d in range(D):
            dx[n, d] += g * w[o, d]


@njit(cache=True)
def _dense_backward_dx_serial(dx, dout, w, N, D, O):
    for n in range(N):
        _dense_backward_dx_body(dx, dout, w, N, D, O, n)


@njit(cache=True)
def _dense_backward_dw_body(dw, db, dout, x, N, D, O, o):
    # dw: (O, D), db: (O,), dout: (N, O), x: (N, D);   dw[o] = sum_n dout[n,o] * x[n], in n order.
    # one iteration (o) of the loop in _dense_backward_dw_serial
    db[o] = 0
    for d in range(D):
        dw[o, d] = 0
    for n in range(N):
        g = dout[n, o]
        db[o] += g
        for d in range(D):
            dw[o, d] += g * x[n, d]


@njit(cache=True)
def _dense_backward_dw_serial(dw, db, dout, x, N, D, O):
    for o in range(O):
        _dense_backward_dw_body(dw, db, dout, x, N, D, O, o)


def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, D, O = _dense_sizes(x.shape, w.shape, b.shape)
    out = _output(out, (N, O), dt, "out")
    if N * D * O < _BLAS_MIN:
        _dense_forward_serial(out, x, w, b, N, D, O, _DOT_LANES)
        return out
    _products.run([(x, w.T, out)])
    out += b
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
    small = N * D * O < _BLAS_MIN
    if small:
        _dense_backward_dw_serial(dw, db, dout, x, N, D, O)
    else:
        _products.run([(dout.T, x, dw)])
        np.sum(dout, axis=0, out=db)
    if not need_dx:
        return None, dw, db
    dx = _output(dx, (N, D), dt, "dx")
    if small:
        _dense_backward_dx_serial(dx, dout, w, N, D, O)
    else:
        _products.run([(dout, w, dx)])
    return dx, dw, db


@njit(cache=True)
def _dense_weight_grad_per_sample_body(dw, db, dout, x, N, D, O, n):
    # dw: (N, O, D), db: (N, O), dout: (N, O), x: (N, D);  dw[n, o] = dout[n, o] * x[n], db[n] = dout[n]
    # one iteration (n) of the loop in _dense_weight_grad_per_sample_kernel / _serial
    for o in range(O):
        g = dout[n, o]
        db[n, o] = g
        row = dw[n, o]
        xr = x[n]
        for d in range(D):
            row[d] = g * xr[d]


@njit(parallel=True, cache=True)
def _dense_weight_grad_per_sample_kernel(dw, db, dout, x, N, D, O):
    for n in prange(N):
        _dense_weight_grad_per_sample_body(dw, db, dout, x, N, D, O, n)


@njit(cache=True)
def _dense_weight_grad_per_sample_serial(dw, db, dout, x, N, D, O):
    for n in range(N):
        _dense_weight_grad_per_sample_body(dw, db, dout, x, N, D, O, n)


def dense_weight_grad_per_sample(dout, x, dw=None, db=None):
    """Per-sample weight gradients of the dense layer: dense_backward's dw, db before the batch sum.

    dout: (N, O), x: (N, D) -> dw: (N, O, D) with dw[n] = outer(dout[n], x[n]), db: (N, O) = dout
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout = _input(dout, dt)
    if x.ndim != 2 or dout.ndim != 2 or dout.shape[0] != x.shape[0]:
        raise ValueError(f"dense_weight_grad_per_sample: dout {dout.shape} and x {x.shape} do not match")
    N, D = x.shape
    O = dout.shape[1]
    dw = _output(dw, (N, O, D), dt, "dw")
    db = _output(db, (N, O), dt, "db")
    kernel = (_dense_weight_grad_per_sample_kernel if _parallel(dw.size)
              else _dense_weight_grad_per_sample_serial)
    kernel(dw, db, dout, x, N, D, O)
    return dw, db


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


def softmax_cross_entropy_forward(logits, y, probs=None, loss_out=None):
    """Mean cross-entropy of softmax(logits) against integer labels, computed stably.

    logits: (N, L), y: (N,) int -> loss: float, probs: (N, L)
    loss_out: not used on the host (the loss is returned as a float).
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


# --------------------------------------------------------------------------- trace reductions
@njit(cache=True)
def _segment_dots_kernel(out, row, a, b, bounds):
    """out[row, s] = sum of a[q] * b[q] over segment s, in float64, q in order."""
    for s in range(bounds.shape[0] - 1):
        acc = 0.0
        for q in range(bounds[s], bounds[s + 1]):
            acc += np.float64(a[q]) * np.float64(b[q])
        out[row, s] = acc


def segment_dots(pairs, bounds):
    """Per-segment float64 dot products of flat vectors (see ref.segment_dots): one pass per pair,
    no float64 copies (ref's casts cost ~2 ms a step on the default network; this ~0.1 ms)."""
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    out = np.empty((len(pairs), bounds.shape[0] - 1))
    for i, (a, b) in enumerate(pairs):
        _segment_dots_kernel(out, i, a, b, bounds)
    return out
