"""Numba CPU kernels: the same ops, names and argument order as ``ref.py``, plus optional outputs.

Every public function is a thin Python wrapper: it checks shapes, allocates any output that was
not passed in (C-contiguous, dtype of the first input; other inputs are cast to it) and calls
``@njit`` kernels ``_<name>_<part>(outputs..., inputs..., sizes...[, s, T])``, the parallel ones
as T slots on minicnn's thread team (_Team). Passing preallocated outputs
(``out=``, ``dx=``, ``dw=``, ...) and, for conv2d, a ``work=`` workspace (``conv2d_workspace``) lets
the training loop run without allocating anything per step.

Dimension glossary (the same as ref.py):
    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

Where the time goes (benchmarks/NOTES.md): almost all FLOPs are in the three conv matrix products
(forward, dW, dX), which the conv kernels hand to BLAS (sgemm/dgemm called from inside Numba) one
cache-sized block of images at a time, between the unfold (im2col), the epilogue (bias, ReLU) and
the fold (col2im) of the same block. Small work runs on one thread, since handing a slot to
another thread costs more than a small kernel.

Kernel rules:
- ``cache=True`` everywhere, so sizes are arguments (module globals would be frozen into the cache).
- Determinism: every output element is written by exactly one loop iteration, which sums its
  terms in a fixed serial order, whichever thread slot runs it. BLAS products run on blocks fixed
  by the shapes (not the thread count), and partial sums over blocks are added in a fixed order.
  Results are therefore bit-identical between runs and do not depend on the number of threads.
  ``fastmath`` stays off (no reassociation).
- Reductions that would be a serial chain of dependent adds keep one partial sum per lane,
  which vectorises without reassociation; the lanes are added up in a fixed order at the end.
- Inner loops index 1-D views with the bare loop variable (``acc[q] += a[q]`` on slices).
  Numba wraps negative indices, so an index like ``xs[q + s0]`` costs a select per element and
  stops LLVM from vectorising: measured 10x slower.
"""
import atexit
import functools
import operator
import os
import platform
import subprocess
import sys
import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import ConfigError
from . import cores
from . import ref as _ref
from .blas import OneThreadBlas, openblas_paths

# Array helpers and two trace reductions: NumPy does them well on the host.
from .ref import (  # noqa: F401
    conv_out_size,
    copy_into,
    dead_fraction,
    empty,
    host_copy,
    item,
    logit_stats,
    subtract,
    to_device,
    zeros,
)

# Threading layer: minicnn's kernels run on its own thread team (_Team below), but the thread count
# is Numba's (numba.set_num_threads, what `minicnn train --threads` sets), and setting it launches
# Numba's threading layer. Numba's default here is OpenMP, whose worker threads spin after each
# parallel loop and stole the cores from everything that followed (measured in earlier versions
# with prange kernels: B at batch 32, 30-34 ms a step on OpenMP against 21-26 on workqueue). So
# the workqueue layer, which sleeps, unless the user has chosen one; it takes effect only if no
# parallel Numba code has run yet in this process and numba.set_num_threads has not been called:
# import this module before either (minicnn.train.set_threads does).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Fusions this backend offers the Network: conv2d_forward(relu=True) and
# maxpool2d_backward(relu_pooled=...) (a ReLU's forward into the conv before it, its backward into
# the max-pool after it: one pass over the activations less each way); and conv2d_forward(pool=...)
# / conv2d_backward(pool=...) (a max-pool after the conv, pooled from each block's output while it
# is in cache, its backward scattered straight into each block's rows: no pass over the conv's
# output either way, and no conv-output-sized gradient array).
FUSES_RELU = True
FUSES_POOL = True
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


# --------------------------------------------------------------------------- helpers
def _input(a, dtype=None):
    """A C-contiguous view (a copy only if needed) of an input array, optionally cast to dtype."""
    if type(a) is np.ndarray and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
        return a                            # the common case, without ascontiguousarray's ~0.5 us
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


# --------------------------------------------------------------------------- the thread team
# Every kernel is a serial @njit(nogil=True) function of a "slot" s of T: kernel(..., s, T) does
# its share of the work, and T calls with s = 0..T-1 do all of it: a share fixed by (s, T) and
# the shapes (the pool and ReLU kernels), or units claimed from a shared counter until none are
# left (the convolutions: a slot that waits for a time slice then holds nobody back). _Team runs
# them: slot 0 on the calling thread, slots 1..T-1 on worker threads kept between calls, which
# wait on a lock (a nogil kernel runs without the GIL, so the slots run at once). No Numba prange:
# measured under load (~4.5 on 2 cores), handing one slot to a worker and joining costs 7 us
# (median; 4 us min) against 24 us (14 us min) for a Numba prange launch on the workqueue layer,
# and with no parallel (parfor) kernels to compile the cold-cache start is shorter
# (benchmarks/NOTES.md, session 5). Determinism: which thread runs a slot or a unit changes
# nothing; the results never depend on T (no sum crosses units, or fixed partials are summed in a
# fixed order; see each kernel).
#
# Hand-offs on a VM: a worker asleep on a lock is woken through the hypervisor (an idle vCPU halts):
# an empty 2-slot call took 23 us back to back and 46 us after 0.2 ms idle (2026-12-01), and
# joining a worker that finished first cost 40 us of a B batch-1 conv call. So after each job a
# worker first waits _SPIN_US in a nogil Numba loop for the next one (as OpenMP's threads and
# PyTorch's do) before sleeping on its lock, and the caller waits for the worker the same way.
# Python calls still need the GIL: a worker that sees a job of a shared counter waits, still
# spinning, until the caller has claimed its first unit (it is inside its nogil kernel, the GIL is
# free), and marks a job done only once it is back in the nogil loop. Measured (benchmarks/NOTES.md,
# session 7): the join 29-43 -> 8-18 us a conv call at B batch 1; steps against the sleeping team,
# alternating in one process: B b1 0.88-1.02 (0.92-0.96 in a prototype), B b8 0.97, A b8 0.97, B b32
# 0.99. Cold start: +0.2 s (two small kernels). MINICNN_SPIN_US=0 turns the waiting off (a machine
# shared with other work).
#
# Small work runs on one slot: a hand-off costs 4-10 us, a serial call 0.4 us.
# _PARALLEL_MIN: elements touched by a call below which it stays on one thread (about 50-100 us of
# serial copying).
_PARALLEL_MIN = 1 << 17
_SPIN_US = 1000.0    # > the gaps between a step's parallel calls: at B b1 and b8 and A b8 steps took 0.96-0.98
                     # of 300 us's, and 3000 us's 0.99-1.01 of 1000's (alternating, session 7)


def spin_microseconds():
    """How long the team's threads wait spinning: MINICNN_SPIN_US if set, else _SPIN_US; a one-line
    ConfigError for anything but a finite number >= 0."""
    raw = os.environ.get("MINICNN_SPIN_US")
    if raw is None or raw == "":
        return _SPIN_US
    try:
        us = float(raw)
    except ValueError:
        us = float("nan")
    if not (0 <= us < float("inf")):
        raise ConfigError(f"MINICNN_SPIN_US must be a number of microseconds >= 0 (0: no spinning), got {raw!r}")
    return us


@functools.cache
def _spin_iterations():
    """Iterations of the spin loops in spin_microseconds() (their speed measured once, ~1 ms)."""
    us = spin_microseconds()
    ctl = np.zeros(4, np.int64)
    _await_done(ctl, 1, 16)                     # compiled (cache) outside the measurement
    n, t = 20000, time.perf_counter()
    _await_done(ctl, 1, n)
    return int(us * n / max(1e-9, (time.perf_counter() - t) * 1e6))


class _Worker:
    """A thread that runs one slot at a time. ``go`` is released (at most once outstanding) when a
    job is posted, ``done`` when a job it took has finished; ``state`` guards job/go_released, so
    the caller can take back a job the worker has not picked up yet (see _Team.run). ``ctl``:
    [jobs posted, jobs done (written in the nogil loop), address of the shared counter or 0]."""

    def __init__(self):
        self.go = threading.Lock()
        self.go.acquire()
        self.done = threading.Lock()
        self.done.acquire()
        self.state = threading.Lock()
        self.job = None
        self.go_released = False
        self.error = None
        self.ctl = np.zeros(4, np.int64)
        self.posted = 0
        self.spin = _spin_iterations()
        threading.Thread(target=self._loop, daemon=True, name="minicnn-worker").start()

    def post(self, job, address=0):
        with self.state:
            self.job = job
            release, self.go_released = not self.go_released, True
        self.posted += 1
        self.ctl[2] = address                      # stored before ctl[0] (x86 keeps the order)
        self.ctl[0] = self.posted                  # seen by a spinning worker
        if release:
            self.go.release()

    def withdraw(self):
        """Take back the posted job if the worker has not taken it: True if withdrawn."""
        with self.state:
            if self.job is None:
                return False
            self.job = None
            return True

    def wait(self):
        """Until the job posted last is done (and the worker has let go of the GIL)."""
        _await_done(self.ctl, self.posted, self.spin)
        self.done.acquire()

    def _loop(self):
        seen = 0
        while True:
            _park(self.ctl, seen, self.spin)       # nogil: job `seen` done; wait a while for the next
            self.go.acquire()
            with self.state:
                self.go_released = False
                job, self.job = self.job, None
                seen = int(self.ctl[0])
            if job is None:                 # withdrawn before this thread got to it
                continue
            kernel, args, s, T = job
            try:
                kernel(*args, s, T)
            except BaseException as e:      # re-raised on the calling thread
                self.error = e
            self.done.release()


