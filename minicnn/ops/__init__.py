"""The op backends: ref (NumPy oracle), cpu (Numba), cuda (Numba CUDA), same names in each."""


def on_device(a):
    """Whether ``a`` is a Numba CUDA device array (they, and only they, carry copy_to_host).
    Checked by duck type so that host code never has to import numba.cuda."""
    return hasattr(a, "copy_to_host")
