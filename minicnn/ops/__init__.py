"""The op backends: ref (NumPy oracle), cpu (Numba), cuda (Numba CUDA), same names in each.

    ops = get_backend("cpu")              # only the requested backend is imported (and compiled)
    out = ops.conv2d_forward(x, w, b, 1, 1)

The contract every backend meets is the ``Backend`` protocol below: the same functions with the
same signatures in ``ref.py``, ``cpu.py`` and ``cuda.py`` (tests/test_backends.py checks it). The
Network, SGD and Trainer call nothing else, so no code above this package asks which backend it
has. Conventions:

- Arrays are the backend's own: NumPy arrays for ref and cpu, Numba device arrays for cuda.
- Optional outputs (``out=``, ``dx=``, ``dw=``, ``db=``, ``argmax=``, ``probs=``, ``dlogits=``,
  ``loss_out=``) are preallocated buffers the result is written into; without them the function
  allocates. Either way the results are returned. A buffer of the wrong shape or dtype raises.
- ``work`` is a per-shape scratch workspace from ``conv2d_workspace`` (None where a backend
  needs none); the forward pass fills it and the backward pass of the same input reuses it.
- Fusions: ``conv2d_forward(relu=True)`` returns relu(conv(x)); ``maxpool2d_backward(relu_pooled=
  out)`` applies the backward of the ReLU before the pool. Every backend accepts both;
  ``FUSES_RELU`` says whether the backend wants the Network to use them (a speed choice only:
  the results are the same). Likewise ``conv2d_forward(pool=(window, stride))`` also max-pools the
  (ReLU'd) output, returning (out, pool_out, argmax), and ``conv2d_backward(pool=..., argmax=...,
  relu_pooled=...)`` takes the pooled output's gradient; ``FUSES_POOL`` says whether the Network
  should use that for a conv [-> relu] -> maxpool chain whose windows do not overlap.
- ``need_dx=False`` skips the input gradient (the first layer); dx is then None.
- ``*_weight_grad_per_sample`` are the weight gradients of ``*_backward`` with the batch axis
  kept (one per sample, a leading N), for the gradient-noise instruments (minicnn.noise).
- The loss is a Python float on the host backends and a (1,) device array on cuda: ``item``
  reads either.
"""
import os
import sys
from typing import Protocol

DEVICES = ("cpu", "numpy", "cuda")


def on_device(a):
    """Whether ``a`` is a Numba CUDA device array (they, and only they, carry copy_to_host).
    Checked by duck type so that host code never has to import numba.cuda."""
    return hasattr(a, "copy_to_host")


def cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def get_backend(device):
    """The ops module for a device name; only the requested backend is imported (and compiled)."""
    from ..errors import ConfigError
    if device == "cpu":
        from . import cpu
        return cpu
    if device == "numpy":
        from . import ref
        return ref
    if device == "cuda":
        from . import cuda
        cuda.require_gpu()
        return cuda
    raise ConfigError(f"unknown device '{device}'; accepted: {', '.join(DEVICES)}")


def backend_of(array):
    """The backend for element-wise work on ``array`` (the SGD update): cuda for a device array;
    for a host array the CPU kernels' module when it is loaded already (a "cpu" network exists:
    its one-pass update, bit-identical to NumPy's passes), else the NumPy reference (nothing to
    compile for a run that does not use the CPU kernels)."""
    if on_device(array):
        from . import cuda
        return cuda
    cpu = sys.modules.get(__name__ + ".cpu")
    if cpu is not None:
        return cpu
    from . import ref
    return ref


