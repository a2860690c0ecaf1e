"""PyTorch models in and out: the same network and weights on both sides.

    net = minicnn.from_torch(model, input_shape=(1, 28, 28))   # nn.Sequential -> Network
    print(net.spec)                                            # conv8k3s1p1-relu-maxpool2s2-fc10
    model = net.to_torch()                                     # Network -> nn.Sequential
    minicnn.torch.load_state_dict_file(net, "model.pt")        # torch.save(model.state_dict(), ...)

What crosses: an ``nn.Sequential`` (nested Sequentials are walked in order) of

    Conv2d      square kernel K, square stride S, square zero padding P (or "valid", or "same"
                with stride 1 and an odd K), dilation 1, groups 1, padding_mode "zeros"
    ReLU
    MaxPool2d   square kernel and stride, padding 0, dilation 1, ceil_mode False
    Flatten     start_dim 1, end_dim -1
    Linear      after a Flatten; the last layer (its outputs are the logits)

and anything else is a one-line ConfigError naming the layer. Every minicnn conv/fc layer has a
bias: a torch layer with ``bias=False`` becomes a minicnn layer whose bias is 0. That is exact
for the forward and backward pass (the logits and every weight gradient are the same), but SGD
then trains that bias, which torch would not; ``to_torch`` gives such a layer back with
``bias=True``. The same holds for a state_dict whose layer has a weight and no bias.

Recording a PyTorch training loop: ``Recorder(model, optimizer, out=DIR)`` writes the run
directory minicnn's own runs write (config.json, steps.csv with minicnn's trace columns,
evals.csv, checkpoints, summary.json) from one ``rec.step(loss, inputs, targets)`` per step, so
that ``minicnn inspect DIR`` diagnoses the run (see the Recorder's docstring).

PyTorch is optional: this module imports it only inside the functions that need it, so
``import minicnn`` (and ``import minicnn.torch``) work without it. Inside the package ``import
torch`` is absolute and gets PyTorch, not this file.
"""
import math
import os
import platform
import re
import time
from collections.abc import Mapping
from contextlib import contextmanager

import numpy as np

from minicnn.errors import ConfigError
from minicnn.network import Network

ACCEPTED_LAYERS = "Conv2d, ReLU, MaxPool2d, Flatten, Linear"
ACCEPTED_DICTS = ("a state_dict saved with torch.save(model.state_dict(), path) from the same nn.Sequential "
                  "(keys 0.weight, 0.bias, ...: matched in order) or with minicnn's names "
                  "(conv1.weight, fc1.bias, ...)")
# the keys of a state_dict written by minicnn (Network.state_dict, checkpoint.npz): matched by name
MINICNN_KEY = re.compile(r"(conv|fc)\d+\.(weight|bias)")


def _import_torch():
    """PyTorch, or a one-line ConfigError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ConfigError("PyTorch is not installed; pip install 'minicnn[torch]'") from None
    if not hasattr(torch, "Tensor"):     # a script run from inside minicnn/ imports this file as 'torch'
        raise ConfigError(f"'import torch' found {torch.__file__}, not PyTorch; do not run scripts from inside "
                          f"the minicnn/ folder")
    return torch


def _pair(value, what, where, accepted):
    """An int from an int or an (a, a) pair; a non-square pair is a ConfigError."""
    if isinstance(value, int):
        return value
    a, b = value
    if a != b:
        raise ConfigError(f"{where}: {what} {tuple(value)} is not square; accepted: {accepted}")
    return int(a)


def _walk(module, prefix=""):
    """[(path, layer)] of a Sequential, nested Sequentials walked in order; path as in state_dict keys."""
    torch = _import_torch()
    out = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child).forward is torch.nn.Sequential.forward and isinstance(child, torch.nn.Sequential):
            out += _walk(child, path + ".")
        else:
            out.append((path, child))
    return out


def _conv_token(conv, where):
    """'conv<F>k<K>s<S>p<P>' for an nn.Conv2d minicnn can compute, else a ConfigError."""
    accepted = "square kernel/stride/padding, dilation 1, groups 1, padding_mode 'zeros'"
    if tuple(conv.dilation) != (1, 1):
        raise ConfigError(f"{where}: dilation {tuple(conv.dilation)}; accepted: {accepted}")
    if conv.groups != 1:
        raise ConfigError(f"{where}: groups={conv.groups}; accepted: {accepted}")
    if conv.padding_mode != "zeros":
        raise ConfigError(f"{where}: padding_mode '{conv.padding_mode}'; accepted: {accepted}")
    K = _pair(conv.kernel_size, "kernel_size", where, accepted)
    S = _pair(conv.stride, "stride", where, accepted)
    if conv.padding == "valid":
        P = 0
    elif conv.padding == "same":
        if S != 1 or K % 2 == 0:      # torch pads an even kernel unevenly; minicnn pads every side alike
            raise ConfigError(f"{where}: padding='same' with kernel {K} and stride {S}; accepted: 'same' only "
                              f"with an odd kernel and stride 1, else an int padding")
        P = (K - 1) // 2
    else:
        P = _pair(conv.padding, "padding", where, accepted)
    return f"conv{conv.out_channels}k{K}s{S}p{P}"


def _pool_token(pool, where):
    """'maxpool<K>s<S>' for an nn.MaxPool2d minicnn can compute, else a ConfigError."""
    accepted = "square kernel and stride, padding 0, dilation 1, ceil_mode False, return_indices False"
    K = _pair(pool.kernel_size, "kernel_size", where, accepted)
    S = K if pool.stride is None else _pair(pool.stride, "stride", where, accepted)
    if _pair(pool.padding, "padding", where, accepted) != 0:
        raise ConfigError(f"{where}: padding {pool.padding}; accepted: {accepted}")
    if _pair(pool.dilation, "dilation", where, accepted) != 1:
        raise ConfigError(f"{where}: dilation {pool.dilation}; accepted: {accepted}")
    if pool.ceil_mode or pool.return_indices:
        raise ConfigError(f"{where}: ceil_mode={pool.ceil_mode}, return_indices={pool.return_indices}; "
                          f"accepted: {accepted}")
    return f"maxpool{K}s{S}"


def _out_size(size, K, S, P):
    return (size + 2 * P - K) // S + 1


def _net_dtype(params, dtype, torch):
    """The network's dtype: ``dtype`` if given, else the one float32/float64 of the parameters."""
    accepted = "float32 or float64"
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise ConfigError(f"from_torch: dtype {dt.name}; accepted: {accepted}")
        return dt
    found = sorted({str(p.dtype).replace("torch.", "") for p in params})
    if found == ["float32"] or found == ["float64"]:
        return np.dtype(found[0])
    raise ConfigError(f"from_torch: the model's parameters are {', '.join(found)}; accepted: {accepted} "
                      f"throughout, or pass dtype=np.float32 / np.float64")


