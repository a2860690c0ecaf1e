"""Numba CUDA kernels for every op: same names and argument order as ``ref.py`` and ``cpu.py``.

Imported only when ``device="cuda"`` is requested; nothing else in minicnn imports ``numba.cuda``.
Every public function takes and returns numba DEVICE arrays (``cuda.to_device`` /
``cuda.device_array``) and accepts optional preallocated outputs, so a training step can run
without allocating or copying to the host. Dimension letters as in ``ref.py``:

    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

How each op maps onto the GPU (all float accumulation in a fixed order, no atomics, so every
result is bit-identical from run to run):

    conv2d forward   implicit GEMM: rows m = (n, i, j), columns f, reduction r = (c, u, v);
                     TILE x TILE threads, one output each, the im2col tile of x and the weight
                     tile staged in shared memory.
    conv2d dw        implicit GEMM dw[f, r] = sum_m dout[f, m] * patch[m, r]: TILE x TILE threads
                     per (f, r) tile, split over row chunks of m (blockIdx.z) into a workspace,
                     then one thread per weight sums the chunks in order (deterministic split-K).
    conv2d dx        one thread per input element, gathering from the dout windows that cover it.
    per-sample dw    conv2d and dense: one thread per element of [dw | db] of one sample, its sum
                     over the output positions in order (no batch sum, so no split-K).
    conv2d db, dense db, loss, sum_of_squares
                     shared-memory tree reductions with a fixed stride pattern.
    maxpool          forward: one thread per output; backward: one thread per input element,
                     gathering over the windows that cover it where argmax == its index
                     (the forward records k/stride on the argmax array it returns).
    dense            tiled matmul (shared memory), transposes by index, split-K for dw.
    relu, softmax-xent backward, sgd_update
                     one thread per element.
    "One thread per element" kernels loop grid-stride, so a capped grid covers any size.
    The loss comes back as a 1-element device array: read it with ``loss.copy_to_host()[0]``
    (a synchronisation), not ``float(loss)``.

Kernel arguments are ordered outputs, inputs, then integer sizes; sizes are always passed as
arguments (never module globals); float scalars are passed already cast to the array dtype so a
float32 kernel computes in float32. Kernels are compiled lazily by numba, once per dtype.
Launch sizes (threads per block, tile size, reduction width) live in one place below.
"""
import math

import numpy as np
from numba import cuda

from ..errors import DeviceError
from . import on_device
from .ref import compile_ahead, conv_out_size, pass_scope  # noqa: F401  (nothing to set or compile ahead on a GPU)

# The Network applies ReLUs as their own kernels (the fused forms are accepted, for the contract).
FUSES_RELU = False
FUSES_POOL = False           # conv2d_forward(pool=...) runs the pool as a second kernel

# --------------------------------------------------------------------------- launch configuration
# The only place launch sizes are chosen. The kernels read their block size from cuda.blockDim, so
# these can be changed at run time (the tests shrink them to keep the CUDA simulator fast).
TPB = 128            # threads per block for one-thread-per-element kernels
MAX_BLOCKS = 8192    # grid cap for those kernels; they loop grid-stride over the rest
TILE = 16            # tiled GEMM kernels: TILE x TILE threads (TILE <= 32), two TILE*TILE tiles
RED_TPB = 256        # threads per block of a tree reduction; must be a power of two
RED_MAX_BLOCKS = 256  # most blocks in the first stage of a grid-wide reduction
RED_ITEMS = 8        # aim for at least this many elements per reduction thread
SPLIT_ROWS = 4096    # weight gradients: reduction rows per split-K chunk (blockIdx.z)