class Backend(Protocol):
    """What every backend module provides (shapes in the glossary of ref.py)."""

    FUSES_RELU: bool
    FUSES_POOL: bool

    # ---- layers: *_forward / *_backward pairs
    def conv2d_workspace(self, x_shape, w_shape, stride, pad, dtype):
        """Scratch buffers for conv2d on inputs of x_shape, or None when the backend needs none."""

    def conv2d_forward(self, x, w, b, stride, pad, out=None, work=None, relu=False, pool=None, pool_out=None,
                       argmax=None):
        """x: (N, C, H, W), w: (F, C, K, K), b: (F,) -> out: (N, F, OH, OW); with pool=(window,
        stride) -> (out, pool_out: (N, F, PH, PW), argmax: (N, F, PH, PW) int32)"""

    def conv2d_backward(self, dout, x, w, stride, pad, dx=None, dw=None, db=None, need_dx=True, work=None,
                        pool=None, argmax=None, relu_pooled=None):
        """-> (dx: (N, C, H, W) or None, dw: (F, C, K, K), db: (F,)); with pool, dout is the
        pooled output's gradient (N, F, PH, PW)"""

    def conv2d_weight_grad_per_sample(self, dout, x, w, stride, pad, dw=None, db=None, work=None):
        """-> (dw: (N, F, C, K, K), db: (N, F)): conv2d_backward's dw, db before the sum over the
        batch (per-sample gradients). work: the forward's workspace, as for conv2d_backward."""

    def maxpool2d_forward(self, x, k, stride, out=None, argmax=None):
        """x: (N, C, H, W) -> (out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32)"""

    def maxpool2d_backward(self, dout, argmax, x_shape, dx=None, relu_pooled=None, k=None, stride=None):
        """-> dx: x_shape. k, stride: the window, for a backend that needs it (cuda records it on argmax)."""

    def relu_forward(self, x, out=None):
        """out = max(x, 0)"""

    def relu_backward(self, dout, out, dx=None):
        """dx = dout where out > 0"""

    def dense_forward(self, x, w, b, out=None):
        """x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""

    def dense_backward(self, dout, x, w, dx=None, dw=None, db=None, need_dx=True):
        """-> (dx: (N, D) or None, dw: (O, D), db: (O,))"""

    def dense_weight_grad_per_sample(self, dout, x, dw=None, db=None):
        """dout: (N, O), x: (N, D) -> (dw: (N, O, D), db: (N, O)): dense_backward's dw, db before the
        sum over the batch (per-sample gradients)."""

    def softmax_cross_entropy_forward(self, logits, y, probs=None, loss_out=None):
        """logits: (N, L), y: (N,) int -> (mean loss, probs: (N, L))"""

    def softmax_cross_entropy_backward(self, probs, y, dlogits=None):
        """-> dlogits: (N, L) = (probs - onehot(y)) / N"""

    # ---- a pass of several ops
    def pass_scope(self):
        """A context manager the Network holds around each forward and backward pass: the CPU
        backend sets its BLAS to one thread once for the pass instead of once per op; nothing
        elsewhere."""

    def compile_ahead(self, dtype, conv_strides):
        """Called by the Network before its first loss (a training step follows): start compiling
        in the background what the backward pass will need, if anything. The CPU backend compiles
        the conv backward kernel in a child process when the Numba cache lacks it (a cold start,
        one core each for the forward and the backward kernels); elsewhere nothing."""

    # ---- the optimiser's update
    def sgd_update(self, params, grads, bufs, lr, momentum, weight_decay, dampening, nesterov, first_step,
                   work=None):
        """torch.optim.SGD's step in place on lists of same-shaped arrays (see minicnn.sgd)."""

    # ---- trace reductions (only the numbers cross to the host)
    def segment_dots(self, pairs, bounds):
        """[(a, b), ...] flat vectors, bounds: (S+1,) -> (len(pairs), S) float64 per-segment dots"""

    def dead_fraction(self, relu_out):
        """(N, ...) -> share of units zero for every sample"""

    def logit_stats(self, logits, probs, y):
        """-> {logit_max, entropy, top_class_share, batch_acc}"""

    # ---- where the arrays live
    def empty(self, shape, dtype): ...

    def zeros(self, shape, dtype): ...

    def to_device(self, a, out=None):
        """a host array as a backend array (into ``out`` if given)"""

    def host_copy(self, a):
        """a NumPy copy"""

    def copy_into(self, dst, src):
        """dst[...] = src"""

    def subtract(self, out, a, b):
        """out = a - b"""

    def item(self, v):
        """a loss as a Python float"""
