"""NumPy reference implementation of every op: the oracle for the Numba kernels.

Clarity over speed. Each op is a ``<op>_forward`` / ``<op>_backward`` pair with the
same name and argument order as in ``cpu.py`` and ``cuda.py``.

Dimension glossary (used in every shape comment in minicnn):
    N  batch size             C  input channels       F  output channels (filters)
    H, W   input height/width     OH, OW  output height/width
    K  kernel size (square)   S  stride               P  zero padding
    D  dense input features   O  dense output features   L  classes (logits)

    OH = (H + 2P - K) // S + 1        (conv2d)
    OH = (H - K) // S + 1             (max-pool, no padding)

Parameter layouts are PyTorch's: conv weight (F, C, K, K), conv bias (F,),
dense weight (O, D), dense bias (O,).
"""
import numpy as np


def conv_out_size(size, k, stride, pad):
    """Output length of a convolution/pooling window sliding over ``size`` pixels."""
    return (size + 2 * pad - k) // stride + 1


# --------------------------------------------------------------------------- conv2d
def conv2d_forward(x, w, b, stride, pad):
    """out[n,f,i,j] = b[f] + sum_{c,u,v} w[f,c,u,v] * xpad[n,c,i*S+u,j*S+v]

    x: (N, C, H, W), w: (F, C, K, K), b: (F,)  ->  out: (N, F, OH, OW)
    """
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    OH, OW = conv_out_size(H, K, stride, pad), conv_out_size(W, K, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((N, F, OH, OW), dtype=x.dtype)
    for i in range(OH):
        for j in range(OW):
            patch = xp[:, :, i * stride:i * stride + K, j * stride:j * stride + K]  # (N, C, K, K)
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def conv2d_backward(dout, x, w, stride, pad):
    """Gradients of conv2d_forward.

    dout: (N, F, OH, OW), x: (N, C, H, W), w: (F, C, K, K)
    -> dx: (N, C, H, W), dw: (F, C, K, K), db: (F,)
    """
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    _, _, OH, OW = dout.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(OH):
        for j in range(OW):
            hs, ws = i * stride, j * stride
            patch = xp[:, :, hs:hs + K, ws:ws + K]             # (N, C, K, K)
            g = dout[:, :, i, j]                                # (N, F)
            dw += np.tensordot(g, patch, axes=([0], [0]))       # (F, C, K, K)
            dxp[:, :, hs:hs + K, ws:ws + K] += np.tensordot(g, w, axes=([1], [0]))
    dx = dxp[:, :, pad:pad + H, pad:pad + W]
    db = dout.sum(axis=(0, 2, 3))
    return np.ascontiguousarray(dx), dw, db


# --------------------------------------------------------------------------- max-pool
def maxpool2d_forward(x, k, stride):
    """out[n,c,i,j] = max over the KxK window at (i*S, j*S); no padding.

    x: (N, C, H, W) -> out: (N, C, OH, OW), argmax: (N, C, OH, OW) int32
    argmax holds the flat index (h*W + w) into the input plane of the winning
    element; on ties the first in row-major window order wins (as PyTorch's CPU
    kernel does).
    """
    N, C, H, W = x.shape
    OH, OW = conv_out_size(H, k, stride, 0), conv_out_size(W, k, stride, 0)
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    for i in range(OH):
        for j in range(OW):
            win = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k].reshape(N, C, k * k)
            a = win.argmax(axis=2)                               # (N, C) first max
            out[:, :, i, j] = np.take_along_axis(win, a[..., None], axis=2)[..., 0]
            argmax[:, :, i, j] = (i * stride + a // k) * W + (j * stride + a % k)
    return out, argmax


def maxpool2d_backward(dout, argmax, x_shape):
    """Route each output gradient to the input element that won the max.

    dout: (N, C, OH, OW), argmax: (N, C, OH, OW) -> dx: x_shape = (N, C, H, W)
    """
    N, C, H, W = x_shape
    dx = np.zeros((N, C, H * W), dtype=dout.dtype)
    flat_idx = argmax.reshape(N, C, -1)
    flat_g = dout.reshape(N, C, -1)
    for n in range(N):
        for c in range(C):
            np.add.at(dx[n, c], flat_idx[n, c], flat_g[n, c])
    return dx.reshape(N, C, H, W)


# --------------------------------------------------------------------------- ReLU
def relu_forward(x):
    """out = max(x, 0); any shape."""
    return np.maximum(x, 0)


def relu_backward(dout, out):
    """dx = dout where the unit was active (out > 0); the kink x = 0 gets 0, as in PyTorch."""
    return dout * (out > 0)


# --------------------------------------------------------------------------- dense
def dense_forward(x, w, b):
    """out = x @ w.T + b.   x: (N, D), w: (O, D), b: (O,) -> out: (N, O)"""
    return x @ w.T + b


def dense_backward(dout, x, w):
    """dout: (N, O), x: (N, D), w: (O, D) -> dx: (N, D), dw: (O, D), db: (O,)"""
    return dout @ w, dout.T @ x, dout.sum(axis=0)


# --------------------------------------------------------------------------- loss
def softmax_cross_entropy_forward(logits, y):
    """Mean cross-entropy of softmax(logits) against integer labels, computed stably.

    logits: (N, L), y: (N,) int -> loss: float, probs: (N, L)
    loss = mean_n [ logsumexp(logits[n]) - logits[n, y[n]] ]
    """
    z = logits - logits.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=1))
    loss = float(np.mean(logsumexp - z[np.arange(len(y)), y]))
    probs = np.exp(z - logsumexp[:, None])
    return loss, probs


def softmax_cross_entropy_backward(probs, y):
    """d(mean loss)/d logits = (probs - onehot(y)) / N.   probs: (N, L) -> dlogits: (N, L)"""
    N = probs.shape[0]
    d = probs.copy()
    d[np.arange(N), y] -= 1
    return d / N