class _Team:
    """Runs kernel(*args, s, T) for s = 0..T-1 on T threads (see above). With ``shared``, the
    kernel's slots take their units of work from a shared counter (_claim), so a slot that never
    starts loses nothing: the caller, after its own slot, withdraws the jobs no worker has taken
    yet instead of waiting for a thread that is waiting for a time slice (a loaded machine).
    ``counter``: that counter (an int64 array at 0), when the workers may watch it (see above)."""

    def __init__(self):
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)     # a forked child has none of the threads

    def _reset(self):
        self.workers = []
        self.lock = threading.Lock()
        self.addresses = {}

    def _address(self, counter):
        """The counter's address. numpy's ``.ctypes.data`` costs ~1.5 us a call (3 or 4 a step at
        batch 1, more inside a step), so the last few are kept, with their arrays: no other array
        can come to have their id while kept."""
        kept = self.addresses.get(id(counter))
        if kept is None or kept[0] is not counter:
            if len(self.addresses) >= 8:
                self.addresses.pop(next(iter(self.addresses)))
            kept = self.addresses[id(counter)] = (counter, counter.ctypes.data)
        return kept[1]

    def run(self, kernel, args, T, shared=False, counter=None):
        if T <= 1:
            kernel(*args, 0, 1)
            return
        with self.lock:                     # one team call at a time, whichever thread calls
            while len(self.workers) < T - 1:
                self.workers.append(_Worker())
            address = self._address(counter) if shared and counter is not None and _X86 else 0
            for s in range(1, T):
                self.workers[s - 1].post((kernel, args, s, T), address)
            error = None
            try:
                kernel(*args, 0, T)
            except BaseException as e:
                error = e
            for w in self.workers[:T - 1]:
                if shared and w.withdraw():
                    continue
                w.wait()
                if w.error is not None:
                    error, w.error = error or w.error, None
            if error is not None:
                raise error


_team = _Team()
spin_microseconds()                  # a bad MINICNN_SPIN_US fails on import, in one line


def _num_threads():
    """numba.get_num_threads() (the thread count users and `minicnn train --threads` set), without
    its ~1 us of checks on every call: after the first call, Numba's own C getter (0.2 us)."""
    global _num_threads
    n = numba.get_num_threads()             # launches Numba's threading layer once
    try:
        from numba.np.ufunc.parallel import _get_num_threads
        if _get_num_threads() == n:
            _num_threads = _get_num_threads
    except ImportError:                     # another Numba version: keep the public call
        _num_threads = numba.get_num_threads
    return n


def _threads(size):
    """Threads for a kernel touching ``size`` elements: Numba's thread count, or 1 for small work."""
    return _num_threads() if size >= _PARALLEL_MIN else 1


@njit(cache=True, inline="always")
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



# --------------------------------------------------------------------------- BLAS
# Matrix products run on one-thread BLAS: OpenBLAS's own threads synchronise with busy waits, and
# on a 2-core machine shared with other processes one product then waits for the other thread's
# time slice (measured: a 32x145x28672 product took 3-24 ms with 2 OpenBLAS threads against 5 ms
# split over 2 threads with OpenBLAS at 1 thread). The parallelism is minicnn's own: the
# convolutions call sgemm/dgemm from inside Numba's parallel loops (SciPy's BLAS, through its
# Cython function pointers: _gemm below), one call per image block; the dense layer calls numpy's
# matmul from Python. Either way BLAS runs at one thread while minicnn's kernels run.


_one_thread_blas = OneThreadBlas()     # the libraries SciPy brought (set by _register_blas)


# SciPy exports its BLAS as Cython function pointers (scipy.linalg.cython_blas, the Fortran
# interface: every argument by pointer). Their addresses are registered with LLVM under fixed
# names, and _xgemm declares and calls them by name: the compiled kernels hold the name, not an
# address, so Numba's on-disk cache stays valid in the next process (which registers again).
_GEMM_SYMBOLS = {"float32": "minicnn_sgemm", "float64": "minicnn_dgemm"}


def _load_cython_blas():
    """Load scipy.linalg.cython_blas without running scipy.linalg's __init__ (~0.15 s of imports
    of the rest of scipy.linalg, which minicnn does not use; the extension itself loads in ~25 ms
    and registers itself under its name, so a later import of it finds the same module). Falls
    back to the ordinary import."""
    import importlib.machinery
    import importlib.util
    import sys
    name = "scipy.linalg.cython_blas"
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("scipy")
        folder = os.path.join(os.path.dirname(spec.origin), "linalg")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "cython_blas" + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader(name, path)
                spec = importlib.util.spec_from_file_location(name, path, loader=loader)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                loader.exec_module(module)
                return
    except Exception:                       # any surprise: the ordinary import below
        sys.modules.pop(name, None)
    importlib.import_module(name)


def _register_blas():
    import llvmlite.binding as llvm
    from numba.extending import get_cython_function_address
    before = set(openblas_paths())
    _load_cython_blas()
    for dt, sym in _GEMM_SYMBOLS.items():
        name = {"float32": "sgemm", "float64": "dgemm"}[dt]
        llvm.add_symbol(sym, get_cython_function_address("scipy.linalg.cython_blas", name))
    # SciPy's own OpenBLAS (wheels bundle one beside numpy's); none new: they share one library
    _one_thread_blas.paths = sorted(set(openblas_paths()) - before) or None


_register_blas()


@intrinsic
def _xgemm(typingctx, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Fortran (column-major) ?gemm: c = alpha * op(a) @ op(b) + beta * c, a, b, c arrays of one
    float dtype (pointers to their first element), transa/transb the characters' codes."""
    if not all(isinstance(t, types.Array) for t in (a, b, c)):
        return None
    dt = c.dtype
    if a.dtype != dt or b.dtype != dt or str(dt) not in _GEMM_SYMBOLS:
        return None
    sig = types.void(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        fl = context.get_value_type(dt)
        i8, i32 = ir.IntType(8), ir.IntType(32)
        fp, ip, cp = fl.as_pointer(), i32.as_pointer(), i8.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [cp, cp, ip, ip, ip, fp, fp, ip, fp, ip, fp, fp, ip])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _GEMM_SYMBOLS[str(dt)])
        tys = sig.args

        def ref(i, to):          # a scalar argument stored on the stack, by pointer
            return cgutils.alloca_once_value(builder, context.cast(builder, args[i], tys[i], to))

        def data(i):
            return context.make_array(tys[i])(context, builder, args[i]).data

        builder.call(fn, [ref(0, types.int8), ref(1, types.int8), ref(2, types.int32), ref(3, types.int32),
                          ref(4, types.int32), ref(5, dt), data(6), ref(7, types.int32), data(8),
                          ref(9, types.int32), ref(10, dt), data(11), ref(12, types.int32)])
        return context.get_dummy_value()
    return sig, codegen


def _is_int64_array(t):
    return isinstance(t, types.Array) and t.dtype == types.int64


def _element_ptr(context, builder, sig, args):
    """In an intrinsic's codegen: the address of args[0][args[1]] (an int64 array, an index)."""
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    return builder.gep(ary.data, [context.cast(builder, args[1], sig.args[1], types.intp)])


@intrinsic
def _fetch_add(typingctx, counter, delta):
    """counter: an int64 array; atomically counter[0] += delta, returning the old value."""
    if not _is_int64_array(counter):
        return None
    sig = types.int64(counter, delta)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, context.cast(builder, args[1], sig.args[1], types.int64),
                                  "seq_cst")
    return sig, codegen


@njit(cache=True, inline="always")
def _claim(counter):
    # counter: (1,) int64 shared by a team call's slots: the next unit of work, taken by one slot
    return _fetch_add(counter, 1)


@intrinsic
def _load_acquire(typingctx, ctl, i):
    """ctl: an int64 array; ctl[i] read with acquire ordering (never hoisted out of a loop)."""
    if not _is_int64_array(ctl):
        return None
    sig = types.int64(ctl, i)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_element_ptr(context, builder, sig, args), "acquire", 8)
    return sig, codegen


@intrinsic
def _load_acquire_at(typingctx, address):
    """The int64 at a memory address (an array's ctypes.data), read with acquire ordering."""
    sig = types.int64(address)

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(context.cast(builder, args[0], sig.args[0], types.int64), ir.IntType(64).as_pointer())
        return builder.load_atomic(ptr, "acquire", 8)
    return sig, codegen


@intrinsic
def _store_release(typingctx, ctl, i, value):
    """ctl[i] = value with release ordering (ctl: an int64 array)."""
    if not _is_int64_array(ctl):
        return None
    sig = types.void(ctl, i, value)

    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _element_ptr(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The x86 spin-wait hint (nothing on other machines)."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        if _X86:
            name = "llvm.x86.sse2.pause"
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                                 name=name)
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@njit(cache=True, nogil=True)
def _park(ctl, seen, iterations):
    # A worker between jobs, without the GIL: job `seen` is done (ctl[1]); wait up to `iterations`
    # for a new one (ctl[0] > seen), and when its slots share a counter (address ctl[2]) until the
    # caller has claimed a unit from it. ctl: (4,) int64 (_Worker).
    _store_release(ctl, 1, seen)
    for _ in range(iterations):
        if _load_acquire(ctl, 0) > seen:
            break
        _pause()
    else:
        return
    address = _load_acquire(ctl, 2)
    if address != 0:
        for _ in range(iterations):
            if _load_acquire_at(address) > 0:
                return
            _pause()


@njit(cache=True, nogil=True)
def _await_done(ctl, posted, iterations):
    # The caller, without the GIL: wait up to `iterations` until job `posted` is done (ctl[1]).
    for _ in range(iterations):
        if _load_acquire(ctl, 1) >= posted:
            return True
        _pause()
    return False


@njit(cache=True, inline="always")
def _gemm(c, a, b, M, N, K, ldc, lda, ldb, TA, TB, beta):
    # Row-major c (M, N) = op(a) @ op(b) + beta * c; a: (M, K), or (K, M) when TA; b: (K, N), or
    # (N, K) when TB; ld*: row strides. As column-major that is c.T = op(b).T @ op(a).T.
    _xgemm(84 if TB else 78, 84 if TA else 78, N, M, K, 1.0, b, ldb, a, lda, beta, c, ldc)


