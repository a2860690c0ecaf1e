"""numpy's OpenBLAS thread count, from Python: for code that calls BLAS or LAPACK on small problems.

OpenBLAS's threads synchronise with busy waits; on a 2-core machine shared with other processes a
multi-threaded call then waits for the other thread's time slice. Measured (2026-12-01, 2 busy
cores): the eigen-decomposition of a 56 x 56 matrix took 68 ms with 2 OpenBLAS threads against
0.4 ms with one, a (56 x 20490) matrix-vector product 7.4 ms against 1.5 ms. cpu.py runs its conv
products at one thread for the same reason (see _Products there); minicnn.hessian runs Lanczos's
small linear algebra inside ``single_thread()``.
"""
import contextlib
import ctypes

_FOUND = []          # [(get, set) or None], filled on first use


def find_blas_threads():
    """(get, set) ctypes functions for the thread count of numpy's OpenBLAS, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", "", "_64"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    return get, put
    return None


@contextlib.contextmanager
def single_thread():
    """numpy's OpenBLAS at one thread inside the block, restored after (nothing when numpy's BLAS
    is not an OpenBLAS this can find)."""
    if not _FOUND:
        _FOUND.append(find_blas_threads())
    funcs = _FOUND[0]
    old = funcs[0]() if funcs is not None else 1
    if old != 1:
        funcs[1](1)
    try:
        yield
    finally:
        if old != 1:
            funcs[1](old)