def _translate(layer, where, shape, input_shape, nn):
    """(spec token or None, the output shape) of one torch layer on inputs of ``shape``."""
    if len(shape) == 1 and type(layer) in (nn.Conv2d, nn.MaxPool2d):
        raise ConfigError(f"{where} comes after a Flatten; accepted: Conv2d/MaxPool2d before the Flatten")
    if type(layer) is nn.Conv2d:
        token = _conv_token(layer, where)
        if layer.in_channels != shape[0]:
            raise ConfigError(f"{where}: in_channels {layer.in_channels}, but its input has {shape[0]} "
                              f"channels (input shape {shape})")
        K, S, P = (int(v) for v in re.fullmatch(r"conv\d+k(\d+)s(\d+)p(\d+)", token).groups())
        shape = (layer.out_channels, _out_size(shape[1], K, S, P), _out_size(shape[2], K, S, P))
    elif type(layer) is nn.MaxPool2d:
        token = _pool_token(layer, where)
        K, S = (int(v) for v in re.fullmatch(r"maxpool(\d+)s(\d+)", token).groups())
        shape = (shape[0], _out_size(shape[1], K, S, 0), _out_size(shape[2], K, S, 0))
    elif type(layer) is nn.ReLU:
        token = "relu"
    elif type(layer) is nn.Flatten:
        if (layer.start_dim, layer.end_dim) != (1, -1):
            raise ConfigError(f"{where}: start_dim={layer.start_dim}, end_dim={layer.end_dim}; "
                              f"accepted: nn.Flatten() (start_dim 1, end_dim -1)")
        if len(shape) == 1:
            return None, shape
        token, shape = "flatten", (int(np.prod(shape)),)
    elif type(layer) is nn.Linear:
        if len(shape) != 1:
            raise ConfigError(f"{where} gets a {'x'.join(map(str, shape))} input, which torch's Linear would "
                              f"apply to the last axis only; accepted: an nn.Flatten() before the first Linear")
        if layer.in_features != shape[0]:
            raise ConfigError(f"{where}: in_features {layer.in_features}, but its input has {shape[0]} "
                              f"features (input shape {tuple(input_shape)})")
        token, shape = f"fc{layer.out_features}", (layer.out_features,)
    else:
        raise ConfigError(f"{where} is not supported; accepted: {ACCEPTED_LAYERS} (in an nn.Sequential)")
    if min(shape) < 1:
        raise ConfigError(f"{where} does not fit its input: its output would be {shape} for input_shape "
                          f"{tuple(input_shape)}; use a larger input")
    return token, shape


def from_torch(model, input_shape, dtype=None, device="cpu"):
    """A minicnn Network with the layers and a copy of the weights of a torch ``nn.Sequential``.

    model: nn.Sequential of Conv2d, ReLU, MaxPool2d, Flatten, Linear (see the module docstring)
    input_shape: (C, H, W) of one sample
    dtype: the network's float type; default that of the model's parameters (float32 or float64)
    device: "cpu", "numpy" or "cuda", as for Network
    Returns the Network; ``net.spec`` is its canonical spec string (print it to see the network).
    Bad input raises a one-line ConfigError naming the layer (its index as in ``model[i]``).
    """
    torch = _import_torch()
    nn = torch.nn
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        raise ConfigError(f"from_torch: got a {type(model).__name__}; accepted: an nn.Sequential of "
                          f"{ACCEPTED_LAYERS} (write the model as one, or load its state_dict into a Network "
                          f"with minicnn.torch.load_state_dict_file)")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"from_torch: input_shape {input_shape!r}; accepted: (C, H, W) of one sample, "
                          f"e.g. (1, 28, 28)")
    layers = _walk(model)
    if not layers:
        raise ConfigError(f"from_torch: the nn.Sequential is empty; accepted: layers {ACCEPTED_LAYERS}, "
                          f"the last a Linear")

    tokens, weights = [], []          # spec tokens; [(weight, bias or None)] of conv/fc layers in order
    for path, layer in layers:
        token, shape = _translate(layer, f"layer {path} ({type(layer).__name__})", shape, input_shape, nn)
        if token is None:
            continue                                    # flattening a flat input: nothing to do
        if token.startswith(("conv", "fc")):
            weights.append((layer.weight, layer.bias))
        tokens.append(token)
    path, last = layers[-1]
    if type(last) is not nn.Linear:
        raise ConfigError(f"layer {path} ({type(last).__name__}) is last; accepted: a Linear last "
                          f"(minicnn's loss is cross-entropy on its logits)")

    params = [p for w, b in weights for p in (w, b) if p is not None]
    dt = _net_dtype(params, dtype, torch)
    net = Network("-".join(tokens), tuple(int(s) for s in input_shape), dtype=dt, device=device)
    arrays = []
    with torch.no_grad():
        for w, b in weights:
            arrays.append(w.detach().to("cpu", torch.float64).numpy())
            arrays.append(np.zeros(w.shape[0]) if b is None else b.detach().to("cpu", torch.float64).numpy())
    net.set_params(arrays)                  # float64 -> the network's dtype: exact for float32 parameters
    return net


def to_torch(net):
    """A torch ``nn.Sequential`` with the layers, layer order and a copy of the weights of ``net``.

    Its parameters are float64 for a float64 network, else float32, on the CPU. Every conv/fc
    layer has a bias. Building it does not draw from torch's random number generator.
    """
    torch = _import_torch()
    nn = torch.nn
    tdtype = torch.float64 if net.dtype == np.float64 else torch.float32
    meta = dict(device="meta", dtype=tdtype)      # no init drawn: the weights are copied in below
    layers = []
    for layer in net.layers:
        if layer.kind == "conv":
            layers.append(nn.Conv2d(layer.in_shape[0], layer.F, layer.K, layer.S, layer.P, **meta))
        elif layer.kind == "relu":
            layers.append(nn.ReLU())
        elif layer.kind == "maxpool":
            layers.append(nn.MaxPool2d(layer.K, layer.S))
        elif layer.kind == "flatten":
            layers.append(nn.Flatten())
        else:
            layers.append(nn.Linear(layer.in_shape[0], layer.out_shape[0], **meta))
    model = nn.Sequential(*layers).to_empty(device="cpu")
    with torch.no_grad():
        for tp, a in zip(model.parameters(), net.state_dict().values()):
            tp.copy_(torch.from_numpy(a))
    return model


# --------------------------------------------------------------------------- state_dict files
def _host(value):
    """A float64 NumPy copy of a torch tensor or array-like (torch not needed for arrays)."""
    if hasattr(value, "detach"):
        return value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=np.float64)


def _is_float(value):
    if hasattr(value, "is_floating_point"):
        return value.is_floating_point()
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _shape(value):
    return tuple(int(s) for s in value.shape)


