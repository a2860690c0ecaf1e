"""The thread count a benchmark runs with, set where numpy, OpenBLAS, OpenMP and MKL read it.

Import this before numpy (they read the environment once, when they load):

    import threads_env            # --threads N from the command line, else every core
    THREADS = threads_env.THREADS

An environment value already set (OPENBLAS_NUM_THREADS=1 python ...) is kept.
"""
import os
import sys

VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def early_threads(argv=None):
    """--threads N (or --threads=N) from the command line, before argparse has run; else the cores."""
    argv = sys.argv if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return str(os.cpu_count() or 1)


THREADS = early_threads()
for _v in VARIABLES:
    os.environ.setdefault(_v, THREADS)