# --------------------------------------------------------------------------- conv2d
# Convolution as matrix products, one block of images at a time (cache-blocked im2col):
#
#   cols: (CKK + 1, nb*OH*WR)  the block's unfolded input: row r = (c*K + u)*K + v holds
#                              xpad[n, c, i*S+u, j*S+v] at column nl*OH*WR + i*WR + j (nl: image in
#                              the block); the last row is all ones (the backward's db)
#   w2:   (F, CKK)             w reshaped
#
#   forward   prod (F, nb*OH*WR)  = w2 @ cols[:CKK]       then out = relu(prod + b) into (N, F, OH, OW)
#   dW, db    dwp (F, CKK + 1)   += gt @ cols.T            gt (F, nb*OH*WR): the block's dout
#   dX        dcols (CKK, nb*OH*WR) = w2.T @ gt            then col2im into the block's images
#
# Stride 1 uses "wide" rows (WR = W + 2P): every (c, u, v) row of an image is one contiguous run
# of its zero-padded plane, so the unfold is K*K long copies per channel and the col2im K*K long
# adds; the WR - OW extra columns per row are computed and dropped (gt is zero there, so they add
# nothing to dW and dX). Other strides gather (WR = OW).
#
# Each block's buffers fit in L2 (blocks of _BLOCK_BYTES of cols), so the unfold, the product and
# the epilogue pass over cache-resident data, and nothing of the batch's size is allocated: no
# full-size cols kept from forward to backward, no full-size dcols. The blocks are shared out on
# the thread team (each slot claims the next block), each block calling one-thread BLAS from
# inside the kernel through _gemm: no Python between the steps.
#
# Determinism: each output element of the forward and of dX is computed inside one block by one
# BLAS call, whose summation order is fixed by the shapes (the block's size is fixed by the layer
# and batch shapes, never by the thread count). dW sums over all blocks: the blocks are grouped into
# G fixed chunks, each chunk's partial sum accumulated block by block in order (BLAS beta = 1),
# and the G partials added in chunk order at the end. So results are bit-identical for any thread
# count.
_BLOCK_BYTES = 1 << 15            # bytes of unfolded input per block (cols): one image per block for
                                  # any image of 32 KB of cols or more (fastest measured, NOTES session 5)
_MIN_BLOCKS = 4                   # split even a small batch into up to this many blocks (threads)
_DW_CHUNKS = 16                   # dW partial sums, added in order at the end (parallelism of backward)
_CONV_PARALLEL_MIN_MACS = 1 << 20  # multiply-adds of a pass below which it runs serially (~20 us
                                   # on one thread; a parallel launch costs 5-10 us idle)
# A batch of one image is one block: it is split instead into _PARTS fixed parts, when the image's
# forward product has at least _PARTS_MIN_MACS multiply-adds (below that a second thread saves
# less than the hand-off): part p unfolds and computes the output rows [p*OH/_PARTS, (p+1)*OH/_PARTS)
# in the forward. Splitting the filters instead made each part pack the whole unfolded input for
# BLAS: half the product took 60-85 us of the whole one's 92 (B's conv2, one thread). The backward
# of one image is split by product instead of by rows: unit 0 computes dW (all rows, one product)
# and unit 1 dX (all channels: its own copy of the output gradient, the product, the col2im), two
# products of full size at once. Splitting both by rows ran each half-size product at 60-70% of
# the whole one's speed (B's conv2 backward, one thread: a part 100-108 us, both 200, the unsplit
# pass 128). Without dX (a first layer) the filters are split instead, from _FILTER_PARTS_MIN_MACS
# dW multiply-adds: unit u unfolds the whole image (cheap for the few channels of a first layer)
# and computes the max-pool's backward and the dW rows of its group of filters, rows no other unit
# writes. Split by rows, each part had to route the pool's gradient of every row: the two parts
# together took 1.54-1.66x the serial pass (B's conv1, session 8).
_PARTS = 2
_PARTS_MIN_MACS = 1 << 21
_FILTER_PARTS_MIN_MACS = 1 << 19