def _sources(net, state, shapes):
    """({minicnn name: key in state, or None for a zero bias}, [unexpected keys])."""
    keys = list(state)
    source_of = {}                               # minicnn name -> key in state (None: zero bias)
    unexpected = []
    if keys and all(MINICNN_KEY.fullmatch(k) for k in keys):
        unexpected = [k for k in keys if k not in shapes]
        source_of = {n: n for n in net.param_names if n in state}
    else:
        groups = {}                              # layer prefix -> {"weight": key, "bias": key}, in order
        for k in keys:
            prefix, _, suffix = k.rpartition(".")
            groups.setdefault(prefix, {})[suffix] = k
        layers = []
        for members in groups.values():
            if "weight" in members and set(members) <= {"weight", "bias"}:
                layers.append(members)
            else:                                # not a Conv2d/Linear (a BatchNorm's buffers, ...)
                unexpected += list(members.values())
        names = [name for name, _ in net.param_layers()]
        for members in layers[len(names):]:
            unexpected += list(members.values())
        for name, members in zip(names, layers):
            source_of[f"{name}.weight"] = members["weight"]
            source_of[f"{name}.bias"] = members.get("bias")      # every minicnn conv/fc layer has a bias
    for name in net.param_names:                # a weight without its bias: the bias=False case
        if name.endswith(".bias") and name not in source_of and name[:-5] + ".weight" in source_of:
            source_of[name] = None
    return source_of, unexpected


def _mismatches(net, state, shapes, source_of, unexpected):
    """The problems of a matched state_dict, one phrase each (empty: it fits)."""
    issues = []
    missing = [n for n in net.param_names if n not in source_of]
    if missing:
        issues.append("missing " + ", ".join(missing))
    if unexpected:
        issues.append("unexpected " + ", ".join(unexpected))
    wrong = [f"{key} {_shape(state[key])} for {name} {shapes[name]}" for name, key in source_of.items()
             if key is not None and _shape(state[key]) != shapes[name]]
    if wrong:
        issues.append("wrong shape " + ", ".join(wrong))
    not_float = [key for key in source_of.values() if key is not None and not _is_float(state[key])]
    if not_float:
        issues.append("not floating point " + ", ".join(not_float))
    return issues


def match_state_dict(net, state, source="state_dict"):
    """Match a state_dict's tensors to ``net``'s parameters; a one-line ConfigError names every mismatch.

    state: {key: tensor or array}. Keys all of minicnn's form (conv1.weight, fc2.bias) are matched
    by name; any other keys (nn.Sequential's 0.weight, features.3.bias, ...) are grouped by layer
    (the part before the last '.') in order, and the groups matched to net's conv/fc layers in order.
    A layer with a weight and no bias (torch's bias=False) gets a zero bias.
    Returns (arrays in ``net.params`` order as float64, {minicnn name: key it came from, or None}).
    """
    if not isinstance(state, Mapping):
        raise ConfigError(f"{source} holds a {type(state).__name__}, not a state_dict; accepted: {ACCEPTED_DICTS}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
           if not isinstance(k, str) or not hasattr(v, "shape")]
    if bad:
        raise ConfigError(f"{source} is not a state_dict of tensors: {', '.join(bad[:5])}"
                          f"{', ...' if len(bad) > 5 else ''}; accepted: {ACCEPTED_DICTS} (for a checkpoint "
                          f"dict, save its model's state_dict alone)")
    shapes = dict(zip(net.param_names, (tuple(p.shape) for p in net.params)))
    source_of, unexpected = _sources(net, state, shapes)
    issues = _mismatches(net, state, shapes, source_of, unexpected)
    if issues:
        raise ConfigError(f"{source} does not fit the network {net.spec} (input {net.input_shape}): "
                          f"{'; '.join(issues)}; accepted: {ACCEPTED_DICTS}")
    arrays = [np.zeros(shapes[n]) if source_of[n] is None else _host(state[source_of[n]]) for n in net.param_names]
    return arrays, {n: source_of[n] for n in net.param_names}


def load_state_dict_file(net, path):
    """Copy the weights of a PyTorch state_dict file into ``net`` (in place).

    path: a file written by ``torch.save(model.state_dict(), path)``; read with
    ``torch.load(path, map_location="cpu", weights_only=True)``, so a whole pickled model
    (``torch.save(model, path)``) is refused. Keys are matched as in ``match_state_dict``.
    Returns {minicnn parameter name: the file's key it came from, or None for a zero bias}.
    Raises a one-line ConfigError when the file cannot be read or does not fit the network.
    """
    torch = _import_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no file {path}; accepted: {ACCEPTED_DICTS}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # torch.load raises many kinds on a file it cannot read
        if "weights only load failed" in str(e).lower():
            raise ConfigError(f"{path} holds pickled objects other than tensors (e.g. a whole model saved with "
                              f"torch.save(model, path)), which weights_only=True loading refuses; accepted: "
                              f"{ACCEPTED_DICTS}") from None
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{path} is not a file torch.load can read ({type(e).__name__}: {why}); "
                          f"accepted: {ACCEPTED_DICTS}") from None
    arrays, source_of = match_state_dict(net, state, source=path)
    net.set_params(arrays)
    return source_of


# =========================================================================== recording a PyTorch loop
RECORDER_SOURCE = "minicnn.torch.Recorder"      # config.json "source" of a recorded run
# Defaults as minicnn's own runs (minicnn.config.PROBE_EVERY, PROBE_SIZE, CHECKPOINT_EVERY; a test
# checks they agree -- this module cannot import minicnn.config, which imports it).
PROBE_EVERY = 10
PROBE_SIZE = 256
CHECKPOINT_EVERY = 200
# config.json's input statistics (the un-normalised-inputs cause reads them) and the label entropy
# (the loss of a constant prediction) come from the first this many training samples, as minicnn's
# input_stats come from its first EVAL_TRAIN_SUBSET = 2000 images.
STATS_SAMPLES = 2000
# The full trace compares the loss after the step with the loss rec.step is given, so both must be
# the same function: loss_fn(outputs, targets) on the step's own forward must equal the given loss to
# this relative tolerance (the same float32 reduction twice agrees to a few ulps; a loss with extra
# terms, or divided for gradient accumulation, is off by far more).
LOSS_MATCH_RTOL = 1e-4
# a validation set given as an (x, y) pair is evaluated in batches of this many samples (as Network.evaluate)
EVAL_BATCH = 500
# the rows of the step buffer (see StepVectors)
ROW = {"g": 0, "w": 1, "d": 2, "p": 3, "x": 4}


def _host_ops():
    """minicnn's Numba CPU kernels (ops.cpu): plain @njit ones only, which never start Numba's
    thread pool (see Recorder)."""
    from .ops import cpu
    return cpu


class TraceLayout:
    """A torch model's layers as minicnn.trace reads a network's (``layers`` with .name/.kind and
    ``param_layers()``), so that ``trace.columns`` and ``trace.step_norms`` name its columns:
    conv1, conv2, ... (Conv1d/2d/3d) and fc1, ... (Linear) in module order -- minicnn's names for the
    same nn.Sequential -- and relu1, relu2, ... for the nn.ReLU calls of one forward, in call order."""

    def __init__(self, param_names, relu_names):
        self.param_names = list(param_names)
        self.layers = [_Named(n, "relu") for n in relu_names]

    def param_layers(self):
        return [(n, None) for n in self.param_names]


class _Named:
    def __init__(self, name, kind):
        self.name, self.kind = name, kind


