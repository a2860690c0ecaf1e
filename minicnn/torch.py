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

PyTorch is optional: this module imports it only inside the functions that need it, so
``import minicnn`` (and ``import minicnn.torch``) work without it. Inside the package ``import
torch`` is absolute and gets PyTorch, not this file.
"""
import os
import re
from collections.abc import Mapping

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