def _conv_plan(N, C, H, W, F, K, S, P, itemsize):
    """(WR, NB, NC, nblocks, G, PARTS): row width, images per block, columns per block, blocks, dW
    chunks, parts per block. A function of the shapes only, so results do not depend on the thread
    count."""
    OH, OW = conv_out_size(H, K, S, P), conv_out_size(W, K, S, P)
    WR = W + 2 * P if S == 1 else OW
    per_image = (C * K * K + 1) * OH * WR * itemsize
    NB = max(1, min(_BLOCK_BYTES // per_image, -(-N // _MIN_BLOCKS)))
    nblocks = -(-N // NB)
    parts = _PARTS if N == 1 and OH >= _PARTS and F * C * K * K * OH * WR >= _PARTS_MIN_MACS else 1
    return WR, NB, NB * OH * WR, nblocks, (_PARTS if parts > 1 else min(nblocks, _DW_CHUNKS)), parts


def conv2d_workspace(x_shape, w_shape, stride, pad, dtype):
    """Scratch buffers for conv2d_forward/backward on inputs of x_shape (reuse across calls).

    x_shape: (N, C, H, W), w_shape: (F, C, K, K) -> dict of arrays, one slot per Numba thread
    (T = numba.config.NUMBA_NUM_THREADS; only the slots of threads that run touch memory), each
    sized for one block of images (NC = images per block * OH * WR columns):
      cols (T, CKK+1, NC), prod (T, max(F, CKK), NC), gt (T, F, NC), xp (T, (H+2P)*(W+2P) + K)
      padded plane, dwp (G, F, CKK+1) dW partial sums, next (1,) int64 the slots' work counter;
      "plan": the blocking (_conv_plan), "filter parts": the units of a backward without dX (one
      image: groups of filters, see _PARTS), "sizes": the checked sizes. Nothing in it carries data
      between calls: layers may share these buffers (but for "next"). The calls keep their checked
      arguments in it ("call forward", "call backward": _kept_call), so one workspace per layer.
    """
    x_shape, w_shape = tuple(x_shape), tuple(w_shape)
    sizes = _conv_sizes(x_shape, w_shape, w_shape[:1], stride, pad)
    N, C, H, W, F, K, OH, _, stride, pad = sizes
    dtype = np.dtype(dtype)
    WR, NB, NC, nblocks, G, parts = plan = _conv_plan(N, C, H, W, F, K, stride, pad, dtype.itemsize)
    T = max(1, numba.config.NUMBA_NUM_THREADS)
    CKK = C * K * K
    xp_len = (H + 2 * pad) * (W + 2 * pad) + K if stride == 1 else 1
    return {"cols": empty((T, CKK + 1, NC), dtype), "prod": empty((T, max(F, CKK), NC), dtype),
            "gt": empty((T, F, NC), dtype), "xp": empty((T, xp_len), dtype),
            "dwp": empty((G, F, CKK + 1), dtype), "next": np.zeros(1, np.int64), "plan": plan,
            "filter parts": _PARTS if N == 1 and F >= _PARTS and F * CKK * OH * WR >= _FILTER_PARTS_MIN_MACS else 1,
            "key": (x_shape, w_shape, stride, pad), "sizes": sizes}


@njit(cache=True, inline="always")
def _copy_run(dst, src, L):
    # dst, src: (L,)
    for q in range(L):
        dst[q] = src[q]


@njit(cache=True, inline="always")
def _zero_run(dst, L):
    # dst: (L,)
    for q in range(L):
        dst[q] = 0


@njit(cache=True, inline="always")
def _fill_run(dst, value, L):
    # dst: (L,)
    for q in range(L):
        dst[q] = value


@njit(cache=True, inline="always")
def _add_into(acc, a, L):
    # acc, a: (L,);  acc += a elementwise
    for q in range(L):
        acc[q] += a[q]


@njit(cache=True, inline="always")
def _unfold_wide(cols, xp, x, n0, nb, i0, i1, C, H, W, K, P):
    # Stride 1, output rows i0 <= i < i1 of images n0..n0+nb-1. cols: (>= C*K*K, >= nb*(i1-i0)*Wp) a
    # slot's block, xp: (Hp*Wp + K,) plane scratch, x: (N, C, H, W). Image n0 + nl, channel c: xp
    # is its zero-padded plane (plus K zeros of tail), then row (c, u, v) of the image is the run
    # xp[u*Wp + v + i0*Wp : u*Wp + v + i1*Wp] (columns nl*(i1-i0)*Wp + (i-i0)*Wp + j).
    Hp, Wp = H + 2 * P, W + 2 * P
    Mw = (i1 - i0) * Wp
    _zero_run(xp[:P * Wp + P], P * Wp + P)                   # top rows and the first left margin
    for nl in range(nb):
        for c in range(C):
            for h in range(H):
                o = (h + P) * Wp + P
                _copy_run(xp[o:o + W], x[n0 + nl, c, h], W)
                _zero_run(xp[o + W:o + W + 2 * P], 2 * P)    # right margin and the next left one
            o = (H + P) * Wp + P
            _zero_run(xp[o - P:], Hp * Wp + K - (o - P))     # bottom rows and the tail
            for u in range(K):
                for v in range(K):
                    s0 = (u + i0) * Wp + v
                    _copy_run(cols[(c * K + u) * K + v, nl * Mw:(nl + 1) * Mw], xp[s0:s0 + Mw], Mw)


@njit(cache=True, inline="always")
def _unfold_strided(cols, x, n0, nb, i0, i1, C, H, W, K, S, P, OH, OW):
    # Any stride, output rows i0 <= i < i1. cols: (>= C*K*K, >= nb*(i1-i0)*OW) a slot's block,
    # x: (N, C, H, W); cols[(c*K+u)*K+v, nl*(i1-i0)*OW + (i-i0)*OW + j] = x[n0+nl, c, i*S+u-P, j*S+v-P]
    # (0 outside).
    M = (i1 - i0) * OW
    for nl in range(nb):
        n = n0 + nl
        for c in range(C):
            for u in range(K):
                i_lo, i_hi = _valid_range(u, S, P, H, OH)
                for v in range(K):
                    j_lo, j_hi = _valid_range(v, S, P, W, OW)
                    row = cols[(c * K + u) * K + v, nl * M:(nl + 1) * M]
                    for i in range(i0, i1):
                        dst = row[(i - i0) * OW:(i - i0 + 1) * OW]
                        if i < i_lo or i >= i_hi:
                            _zero_run(dst, OW)
                            continue
                        src = x[n, c, i * S + u - P]
                        for j in range(j_lo):
                            dst[j] = 0
                        for j in range(j_lo, j_hi):
                            dst[j] = src[j * S + v - P]
                        for j in range(max(j_hi, j_lo), OW):
                            dst[j] = 0


@njit(cache=True, inline="always")
def _fold_wide(dx, xp, dcols, n0, nb, c0, c1, H, W, K, P, OH):
    # Stride 1, the transpose of _unfold_wide, for channels c0 <= c < c1. dx: (N, C, H, W),
    # xp: (Hp*Wp + K,) plane scratch, dcols: (>= (c1-c0)*K*K, >= nb*OH*Wp) zero in the wide columns,
    # row ((c-c0)*K + u)*K + v. For image n0 + nl, channel c: xp[u*Wp + v + q] += dcols[(c, u, v),
    # nl, q] over taps (u, v) in order, then cropped into dx.
    Hp, Wp = H + 2 * P, W + 2 * P
    Mw = OH * Wp
    L = Hp * Wp + K
    for nl in range(nb):
        for c in range(c0, c1):
            r = (c - c0) * K * K
            _copy_run(xp[:Mw], dcols[r, nl * Mw:(nl + 1) * Mw], Mw)    # tap (0, 0)
            _zero_run(xp[Mw:], L - Mw)
            for u in range(K):
                for v in range(K):
                    if u == 0 and v == 0:
                        continue
                    s0 = u * Wp + v
                    _add_into(xp[s0:s0 + Mw], dcols[r + u * K + v, nl * Mw:(nl + 1) * Mw], Mw)
            for h in range(H):
                o = (h + P) * Wp + P
                _copy_run(dx[n0 + nl, c, h], xp[o:o + W], W)


@njit(cache=True, inline="always")
def _fold_strided(dx, dcols, n0, nb, c0, c1, H, W, K, S, P, OH, OW):
    # Any stride, the transpose of _unfold_strided, for channels c0 <= c < c1: dx: (N, C, H, W),
    # dcols: (>= (c1-c0)*K*K, >= nb*OH*OW), row ((c-c0)*K + u)*K + v.
    # dx[n,c,h,w] = sum over taps (u, v) in order of dcols[(c*K+u)*K+v, nl, i, j] where h = i*S+u-P,
    # w = j*S+v-P (a gather: each dx element summed in one place, in a fixed order).
    M = OH * OW
    for nl in range(nb):
        n = n0 + nl
        for c in range(c0, c1):
            for h in range(H):
                dst = dx[n, c, h]
                _zero_run(dst, W)
                for u in range(K):
                    a = h + P - u                     # = i*S
                    if a < 0 or a % S != 0 or a // S >= OH:
                        continue
                    i = a // S
                    for v in range(K):
                        row = dcols[((c - c0) * K + u) * K + v, nl * M + i * OW:nl * M + (i + 1) * OW]
                        for w in range(W):
                            bb = w + P - v
                            if bb >= 0 and bb % S == 0 and bb // S < OW:
                                dst[w] += row[bb // S]


@njit(cache=True, inline="always")
def _epilogue(out, prod, b, n0, nb, i0, i1, F, OW, WR, RELU):
    # out: (N, F, OH, OW), prod: (>= F, >= nb*(i1-i0)*WR), b: (F,);  output rows i0 <= i < i1:
    # out[n0+nl, f, i, j] = prod[f, nl*(i1-i0)*WR + (i-i0)*WR + j] + b[f], through ReLU when RELU
    # ('v < 0 -> 0', as relu_forward: the ReLU layer fused into this pass)
    for nl in range(nb):
        for f in range(F):
            bf = b[f]
            base = nl * (i1 - i0) * WR - i0 * WR
            for i in range(i0, i1):
                src = prod[f, base + i * WR:base + i * WR + OW]
                dst = out[n0 + nl, f, i]
                if RELU:
                    for j in range(OW):
                        v = src[j] + bf
                        dst[j] = 0 if v < 0 else v
                else:
                    for j in range(OW):
                        dst[j] = src[j] + bf


@njit(cache=True, inline="always")
def _gather_dout(gt, dout, n0, nb, f0, f1, OH, OW, WR):
    # gt: (>= f1, >= nb*OH*WR), dout: (N, F, OH, OW);  gt[f, nl*OH*WR + i*WR + j] = dout[n0+nl, f, i, j],
    # 0 for OW <= j < WR, for filters f0 <= f < f1
    for f in range(f0, f1):
        for nl in range(nb):
            base = nl * OH * WR
            for i in range(OH):
                row = gt[f, base + i * WR:base + (i + 1) * WR]
                _copy_run(row, dout[n0 + nl, f, i], OW)
                _zero_run(row[OW:], WR - OW)


# The slots' work. A forward unit (a block of images, or with PARTS > 1 a part of the one image) is
# (n0, nb, i0, i1): output rows i0 <= i < i1 of images n0..n0+nb-1. A backward unit adds the
# [dW | db] of its rows into its chunk's dwp[g] (the chunk's first unit overwrites it) and computes
# dx of input channels c0 <= c < c1 of its images; a chunk's units run in order on one thread.
# The slots claim forward units, or backward chunks, from a shared counter (_claim): a thread that
# waits for a time slice holds nobody back, and which thread did a unit changes no result (each
# unit's results, and each chunk's sum, are computed the same way by any slot, in the slot's own
# scratch). With PARTS > 1 (N = 1), forward part p has the output rows [b_p, b_(p+1)),
# b_p = p*OH/PARTS rounded down to a multiple of ALIGN (the fused max-pool's stride, so that no
# pooling window straddles two parts); the backward has two units, dW then dX, when it computes dX
# (SPLIT: dwp has one chunk), else (no dX) a group of filters each, dwp[0]'s rows of those filters.
# The kernels come in two copies, wide (stride 1) and strided, so that each compiles only its own
# unfold and fold (a flag argument compiled both: ~2-3 s more of a cold start; Numba's literal
# dispatch re-typed every call, ~40 ms).
@njit(cache=True, inline="always")
def _part_rows(p, OH, PARTS, ALIGN):
    lo = 0 if p == 0 else p * OH // PARTS // ALIGN * ALIGN
    hi = OH if p == PARTS - 1 else (p + 1) * OH // PARTS // ALIGN * ALIGN
    return lo, hi


@njit(cache=True, inline="always")
def _forward_unit(u, N, OH, NB, PARTS, ALIGN):
    # Forward unit u (a block, or with PARTS > 1 a part) -> (n0, nb, i0, i1)
    if PARTS > 1:
        i0, i1 = _part_rows(u, OH, PARTS, ALIGN)
        return 0, 1, i0, i1
    n0 = u * NB
    return n0, min(NB, N - n0), 0, OH


@njit(cache=True, inline="always")
def _chunk_blocks(g, N, NB, PARTS, G):
    # The units of backward chunk g: blocks [lo, hi), summed in order into dwp[g]; with PARTS > 1
    # chunk g is unit g alone (a part, or in SPLIT mode the dW or the dX).
    if PARTS > 1:
        return g, g + 1
    nblocks = -(-N // NB)
    return g * nblocks // G, (g + 1) * nblocks // G


@njit(cache=True, inline="always")
def _backward_unit(u, N, C, F, OH, NB, PARTS, SPLIT):
    # Backward unit u -> (n0, nb, c0, c1, f0, f1, DW): images n0..n0+nb-1 add the dW of filters
    # f0..f1 when DW, and the unit computes the dX of channels c0..c1. SPLIT (one image with dX):
    # unit 0 is the whole dW, unit 1 the whole dX. Else with PARTS > 1 (one image, no dX) unit u
    # is the dW of the u-th of PARTS groups of filters.
    if SPLIT:
        return 0, 1, 0, 0 if u == 0 else C, 0, F, u == 0
    if PARTS > 1:
        return 0, 1, 0, 0, u * F // PARTS, (u + 1) * F // PARTS, True
    n0 = u * NB
    return n0, min(NB, N - n0), 0, C, 0, F, True


@njit(cache=True, inline="always")
def _conv_product(out, pool_out, argmax, cols, prod, w2, b, n0, nb, i0, i1, F, CKK, OH, OW, WR, RELU, POOL, PK, PS,
                  PH, PW):
    # The forward of a block whose cols are unfolded: prod = w2 @ cols, the epilogue (bias, ReLU)
    # into out, and with POOL the max-pool (window PK, stride PS <= ... see conv2d_forward) of the
    # rows just written into pool_out and argmax (PH x PW pooled planes), while they are in cache.
    # out: (N, F, OH, OW), pool_out, argmax: (N, F, PH, PW), cols: (>= CKK, NC), prod: (>= F, NC),
    # w2: (F, CKK), b: (F,)
    NC = cols.shape[1]
    _gemm(prod, w2, cols, F, nb * (i1 - i0) * WR, CKK, NC, CKK, NC, False, False, 0.0)
    _epilogue(out, prod, b, n0, nb, i0, i1, F, OW, WR, RELU)
    if POOL:
        p0 = -(-i0 // PS)
        p1 = PH if i1 == OH else max(p0, min(PH, (i1 - PK) // PS + 1))
        for nl in range(nb):
            for f in range(F):
                _maxpool_rows(pool_out, argmax, out, n0 + nl, f, p0, p1, OW, PK, PS, PW)


@njit(cache=True, nogil=True)
def _conv_forward_wide(out, pool_out, argmax, cols, prod, xp, nxt, x, w2, b, N, C, H, W, F, K, P, OH, OW, WR, NB,
                       PARTS, RELU, POOL, PK, PS, PH, PW, s, T):
    # Stride 1. out: (N, F, OH, OW), pool_out, argmax: (N, F, PH, PW) (with POOL), cols: (>T, CKK+1,
    # NC), prod: (>T, >= F, NC), xp: (>T, Hp*Wp+K) scratch, x: (N, C, H, W), w2: (F, CKK), b: (F,).
    # Slot s of T (see the slots' work above).
    U = PARTS if PARTS > 1 else -(-N // NB)
    u = _claim(nxt)
    while u < U:
        n0, nb, i0, i1 = _forward_unit(u, N, OH, NB, PARTS, PS if POOL else 1)
        _unfold_wide(cols[s], xp[s], x, n0, nb, i0, i1, C, H, W, K, P)
        _conv_product(out, pool_out, argmax, cols[s], prod[s], w2, b, n0, nb, i0, i1, F, C * K * K, OH, OW, WR, RELU,
                      POOL, PK, PS, PH, PW)
        u = _claim(nxt)


@njit(cache=True, nogil=True)
def _conv_forward_strided(out, pool_out, argmax, cols, prod, nxt, x, w2, b, N, C, H, W, F, K, S, P, OH, OW, NB,
                          PARTS, RELU, POOL, PK, PS, PH, PW, s, T):
    # Any stride; as _conv_forward_wide without the plane scratch (WR = OW).
    U = PARTS if PARTS > 1 else -(-N // NB)
    u = _claim(nxt)
    while u < U:
        n0, nb, i0, i1 = _forward_unit(u, N, OH, NB, PARTS, PS if POOL else 1)
        _unfold_strided(cols[s], x, n0, nb, i0, i1, C, H, W, K, S, P, OH, OW)
        _conv_product(out, pool_out, argmax, cols[s], prod[s], w2, b, n0, nb, i0, i1, F, C * K * K, OH, OW, OW, RELU,
                      POOL, PK, PS, PH, PW)
        u = _claim(nxt)


@njit(cache=True, inline="always")
def _unpool_rows(gt, dpool, argmax, pooled, n0, nb, f0, f1, OH, OW, WR, PK, PS, PH, PW, MASK):
    # The max-pool's backward straight into the block's rows of filters f0..f1: gt: (>= f1, >= nb*OH*WR) zeroed, then
    # gt[f, nl*OH*WR + h*WR + w] += dpool[n, f, i, j] (times pooled > 0 when MASK: the ReLU before
    # the pool) at the winner (h, w) of window (i, j), windows in row-major order, as
    # maxpool2d_backward. dpool, argmax, pooled: (N, F, PH, PW); argmax: flat index h*OW + w.
    for f in range(f0, f1):
        for nl in range(nb):
            n = n0 + nl
            base = nl * OH * WR
            _zero_run(gt[f, base:base + OH * WR], OH * WR)
            for i in range(PH):
                drow = dpool[n, f, i]
                arow = argmax[n, f, i]
                prow = pooled[n, f, i]
                for j in range(PW):
                    g = drow[j]
                    if MASK:
                        g = g * (prow[j] > 0)
                    k = arow[j] - (i * PS * OW + j * PS)        # within the window: dh*OW + dw
                    dh = 0
                    for _ in range(PK - 1):                     # selects: the winner's row is data
                        t = k >= OW
                        dh = dh + 1 if t else dh
                        k = k - OW if t else k
                    gt[f, base + (i * PS + dh) * WR + j * PS + k] += g


@njit(cache=True, inline="always")
def _conv_grad_products(dwp, cols, prod, gt, dout, argmax, pooled, w2, n0, nb, c0, c1, f0, f1, F, CKK, KK, OH, OW,
                        WR, BETA, DW, NEED_DX, POOL, MASK, PK, PS, PH, PW):
    # The backward of a block whose cols are unfolded: gt = the block's output gradient of filters
    # f0..f1 (dout's, or with POOL the max-pool's backward of dout), when DW dwp[f0:f1] =
    # BETA * dwp[f0:f1] + gt[f0:f1] @ cols.T (the ones row gives db), and when NEED_DX (all filters)
    # prod[:(c1-c0)*KK] = w2[:, channels c0..c1].T @ gt.
    # cols: (CKK+1, NC), prod: (>= CKK, NC), gt: (F, NC), dwp: (F, CKK+1), dout: (N, F, OH, OW) or
    # with POOL (N, F, PH, PW) as argmax and pooled, w2: (F, CKK)
    NC = cols.shape[1]
    M = nb * OH * WR
    if POOL:
        _unpool_rows(gt, dout, argmax, pooled, n0, nb, f0, f1, OH, OW, WR, PK, PS, PH, PW, MASK)
    else:
        _gather_dout(gt, dout, n0, nb, f0, f1, OH, OW, WR)
    if DW:
        _fill_run(cols[CKK], 1, M)
        _gemm(dwp[f0:], gt[f0:], cols, f1 - f0, CKK + 1, M, CKK + 1, NC, NC, False, True, BETA)
    if NEED_DX and c1 > c0:
        _gemm(prod, w2.reshape(F * CKK)[c0 * KK:], gt, (c1 - c0) * KK, M, F, NC, CKK, NC, True, False, 0.0)


@njit(cache=True, nogil=True)
def _conv_backward_wide(dx, dwp, cols, prod, gt, xp, nxt, dout, argmax, pooled, x, w2, N, C, H, W, F, K, P, OH, OW,
                        WR, NB, PARTS, NEED_DX, POOL, MASK, PK, PS, PH, PW, s, T):
    # Stride 1. dx: (N, C, H, W), dwp: (G, F, CKK+1) partial [dW | db] sums, cols: (>T, CKK+1, NC),
    # prod: (>T, >= CKK, NC), gt: (>T, F, NC), xp: (>T, Hp*Wp+K) scratch, dout: (N, F, OH, OW), or
    # with POOL the pooled output's gradient (N, F, PH, PW) as argmax and pooled, x: (N, C, H, W),
    # w2: (F, CKK).  Slot s of T (see the slots' work above); chunk g's units are summed in order
    # into dwp[g]; with PARTS > 1 (one image) the units are summed into dwp[0] (G = 1).
    G = dwp.shape[0]
    SPLIT = PARTS > 1 and NEED_DX
    g = _claim(nxt)
    while g < (PARTS if PARTS > 1 else G):
        lo, hi = _chunk_blocks(g, N, NB, PARTS, G)
        for u in range(lo, hi):
            n0, nb, c0, c1, f0, f1, DW = _backward_unit(u, N, C, F, OH, NB, PARTS, SPLIT)
            if DW:
                _unfold_wide(cols[s], xp[s], x, n0, nb, 0, OH, C, H, W, K, P)
            _conv_grad_products(dwp[0 if PARTS > 1 else g], cols[s], prod[s], gt[s], dout, argmax, pooled, w2, n0, nb,
                                c0, c1, f0, f1, F, C * K * K, K * K, OH, OW, WR, 0.0 if u == lo else 1.0, DW, NEED_DX,
                                POOL, MASK, PK, PS, PH, PW)
            if NEED_DX and c1 > c0:
                _fold_wide(dx, xp[s], prod[s], n0, nb, c0, c1, H, W, K, P, OH)
        g = _claim(nxt)


@njit(cache=True, nogil=True)
def _conv_backward_strided(dx, dwp, cols, prod, gt, nxt, dout, argmax, pooled, x, w2, N, C, H, W, F, K, S, P, OH,
                           OW, NB, PARTS, NEED_DX, POOL, MASK, PK, PS, PH, PW, s, T):
    # Any stride; as _conv_backward_wide without the plane scratch (WR = OW).
    G = dwp.shape[0]
    SPLIT = PARTS > 1 and NEED_DX
    g = _claim(nxt)
    while g < (PARTS if PARTS > 1 else G):
        lo, hi = _chunk_blocks(g, N, NB, PARTS, G)
        for u in range(lo, hi):
            n0, nb, c0, c1, f0, f1, DW = _backward_unit(u, N, C, F, OH, NB, PARTS, SPLIT)
            if DW:
                _unfold_strided(cols[s], x, n0, nb, 0, OH, C, H, W, K, S, P, OH, OW)
            _conv_grad_products(dwp[0 if PARTS > 1 else g], cols[s], prod[s], gt[s], dout, argmax, pooled, w2, n0, nb,
                                c0, c1, f0, f1, F, C * K * K, K * K, OH, OW, OW, 0.0 if u == lo else 1.0, DW, NEED_DX,
                                POOL, MASK, PK, PS, PH, PW)
            if NEED_DX and c1 > c0:
                _fold_strided(dx, prod[s], n0, nb, c0, c1, H, W, K, S, P, OH, OW)
        g = _claim(nxt)


@njit(cache=True)
def _sum_chunks(dw, db, dwp, F, CKK):
    # dw: (F, C, K, K), db: (F,), dwp: (G, F, CKK+1) partial sums;  [dw | db] = sum_g dwp[g], g in order.
    # (dw is reshaped here, not by the caller: a kept call holds no view of the gradient buffer
    # but dw itself, see Network._unshare_grads.)
    # Chunk by chunk along each filter's contiguous row, so that the inner loop vectorises; every
    # element is still ((dwp[0] + dwp[1]) + dwp[2]) + ... (B's conv2 at batch 1: 34 us -> 3 us).
    G, dw2 = dwp.shape[0], dw.reshape((F, CKK))
    for f in range(F):
        out = dw2[f]
        first = dwp[0, f]
        for r in range(CKK):
            out[r] = first[r]
        b = first[CKK]
        for g in range(1, G):
            part = dwp[g, f]
            for r in range(CKK):
                out[r] += part[r]
            b += part[CKK]
        db[f] = b


# Compiling ahead. With a cold Numba cache (a first run, or this file changed) the first training
# step compiles every kernel it calls: ~10 s, ~8 s of it the two conv kernels (forward 3.5 s,
# backward 4.4 s, NOTES session 8), one after the other on one core. The conv backward kernel does
# not depend on the forward one, so compile_ahead has a child process compile it, on another core,
# while this process compiles the forward pass: the child writes it into Numba's cache, and the
# first conv2d_backward here waits for the child (_await_ahead) and loads it from there. Only when
# the cache misses (probed with a trivial kernel of this file: Numba keeps or drops the whole file's
# entries together), with two cores or more, once per process and dtype. If the child fails or
# its kernel does not match, this process compiles it as it would have: only time is at stake.
_AHEAD_TIMEOUT_S = 300              # wait at most this long for a child, then compile here
_ahead_keys = set()                 # (dtype name, strides) compile_ahead has seen
_ahead = []                         # the children's Popen objects, until awaited


@njit(cache=True)
def _cache_probe(a):
    return a.size


def _cache_missed(dt):
    """Whether the Numba cache lacks this file's kernels for dtype dt (compiling the probe if so)."""
    stats = getattr(_cache_probe, "stats", None)          # absent under NUMBA_DISABLE_JIT
    if stats is None:
        return False
    before = sum(stats.cache_misses.values())
    _cache_probe(np.empty(0, dt))
    return sum(_cache_probe.stats.cache_misses.values()) > before


def compile_ahead(dtype, conv_strides):
    """Start compiling, in the background, the conv backward kernel(s) a training step will need
    (see above): dtype the network's, conv_strides its conv layers' strides. Returns at once; a
    no-op with a warm cache, on one core, or when already started for this dtype and strides."""
    dt = np.dtype(dtype)
    strides = tuple(sorted({1 if int(s) == 1 else 2 for s in conv_strides}))
    key = (dt.name, strides)
    if not strides or key in _ahead_keys:
        return
    _ahead_keys.add(key)
    if cores() < 2 or getattr(sys, "frozen", False) or not sys.executable or not _cache_missed(dt):
        return                              # (a frozen app's executable is not a Python to run -c)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    try:
        _ahead.append(subprocess.Popen(_ahead_command(dt.name, strides), env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except OSError:                                       # no child: compiled here when needed
        pass


def _ahead_command(dtype_name, strides):
    """The child's command line (this Python, the same minicnn, the same environment)."""
    code = f"from minicnn.ops import cpu; cpu._compile_conv_backward({dtype_name!r}, {strides!r})"
    return [sys.executable, "-c", code]


def _compile_conv_backward(dtype, strides):
    """The child's work: conv2d_backward on a tiny batch, which compiles (into the cache) the kernel
    of each stride (1: the wide kernel; any other: the strided one) with the argument types of a
    Network's call."""
    for s in strides:
        x, w = np.zeros((1, 1, 5, 5), dtype), np.zeros((1, 1, 3, 3), dtype)
        OH = conv_out_size(5, 3, s, 1)
        work = conv2d_workspace(x.shape, w.shape, s, 1, dtype)
        conv2d_backward(np.zeros((1, 1, OH, OH), dtype), x, w, s, 1, work=work)


def _await_ahead():
    """Wait for the children compile_ahead started: their kernels are in the cache then."""
    while _ahead:
        proc = _ahead.pop()
        try:
            proc.wait(timeout=_AHEAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()                                   # reaped: no zombie left


@atexit.register
def _stop_ahead():
    for proc in _ahead:
        if proc.poll() is None:
            proc.kill()


def _forget_ahead():
    _ahead.clear()
    _ahead_keys.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ahead)     # a forked child has none of the children


def _conv_work(work, x_shape, w_shape, stride, pad, dt):
    """The workspace for these shapes: ``work`` checked, or a new one (then the shapes are checked)."""
    if work is None:
        return conv2d_workspace(x_shape, w_shape, stride, pad, dt)
    if work["key"] != (x_shape, w_shape, stride, pad) or work["cols"].dtype != dt:
        raise ValueError(f"conv2d: work was made for {work['key']} {work['cols'].dtype}, "
                         f"not {(tuple(x_shape), tuple(w_shape), stride, pad)} {np.dtype(dt)}")
    return work


def _conv_slots(work, units, macs):
    """Thread slots for a conv pass: Numba's thread count when there are several units of work
    (blocks, chunks or parts) and enough multiply-adds, else 1."""
    if macs < _CONV_PARALLEL_MIN_MACS:
        return 1
    return max(1, min(_num_threads(), units, work["cols"].shape[0]))


_NO_ARGMAX = np.zeros((1, 1, 1, 1), np.int32)      # stands in for argmax when no max-pool is fused


def _pool_sizes(pool, OH, OW, work):
    """(PK, PS, PH, PW) of a max-pool (window, stride) on an OH x OW conv output (kept in work)."""
    key = ("pool", pool)
    if key in work:
        return work[key]
    PK, PS = (int(v) for v in pool)
    PH, PW = conv_out_size(OH, PK, PS, 0), conv_out_size(OW, PK, PS, 0)
    if PK < 1 or PS < 1 or PH < 1 or PW < 1:
        raise ValueError(f"conv2d: max-pool window {PK} stride {PS} does not fit the conv output {OH}x{OW}")
    work[key] = PK, PS, PH, PW
    return work[key]


# A layer calls its conv with the same buffers every step. The checks and the argument tuple of a
# call are kept in its workspace ("call forward" / "call backward"): the next call with the very
# same weight, output and scratch objects, and options, and inputs of the same shapes (C-contiguous
# ndarrays of the dtype; the input x and the incoming gradient may be new arrays, as a new batch
# or a reshaped view is) runs the kernel on the kept tuple, with its inputs put in. It saved ~10 us
# of checks a call standalone and 2-3x that inside a training step (B at batch 1: 4 calls). The
# last KEPT_CALLS calls of each name are kept: the backward alternates between two gradient
# buffers when loss_and_grads hands one out each step (Network._unshare_grads).
KEPT_CALLS = 2


def _kept_call(work, name, arrays, options, fresh):
    """(kernel, args, units, macs, after, result) of one of the last ``name`` calls on this
    workspace that had the very objects ``arrays``, equal ``options``, and arrays like ``fresh``
    (checked here and put in their places); else None."""
    for kept in work.get(name, ()):
        if all(map(operator.is_, kept[0], arrays)) and kept[1] == options:
            break
    else:
        return None
    for a, (shape, dt) in zip(fresh, kept[2]):
        if type(a) is not np.ndarray or a.shape != shape or a.dtype != dt or not a.flags.c_contiguous:
            return None
    kernel, args, where, units, macs, after, result = kept[3:]
    args = list(args)
    for i, k in where:
        args[i] = fresh[k]
    return kernel, tuple(args), units, macs, after, result


def _keep_call(work, name, arrays, options, fresh, kernel, args, units, macs, after, result):
    """Keep a call for _kept_call (the newest first): where each fresh array sits in args (by
    identity), and no reference to the fresh arrays themselves (a batch is not kept alive by its
    workspace)."""
    where = [(i, k) for i, a in enumerate(args) for k, f in enumerate(fresh) if a is f]
    places = {i for i, _ in where}
    args = tuple(None if i in places else a for i, a in enumerate(args))
    call = (tuple(arrays), options, tuple((f.shape, f.dtype) for f in fresh), kernel, args, where, units, macs,
            after, result)
    work[name] = (call,) + work.get(name, ())[:KEPT_CALLS - 1]


def _run_kept(work, kept, compiled_ahead=False):
    """Run a call (kept or new). compiled_ahead: its kernel may be compiling in compile_ahead's
    child: wait for that first (a backward's first call)."""
    kernel, args, units, macs, after, result = kept
    if compiled_ahead and _ahead:
        _await_ahead()
    work["next"][0] = 0
    with _one_thread_blas:
        _team.run(kernel, args, _conv_slots(work, units, macs), True, work["next"])
    if after is not None:
        after[0](*after[1:])
    return result


def conv2d_forward(x, w, b, stride, pad, out=None, work=None, relu=False, pool=None, pool_out=None, argmax=None):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    work: optional conv2d_workspace(x.shape, w.shape, S, P, dtype) (scratch only).
    relu: return relu_forward(out) instead (a following ReLU layer fused into the output pass).
    pool: (window, stride) of a max-pool applied to the (ReLU'd) output, fused in: returns
    (out, pool_out, argmax) = (out, *maxpool2d_forward(out, window, stride)), pool_out and argmax
    (N, F, PH, PW) written into the given buffers. Pooled while each block's output is in cache
    when window <= stride (no window straddles two blocks), else in a second pass.
    """
    given = (w, b, out, pool_out, argmax)
    options = (stride, pad, bool(relu), None if pool is None else tuple(pool))
    kept = work is not None and _kept_call(work, "call forward", given, options, (x,))
    if kept:
        return _run_kept(work, kept)
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    work = _conv_work(work, x.shape, w.shape, stride, pad, dt)      # shapes checked once per workspace
    N, C, H, W, F, K, OH, OW, stride, pad = work["sizes"]
    if b.shape != (F,):
        raise ValueError(f"conv2d: shapes do not match: w {w.shape}, b {b.shape}")
    out = _output(out, (N, F, OH, OW), dt, "out")
    WR, NB, _, nblocks, _, parts = work["plan"]
    CKK = C * K * K
    fuse = pool is not None
    if fuse:
        PK, PS, PH, PW = _pool_sizes(tuple(pool), OH, OW, work)
        pool_out = _output(pool_out, (N, F, PH, PW), dt, "pool_out")
        argmax = _output(argmax, (N, F, PH, PW), np.int32, "argmax")
        fuse = PK <= PS
    if not fuse:
        PK, PS, PH, PW = 1, 1, 1, 1
    po, am = (pool_out, argmax) if fuse else (out, _NO_ARGMAX)
    units, macs = max(nblocks, parts), N * OH * WR * F * CKK
    w2, relu = w.reshape(F, CKK), bool(relu)
    nxt = work["next"]
    if stride == 1:
        kernel, args = _conv_forward_wide, (out, po, am, work["cols"], work["prod"], work["xp"], nxt, x, w2, b, N, C,
                                            H, W, F, K, pad, OH, OW, WR, NB, parts, relu, fuse, PK, PS, PH, PW)
    else:
        kernel, args = _conv_forward_strided, (out, po, am, work["cols"], work["prod"], nxt, x, w2, b, N, C, H, W, F,
                                               K, stride, pad, OH, OW, NB, parts, relu, fuse, PK, PS, PH, PW)
    after = None
    if pool is not None and not fuse:        # overlapping windows: pooled in a second pass
        after = (_maxpool_after, out, pool[0], pool[1], pool_out, argmax)
    result = out if pool is None else (out, pool_out, argmax)
    if all(map(operator.is_, given, (w, b, out, pool_out, argmax))):     # nothing cast or allocated
        _keep_call(work, "call forward", given, options, (x,), kernel, args, units, macs, after, result)
    return _run_kept(work, (kernel, args, units, macs, after, result))


def _maxpool_after(out, k, stride, pool_out, argmax):
    maxpool2d_forward(out, k, stride, out=pool_out, argmax=argmax)


def conv2d_backward(dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True, work=None, pool=None,
                    argmax=None, relu_pooled=None):
    """Gradients of conv2d_forward; with need_dx=False (first layer) dx is skipped and None.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W) or None, dw: (F, C, K, K), db: (F,)
    work: optional conv2d_workspace(x.shape, w.shape, S, P, dtype) (scratch only).
    pool: the forward's fused max-pool (window, stride): dout is then the gradient of its output
    (N, F, PH, PW), argmax the forward's, and relu_pooled the forward's pool_out when the ReLU was
    fused too: the gradients of conv2d(...) of maxpool2d_backward(dout, argmax, ..., relu_pooled),
    the pool's backward scattered straight into each block's rows (no conv-output-sized gradient).
    """
    given = (w, dx, dw, db, argmax, relu_pooled)
    options = (stride, pad, bool(need_dx), None if pool is None else tuple(pool))
    kept = work is not None and _kept_call(work, "call backward", given, options, (dout, x))
    if kept:
        return _run_kept(work, kept)
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    work = _conv_work(work, x.shape, w.shape, stride, pad, dt)      # shapes checked once per workspace
    N, C, H, W, F, K, OH, OW, stride, pad = work["sizes"]
    fuse = pool is not None
    dout_in = dout
    if fuse:
        PK, PS, PH, PW = _pool_sizes(tuple(pool), OH, OW, work)
        argmax = _input(argmax, np.int32)
        pooled = dout if relu_pooled is None else _input(relu_pooled, dt)
        if dout.shape != (N, F, PH, PW) or argmax.shape != dout.shape or pooled.shape != dout.shape:
            raise ValueError(f"conv2d_backward: pooled gradient {dout.shape}, argmax {argmax.shape}, relu_pooled "
                             f"{pooled.shape}: expected {(N, F, PH, PW)}")
        if PK > PS:                          # overlapping windows: the pool's backward in a pass of its own
            dout = maxpool2d_backward(dout, argmax, (N, F, OH, OW), relu_pooled=relu_pooled)
            fuse = False
    if not fuse:
        PK, PS, PH, PW = 1, 1, 1, 1
        argmax, pooled = _NO_ARGMAX, dout
        if dout.shape != (N, F, OH, OW):
            raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw, db = _output(dw, (F, C, K, K), dt, "dw"), _output(db, (F,), dt, "db")
    dx = _output(dx, (N, C, H, W), dt, "dx") if need_dx else None
    WR, NB, _, _, G, parts, CKK = *work["plan"], C * K * K
    parts = parts if need_dx else work["filter parts"]      # one image: a dW and a dX unit, or groups of filters
    macs = N * OH * WR * F * CKK * (2 if need_dx else 1)         # (groups: parallel from _FILTER_PARTS_MIN_MACS)
    units, macs = (parts, max(macs, _CONV_PARALLEL_MIN_MACS)) if parts > 1 else (G, macs)
    dxa, w2, need_dx, mask = dx if need_dx else x, w.reshape(F, CKK), bool(need_dx), relu_pooled is not None
    nxt, dwp = work["next"], work["dwp"][:1] if N == 1 else work["dwp"]     # one image: one dW chunk
    if stride == 1:
        kernel, args = _conv_backward_wide, (dxa, dwp, work["cols"], work["prod"], work["gt"], work["xp"], nxt, dout,
                                             argmax, pooled, x, w2, N, C, H, W, F, K, pad, OH, OW, WR, NB, parts,
                                             need_dx, fuse, mask, PK, PS, PH, PW)
    else:
        kernel, args = _conv_backward_strided, (dxa, dwp, work["cols"], work["prod"], work["gt"], nxt, dout, argmax,
                                                pooled, x, w2, N, C, H, W, F, K, stride, pad, OH, OW, NB, parts,
                                                need_dx, fuse, mask, PK, PS, PH, PW)
    after, result = (_sum_chunks, dw, db, dwp, F, CKK), (dx, dw, db)
    if dout is dout_in and all(map(operator.is_, given[:4], (w, dx, dw, db))) and (pool is None or (
            argmax is given[4] and (relu_pooled is None or pooled is relu_pooled))):      # nothing cast or allocated
        _keep_call(work, "call backward", given, options, (dout, x), kernel, args, units, macs, after, result)
    return _run_kept(work, (kernel, args, units, macs, after, result), compiled_ahead=True)


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
@njit(cache=True, inline="always")
def _maxpool_row_2x2(orow, arow, r0, r1, base, W, OW):
    # One pooled row of a 2x2 stride-2 max-pool: orow, arow: (OW,), r0, r1: the two input rows (W,),
    # base: the flat index of r0[0]. _maxpool_rows' comparisons in its order, with a constant stride
    # (B's conv1 pool: 25 -> 17 us).
    for j in range(OW):
        best = r0[2 * j]
        k = 0
        v = r0[2 * j + 1]
        t = v > best
        best = v if t else best
        k = 1 if t else k
        v = r1[2 * j]
        t = v > best
        best = v if t else best
        k = W if t else k
        v = r1[2 * j + 1]
        t = v > best
        best = v if t else best
        k = W + 1 if t else k
        orow[j] = best
        arow[j] = base + 2 * j + k


@njit(cache=True, inline="always")
def _maxpool_rows(out, argmax, x, n, c, i0, i1, W, K, S, OW):
    # Pooled rows i0 <= i < i1 of plane (n, c). out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32,
    # x: (N, C, H, W). Strict '>' while scanning the window row-major: on ties the first element
    # wins. Indexing 1-D row views (not x[n, c, h, w]) and a 2x2 special case: 2-3x faster (NOTES.md).
    for i in range(i0, i1):
        h0 = i * S
        orow = out[n, c, i]
        arow = argmax[n, c, i]
        if K == 2 and S == 2:            # the common pool: the same comparisons, a constant stride
            _maxpool_row_2x2(orow, arow, x[n, c, h0], x[n, c, h0 + 1], h0 * W, W, OW)
        elif K == 2:
            r0 = x[n, c, h0]
            r1 = x[n, c, h0 + 1]
            for j in range(OW):          # selects, not branches: 1.4x (mispredicted on real data)
                w0 = j * S
                best = r0[w0]
                k = 0
                v = r0[w0 + 1]
                t = v > best
                best = v if t else best
                k = 1 if t else k
                v = r1[w0]
                t = v > best
                best = v if t else best
                k = W if t else k
                v = r1[w0 + 1]
                t = v > best
                best = v if t else best
                k = W + 1 if t else k
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


@njit(cache=True, nogil=True)
def _maxpool2d_forward_slot(out, argmax, x, N, C, H, W, K, S, OH, OW, s, T):
    # out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32, x: (N, C, H, W);
    # slot s of T: planes [s*N*C//T, (s+1)*N*C//T)
    for nc in range(s * N * C // T, (s + 1) * N * C // T):
        _maxpool_rows(out, argmax, x, nc // C, nc % C, 0, OH, W, K, S, OW)


@njit(cache=True, inline="always")
def _maxpool2d_backward_body(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK, nc):
    # dx: (N, C, H, W), dout: (N, C, OH, OW), argmax: (N, C, OH, OW), pooled: (N, C, OH, OW)
    # One iteration per plane (n, c); overlapping windows add up in row-major output order.
    # MASK: the input came from a ReLU; its backward is fused in: a gradient reaches the winner
    # only where the pooled value (= the ReLU's output there) is > 0, as relu_backward.
    # one plane (nc) of _maxpool2d_backward_slot
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


@njit(cache=True, nogil=True)
def _maxpool2d_backward_slot(dx, dout, argmax, pooled, N, C, H, W, OH, OW, MASK, s, T):
    # slot s of T: planes [s*N*C//T, (s+1)*N*C//T)
    for nc in range(s * N * C // T, (s + 1) * N * C // T):
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
    _team.run(_maxpool2d_forward_slot, (out, argmax, x, N, C, H, W, k, stride, OH, OW), min(_threads(x.size), N * C))
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
    mask = relu_pooled is not None
    pooled = _input(relu_pooled, dt) if mask else dout
    if pooled.shape != dout.shape:
        raise ValueError(f"maxpool2d_backward: relu_pooled {pooled.shape} does not match dout {dout.shape}")
    _team.run(_maxpool2d_backward_slot, (dx, dout, argmax, pooled, N, C, H, W, OH, OW, mask),
              min(_threads(dx.size), N * C))
    return dx


# --------------------------------------------------------------------------- ReLU
@njit(cache=True, nogil=True)
def _relu_forward_slot(out, x, size, s, T):
    # out: (size,), x: (size,)  (flat views of any shape); slot s of T: [s*size//T, (s+1)*size//T)
    # 'x < 0' rather than 'x > 0' so that NaN and -0.0 pass through, as np.maximum(x, 0) does.
    for p in range(s * size // T, (s + 1) * size // T):
        v = x[p]
        out[p] = 0 if v < 0 else v


@njit(cache=True, nogil=True)
def _relu_backward_slot(dx, dout, out, size, s, T):
    # dx: (size,), dout: (size,), out: (size,)  (flat views of any shape); slot s of T as above
    for p in range(s * size // T, (s + 1) * size // T):
        dx[p] = dout[p] * (out[p] > 0)


def relu_forward(x, out=None):
    """out = max(x, 0); any shape."""
    x = _input(x)
    dt = _float_dtype(x)
    out = _output(out, x.shape, dt, "out")
    _team.run(_relu_forward_slot, (out.reshape(-1), x.reshape(-1), x.size), _threads(x.size))
    return out


def relu_backward(dout, out, dx=None):
    """dx = dout where the unit was active (out > 0); the kink x = 0 gets 0, as in PyTorch. Any shape."""
    dout = _input(dout)
    dt = _float_dtype(dout)
    out = _input(out, dt)
    if out.shape != dout.shape:
        raise ValueError(f"relu_backward: dout {dout.shape} and out {out.shape} differ")
    dx = _output(dx, dout.shape, dt, "dx")
    _team.run(_relu_backward_slot, (dx.reshape(-1), dout.reshape(-1), out.reshape(-1), dout.size), _threads(dout.size))
    return dx


# --------------------------------------------------------------------------- dense
# The products run on one-thread BLAS through _gemm (one call per product, so each element's sum
# runs in an order fixed by the shapes). Called from inside Numba, a BLAS call costs ~1 us: it beat
# the lane-blocked Numba dot loops kept here before even at batch 1 (A's fc, forward and backward:
# 15 us against 27; B's: 22 against 63), so those are gone.


@njit(cache=True)
def _dense_forward_blas(out, x, w, b, N, D, O):
    # out: (N, O), x: (N, D), w: (O, D), b: (O,);   out = x @ w.T + b
    _gemm(out, x, w, N, O, D, O, D, D, False, True, 0.0)
    for n in range(N):
        _add_into(out[n], b, O)


@njit(cache=True)
def _dense_backward_blas(dx, dw, db, dout, x, w, N, D, O, NEED_DX):
    # dx: (N, D) (not written unless NEED_DX), dw: (O, D), db: (O,), dout: (N, O), x: (N, D), w: (O, D)
    # dw = dout.T @ x, db = sum of dout's rows in n order, dx = dout @ w
    _gemm(dw, dout, x, O, D, N, D, O, D, True, False, 0.0)
    _copy_run(db, dout[0], O)
    for n in range(1, N):
        _add_into(db, dout[n], O)
    if NEED_DX:
        _gemm(dx, dout, w, N, D, O, D, O, D, False, False, 0.0)


def dense_forward(x, w, b, out=None):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    x = _input(x)
    dt = _float_dtype(x)
    w, b = _input(w, dt), _input(b, dt)
    N, D, O = _dense_sizes(x.shape, w.shape, b.shape)
    out = _output(out, (N, O), dt, "out")
    with _one_thread_blas:
        _dense_forward_blas(out, x, w, b, N, D, O)
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
    dx = _output(dx, (N, D), dt, "dx") if need_dx else None
    with _one_thread_blas:
        _dense_backward_blas(dx if need_dx else x, dw, db, dout, x, w, N, D, O, need_dx)
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


# --------------------------------------------------------------------------- a pass of ops
def pass_scope():
    """BLAS at one thread for a whole pass (the ops inside it skip setting it; Backend.pass_scope)."""
    return _one_thread_blas


# --------------------------------------------------------------------------- SGD
@njit(cache=True)
def _sgd_update_kernel(p, g, buf, neg_lr, momentum, weight_decay, one_minus_dampening, HAS_WD, HAS_MOMENTUM, FIRST,
                       NESTEROV):
    # p, g, buf: (n,) (buf not touched without HAS_MOMENTUM); the scalars in p's dtype.
    # ref.sgd_update's arithmetic, element by element: each product rounded before its sum (no FMA
    # contraction without fastmath), so the result is bit-identical to its NumPy passes.
    for q in range(p.shape[0]):
        d = g[q]
        if HAS_WD:
            d = p[q] * weight_decay + d
        if HAS_MOMENTUM:
            if FIRST:
                v = d
            else:
                v = buf[q] * momentum + d * one_minus_dampening
            buf[q] = v
            if NESTEROV:
                d = v * momentum + d
            else:
                d = v
        p[q] = p[q] + d * neg_lr


def _flat_same(a, dt):
    """a as a 1-D view when it is a writeable C-contiguous ndarray of dtype dt, else None."""
    if type(a) is np.ndarray and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable:
        return a.reshape(-1)
    return None


def sgd_update(params, grads, bufs, lr, momentum, weight_decay, dampening, nesterov, first_step, work=None):
    """ref.sgd_update (torch.optim.SGD's step, in place; the same numbers bit for bit) in one pass
    per parameter array instead of 2-6 NumPy passes (B's 60K parameters: ~40 us less a step).
    Arrays that are not C-contiguous float32/float64 of one dtype take ref's NumPy passes."""
    for i, (p, g) in enumerate(zip(params, grads)):
        dt = p.dtype if type(p) is np.ndarray else None
        pf, gf = _flat_same(p, dt), (_flat_same(g, dt) if dt is not None else None)
        bf = pf if not momentum else (_flat_same(bufs[i], dt) if bufs is not None else None)
        if pf is None or gf is None or bf is None or dt not in (np.float32, np.float64) or p.shape != g.shape \
                or (momentum and bufs[i].shape != p.shape):
            _ref.sgd_update([p], [g], None if bufs is None else [bufs[i]], lr, momentum, weight_decay, dampening,
                            nesterov, first_step, work=None if work is None else work.setdefault(("ref", i), {}))
            continue
        c = dt.type
        _sgd_update_kernel(pf, gf, bf, c(-lr), c(momentum), c(weight_decay), c(1 - dampening), bool(weight_decay),
                           bool(momentum), bool(first_step), bool(nesterov))


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


@njit(cache=True)
def _segment_gram4_kernel(out, rows, bounds):
    """out[s] = the 4 x 4 Gram matrix of rows (4, P) over segment s, float64, q in order."""
    for s in range(bounds.shape[0] - 1):
        aa = ab = ac = ad = bb = bc = bd = cc = cd = dd = 0.0
        for q in range(bounds[s], bounds[s + 1]):
            a, b, c, d = rows[0, q], rows[1, q], rows[2, q], rows[3, q]
            aa += a * a
            ab += a * b
            ac += a * c
            ad += a * d
            bb += b * b
            bc += b * c
            bd += b * d
            cc += c * c
            cd += c * d
            dd += d * d
        g = out[s]
        g[0, 0], g[1, 1], g[2, 2], g[3, 3] = aa, bb, cc, dd
        g[0, 1] = g[1, 0] = ab
        g[0, 2] = g[2, 0] = ac
        g[0, 3] = g[3, 0] = ad
        g[1, 2] = g[2, 1] = bc
        g[1, 3] = g[3, 1] = bd
        g[2, 3] = g[3, 2] = cd


def segment_gram4(rows, bounds):
    """Per-segment Gram matrices of four float64 vectors in one pass: rows (4, P), bounds (S+1,)
    -> (S, 4, 4), out[s, i, j] = sum of rows[i, q] * rows[j, q] over bounds[s] <= q < bounds[s+1],
    summed in q order (minicnn.torch.StepVectors: <g,g>, <w,w>, <d,d>, <g,p>, ... per layer)."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] != 4:
        raise ValueError(f"segment_gram4: rows must be (4, P), got {rows.shape}")
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    out = np.empty((bounds.shape[0] - 1, 4, 4))
    _segment_gram4_kernel(out, rows, bounds)
    return out


@njit(cache=True)
def _logit_stats_kernel(z, y, has_y):
    """(largest |logit|, mean softmax entropy, top-class share, accuracy) of (N, L) logits, float64."""
    N, L = z.shape
    counts = np.zeros(L, np.int64)
    mx = ent = 0.0
    right = 0
    for n in range(N):
        row = z[n]
        top = np.float64(row[0])
        k = 0
        lo = top
        for j in range(1, L):
            v = np.float64(row[j])
            if v > top or (np.isnan(v) and not np.isnan(top)):     # NumPy's argmax: the first max or NaN
                top, k = v, j
            lo = min(lo, v)
        mx = max(mx, abs(top), abs(lo))
        tot = acc = 0.0
        for j in range(L):
            s = np.float64(row[j]) - top
            e = np.exp(s)
            tot += e
            acc += e * s
        ent += np.log(tot) - acc / tot          # -sum p log p, p = e / tot, log p = s - log tot
        counts[k] += 1
        if has_y and y[n] == k:
            right += 1
    return mx, ent / N, counts.max() / N, right / N


def logit_stats_from_logits(logits, y=None):
    """logit_stats (see ref.logit_stats) from the logits alone, in one pass: (N, L) float logits,
    y: (N,) integer class indices or None -> {logit_max, entropy, top_class_share[, batch_acc]}.
    For a PyTorch loop's logits (minicnn.torch.Recorder), which has no softmax of its own at hand:
    one call where NumPy takes a dozen."""
    z = np.ascontiguousarray(logits)
    if z.ndim != 2 or not len(z) or z.shape[1] == 0:
        raise ValueError(f"logit_stats_from_logits: logits must be (N, L) with N, L >= 1, got {z.shape}")
    has_y = y is not None
    y = np.ascontiguousarray(y if has_y else np.zeros(0), dtype=np.int64)
    mx, ent, share, acc = _logit_stats_kernel(z, y, has_y)
    rec = {"logit_max": float(mx), "entropy": float(ent), "top_class_share": float(share)}
    if has_y:
        rec["batch_acc"] = float(acc)
    return rec


# --------------------------------------------------------------------------- per-sample weight gradients
# The gradient-noise instruments (minicnn.noise) need each image's own weight gradient. For a conv,
# image n's is exactly conv2d_backward's dw, db on a batch of that one image: the same kernels (and
# the same blocked products), one image at a time, without the input gradient. For a dense layer it
# is an outer product (no sum: every element is one multiplication, so numpy computes it exactly).
def conv2d_weight_grad_per_sample(dout, x, w, stride, pad, dw=None, db=None, work=None):
    """Per-sample weight gradients of conv2d: conv2d_backward's dw, db before the sum over the batch.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K) -> dw: (N, F, C, K, K), db: (N, F)
    work: not used (each image gets a workspace of its own size).
    """
    x = _input(x)
    dt = _float_dtype(x)
    dout, w = _input(dout, dt), _input(w, dt)
    N, C, H, W, F, K, OH, OW, stride, pad = _conv_sizes(x.shape, w.shape, (w.shape[0],), stride, pad)
    if dout.shape != (N, F, OH, OW):
        raise ValueError(f"dout: expected shape {(N, F, OH, OW)}, got {dout.shape}")
    dw = _output(dw, (N, F, C, K, K), dt, "dw")
    db = _output(db, (N, F), dt, "db")
    one = conv2d_workspace((1, C, H, W), w.shape, stride, pad, dt)
    for n in range(N):
        conv2d_backward(dout[n:n + 1], x[n:n + 1], w, stride, pad, dw=dw[n], db=db[n], need_dx=False, work=one)
    return dw, db


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
    np.multiply(dout[:, :, None], x[:, None, :], out=dw)
    db[...] = dout
    return dw, db