def torch_layers(model, optimizer):
    """The optimizer's parameters grouped the way the trace reports them.

    Returns ([(name, module path, [parameters])] of the Conv1d/2d/3d and Linear modules in
    ``model.named_modules()`` order, named conv1, ..., fc1, ... as from_torch names them (a module
    whose parameters the optimizer does not train keeps its number but has no entry), [the
    optimizer's other parameters] (BatchNorm, embeddings, ...: in the totals, never per layer)).
    A parameter shared by several modules belongs to the first."""
    nn = _import_torch().nn
    trained = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            trained.setdefault(id(p), p)
    layers, counts, taken = [], {}, set()
    for path, m in model.named_modules():
        kind = ("conv" if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                else "fc" if isinstance(m, nn.Linear) else None)
        if kind is None:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        ps = [p for p in (m.weight, m.bias) if p is not None and id(p) in trained and id(p) not in taken]
        taken.update(id(p) for p in ps)
        if ps:
            layers.append((f"{kind}{counts[kind]}", path, ps))
    return layers, [p for k, p in trained.items() if k not in taken]


class StepVectors:
    """One step's vectors as the rows of a float64 (5, P) buffer where the parameters live: g (the
    gradient the optimizer used), w (the weights before the step), d (the update), p (the previous
    step's gradient), x (scratch). Per segment (the trace's layers, then the other parameters) one
    matrix product of the rows g, w, d, p with themselves gives every dot product the trace needs
    (the Gram matrix: <g,g>, <w,w>, <d,d>, <g,p>, <p,p>, <g,d>), each segment summed on its own.

        vec.before()          # optimizer pre-step hook: copies g and w
        vec.after()           # post-step hook: d = w_after - w
        vec.dots()            # {"gg": (S,) float64 array, "ww", "dd", "gp", "pp", "gd"}
        vec.remember_gradient()

    A row is filled by one torch.cat (converting to float64 on the way); remember_gradient swaps
    the roles of the g and p rows instead of copying one into the other; on the host the Gram
    matrices come from one pass of a Numba kernel (ops.cpu.segment_gram4) instead of a matrix
    product per segment (measured inside network A's training loop: 120 us a step against 170).
    """

    def __init__(self, params, lengths):
        torch = _import_torch()
        self.torch, self.params = torch, list(params)
        device = self.params[0].device
        self.buf = torch.zeros(len(ROW), sum(lengths), dtype=torch.float64, device=device)
        self.rows = dict(ROW)                   # role -> row of buf (g and p trade rows every step)
        self.zeros = [torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in self.params]
        self.flat_params = None
        self.edges = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.segments = [self.buf[:ROW["x"], a:b] for a, b in zip(self.edges[:-1], self.edges[1:])]  # (4, n_s)
        self.host = _host_ops() if device.type == "cpu" else None

    def flat(self, tensors, row):
        """Copy tensors (None: zeros) into a row, in parameter order, as float64."""
        try:
            parts = [z if t is None else t.detach().reshape(-1) for t, z in zip(tensors, self.zeros)]
        except RuntimeError:                    # a sparse gradient (nn.Embedding(sparse=True))
            parts = [z if t is None else (t.to_dense() if t.is_sparse else t).detach().reshape(-1)
                     for t, z in zip(tensors, self.zeros)]
        self.torch.cat(parts, out=self.buf[self.rows[row]])

    def weights(self, row):
        """Copy the parameters into a row (through flat views of their storage, made once and
        remade when a parameter's storage changed, e.g. after model.to())."""
        if self.flat_params is None or any(v.data_ptr() != p.data_ptr() for v, p in zip(self.flat_params, self.params)):
            self.flat_params = ([p.detach().reshape(-1) for p in self.params]
                                if all(p.is_contiguous() for p in self.params) else None)
        if self.flat_params is None:
            self.flat(self.params, row)
        else:
            self.torch.cat(self.flat_params, out=self.buf[self.rows[row]])

    def before(self):
        self.flat([p.grad for p in self.params], "g")
        self.weights("w")

    def after(self):
        self.weights("x")
        buf, rows = self.buf, self.rows
        self.torch.sub(buf[rows["x"]], buf[rows["w"]], out=buf[rows["d"]])

    def remember_gradient(self):
        self.rows["g"], self.rows["p"] = self.rows["p"], self.rows["g"]

    def dots(self):
        """{pair: (S,) float64 per-segment dot products}, pairs gg ww dd gp pp gd (on a GPU: one transfer)."""
        if self.host is not None:               # one pass of a Numba kernel over the four rows
            gram = self.host.segment_gram4(self.buf[:ROW["x"]].numpy(), self.edges)
        else:
            gram = self.torch.stack([v @ v.T for v in self.segments]).cpu().numpy()      # (S, 4, 4)
        rows = self.rows
        return {a + b: gram[:, rows[a], rows[b]] for a, b in ("gg", "ww", "dd", "gp", "pp", "gd")}

    def dot_update(self, grads):
        """<grads, d> over all parameters, in float64 (grads: one per parameter, None for zero)."""
        self.flat(grads, "x")
        return float(self.buf[self.rows["x"]] @ self.buf[self.rows["d"]])


class _Means:
    """Running means of a few trace columns since the last evaluation (sums, not the records: a
    long run without evaluations would otherwise keep every step's record)."""
    KEYS = ("loss", "batch_acc")

    def __init__(self):
        self.sums, self.counts = dict.fromkeys(self.KEYS, 0.0), dict.fromkeys(self.KEYS, 0)

    def add(self, rec):
        for k in self.KEYS:
            if k in rec:
                self.sums[k] += rec[k]
                self.counts[k] += 1

    def mean(self, key):
        """The mean since the last evaluation (NaN where there is none)."""
        return self.sums[key] / self.counts[key] if self.counts[key] else math.nan


class _Capture:
    """What one forward of the model showed: its output (the logits) and, per nn.ReLU call in call
    order, (units alive on some sample, units)."""

    def __init__(self):
        self.logits, self.relus = None, []