def _grid_1d(n):
    """Blocks and threads for a grid-stride loop over n elements (one element per thread
    up to MAX_BLOCKS * TPB elements)."""
    return max(1, min(MAX_BLOCKS, -(-n // TPB))), TPB


def _grid_tiles(rows, cols, splits=1):
    """Grid and block for a tiled GEMM: x over columns, y over rows, z over split-K chunks."""
    return (max(1, -(-cols // TILE)), max(1, -(-rows // TILE)), splits), (TILE, TILE)


def _tile_smem(dtype):
    """Dynamic shared memory of a tiled kernel: two TILE*TILE tiles."""
    return 2 * TILE * TILE * np.dtype(dtype).itemsize


def _reduction_blocks(n):
    """Blocks of the first stage of a grid-wide reduction over n elements."""
    _check_power_of_two(RED_TPB)
    return max(1, min(RED_MAX_BLOCKS, -(-n // (RED_TPB * RED_ITEMS))))


def _red_threads(n):
    """Threads of a block that tree-reduces n items: RED_TPB, or the next power of two >= n
    when n is smaller (no point in 256 threads summing 8 numbers)."""
    _check_power_of_two(RED_TPB)
    return min(RED_TPB, 1 << max(0, n - 1).bit_length())


def _red_smem(threads, dtype):
    """Dynamic shared memory of a reduction block: one value per thread."""
    return threads * np.dtype(dtype).itemsize


def _check_power_of_two(v):
    if v <= 0 or v & (v - 1):
        raise ValueError(f"RED_TPB must be a power of two, got {v}")


def _splits(rows):
    """Number of split-K chunks and rows per chunk for a reduction over `rows` rows."""
    splits = max(1, -(-rows // SPLIT_ROWS))
    return splits, -(-rows // splits) if rows else 1


# --------------------------------------------------------------------------- availability
def is_available():
    """True when numba sees a usable CUDA GPU (or the CUDA simulator is enabled)."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports as "no GPU", not as a crash
        return False


def require_gpu():
    """Raise DeviceError with a one-line hint when no CUDA GPU is present."""
    if not is_available():
        raise DeviceError("no CUDA GPU found; use --device cpu")


# --------------------------------------------------------------------------- host-side helpers
_WORKSPACES = {}


def _workspace(tag, shape, dtype):
    """A reusable scratch device array (split-K partials, reduction partials): no per-step alloc.

    All kernels run on the default stream, so one buffer per (tag, shape, dtype) is safe.
    """
    key = (tag, tuple(shape), np.dtype(dtype).str)
    buf = _WORKSPACES.get(key)
    if buf is None:
        buf = _WORKSPACES[key] = cuda.device_array(shape, dtype=dtype)
    return buf


_DUMMIES = {}


def _dummy(dtype):
    """A 1-element device array standing in for an unused array argument."""
    key = np.dtype(dtype).str
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda.device_array(1, dtype=dtype)
    return _DUMMIES[key]


def _output(arr, shape, dtype, name):
    """Return `arr` if it fits (shape, dtype), a new device array if it is None; else raise."""
    if arr is None:
        return cuda.device_array(shape, dtype=dtype)
    if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {np.dtype(dtype)}, "
                         f"got {tuple(arr.shape)} {np.dtype(arr.dtype)}")
    return arr


def _scalar(v, dtype):
    """A Python number as a scalar of the array dtype (keeps float32 kernels in float32)."""
    return np.dtype(dtype).type(v)


# --------------------------------------------------------------------------- device functions
@cuda.jit(device=True)
def _tree_sum(sh, t, nthreads):
    """Sum sh[0:nthreads] into sh[0] by pairwise halving; every thread of the block must call it.

    sh: (nthreads,) shared memory, filled by the caller; nthreads a power of two. The pairing
    order is fixed, so the result is deterministic.
    """
    cuda.syncthreads()
    s = nthreads // 2
    while s > 0:
        if t < s:
            sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2
    return sh[0]


@cuda.jit(device=True)
def _patch(x, m, r, H, W, K, S, P, OH, OW):
    """Element (m, r) of the zero-padded im2col matrix of x: row m = (n, i, j) an output position,
    column r = (c, u, v) a kernel tap; x[n, c, i*S-P+u, j*S-P+v], or 0 in the padding."""
    h = ((m // OW) % OH) * S - P + (r // K) % K
    ww = (m % OW) * S - P + r % K
    if h >= 0 and h < H and ww >= 0 and ww < W:
        return x[m // (OH * OW), r // (K * K), h, ww]
    return x.dtype.type(0)


# --------------------------------------------------------------------------- kernels: conv2d
@cuda.jit
def _conv2d_forward_kernel(out, x, w, b, N, C, H, W, F, K, S, P, OH, OW):
    """out: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K), b: (F,).

    Block (T, T): threadIdx.x -> output row m = (n, i, j), threadIdx.y -> filter f.
    Per reduction tile r0..r0+T of r = (c, u, v): xs[r_local*T + m_local] holds the im2col
    patch (zero outside the image), ws[f_local*T + r_local] the weights.
    """
    T = cuda.blockDim.x
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    smem = cuda.shared.array(0, dtype=x.dtype)
    xs = smem[:T * T]
    ws = smem[T * T:2 * T * T]
    zero = x.dtype.type(0)
    M = N * OH * OW
    R = C * K * K
    KK = K * K
    m = cuda.blockIdx.x * T + tx
    f = cuda.blockIdx.y * T + ty
    n = m // (OH * OW)
    i = (m // OW) % OH
    j = m % OW
    acc = zero
    for r0 in range(0, R, T):
        r = r0 + ty                       # patch element this thread stages
        v = zero
        if m < M and r < R:
            v = _patch(x, m, r, H, W, K, S, P, OH, OW)
        xs[ty * T + tx] = v
        rw = r0 + tx                      # weight element this thread stages
        v = zero
        if f < F and rw < R:
            v = w[f, rw // KK, (rw // K) % K, rw % K]
        ws[ty * T + tx] = v
        cuda.syncthreads()
        for k in range(T):
            acc += xs[k * T + tx] * ws[ty * T + k]
        cuda.syncthreads()
    if m < M and f < F:
        out[n, f, i, j] = acc + b[f]


@cuda.jit
def _conv2d_backward_dx_kernel(dx, dout, w, N, C, H, W, F, K, S, P, OH, OW):
    """dx: (N, C, H, W), dout: (N, F, OH, OW), w: (F, C, K, K). One thread per dx element
    (grid-stride loop).

    dx[n,c,h,x] = sum over the outputs (i, j) whose window covers (h, x), with u = h+P-i*S,
    v = x+P-j*S, of sum_f dout[n,f,i,j] * w[f,c,u,v]; order i, j, f ascending.
    """
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        xw = idx % W
        h = (idx // W) % H
        c = (idx // (W * H)) % C
        n = idx // (W * H * C)
        hp = h + P
        wp = xw + P
        i_lo = max(0, (hp - K + S) // S)      # smallest i with i*S <= hp and i*S + K > hp
        i_hi = min(OH - 1, hp // S)
        j_lo = max(0, (wp - K + S) // S)
        j_hi = min(OW - 1, wp // S)
        acc = dx.dtype.type(0)
        for i in range(i_lo, i_hi + 1):
            u = hp - i * S
            for j in range(j_lo, j_hi + 1):
                v = wp - j * S
                for f in range(F):
                    acc += dout[n, f, i, j] * w[f, c, u, v]
        dx[n, c, h, xw] = acc


@cuda.jit
def _conv2d_backward_dw_kernel(part, dout, x, N, C, H, W, F, K, S, P, OH, OW, rows_per_split):
    """part: (SPLITS, F, R) with R = C*K*K; dout: (N, F, OH, OW), x: (N, C, H, W).

    part[s, f, r] = sum over rows m = (n, i, j) in chunk s (ascending) of
    dout[n, f, i, j] * xpad[n, c, i*S+u, j*S+v], r = (c, u, v).
    Block (T, T): threadIdx.x -> r, threadIdx.y -> f, blockIdx.z -> chunk s.
    ds[f_local*T + m_local] holds dout, ps[m_local*T + r_local] the im2col patch.
    """
    T = cuda.blockDim.x
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    smem = cuda.shared.array(0, dtype=x.dtype)
    ds = smem[:T * T]
    ps = smem[T * T:2 * T * T]
    zero = x.dtype.type(0)
    M = N * OH * OW
    R = C * K * K
    r = cuda.blockIdx.x * T + tx
    f = cuda.blockIdx.y * T + ty
    s = cuda.blockIdx.z
    m_begin = s * rows_per_split
    m_end = min(M, m_begin + rows_per_split)
    acc = zero
    for m0 in range(m_begin, m_end, T):
        m = m0 + tx                       # dout element this thread stages: (f, m)
        val = zero
        if f < F and m < m_end:
            val = dout[m // (OH * OW), f, (m // OW) % OH, m % OW]
        ds[ty * T + tx] = val
        m = m0 + ty                       # patch element this thread stages: (m, r)
        val = zero
        if m < m_end and r < R:
            val = _patch(x, m, r, H, W, K, S, P, OH, OW)
        ps[ty * T + tx] = val
        cuda.syncthreads()
        for k in range(T):
            acc += ds[ty * T + k] * ps[k * T + tx]
        cuda.syncthreads()
    if f < F and r < R:
        part[s, f, r] = acc


@cuda.jit
def _sum_splits_kernel(out, part, splits, n):
    """out: (n,) = sum over s ascending of part[s, :]; part: (splits, n). One thread per element."""
    for q in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = part[0, q]
        for s in range(1, splits):
            acc += part[s, q]
        out[q] = acc


@cuda.jit
def _sum_rows_kernel(out, a, N, F, inner):
    """out: (F,), a: (N, F, inner): out[f] = sum_{n,k} a[n, f, k]. One block per f, tree-reduced."""
    sh = cuda.shared.array(0, dtype=a.dtype)
    t = cuda.threadIdx.x
    f = cuda.blockIdx.x
    acc = a.dtype.type(0)
    for q in range(t, N * inner, cuda.blockDim.x):
        acc += a[q // inner, f, q % inner]
    sh[t] = acc
    total = _tree_sum(sh, t, cuda.blockDim.x)
    if t == 0:
        out[f] = total


@cuda.jit
def _conv2d_weight_grad_per_sample_kernel(dw, db, dout, x, N, C, H, W, F, K, S, P, OH, OW):
    """dw: (N, F, C, K, K), db: (N, F), dout: (N, F, OH, OW), x: (N, C, H, W).

    One thread per element q of [dw | db] per sample (grid-stride), q = (n, f, r) with
    r = (c, u, v) < R = C*K*K a weight and r = R the bias:
    dw[n, f, c, u, v] = sum over m = (i, j) ascending of dout[n, f, i, j] * xpad[n, c, i*S+u, j*S+v],
    db[n, f] = sum over m of dout[n, f, i, j]. Each sum in one thread, in order: deterministic.
    (Not tiled: the instruments run every K steps, not every step.)
    """
    R = C * K * K
    M = OH * OW
    for q in range(cuda.grid(1), N * F * (R + 1), cuda.gridsize(1)):
        r = q % (R + 1)
        f = (q // (R + 1)) % F
        n = q // ((R + 1) * F)
        acc = dw.dtype.type(0)
        if r == R:
            for m in range(M):
                acc += dout[n, f, m // OW, m % OW]
            db[n, f] = acc
        else:
            for m in range(M):
                acc += dout[n, f, m // OW, m % OW] * _patch(x, n * M + m, r, H, W, K, S, P, OH, OW)
            dw[n, f, r // (K * K), (r // K) % K, r % K] = acc


# --------------------------------------------------------------------------- kernels: max-pool
@cuda.jit
def _maxpool2d_forward_kernel(out, argmax, x, N, C, H, W, K, S, OH, OW):
    """out, argmax: (N, C, OH, OW), x: (N, C, H, W). One thread per output.

    Scans the window in row-major order and keeps the first maximum (a NaN wins, as in
    numpy's argmax); argmax = h*W + w in the input plane.
    """
    for idx in range(cuda.grid(1), N * C * OH * OW, cuda.gridsize(1)):
        j = idx % OW
        i = (idx // OW) % OH
        c = (idx // (OW * OH)) % C
        n = idx // (OW * OH * C)
        h0 = i * S
        w0 = j * S
        best = x[n, c, h0, w0]
        best_at = h0 * W + w0
        for u in range(K):
            for v in range(K):
                val = x[n, c, h0 + u, w0 + v]
                if val > best or (val != val and best == best):
                    best = val
                    best_at = (h0 + u) * W + w0 + v
        out[n, c, i, j] = best
        argmax[n, c, i, j] = best_at


@cuda.jit
def _maxpool2d_backward_kernel(dx, dout, argmax, N, C, H, W, KH, SH, KW, SW, OH, OW):
    """dx: (N, C, H, W), dout, argmax: (N, C, OH, OW). One thread per dx element, gathering
    dout over the windows that cover it (row-major) where argmax picked it.

    (KH, SH) and (KW, SW) are the window size and stride along H and W. Any geometry whose
    windows are a superset of the real ones gives the same result (bit for bit: same order).
    """
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        xw = idx % W
        h = (idx // W) % H
        c = (idx // (W * H)) % C
        n = idx // (W * H * C)
        me = h * W + xw
        i_lo = max(0, (h - KH + SH) // SH)
        i_hi = min(OH - 1, h // SH)
        j_lo = max(0, (xw - KW + SW) // SW)
        j_hi = min(OW - 1, xw // SW)
        acc = dx.dtype.type(0)
        for i in range(i_lo, i_hi + 1):
            for j in range(j_lo, j_hi + 1):
                if argmax[n, c, i, j] == me:
                    acc += dout[n, c, i, j]
        dx[n, c, h, xw] = acc


# --------------------------------------------------------------------------- kernels: elementwise
@cuda.jit
def _relu_forward_kernel(out, x, n):
    """out, x: (n,) flat. out = max(x, 0); NaN passes through."""
    for q in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = x[q]
        zero = x.dtype.type(0)
        out[q] = zero if v < zero else v


@cuda.jit
def _relu_backward_kernel(dx, dout, out, n):
    """dx, dout, out: (n,) flat. dx = dout where out > 0, else 0."""
    for q in range(cuda.grid(1), n, cuda.gridsize(1)):
        dx[q] = dout[q] if out[q] > 0 else dx.dtype.type(0)


@cuda.jit
def _sgd_kernel(p, g, buf, n, lr, momentum, weight_decay, one_minus_dampening, nesterov,
                first_step):
    """p, g, buf: (n,) flat; torch.optim.SGD's rule (see sgd_update). buf unused if momentum == 0."""
    for q in range(cuda.grid(1), n, cuda.gridsize(1)):
        d = g[q]
        if weight_decay != 0:
            d = d + weight_decay * p[q]
        if momentum != 0:
            if first_step:
                bv = d
            else:
                bv = momentum * buf[q] + one_minus_dampening * d
            buf[q] = bv
            if nesterov:
                d = d + momentum * bv
            else:
                d = bv
        p[q] = p[q] - lr * d


# --------------------------------------------------------------------------- kernels: dense
@cuda.jit
def _matmul_kernel(c, a, b, bias, M, NC, KD, trans_a, trans_b, add_bias, k_per_split):
    """c: (SPLITS, M, NC) = A @ B (+ bias) over reduction chunk s = blockIdx.z.

    A: (M, KD) is a, or a.T when trans_a (a: (KD, M)); B: (KD, NC) is b, or b.T when trans_b
    (b: (NC, KD)); bias: (NC,), added when add_bias. Block (T, T): threadIdx.x -> column,
    threadIdx.y -> row. Tiles As[m_local*T + k_local], Bs[k_local*T + n_local]; each is loaded
    with threadIdx.x along the contiguous axis of its source (coalesced).
    """
    T = cuda.blockDim.x
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    smem = cuda.shared.array(0, dtype=c.dtype)
    As = smem[:T * T]
    Bs = smem[T * T:2 * T * T]
    zero = c.dtype.type(0)
    row = cuda.blockIdx.y * T + ty
    col = cuda.blockIdx.x * T + tx
    k_begin = cuda.blockIdx.z * k_per_split
    k_end = min(KD, k_begin + k_per_split)
    if trans_a:
        ml = tx
        kla = ty
    else:
        ml = ty
        kla = tx
    if trans_b:
        nl = ty
        klb = tx
    else:
        nl = tx
        klb = ty
    mg = cuda.blockIdx.y * T + ml
    ng = cuda.blockIdx.x * T + nl
    acc = zero
    for k0 in range(k_begin, k_end, T):
        kg = k0 + kla
        v = zero
        if mg < M and kg < k_end:
            v = a[kg, mg] if trans_a else a[mg, kg]
        As[ml * T + kla] = v
        kg = k0 + klb
        v = zero
        if ng < NC and kg < k_end:
            v = b[ng, kg] if trans_b else b[kg, ng]
        Bs[klb * T + nl] = v
        cuda.syncthreads()
        for k in range(T):
            acc += As[ty * T + k] * Bs[k * T + tx]
        cuda.syncthreads()
    if row < M and col < NC:
        if add_bias:
            acc += bias[col]
        c[cuda.blockIdx.z, row, col] = acc


@cuda.jit
def _dense_weight_grad_per_sample_kernel(dw, db, dout, x, N, D, O):
    """dw: (N, O, D), db: (N, O), dout: (N, O), x: (N, D). One thread per element of dw (grid-stride,
    adjacent threads along d): dw[n, o, d] = dout[n, o] * x[n, d]; the d == 0 thread also writes db."""
    for q in range(cuda.grid(1), N * O * D, cuda.gridsize(1)):
        d = q % D
        o = (q // D) % O
        n = q // (D * O)
        g = dout[n, o]
        dw[n, o, d] = g * x[n, d]
        if d == 0:
            db[n, o] = g


# --------------------------------------------------------------------------- kernels: reductions, loss
@cuda.jit
def _sum_kernel(out, x, n, square, scale):
    """out: (gridDim.x,), x: (n,) flat. out[b] = scale * sum of x (or x*x) over block b's
    grid-strided share, tree-reduced in shared memory."""
    sh = cuda.shared.array(0, dtype=x.dtype)
    t = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    acc = x.dtype.type(0)
    for q in range(cuda.blockIdx.x * tpb + t, n, cuda.gridDim.x * tpb):
        v = x[q]
        if square:
            acc += v * v
        else:
            acc += v
    sh[t] = acc
    total = _tree_sum(sh, t, tpb)
    if t == 0:
        out[cuda.blockIdx.x] = total * scale


@cuda.jit
def _softmax_xent_forward_kernel(partial, probs, logits, y, N, L, scale):
    """partial: (gridDim.x,), probs, logits: (N, L), y: (N,) int labels in [0, L).

    Each thread handles grid-strided rows: z = logits - max, lse = log(sum exp z),
    row loss = lse - z[y], probs = exp(z - lse). partial[b] = scale * block b's loss sum.
    """
    sh = cuda.shared.array(0, dtype=logits.dtype)
    t = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    zero = logits.dtype.type(0)
    acc = zero
    for n in range(cuda.blockIdx.x * tpb + t, N, cuda.gridDim.x * tpb):
        mx = logits[n, 0]
        for l in range(1, L):
            mx = max(mx, logits[n, l])
        s = zero
        for l in range(L):
            s += math.exp(logits[n, l] - mx)
        lse = math.log(s)
        acc += lse - (logits[n, y[n]] - mx)
        for l in range(L):
            probs[n, l] = math.exp((logits[n, l] - mx) - lse)
    sh[t] = acc
    total = _tree_sum(sh, t, tpb)
    if t == 0:
        partial[cuda.blockIdx.x] = total * scale


@cuda.jit
def _softmax_xent_backward_kernel(dlogits, probs, y, N, L, n_float):
    """dlogits, probs: (N, L), y: (N,). dlogits = (probs - onehot(y)) / N. One thread per element."""
    for q in range(cuda.grid(1), N * L, cuda.gridsize(1)):
        n = q // L
        l = q % L
        p = probs[n, l]
        if l == y[n]:
            p = p - probs.dtype.type(1)
        dlogits[n, l] = p / n_float


# --------------------------------------------------------------------------- kernels: trace reductions
@cuda.jit
def _segment_dot_kernel(out, a, b, bounds, row):
    """out: (pairs, S) float64, a, b: (n,) flat, bounds: (S+1,) int64 segment edges.
    Block s: out[row, s] = sum of a[q] * b[q] over bounds[s] <= q < bounds[s+1], each thread a
    block-strided share accumulated in float64, then a fixed-order tree sum."""
    sh = cuda.shared.array(0, dtype=out.dtype)
    t = cuda.threadIdx.x
    tpb = cuda.blockDim.x
    s = cuda.blockIdx.x
    acc = out.dtype.type(0)
    for q in range(bounds[s] + t, bounds[s + 1], tpb):
        acc += out.dtype.type(a[q]) * out.dtype.type(b[q])
    sh[t] = acc
    total = _tree_sum(sh, t, tpb)
    if t == 0:
        out[row, s] = total


@cuda.jit
def _alive_kernel(alive, a, N, U):
    """alive: (U,) float64, a: (N*U,) flat, sample-major (N, U). alive[u] = 1 when some sample has
    a[n, u] != 0, else 0. One thread per unit u (adjacent threads read adjacent units)."""
    for u in range(cuda.grid(1), U, cuda.gridsize(1)):
        v = 0.0
        for n in range(N):
            if a[n * U + u] != 0:
                v = 1.0
                break
        alive[u] = v


@cuda.jit
def _logit_rows_kernel(rows, pred, logits, probs, N, L):
    """rows: (N, 2) float64 = (max |logit|, softmax entropy) of each sample, pred: (N,) int32 its
    arg-max logit (the first of equal ones, as numpy's argmax). One thread per sample."""
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        best = logits[n, 0]
        arg = 0
        amax = abs(logits[n, 0])
        ent = 0.0
        for l in range(L):
            v = logits[n, l]
            if v > best:
                best = v
                arg = l
            amax = max(amax, abs(v))
            p = rows.dtype.type(probs[n, l])
            if p > 0:
                ent -= p * math.log(p)
        rows[n, 0] = amax
        rows[n, 1] = ent
        pred[n] = arg


@cuda.jit
def _logit_finish_kernel(out, counts, rows, pred, y, N, L):
    """One thread, samples in order: out (4,) float64 = max |logit|, mean entropy, share of the
    batch predicted as the most predicted class, accuracy. counts: (L,) int32 scratch."""
    if cuda.grid(1) != 0:
        return
    for l in range(L):
        counts[l] = 0
    amax = 0.0
    ent = 0.0
    correct = 0
    for n in range(N):
        amax = max(amax, rows[n, 0])
        ent += rows[n, 1]
        counts[pred[n]] += 1
        if pred[n] == y[n]:
            correct += 1
    top = 0
    for l in range(L):
        top = max(top, counts[l])
    out[0] = amax
    out[1] = ent / N
    out[2] = top / N
    out[3] = correct / N


@cuda.jit
def _subtract_kernel(out, a, b, n):
    """out, a, b: (n,) flat. out = a - b."""
    for q in range(cuda.grid(1), n, cuda.gridsize(1)):
        out[q] = a[q] - b[q]


# --------------------------------------------------------------------------- host: reductions
def _reduce_sum(x_flat, out, square, scale):
    """out[0] = scale * sum(x_flat**2 if square else x_flat), two fixed-order stages."""
    n = x_flat.shape[0]
    dtype = x_flat.dtype
    blocks = _reduction_blocks(n)
    if blocks == 1:
        tpb = _red_threads(n)
        _sum_kernel[1, tpb, 0, _red_smem(tpb, dtype)](out, x_flat, n, square, _scalar(scale, dtype))
        return out
    partial = _workspace("sum_partial", (blocks,), dtype)
    _sum_kernel[blocks, RED_TPB, 0, _red_smem(RED_TPB, dtype)](partial, x_flat, n, square,
                                                               _scalar(1, dtype))
    tpb = _red_threads(blocks)
    _sum_kernel[1, tpb, 0, _red_smem(tpb, dtype)](out, partial, blocks, 0, _scalar(scale, dtype))
    return out


def _sum_rows(out, a3):
    """out: (F,) = a3.sum(axis=(0, 2)) for a3: (N, F, inner), one tree-reduced block per f."""
    N, F, inner = a3.shape
    tpb = _red_threads(N * inner)
    _sum_rows_kernel[F, tpb, 0, _red_smem(tpb, a3.dtype)](out, a3, N, F, inner)
    return out


def _split_gemm_finish(out_flat, part, splits):
    """out_flat: (n,) = part.sum(axis=0) for part: (splits, n), in fixed order."""
    n = out_flat.shape[0]
    blocks, tpb = _grid_1d(n)
    _sum_splits_kernel[blocks, tpb](out_flat, part, splits, n)


# --------------------------------------------------------------------------- public: conv2d
def conv2d_workspace(x_shape, w_shape, stride, pad, dtype):
    """The CUDA convolutions are implicit GEMMs: no scratch space to keep between calls."""
    return None


def conv2d_forward(x, w, b, stride, pad, out=None, work=None, relu=False, pool=None, pool_out=None, argmax=None):
    """x: (N, C, H, W), w: (F, C, K, K), b: (F,) -> out: (N, F, OH, OW) (device arrays).
    relu: return relu(out) (applied in place after the product; FUSES_RELU is False here).
    pool: (window, stride): also max-pool it, -> (out, pool_out, argmax) (a second kernel here;
    FUSES_POOL is False)."""
    if pool is not None:
        res = conv2d_forward(x, w, b, stride, pad, out=out, relu=relu)
        return (res, *maxpool2d_forward(res, pool[0], pool[1], out=pool_out, argmax=argmax))
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    out = _output(out, (N, F, OH, OW), x.dtype, "out")
    grid, block = _grid_tiles(N * OH * OW, F)
    grid = (grid[1], grid[0], 1)          # x over output rows m = (n, i, j), y over filters
    _conv2d_forward_kernel[grid, block, 0, _tile_smem(x.dtype)](
        out, x, w, b, N, C, H, W, F, K, stride, pad, OH, OW)
    if relu:
        relu_forward(out, out=out)
    return out


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True, work=None, pool=None,
                    argmax=None, relu_pooled=None):
    """dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) (None when need_dx is False), dw: (F, C, K, K), db: (F,).
    pool: the forward's max-pool (window, stride): dout is the pooled output's gradient, taken
    back through maxpool2d_backward first (into a temporary conv-output-sized array)."""
    if pool is not None:
        N, _, H, W = x.shape
        F, _, K, _ = w.shape
        shape = (N, F, conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad))
        dout = maxpool2d_backward(dout, argmax, shape, relu_pooled=relu_pooled, k=pool[0], stride=pool[1])
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, OH, OW = dout.shape
    dtype = x.dtype
    R = C * K * K
    dw = _output(dw, (F, C, K, K), dtype, "dw")
    db = _output(db, (F,), dtype, "db")

    splits, rows = _splits(N * OH * OW)
    part = dw.reshape(1, F, R) if splits == 1 else _workspace("conv_dw", (splits, F, R), dtype)
    grid, block = _grid_tiles(F, R, splits)
    _conv2d_backward_dw_kernel[grid, block, 0, _tile_smem(dtype)](
        part, dout, x, N, C, H, W, F, K, stride, pad, OH, OW, rows)
    if splits > 1:
        _split_gemm_finish(dw.reshape(F * R), part.reshape(splits, F * R), splits)

    _sum_rows(db, dout.reshape(N, F, OH * OW))

    if need_dx:
        dx = _output(dx, (N, C, H, W), dtype, "dx")
        blocks, tpb = _grid_1d(N * C * H * W)
        _conv2d_backward_dx_kernel[blocks, tpb](dx, dout, w, N, C, H, W, F, K, stride, pad,
                                                OH, OW)
    return dx, dw, db


def conv2d_weight_grad_per_sample(dout, x, w, stride, pad, dw=None, db=None, work=None):
    """Per-sample weight gradients of conv2d: conv2d_backward's dw, db before the batch sum.
    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K) (only its shape is used)
    -> dw: (N, F, C, K, K), db: (N, F) (device arrays). work: not needed here."""
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, OH, OW = dout.shape
    dw = _output(dw, (N, F, C, K, K), x.dtype, "dw")
    db = _output(db, (N, F), x.dtype, "db")
    blocks, tpb = _grid_1d(N * F * (C * K * K + 1))
    _conv2d_weight_grad_per_sample_kernel[blocks, tpb](dw, db, dout, x, N, C, H, W, F, K, stride, pad, OH, OW)
    return dw, db


# --------------------------------------------------------------------------- public: max-pool
def maxpool2d_forward(x, k, stride, out=None, argmax=None):
    """x: (N, C, H, W) -> out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32 (h*W + w)."""
    N, C, H, W = x.shape
    OH, OW = conv_out_size(H, k, stride, 0), conv_out_size(W, k, stride, 0)
    out = _output(out, (N, C, OH, OW), x.dtype, "out")
    argmax = _output(argmax, (N, C, OH, OW), np.int32, "argmax")
    blocks, tpb = _grid_1d(N * C * OH * OW)
    _maxpool2d_forward_kernel[blocks, tpb](out, argmax, x, N, C, H, W, k, stride, OH, OW)
    # The backward gather needs the window geometry, which ref's signature does not carry:
    # remember it on the argmax array itself (see maxpool2d_backward).
    argmax.minicnn_pool_geometry = (int(k), int(stride))
    return out, argmax


def maxpool2d_backward(dout, argmax, x_shape, dx=None, relu_pooled=None, k=None, stride=None):
    """dout: (N, C, OH, OW), argmax: (N, C, OH, OW) int32 -> dx: x_shape = (N, C, H, W).

    relu_pooled: the forward's out when the pooled input was a ReLU's output: the ReLU's backward
    is applied to dout first (a winner was active exactly when its pooled value is > 0).

    The gather needs the window geometry (k, stride). It is taken, in order, from the k/stride
    arguments, from the argmax array returned by maxpool2d_forward (which records it), or else
    the widest geometry the shapes allow (stride 1, window H-OH+1): still exact, but each
    thread then scans O(OH) x O(OW) windows instead of ceil(k/stride)^2.
    """
    N, C, H, W = x_shape
    _, _, OH, OW = dout.shape
    if k is None or stride is None:
        k, stride = getattr(argmax, "minicnn_pool_geometry", (None, None))
    if k is None:
        KH, SH, KW, SW = H - OH + 1, 1, W - OW + 1, 1
    else:
        KH, SH, KW, SW = k, stride, k, stride
    if relu_pooled is not None:
        dout = relu_backward(dout, relu_pooled, dx=_workspace("pool_relu_mask", dout.shape, dout.dtype))
    dx = _output(dx, (N, C, H, W), dout.dtype, "dx")
    blocks, tpb = _grid_1d(N * C * H * W)
    _maxpool2d_backward_kernel[blocks, tpb](dx, dout, argmax, N, C, H, W, KH, SH, KW, SW, OH, OW)
    return dx


# --------------------------------------------------------------------------- public: ReLU
def relu_forward(x, out=None):
    """out = max(x, 0); x: any shape (contiguous) -> out: same shape."""
    out = _output(out, x.shape, x.dtype, "out")
    n = x.size
    blocks, tpb = _grid_1d(n)
    _relu_forward_kernel[blocks, tpb](out.reshape(n), x.reshape(n), n)
    return out


def relu_backward(dout, out, dx=None):
    """dx = dout where out > 0, else 0; dout, out: same shape -> dx: same shape."""
    dx = _output(dx, dout.shape, dout.dtype, "dx")
    n = dout.size
    blocks, tpb = _grid_1d(n)
    _relu_backward_kernel[blocks, tpb](dx.reshape(n), dout.reshape(n), out.reshape(n), n)
    return dx


# --------------------------------------------------------------------------- public: dense
def _matmul(c3, a, b, bias, trans_a, trans_b, M, NC, KD, splits=1, k_per_split=None):
    """c3: (splits, M, NC) = op(a) @ op(b) (+ bias), see _matmul_kernel."""
    add_bias = bias is not None
    bias = bias if add_bias else _dummy(c3.dtype)
    grid, block = _grid_tiles(M, NC, splits)
    _matmul_kernel[grid, block, 0, _tile_smem(c3.dtype)](
        c3, a, b, bias, M, NC, KD, int(trans_a), int(trans_b), int(add_bias),
        KD if k_per_split is None else k_per_split)


def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    N, D = x.shape
    O = w.shape[0]
    out = _output(out, (N, O), x.dtype, "out")
    _matmul(out.reshape(1, N, O), x, w, b, False, True, N, O, D)
    return out


def dense_backward(dout, x, w, dx=None, dw=None, db=None, need_dx=True):
    """dout: (N, O), x: (N, D), w: (O, D)
    -> dx: (N, D) (None when need_dx is False), dw: (O, D), db: (O,)"""
    N, D = x.shape
    O = w.shape[0]
    dtype = x.dtype
    dw = _output(dw, (O, D), dtype, "dw")
    db = _output(db, (O,), dtype, "db")
    splits, rows = _splits(N)                       # dw = dout.T @ x reduces over the batch
    part = dw.reshape(1, O, D) if splits == 1 else _workspace("dense_dw", (splits, O, D), dtype)
    _matmul(part, dout, x, None, True, False, O, D, N, splits, rows)
    if splits > 1:
        _split_gemm_finish(dw.reshape(O * D), part.reshape(splits, O * D), splits)
    _sum_rows(db, dout.reshape(N, O, 1))
    if need_dx:
        dx = _output(dx, (N, D), dtype, "dx")
        _matmul(dx.reshape(1, N, D), dout, w, None, False, False, N, D, O)
    return dx, dw, db


def dense_weight_grad_per_sample(dout, x, dw=None, db=None):
    """Per-sample weight gradients of the dense layer: dense_backward's dw, db before the batch sum.
    dout: (N, O), x: (N, D) -> dw: (N, O, D) = outer(dout[n], x[n]) per sample, db: (N, O) = dout"""
    N, D = x.shape
    O = dout.shape[1]
    dw = _output(dw, (N, O, D), x.dtype, "dw")
    db = _output(db, (N, O), x.dtype, "db")
    blocks, tpb = _grid_1d(N * O * D)
    _dense_weight_grad_per_sample_kernel[blocks, tpb](dw, db, dout, x, N, D, O)
    return dw, db


# --------------------------------------------------------------------------- public: loss
def softmax_cross_entropy_forward(logits, y, probs=None, loss_out=None):
    """Mean cross-entropy of softmax(logits) against integer labels, reduced on the device.

    logits: (N, L), y: (N,) int in [0, L) -> loss: (1,) device array, probs: (N, L)
    Read the loss with ``loss.copy_to_host()[0]`` (that synchronises).
    """
    N, L = logits.shape
    dtype = logits.dtype
    probs = _output(probs, (N, L), dtype, "probs")
    loss_out = _output(loss_out, (1,), dtype, "loss_out")
    blocks = max(1, min(RED_MAX_BLOCKS, -(-N // RED_TPB)))   # one row per thread
    if blocks == 1:
        tpb = _red_threads(N)
        _softmax_xent_forward_kernel[1, tpb, 0, _red_smem(tpb, dtype)](
            loss_out, probs, logits, y, N, L, _scalar(1.0 / N, dtype))
    else:
        partial = _workspace("xent_partial", (blocks,), dtype)
        _softmax_xent_forward_kernel[blocks, RED_TPB, 0, _red_smem(RED_TPB, dtype)](
            partial, probs, logits, y, N, L, _scalar(1, dtype))
        tpb = _red_threads(blocks)
        _sum_kernel[1, tpb, 0, _red_smem(tpb, dtype)](loss_out, partial, blocks, 0,
                                                       _scalar(1.0 / N, dtype))
    return loss_out, probs


def softmax_cross_entropy_backward(probs, y, dlogits=None):
    """d(mean loss)/d logits = (probs - onehot(y)) / N.   probs: (N, L) -> dlogits: (N, L)"""
    N, L = probs.shape
    dlogits = _output(dlogits, (N, L), probs.dtype, "dlogits")
    blocks, tpb = _grid_1d(N * L)
    _softmax_xent_backward_kernel[blocks, tpb](dlogits, probs, y, N, L, _scalar(N, probs.dtype))
    return dlogits


# --------------------------------------------------------------------------- public: SGD, norms
def sgd_update(params, grads, bufs, lr, momentum, weight_decay, dampening, nesterov, first_step, work=None):
    """torch.optim.SGD's step, in place on flat 1-D device arrays (or sequences of them).

        g   = grad + weight_decay * p
        buf = g  if first_step  else  momentum * buf + (1 - dampening) * g   (momentum != 0)
        d   = g + momentum * buf  if nesterov  else  buf                      (d = g if momentum == 0)
        p  -= lr * d

    params, grads, bufs: (n,) each; bufs is updated in place and may be None when momentum == 0.
    grads are left unchanged. work: not needed here (one kernel per array, no intermediates).
    """
    if isinstance(params, (list, tuple)):
        bufs = [None] * len(params) if bufs is None else bufs
        for p, g, b in zip(params, grads, bufs):
            sgd_update(p, g, b, lr, momentum, weight_decay, dampening, nesterov, first_step)
        return
    if momentum and bufs is None:
        raise ValueError("sgd_update: momentum != 0 needs momentum buffers (bufs)")
    n = params.size
    dtype = params.dtype
    blocks, tpb = _grid_1d(n)
    _sgd_kernel[blocks, tpb](params, grads, params if bufs is None else bufs, n,
                             _scalar(lr, dtype), _scalar(momentum, dtype),
                             _scalar(weight_decay, dtype), _scalar(1 - dampening, dtype),
                             int(bool(nesterov)), int(bool(first_step)))


def sum_of_squares(x, out=None):
    """out[0] = sum(x**2) over all elements of x (any shape, contiguous) -> (1,) device array.

    Two fixed-order tree-reduction stages: deterministic for a given size and launch config.
    """
    out = _output(out, (1,), x.dtype, "out")
    return _reduce_sum(x.reshape(x.size), out, 1, 1)


# --------------------------------------------------------------------------- public: trace reductions
# The per-step trace's numbers, reduced on the device; only these scalars are copied to the host.
_CONSTANTS = {}


def _constant(a):
    """A device copy of a small constant host array (e.g. segment bounds), uploaded once."""
    a = np.ascontiguousarray(a)
    key = (a.dtype.str, a.shape, a.tobytes())
    if key not in _CONSTANTS:
        _CONSTANTS[key] = cuda.to_device(a)
    return _CONSTANTS[key]


def segment_dots(pairs, bounds):
    """[(a, b), ...] flat device arrays, bounds: (S+1,) segment edges -> (len(pairs), S) float64
    host array of per-segment dot products (see ref.segment_dots). One block per segment."""
    S = len(bounds) - 1
    out = _workspace("segment_dots", (len(pairs), S), np.float64)
    d_bounds = _constant(np.asarray(bounds, dtype=np.int64))
    tpb = RED_TPB
    _check_power_of_two(tpb)
    for i, (a, b) in enumerate(pairs):
        _segment_dot_kernel[S, tpb, 0, _red_smem(tpb, np.float64)](
            out, a.reshape(a.size), b.reshape(b.size), d_bounds, i)
    return out.copy_to_host()


def dead_fraction(relu_out):
    """Share of units zero for every sample of the batch (see ref.dead_fraction).
    relu_out: (N, ...) device array -> float"""
    N = relu_out.shape[0]
    U = relu_out.size // N
    alive = _workspace("alive", (U,), np.float64)
    blocks, tpb = _grid_1d(U)
    _alive_kernel[blocks, tpb](alive, relu_out.reshape(relu_out.size), N, U)
    total = _reduce_sum(alive, _workspace("alive_total", (1,), np.float64), 0, 1)
    return float(1.0 - total.copy_to_host()[0] / U)


def logit_stats(logits, probs, y):
    """max |logit|, mean entropy, top-class share, batch accuracy (see ref.logit_stats).
    logits, probs: (N, L), y: (N,) device arrays -> dict of floats"""
    N, L = logits.shape
    rows = _workspace("logit_rows", (N, 2), np.float64)
    pred = _workspace("logit_pred", (N,), np.int32)
    blocks, tpb = _grid_1d(N)
    _logit_rows_kernel[blocks, tpb](rows, pred, logits, probs, N, L)
    out = _workspace("logit_stats", (4,), np.float64)
    _logit_finish_kernel[1, 1](out, _workspace("logit_counts", (L,), np.int32), rows, pred, y, N, L)
    v = out.copy_to_host()
    return {"logit_max": float(v[0]), "entropy": float(v[1]), "top_class_share": float(v[2]),
            "batch_acc": float(v[3])}


# --------------------------------------------------------------------------- public: arrays
# The same helpers as ref.py's, for device arrays (Network and SGD use only these).
def empty(shape, dtype):
    return cuda.device_array(shape, dtype=dtype)


def zeros(shape, dtype):
    return cuda.to_device(np.zeros(shape, dtype))


def to_device(a, out=None):
    """A host array as a device array (copied into ``out`` when given); device arrays pass through."""
    if on_device(a):
        return a
    a = np.ascontiguousarray(a)
    if out is None:
        return cuda.to_device(a)
    out.copy_to_device(a)
    return out


def host_copy(a):
    """A NumPy copy of a device (or host) array."""
    return a.copy_to_host() if on_device(a) else np.array(a, copy=True)


def copy_into(dst, src):
    """dst[...] = src: device to device, or host to device (cast to dst's dtype)."""
    dst.copy_to_device(src if on_device(src) else np.ascontiguousarray(src, dtype=dst.dtype))


def subtract(out, a, b):
    """out = a - b (same-shape contiguous device arrays)."""
    n = out.size
    blocks, tpb = _grid_1d(n)
    _subtract_kernel[blocks, tpb](out.reshape(n), a.reshape(n), b.reshape(n), n)


def item(v):
    """The loss (a 1-element device array) as a Python float (a synchronisation)."""
    return float(v.copy_to_host()[0]) if on_device(v) else float(v)
