"""The OpenBLAS thread counts, from Python: minicnn's kernels run BLAS at one thread.

OpenBLAS's threads synchronise with busy waits; on a 2-core machine shared with other processes a
multi-threaded call then waits for the other thread's time slice. Measured (2026-12-01, 2 busy
cores): a 32x145x28672 product took 3-24 ms with 2 OpenBLAS threads against 5 ms split over 2
threads with OpenBLAS at 1 thread; the eigen-decomposition of a 56 x 56 matrix 68 ms against
0.4 ms; a (56 x 20490) matrix-vector product 7.4 ms against 1.5 ms. So cpu.py's kernels (which call
SciPy's BLAS from inside Numba) run inside ``OneThreadBlas`` and minicnn.hessian runs Lanczos's small
linear algebra inside ``single_thread()``; the caller's setting is restored after either.
"""
import ctypes


def openblas_paths():
    """The OpenBLAS libraries mapped into this process (empty where /proc is missing)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []


def find_blas_threads(paths=None):
    """[(get, set)] ctypes functions for the thread count of the OpenBLAS libraries at ``paths``
    (default: every OpenBLAS mapped into the process)."""
    found = []
    for path in openblas_paths() if paths is None else paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "", "_64"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None and not any(get is g for g, _ in found):
                    put.argtypes = [ctypes.c_int]
                    found.append((get, put))
                    break
            else:
                continue
            break
    return found


class OneThreadBlas:
    """``with blas:`` runs the block with the OpenBLAS libraries at ``paths`` (set later, e.g. the
    ones SciPy brought; default every OpenBLAS) at one thread, then restores the caller's setting.
    Blocks nest: only the outermost one sets and restores (the Network enters one per pass, so
    the ops inside it skip the three C calls; ~3 us each standalone, 2-3x that inside a step)."""

    def __init__(self, paths=None):
        self.libs = None
        self.paths = paths
        self.saved = []
        self.depth = 0               # blocks entered and not left: inner ones change nothing

    def __enter__(self):
        self.depth += 1
        if self.depth > 1:
            return self
        if self.libs is None:
            self.libs = find_blas_threads(self.paths)
        for get, put in self.libs:
            old = get()
            if old != 1:
                put(1)
                self.saved.append((put, old))
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0 and self.saved:
            for put, old in self.saved:
                put(old)
            self.saved.clear()
        return False


_EVERY = OneThreadBlas()


def single_thread():
    """Every OpenBLAS in the process at one thread inside the block, restored after."""
    return _EVERY