class Recorder:
    """Record a PyTorch training loop as a minicnn run directory, for ``minicnn inspect``.

        rec = minicnn.torch.Recorder(model, optimizer, out="runs/mine", probe=(x_val[:256], y_val[:256]))
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            rec.step(loss, x, y)        # once per step, AFTER optimizer.step()
        rec.close()                     # or use it as a context manager: with Recorder(...) as rec:

    The run directory is minicnn's (minicnn.rundir): config.json (what is known: the optimizer and
    its hyperparameters, batch size, input shape and statistics, classes, the minicnn spec when
    the model converts with from_torch), steps.csv (minicnn.trace's columns, one row per
    rec.step), evals.csv (with ``val_data`` or ``eval_fn``), checkpoints/ every
    ``checkpoint_every`` steps (step_XXXXXXX.pt: the model's state_dict, .optimizer.pt: the
    optimizer's, and .npz in minicnn's format when the model converts), summary.json and loss.png
    on close.

    model: any nn.Module; its output is taken as the logits (N, L) where it is one such tensor
    optimizer: any torch.optim optimizer; ``lr`` is its first parameter group's
    level: "off" (lr, loss), "light" (+ norms, update ratios, gradient cosine, dead ReLUs, logit
        statistics, from the step's own forward/backward), "full" (+ the loss on the same batch
        after the step, its first-order prediction and, with ``alpha``, Cockpit's alpha: one more
        forward and, for alpha, backward on the step's batch)
    probe: (x, y) held-out images (e.g. 256 validation images) measured every ``probe_every``
        steps before the step, in eval mode: the diagnosis's evidence for dead layers and collapse
    val_data: an (x, y) pair or an iterable of (x, y) batches (a DataLoader), evaluated before the
        first step, every ``eval_every`` steps and on close (val_loss, val_acc); or
    eval_fn: eval_fn(model) -> {"val_loss": ..., "val_acc": ...} called instead
    loss_fn: loss_fn(outputs, targets), the loss rec.step is given (default: mean cross-entropy);
        used for the probe, the validation data and the loss after the step
    config: a dict of your own settings, stored in config.json under "user"

    Per layer (conv1, ..., fc1, ... as TraceLayout names them): gradient and weight norms and the
    update ratio |dw|/|w|; in total: the norms and the cosine between consecutive gradients (the
    gradient as the optimizer saw it, after any clipping). Per nn.ReLU call: the share of units
    zero on every sample (forward hooks; ReLUs called as F.relu cannot be seen). Parameters of
    other modules count in the totals only. Only forwards with gradients enabled are read (your
    own no_grad evaluations are not); with several forwards per step the last counts. The full
    trace's extra forward leaves the model's buffers (BatchNorm statistics) and the random number
    generators as it found them. ``rec.unavailable`` says what could not be measured and why.
    Memory: about ten copies of the parameters (the step's vectors, see StepVectors).

    It never starts Numba's thread pool (config.json's environment is PyTorch's, not
    minicnn.rundir.environment()): in one process with PyTorch that pool slowed PyTorch's CPU steps
    eightfold (measured: network A at batch 64, 33 ms -> 262 ms per step after numba.get_num_threads()).
    The two Numba kernels it calls on the host (ops.cpu.segment_gram4, logit_stats_from_logits) are
    plain serial @njit functions, which do not start it.
    """

    def __init__(self, model, optimizer, out, level="light", probe=None, probe_every=PROBE_EVERY, val_data=None,
                 eval_every=None, eval_fn=None, loss_fn=None, checkpoint_every=CHECKPOINT_EVERY, alpha=True,
                 config=None):
        from .rundir import CHECKPOINT_DIR, EVAL_COLUMNS, EVALS, CsvLog
        torch = _import_torch()
        _check_recorder_args(torch, model, optimizer, level, probe, probe_every, val_data, eval_every, eval_fn,
                             checkpoint_every)
        self.torch, self.model, self.optimizer, self.out = torch, model, optimizer, os.fspath(out)
        self.level, self.alpha, self.user = level, bool(alpha), dict(config or {})
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.probe_every, self.eval_every, self.checkpoint_every = probe_every, eval_every, checkpoint_every
        self.val_data, self.eval_fn = val_data, eval_fn
        self.layers, others = torch_layers(model, optimizer)
        params = [p for _, _, ps in self.layers for p in ps] + others
        lengths = [sum(p.numel() for p in ps) for _, _, ps in self.layers] + ([sum(p.numel() for p in others)]
                                                                              if others else [])
        self.vectors = StepVectors(params, lengths) if level != "off" and params else None
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.probe_x, self.probe_y = self.on_device(probe) if probe is not None else (None, None)
        self.weight_modules = [m for m in model.modules()
                               if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]
        self.buffers = list(model.buffers())
        self.train_seen, self.probe_seen, self.slot, self.mode = _Capture(), _Capture(), None, None
        self.step_count, self.optimizer_steps, self.stepped, self.prepared = 0, 0, False, -1
        self.lr, self.probed, self.remembered, self.layout, self.steps_log = None, {}, False, None, None
        self.input_shape, self.num_classes, self.net, self.unavailable, self.batch_size = None, None, None, {}, None
        self.stats = {"n": 0, "count": 0, "sum": 0.0, "sumsq": 0.0, "min": math.inf, "max": -math.inf,
                      "labels": np.zeros(0, np.int64)}
        self.since_eval, self.eval_records, self.last_eval = _Means(), [], None
        self.nonfinite, self.last_loss = None, None
        self.t0, self.first_step_s, self.closed, self.summary, self.epoch = time.perf_counter(), None, False, None, None
        os.makedirs(os.path.join(self.out, CHECKPOINT_DIR), exist_ok=True)
        self.evals_log = CsvLog(os.path.join(self.out, EVALS), EVAL_COLUMNS)
        self.hooks = self.install()
        self.write_config()
        if val_data is not None or eval_fn is not None:
            self.evaluate(0)

    # ------------------------------------------------------------------ hooks
    def install(self):
        """The forward hooks (the model: its output; every nn.ReLU: dead units) and the optimizer's
        step hooks; removed on close."""
        hooks = [self.model.register_forward_pre_hook(self.on_forward_start),
                 self.model.register_forward_hook(self.on_forward_end)]
        hooks += [m.register_forward_hook(self.on_relu) for m in self.model.modules()
                  if isinstance(m, self.torch.nn.ReLU) and m is not self.model]
        hooks += [self.optimizer.register_step_pre_hook(self.before_step),
                  self.optimizer.register_step_post_hook(self.after_step)]
        return hooks

    def on_forward_start(self, module, args):
        """Which capture this forward fills: the probe's, the training step's (a forward with
        gradients enabled outside the Recorder's own), or none."""
        if self.mode == "probe":
            self.slot = self.probe_seen
        elif self.mode is None and self.torch.is_grad_enabled():
            self.slot = self.train_seen
            if args and hasattr(args[0], "shape"):
                self.input_shape = tuple(int(s) for s in args[0].shape[1:])
        else:
            self.slot = None
        if self.slot is not None:
            self.slot.logits, self.slot.relus = None, []

    def on_relu(self, module, args, output):
        if self.slot is not None and self.torch.is_tensor(output) and output.dim() > 0 and len(output):
            units = math.prod(output.shape[1:])          # >= 0 after a ReLU: a unit is alive iff its sum > 0
            self.slot.relus.append((output.detach().sum(0).count_nonzero(), units))

    def on_forward_end(self, module, args, output):
        if self.slot is not None:
            self.slot.logits = output.detach() if self.torch.is_tensor(output) else None
        self.slot = None

    def before_step(self, optimizer, args, kwargs):
        """Before optimizer.step(): the lr it uses; the probe and checkpoint due before step t, on the
        weights before it (as minicnn measures and saves them); the gradient and the weights."""
        t = self.step_count
        self.lr = _scalar(optimizer.param_groups[0]["lr"])
        if self.prepared != t:                      # once per record, even if the optimizer steps twice
            self.prepared = t
            if self.probe_x is not None and self.level != "off" and self.probe_every and t % self.probe_every == 0:
                self.probed = self.measure_probe()
            if self.checkpoint_every and t % self.checkpoint_every == 0:
                from .rundir import checkpoint_path
                self.write_checkpoint(checkpoint_path(self.out, t)[:-len(".npz")], t)
        if self.vectors is not None:
            self.vectors.before()
        self.optimizer_steps += 1

    def after_step(self, optimizer, args, kwargs):
        if self.vectors is not None:
            self.vectors.after()
        self.stepped = True

    # ------------------------------------------------------------------ one step
    def step(self, loss, inputs, targets, epoch=None):
        """Record the step just taken (call after optimizer.step()); returns its trace record.

        loss: the step's loss (a tensor or a number); inputs, targets: its batch; epoch: written to
        the epoch column if given. A non-finite loss is recorded (and the run ends 'diverged' on close).
        """
        if self.closed:
            raise ConfigError("Recorder.step after close(); make a new Recorder for a new run")
        t, value = self.step_count, _scalar(loss)
        if t == 0:
            self.start(value, inputs, targets)
        self.epoch = epoch if epoch is not None else self.epoch
        rec = {"step": t, "lr": self.lr if self.stepped else _scalar(self.optimizer.param_groups[0]["lr"]),
               "loss": value}
        if epoch is not None:
            rec["epoch"] = epoch
        if self.level != "off" and math.isfinite(value):
            rec.update(self.instruments(value, inputs, targets))
        rec.update(self.probed)
        self.probed, self.stepped = {}, False
        rec["time_s"] = time.perf_counter() - self.t0
        self.steps_log.write(rec)
        self.account(rec, inputs, targets)
        self.step_count += 1
        if self.eval_every and self.step_count % self.eval_every == 0:
            self.evaluate(self.step_count)
        return rec

    def instruments(self, loss, inputs, targets):
        """The light (and full) trace of the step: logit statistics and dead units of its forward,
        the norms of its gradient, weights and update (trace.step_norms), and at full the same-batch test."""
        from .trace import step_norms
        rec = {}
        if self.train_seen.logits is not None:
            rec.update(self.logit_stats(self.train_seen.logits, targets))
        rec.update(self.dead(self.train_seen, "dead."))
        if not (self.stepped and self.vectors is not None):
            return rec
        dots = self.vectors.dots()
        rec.update(step_norms(self.layout, dots, cos=self.remembered))
        self.vectors.remember_gradient()
        self.remembered = True
        if self.level == "full" and "loss_after" not in self.unavailable:
            rec.update(self.same_batch(loss, inputs, targets, float(dots["gd"].sum())))
        return rec

    def start(self, loss, inputs, targets):
        """At the first rec.step: check the contract, fix the columns (the ReLU calls of the first
        forward), say what cannot be measured, and write config.json with what is now known."""
        from .rundir import STEPS, CsvLog
        from .trace import columns
        torch = self.torch
        if self.optimizer_steps == 0 and not any(p.grad is not None and not torch.isfinite(p.grad).all()
                                                 for p in self.model.parameters()):
            raise ConfigError("Recorder.step: the optimizer has not stepped yet; call rec.step(loss, inputs, "
                              "targets) once per step, after optimizer.step()")
        seen = self.train_seen
        self.layout = TraceLayout([name for name, _, _ in self.layers],
                                  [f"relu{i + 1}" for i in range(len(seen.relus))])
        if self.level != "off":
            self.note_unavailable(seen, inputs, targets, loss)
        if seen.logits is not None and seen.logits.dim() == 2:
            self.num_classes = int(seen.logits.shape[1])
        cols = columns(self.layout, self.level, False, probe=self.probe_x is not None)
        self.steps_log = CsvLog(os.path.join(self.out, STEPS), cols)
        self.batch_size = int(len(targets)) if hasattr(targets, "__len__") else None
        self.write_config()

    def note_unavailable(self, seen, inputs, targets, loss):
        """rec.unavailable: {what: why} for the quantities this model or loop does not allow."""
        torch, why = self.torch, self.unavailable
        if not self.layers:
            why["per-layer norms"] = "the optimizer trains no Conv1d/2d/3d or Linear layer"
        if not seen.relus:
            why["dead units"] = "no nn.ReLU module was called (F.relu and other activations cannot be hooked)"
        if seen.logits is None or seen.logits.dim() != 2:
            why["logit statistics"] = ("no training forward was seen (is the Recorder's model the one called?)"
                                       if seen.logits is None and not seen.relus else
                                       "the model's output is not one (N, classes) tensor of logits")
        elif not _class_indices(torch, targets, len(seen.logits)):
            why["batch_acc"] = "the targets are not class indices (N,)"
        if self.probe_x is None:
            why["probe"] = ("no probe data (probe=(x, y) of held-out images): dead layers and a constant "
                            "prediction cannot be told on a training batch")
        if self.level != "full":
            return
        if not torch.is_tensor(inputs):
            why["loss_after"] = "the inputs are not one tensor: the model cannot be run again on them"
        elif seen.logits is None:
            why["loss_after"] = "the model's output is not one tensor"
        else:
            with torch.no_grad():
                again = _scalar(self.loss_fn(seen.logits, targets))
            if not abs(again - loss) <= LOSS_MATCH_RTOL * max(abs(loss), 1e-12):
                raise ConfigError(f"Recorder(level='full'): the loss given to rec.step ({loss:.6g}) is not "
                                  f"loss_fn(outputs, targets) ({again:.6g}); pass loss_fn=your loss so that the "
                                  f"loss after the step compares with it")

    def logit_stats(self, logits, targets):
        """Largest |logit|, mean softmax entropy, share predicted as the top class and (for class-index
        targets) accuracy of a batch's (N, L) logits, as minicnn's ops.logit_stats, in float64 on the
        host: one Numba kernel (ops.cpu.logit_stats_from_logits; NumPy took a dozen calls, 250 us a
        step in a training loop against ~30)."""
        torch = self.torch
        if logits.dim() != 2 or not len(logits) or not logits.shape[1]:
            return {}
        z = logits.detach().cpu()
        z = z.numpy() if z.dtype in (torch.float32, torch.float64) else z.to(torch.float64).numpy()
        y = targets.detach().cpu().numpy() if _class_indices(torch, targets, len(z)) else None
        return _host_ops().logit_stats_from_logits(z, y)

    def dead(self, seen, prefix):
        """{prefix + relu<i>: share of units zero on every sample} of a capture's ReLU calls."""
        if not seen.relus:
            return {}
        alive = self.torch.stack([a for a, _ in seen.relus]).tolist()
        return {f"{prefix}relu{i + 1}": 1.0 - a / units for i, (a, (_, units)) in enumerate(zip(alive, seen.relus))}

    def same_batch(self, loss, inputs, targets, df0):
        """The full trace's test of the step on its own batch (as trace.StepMeter.same_batch): the
        loss after it, the change against the first-order prediction <g, d>, and alpha from the
        gradient after it. The model's buffers and the RNGs are left as they were."""
        from .trace import alpha_from_step
        torch = self.torch
        saved = [b.detach().clone() for b in self.buffers]
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.mode = "after"
        try:
            with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(self.alpha):
                after = self.loss_fn(self.model(inputs), targets)
                grads = (torch.autograd.grad(after, self.vectors.params, allow_unused=True)
                         if self.alpha and after.requires_grad else None)
        finally:
            self.mode = None
            with torch.no_grad():
                for b, s in zip(self.buffers, saved):
                    b.copy_(s)
        loss_after = _scalar(after)
        rec = {"loss_after": loss_after, "loss_change": loss_after - loss, "predicted_change": df0}
        if grads is not None and math.isfinite(loss_after):
            rec["alpha"] = alpha_from_step(loss, loss_after, df0, self.vectors.dot_update(grads))
        return rec

    def measure_probe(self):
        """probe_* columns (as minicnn.trace.Probe): loss, accuracy, top-class share, largest |logit|,
        entropy and the dead share of every ReLU call, on the probe images in eval mode."""
        torch = self.torch
        self.mode = "probe"
        try:
            with torch.no_grad(), self.eval_mode():
                out = self.model(self.probe_x)
        finally:
            self.mode = None
        if not torch.is_tensor(out) or out.dim() != 2:
            return {}
        st = self.logit_stats(out, self.probe_y)
        rec = {"probe_loss": _scalar(self.loss_fn(out, self.probe_y)), "probe_acc": st.pop("batch_acc", math.nan)}
        rec.update({f"probe_{k}": v for k, v in st.items()})
        rec.update(self.dead(self.probe_seen, "probe_dead."))
        return rec

    @contextmanager
    def eval_mode(self):
        """The model in eval mode, every module's own mode restored after."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    # ------------------------------------------------------------------ evaluations
    def evaluate(self, step=None):
        """Evaluate now (eval_fn(model), else val_data) and append the row to evals.csv. train_loss
        and train_acc are the means of the recorded batch losses and accuracies since the last
        evaluation (NaN before the first step)."""
        from .rundir import EVAL_COLUMNS
        if self.eval_fn is None and self.val_data is None:
            raise ConfigError("Recorder.evaluate: no validation data; give val_data=(x, y) or a DataLoader, "
                              "or eval_fn=")
        step = self.step_count if step is None else int(step)
        vals = dict(self.eval_fn(self.model)) if self.eval_fn is not None else self.validation()
        rec = {"step": step, "epoch": self.epoch, "train_loss": self.since_eval.mean("loss"),
               "train_acc": self.since_eval.mean("batch_acc")}
        rec.update({k: _scalar(v) for k, v in vals.items() if k in EVAL_COLUMNS[2:]})
        if rec["epoch"] is None:
            del rec["epoch"]
        self.evals_log.write(rec)
        self.eval_records.append(rec)
        self.since_eval, self.last_eval = _Means(), step
        return rec

    def validation(self):
        """Mean loss and accuracy over the validation data, in eval mode without gradients."""
        torch = self.torch
        total, correct, n = 0.0, 0, 0
        self.mode = "eval"
        try:
            with torch.no_grad(), self.eval_mode():
                for xb, yb in self.val_batches():
                    out = self.model(xb)
                    total += _scalar(self.loss_fn(out, yb)) * len(yb)
                    if torch.is_tensor(out) and out.dim() == 2 and _class_indices(torch, yb, len(out)):
                        correct += int((out.argmax(1) == yb).sum())
                    n += len(yb)
        finally:
            self.mode = None
        if n == 0:
            raise ConfigError("Recorder: val_data holds no samples")
        return {"val_loss": total / n, "val_acc": correct / n}

    def val_batches(self):
        data = self.val_data
        if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
            x, y = self.on_device(data)
            for i in range(0, len(y), EVAL_BATCH):
                yield x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]
            return
        for batch in data:
            yield self.on_device(batch[:2])

    def on_device(self, pair):
        """(x, y) tensors (NumPy arrays converted) on the model's device, x in the parameters' dtype."""
        torch = self.torch
        x, y = (torch.as_tensor(v) for v in pair)
        if x.is_floating_point():
            x = x.to(self.dtype)
        return x.to(self.device), y.to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, base, step):
        """base.pt (the model's state_dict), base.optimizer.pt (the optimizer's) and, when the model
        converts with from_torch, base.npz in minicnn's checkpoint format (weights, SGD momentum)."""
        from .rundir import save_checkpoint
        torch = self.torch
        state = self.model.state_dict()
        torch.save(state, base + ".pt")
        torch.save(self.optimizer.state_dict(), base + ".optimizer.pt")
        net = self.minicnn_net()
        if net is not None:
            arrays, _ = match_state_dict(net, state)
            net.set_params(arrays)
            save_checkpoint(base + ".npz", net, self.minicnn_sgd(net), step)

    def minicnn_net(self):
        """The model as a minicnn Network (from_torch, once the input shape is known), or None with the
        reason in rec.unavailable."""
        if self.net is None and self.input_shape is not None and "minicnn network" not in self.unavailable:
            try:
                self.net = from_torch(self.model, self.input_shape, device="numpy")
            except ConfigError as e:
                self.unavailable["minicnn network"] = str(e)
        return self.net

    def minicnn_sgd(self, net):
        """minicnn's SGD with the torch SGD's hyperparameters and momentum buffers (in net's parameter
        order; a missing buffer or bias is zero, as torch starts them); plain SGD for other optimizers."""
        from .sgd import SGD
        torch, opt = self.torch, self.optimizer
        if not isinstance(opt, torch.optim.SGD):
            return SGD()
        g = opt.param_groups[0]
        sgd = SGD(lr=_scalar(g["lr"]), momentum=g["momentum"], weight_decay=g["weight_decay"],
                  dampening=g["dampening"], nesterov=g["nesterov"])
        if g["momentum"]:
            tensors = [t for m in self.weight_modules for t in (m.weight, m.bias)]
            bufs = [None if t is None else opt.state.get(t, {}).get("momentum_buffer") for t in tensors]
            sgd.load_state_dict({"buffers": [np.zeros(p.shape) if b is None else _host(b)
                                             for b, p in zip(bufs, net.params)]})
        return sgd

    # ------------------------------------------------------------------ the run as a whole
    def describe(self):
        """config.json: what is known of the run (see the class docstring)."""
        from .rundir import label_entropy
        torch, opt = self.torch, self.optimizer
        g = opt.param_groups[0]
        cfg = {"lr": self.lr, "batch_size": self.batch_size, "trace": self.level,
               "probe_every": self.probe_every if self.probe_x is not None else 0,
               "probe_size": len(self.probe_y) if self.probe_y is not None else 0,
               "checkpoint_every": self.checkpoint_every, "eval_every": self.eval_every}
        cfg.update({k: _json_value(g[k]) for k in ("momentum", "weight_decay", "nesterov") if k in g})
        st = self.stats
        out = {"source": RECORDER_SOURCE, "config": cfg,
               "optimizer": {"class": type(opt).__name__,
                             "param_groups": [{k: _json_value(v) for k, v in grp.items() if k != "params"}
                                              for grp in opt.param_groups]},
               "model": type(self.model).__name__, "spec": self.net.spec if self.net is not None else None,
               "layers": {name: path for name, path, _ in self.layers}, "input_shape": self.input_shape,
               "num_params": sum(p.numel() for p in self.model.parameters()), "num_classes": self.num_classes,
               "trace_level": self.level, "eval_every": self.eval_every, "unavailable": self.unavailable,
               "environment": {"python": platform.python_version(), "numpy": np.__version__,
                               "machine": platform.machine(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads(), "device": str(self.device)},
               "user": self.user}
        if st["count"]:
            mean = st["sum"] / st["count"]
            out["input_stats"] = {"mean": mean, "std": math.sqrt(max(st["sumsq"] / st["count"] - mean * mean, 0.0)),
                                  "min": st["min"], "max": st["max"], "samples": st["n"]}
        if st["labels"].sum() and self.num_classes:
            labels = np.repeat(np.arange(len(st["labels"])), st["labels"])
            out["label_entropy"] = label_entropy(labels, max(self.num_classes, len(st["labels"])))
        return out

    def write_config(self):
        from .rundir import CONFIG, write_json
        if self.input_shape is not None:
            self.minicnn_net()
        write_json(os.path.join(self.out, CONFIG), self.describe())

    def account(self, rec, inputs, targets):
        """After a record: the first step's time, the first non-finite loss, the means since the last
        evaluation, and the input and label statistics of the first STATS_SAMPLES samples."""
        torch, st = self.torch, self.stats
        if self.first_step_s is None:
            self.first_step_s = rec["time_s"]
        self.last_loss = rec["loss"]
        if self.nonfinite is None and not math.isfinite(rec["loss"]):
            self.nonfinite = rec["step"]
        self.since_eval.add(rec)
        if st["n"] >= STATS_SAMPLES or not torch.is_tensor(inputs) or not inputs.is_floating_point():
            return
        x = inputs.detach()
        var, mean = torch.var_mean(x, correction=0)
        lo, hi, var, mean = torch.stack([*torch.aminmax(x), var, mean]).tolist()
        n = x.numel()
        st.update(min=min(st["min"], lo), max=max(st["max"], hi), sum=st["sum"] + mean * n,
                  sumsq=st["sumsq"] + (var + mean * mean) * n, count=st["count"] + n, n=st["n"] + len(x))
        if _class_indices(torch, targets, len(x)):
            c = torch.bincount(targets.detach().cpu()).numpy()
            n = max(len(c), len(st["labels"]))
            st["labels"] = np.pad(st["labels"], (0, n - len(st["labels"]))) + np.pad(c, (0, n - len(c)))
        if st["n"] >= STATS_SAMPLES:
            self.write_config()

    def close(self, status=None, message=""):
        """Finish the run: remove the hooks, evaluate (with validation data), write the final
        checkpoint, summary.json (status finished / diverged / interrupted / error), config.json and
        loss.png. Returns the summary; a second call returns it again."""
        from .rundir import FINAL_CHECKPOINT, STEPS, SUMMARY, CsvLog, write_json
        if self.closed:
            return self.summary
        self.closed = True
        for h in self.hooks:
            h.remove()
        if status is None:
            status = "finished" if self.nonfinite is None else "diverged"
            if self.nonfinite is not None:
                message = f"loss became non-finite at step {self.nonfinite} (every step is recorded)"
        try:
            if status in ("finished", "diverged"):
                if (self.val_data is not None or self.eval_fn is not None) and self.last_eval != self.step_count:
                    self.evaluate(self.step_count)
                self.write_checkpoint(os.path.join(self.out, FINAL_CHECKPOINT)[:-len(".npz")], self.step_count)
        finally:
            if self.steps_log is None:
                self.steps_log = CsvLog(os.path.join(self.out, STEPS), ["step", "epoch", "lr", "loss", "time_s"])
            self.steps_log.close()
            self.evals_log.close()
            last = self.eval_records[-1] if self.eval_records else {}
            vals = [r["val_loss"] for r in self.eval_records if "val_loss" in r]
            self.summary = {"status": status, "message": message, "steps": self.step_count,
                            "wall_s": time.perf_counter() - self.t0, "first_step_s": self.first_step_s,
                            "final_eval": last, "best_val_loss": min(vals) if vals else None,
                            "final_train_loss": self.last_loss}
            self.write_config()
            write_json(os.path.join(self.out, SUMMARY), self.summary)
        from .plots import plot_losses
        plot_losses(self.out)
        return self.summary

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.close()
        elif issubclass(kind, KeyboardInterrupt):
            self.close("interrupted", f"interrupted at step {self.step_count}; every finished step is recorded")
        else:
            self.close("error", f"{kind.__name__}: {exc}")
        return False


def _check_recorder_args(torch, model, optimizer, level, probe, probe_every, val_data, eval_every, eval_fn,
                         checkpoint_every):
    """One-line ConfigErrors for Recorder arguments it cannot use."""
    from .trace import TRACE_LEVELS
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"Recorder: model is a {type(model).__name__}; accepted: a torch.nn.Module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"Recorder: optimizer is a {type(optimizer).__name__}; accepted: a torch.optim optimizer")
    if level not in TRACE_LEVELS:
        raise ConfigError(f"Recorder: level {level!r}; accepted: {', '.join(TRACE_LEVELS)}")
    if probe is not None and not (isinstance(probe, (tuple, list)) and len(probe) == 2
                                  and hasattr(probe[0], "shape") and len(probe[0]) == len(probe[1]) > 0):
        raise ConfigError(f"Recorder: probe is a {type(probe).__name__} that is not an (x, y) pair of one length; "
                          f"accepted: held-out inputs and their labels, e.g. probe=(x_val[:256], y_val[:256])")
    for name, v, low in (("probe_every", probe_every, 1), ("eval_every", eval_every, 1),
                         ("checkpoint_every", checkpoint_every, 0)):
        if v is not None and not (isinstance(v, int) and v >= low):
            raise ConfigError(f"Recorder: {name}={v!r}; accepted: an int >= {low}"
                              + " or None" * (name == "eval_every"))
    if eval_every and val_data is None and eval_fn is None:
        raise ConfigError("Recorder: eval_every needs val_data=(x, y) or a DataLoader, or eval_fn=")


def _scalar(v):
    """A Python float from a number or a one-element tensor."""
    return float(v.detach()) if hasattr(v, "detach") else float(v)


def _json_value(v):
    """A param_group value as JSON can hold it (tensors as numbers, tuples as lists)."""
    if hasattr(v, "detach"):
        return v.detach().cpu().tolist()
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)


def _class_indices(torch, targets, n):
    """Whether targets are (n,) integer class indices."""
    return (torch.is_tensor(targets) and targets.dim() == 1 and len(targets) == n
            and not targets.is_floating_point() and not targets.is_complex())
