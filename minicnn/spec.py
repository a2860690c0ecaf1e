"""Network spec strings: ``conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10``.

Grammar (layers joined by ``-``):
    conv<F>[k<K>][s<S>][p<P>]   2-D convolution, F filters, K x K kernel (default 3), stride S (1), zero padding P (0)
    relu                        rectified linear unit
    maxpool<K>[s<S>]            K x K max-pool, stride S (default K)
    flatten                     (C, H, W) -> C*H*W in torch.flatten order; implied before the first fc
    fc<O>                       dense layer with O outputs

Named presets stand in for a spec (``small`` is the default).
"""
import re
from dataclasses import dataclass

from .errors import ArgumentTypeError, SpecError

GRAMMAR = ("layers joined by '-': conv<F>[k<K>][s<S>][p<P>], relu, maxpool<K>[s<S>], flatten, fc<O> "
           "(e.g. conv16k3p1-relu-maxpool2-fc10), or a preset: {presets}")

PRESETS = {
    # the reference network "A" of the benchmarks; the default
    "small": "conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc10",
    # twice the channels
    "wide": "conv32k3p1-relu-maxpool2-conv64k3p1-relu-maxpool2-fc10",
    # three conv blocks and a hidden dense layer
    "deep": "conv16k3p1-relu-conv16k3p1-relu-maxpool2-conv32k3p1-relu-maxpool2-fc64-relu-fc10",
    # one conv layer and a hidden dense layer
    "tiny": "conv8k5s2p2-relu-fc32-relu-fc10",
    # softmax regression on raw pixels (the baseline a CNN must beat)
    "linear": "fc10",
    # a plain multi-layer perceptron
    "mlp": "fc128-relu-fc10",
}

_PATTERNS = {
    "conv": re.compile(r"conv(\d+)(?:k(\d+))?(?:s(\d+))?(?:p(\d+))?"),
    "maxpool": re.compile(r"maxpool(\d+)(?:s(\d+))?"),
    "fc": re.compile(r"fc(\d+)"),
}


@dataclass(frozen=True)
class LayerSpec:
    """One parsed token. kind is 'conv', 'relu', 'maxpool', 'flatten' or 'fc'."""
    kind: str
    out: int = 0        # conv: filters F; fc: outputs O
    k: int = 0          # conv/maxpool kernel size
    stride: int = 1
    pad: int = 0

    def token(self):
        if self.kind == "conv":
            return f"conv{self.out}k{self.k}s{self.stride}p{self.pad}"
        if self.kind == "maxpool":
            return f"maxpool{self.k}s{self.stride}"
        if self.kind == "fc":
            return f"fc{self.out}"
        return self.kind


def _error(token, why):
    return SpecError(f"bad layer '{token}' in network spec: {why}; accepted: "
                     + GRAMMAR.format(presets=", ".join(PRESETS)))


def parse_spec(spec):
    """Parse a spec string (or preset name) into a list of LayerSpec, flatten made explicit."""
    if not isinstance(spec, str):
        raise ArgumentTypeError(f"spec must be a string, got {type(spec).__name__} {spec!r}; accepted: "
                                + GRAMMAR.format(presets=", ".join(PRESETS)))
    if not spec.strip():
        raise SpecError("empty network spec; accepted: " + GRAMMAR.format(presets=", ".join(PRESETS)))
    spec = PRESETS.get(spec.strip(), spec.strip())
    layers = []
    for token in spec.split("-"):
        t = token.strip().lower()
        if t == "relu":
            layers.append(LayerSpec("relu"))
        elif t == "flatten":
            layers.append(LayerSpec("flatten"))
        elif (m := _PATTERNS["conv"].fullmatch(t)):
            f, k, s, p = (int(g) if g is not None else None for g in m.groups())
            layers.append(LayerSpec("conv", out=f, k=3 if k is None else k,
                                    stride=1 if s is None else s, pad=0 if p is None else p))
        elif (m := _PATTERNS["maxpool"].fullmatch(t)):
            k, s = (int(g) if g is not None else None for g in m.groups())
            layers.append(LayerSpec("maxpool", k=k, stride=k if s is None else s))
        elif (m := _PATTERNS["fc"].fullmatch(t)):
            layers.append(LayerSpec("fc", out=int(m.group(1))))
        else:
            raise _error(token, "unknown token")
        ls = layers[-1]
        if ls.kind in ("conv", "fc") and ls.out < 1:
            raise _error(token, "needs at least 1 output")
        if ls.kind in ("conv", "maxpool") and (ls.k < 1 or ls.stride < 1):
            raise _error(token, "kernel size and stride must be >= 1")
    # make the flatten before the first dense layer explicit; no conv/pool after a flatten
    out, flat = [], False
    for ls, token in zip(layers, spec.split("-")):
        if ls.kind == "fc" and not flat:
            out.append(LayerSpec("flatten"))
            flat = True
        elif ls.kind == "flatten":
            if flat:
                continue
            flat = True
        elif ls.kind in ("conv", "maxpool") and flat:
            raise _error(token, "conv/maxpool cannot follow a flatten or fc layer")
        out.append(ls)
    if not out or out[-1].kind != "fc":
        raise _error(spec.split("-")[-1], "the last layer must be fc<classes>")
    return out


def canonical_spec(spec):
    """The spec with every default written out (presets expanded)."""
    return "-".join(ls.token() for ls in parse_spec(spec) if ls.kind != "flatten")
