"""Gradient checking helpers, CS231n style: centred finite differences and a relative error."""
import numpy as np


def numeric_gradient(f, x, eps=1e-6):
    """Centred-difference gradient of the scalar f(x) with respect to the float64 array x.

    Each element is perturbed in place by +-eps and restored afterwards, so f may read x
    directly (a closure) or take it as its argument; f is called as f(x).
    """
    if x.dtype != np.float64:
        raise TypeError(f"numeric_gradient needs a float64 array, got {x.dtype}")
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        f_plus = float(f(x))
        x[idx] = old - eps
        f_minus = float(f(x))
        x[idx] = old
        grad[idx] = (f_plus - f_minus) / (2 * eps)
        it.iternext()
    return grad


def rel_error(x, y):
    """max|x - y| / max(1e-8, max(|x| + |y|)): 0 for equal arrays, about 1 for unrelated ones."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(x - y)) / max(1e-8, float(np.max(np.abs(x) + np.abs(y)))))
