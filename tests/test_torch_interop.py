"""PyTorch models in and out (minicnn/torch.py): from_torch, Network.to_torch, state_dict files.

Random nn.Sequential models drawn by Hypothesis go through from_torch; minicnn's logits, loss and
every gradient must match PyTorch's in float64 to 1e-10 relative, and to_torch must give the
same weights back bit for bit. Inputs are kept honest (see branch_margin) instead of loosening
tolerances. Bad models and files must give one-line errors that name the problem.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import seeds

import minicnn
from minicnn import ConfigError, Network

torch = pytest.importorskip("torch")
nn = torch.nn
mt = pytest.importorskip("minicnn.torch")

# float64 relative error allowed between minicnn and PyTorch (both are exact up to rounding)
TOL = 1e-10
# The two float64 computations of these small networks agree to ~1e-14 in every activation. A
# ReLU input further than this from 0, or a max-pool window whose two largest values are further
# apart than this, therefore takes the same branch in both, so their gradients are comparable.
MARGIN = 1e-9

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def branch_margin(model, x):
    """The smallest nonzero |ReLU input| and nonzero gap between a max-pool window's two largest
    values met by a batch x in PyTorch. Exact zeros and exact ties are left out: they arise only
    from all-padding or all-dead windows, computed exactly alike in both (sums of zeros plus the
    same bias), and both break ties towards the first element in row-major window order."""
    margin, h = math.inf, x
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.ReLU):
                a = h.abs()
                a = a[a > 0]
                margin = min(margin, a.min().item()) if a.numel() else margin
            elif isinstance(layer, nn.MaxPool2d) and layer.kernel_size > 1:
                K, S = layer.kernel_size, layer.stride
                win = h.unfold(2, K, S).unfold(3, K, S).reshape(-1, K * K)
                top = win.topk(2, dim=1).values
                gap = top[:, 0] - top[:, 1]
                gap = gap[gap > 0]
                margin = min(margin, gap.min().item()) if gap.numel() else margin
            h = layer(h)
    return margin


@st.composite
def torch_cases(draw):
    """A random float64 nn.Sequential (1-2 conv blocks, optional pool, optional hidden Linear),
    an input shape it fits, a batch and labels."""
    C = draw(st.integers(1, 3))
    blocks, need_h, need_w = [], 1, 1
    for _ in range(draw(st.integers(1, 2))):
        K, S, P = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
        pool = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 2))))
        blocks.append((draw(st.integers(1, 4)), K, S, P, draw(st.booleans()), pool))
    for _F, K, S, P, _bias, pool in reversed(blocks):    # the smallest input every layer fits
        if pool:
            need_h, need_w = pool[0] + pool[1] * (need_h - 1), pool[0] + pool[1] * (need_w - 1)
        need_h, need_w = max(1, K - 2 * P + S * (need_h - 1)), max(1, K - 2 * P + S * (need_w - 1))
    H, W = need_h + draw(st.integers(0, 3)), need_w + draw(st.integers(0, 3))
    layers, c, h, w = [], C, H, W
    for F, K, S, P, bias, pool in blocks:
        layers += [nn.Conv2d(c, F, K, S, P, bias=bias), nn.ReLU()]
        c, h, w = F, (h + 2 * P - K) // S + 1, (w + 2 * P - K) // S + 1
        if pool:
            layers.append(nn.MaxPool2d(*pool))
            h, w = (h - pool[0]) // pool[1] + 1, (w - pool[0]) // pool[1] + 1
    assert h >= 1 and w >= 1
    layers.append(nn.Flatten())
    d = c * h * w
    if draw(st.booleans()):
        hidden = draw(st.integers(1, 6))
        layers += [nn.Linear(d, hidden, bias=draw(st.booleans())), nn.ReLU()]
        d = hidden
    classes = draw(st.integers(2, 5))
    layers.append(nn.Linear(d, classes, bias=draw(st.booleans())))
    seed = draw(seeds)
    torch.manual_seed(seed)
    model = nn.Sequential(*layers).double()
    rng = np.random.default_rng(seed)
    N = draw(st.integers(1, 3))
    return model, (C, H, W), rng.standard_normal((N, C, H, W)), rng.integers(0, classes, N)


def rel_error(a, b):
    return np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b))) if b.size else 0.0


def check_against_torch(model, net, x, y):
    """minicnn's logits, loss and every gradient against PyTorch's, float64, TOL relative. The
    zero bias standing in for a bias=False layer is checked against net.to_torch()'s."""
    twin = net.to_torch()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    refs = []
    for m in (model, twin):
        m.zero_grad()
        logits = m(xt)
        loss = nn.functional.cross_entropy(logits, yt)
        loss.backward()
        refs.append((logits.detach().numpy(), loss.item()))
    (tlogits, tloss), _ = refs
    tgrads = []
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    twin_layers = [m for m in twin if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m, t in zip(layers, twin_layers, strict=True):
        tgrads += [m.weight.grad.numpy(), (t.bias if m.bias is None else m.bias).grad.numpy()]
    assert rel_error(net.forward(x), tlogits) < TOL
    loss, grads = net.loss_and_grads(x, y)
    assert abs(loss - tloss) <= TOL * abs(tloss)
    for name, g, tg in zip(net.param_names, grads, tgrads, strict=True):
        assert g.shape == tg.shape, name
        assert rel_error(g, tg) < TOL, f"{name}: relative error {rel_error(g, tg):.2e}"


def assert_same_weights(model, back):
    """back (from to_torch) has model's layers and weights exactly; a missing bias came back as 0."""
    assert [type(b) for b in back] == [type(m) for m in model]
    for m, b in zip([m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))],
                    [b for b in back if isinstance(b, (nn.Conv2d, nn.Linear))], strict=True):
        assert type(m) is type(b)
        assert b.weight.dtype == m.weight.dtype
        assert torch.equal(b.weight, m.weight)
        assert torch.equal(b.bias, torch.zeros_like(b.bias) if m.bias is None else m.bias)
        if isinstance(m, nn.Conv2d):
            assert (b.kernel_size, b.stride, b.padding) == (m.kernel_size, m.stride, m.padding)
    for m, b in zip([m for m in model if isinstance(m, nn.MaxPool2d)],
                    [b for b in back if isinstance(b, nn.MaxPool2d)], strict=True):
        assert (b.kernel_size, b.stride) == (m.kernel_size, m.stride)


# --------------------------------------------------------------------------- models in and out
@EXAMPLES
@given(torch_cases())
def test_random_models_match_torch_and_round_trip(case):
    model, shape, x, y = case
    assume(branch_margin(model, torch.from_numpy(x)) > MARGIN)
    net = minicnn.from_torch(model, shape, device="numpy")
    assert net.dtype == np.float64
    assert Network(net.spec, shape).spec == net.spec                     # canonical
    check_against_torch(model, net, x, y)
    assert_same_weights(model, net.to_torch())


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_fixed_model_on_each_host_backend(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.ReLU()),
                          nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    net = minicnn.from_torch(model, (2, 11, 11), device=device)
    assert net.spec == "conv4k3s1p1-relu-maxpool2s2-conv6k3s2p0-relu-fc8-relu-fc3"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 2, 11, 11)), rng.integers(0, 3, 4)
    assert branch_margin(model, torch.from_numpy(x)) > MARGIN
    check_against_torch(model, net, x, y)


def test_dtype_follows_the_model_or_the_argument():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    net = minicnn.from_torch(model, (1, 5, 5), device="numpy")
    assert net.dtype == np.float32
    back = net.to_torch()
    assert all(p.dtype == torch.float32 for p in back.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), back.parameters()))
    net64 = minicnn.from_torch(model, (1, 5, 5), dtype=np.float64, device="numpy")
    assert net64.dtype == np.float64 and all(p.dtype == torch.float64 for p in net64.to_torch().parameters())
    assert np.array_equal(net64.get_flat_params(), net.get_flat_params().astype(np.float64))
    half = nn.Sequential(nn.Flatten(), nn.Linear(25, 3)).half()
    assert minicnn.from_torch(half, (1, 5, 5), dtype="float32", device="numpy").dtype == np.float32


def test_to_torch_leaves_torch_rng_alone_and_matches_spec():
    net = Network("conv3k3p1-relu-maxpool2-fc5", (1, 6, 6), seed=3, dtype=np.float64, device="numpy")
    state = torch.get_rng_state()
    model = net.to_torch()
    assert torch.equal(state, torch.get_rng_state())
    assert minicnn.from_torch(model, (1, 6, 6), device="numpy").spec == net.spec
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    assert np.array_equal(flat, net.get_flat_params())


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


class MySequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


BAD_MODELS = [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
     ["layer 1 (BatchNorm2d) is not supported", "accepted"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(16, 2)), ["layer 1 (Dropout)"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2, 2)),
     ["layer 0 (Conv2d)", "dilation (2, 2)", "dilation 1"]),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)), ["groups=2", "groups 1"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, (3, 1)), nn.Flatten(), nn.Linear(24, 2)), ["kernel_size (3, 1)", "square"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=(1, 2)), nn.Flatten(), nn.Linear(8, 2)), ["stride (1, 2)"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(32, 2)),
     ["padding_mode 'reflect'"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Flatten(), nn.Linear(32, 2)), ["'same'", "odd"]),
    (lambda: nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(9, 2)),
     ["layer 0 (MaxPool2d)", "padding"]),
    (lambda: nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 2)), ["ceil_mode=True"]),
    (lambda: nn.Sequential(nn.MaxPool2d(2, dilation=2), nn.Flatten(), nn.Linear(4, 2)), ["dilation 2"]),
    (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(16, 2)), ["start_dim=0"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), ["layer 1 (Linear)", "nn.Flatten() before"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 2)), ["in_channels 3", "1 channels"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(15, 2)), ["in_features 15", "16 features"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 5), nn.Flatten(), nn.Linear(2, 2)), ["does not fit"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.ReLU()), ["layer 2 (ReLU) is last", "Linear last"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Softmax(1)), ["layer 2 (Softmax) is not supported"]),
    (lambda: nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), nn.Sequential(nn.Tanh(), nn.Linear(4, 2))),
     ["layer 1.0 (Tanh)"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 4), Custom()), ["layer 2 (Custom) is not supported"]),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).to(torch.bfloat16), ["bfloat16", "dtype="]),
    (lambda: Custom(), ["got a Custom", "nn.Sequential"]),
    (lambda: MySequential(nn.Flatten(), nn.Linear(16, 2)), ["got a MySequential"]),
    (lambda: nn.Sequential(), ["empty"]),
]


@pytest.mark.parametrize("make,words", BAD_MODELS, ids=range(len(BAD_MODELS)))
def test_bad_models_are_one_line_errors(make, words):
    with pytest.raises(ConfigError) as e:
        minicnn.from_torch(make(), (1, 4, 4), device="numpy")
    one_line(e, *words)


def test_bad_input_shape_and_dtype():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ConfigError) as e:
        minicnn.from_torch(model, (16,))
    one_line(e, "(C, H, W)")
    with pytest.raises(ConfigError) as e:
        minicnn.from_torch(model, (1, 4, 4), dtype=np.int32)
    one_line(e, "int32", "float32 or float64")


# --------------------------------------------------------------------------- state_dict files
def sequential_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(3, 4, 2), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))


SPEC = "conv3k3s1p1-relu-maxpool2s2-conv4k2s1p0-relu-fc5"


def test_state_dict_file_with_sequential_names(tmp_path):
    model = sequential_model()
    torch.save(model.state_dict(), tmp_path / "seq.pt")
    net = Network(SPEC, (1, 6, 6), seed=7, device="numpy")
    source = mt.load_state_dict_file(net, tmp_path / "seq.pt")
    assert source == {"conv1.weight": "0.weight", "conv1.bias": None, "conv2.weight": "3.0.weight",
                      "conv2.bias": "3.0.bias", "fc1.weight": "5.weight", "fc1.bias": "5.bias"}
    assert np.array_equal(net.get_flat_params(), minicnn.from_torch(model, (1, 6, 6)).get_flat_params())


def test_state_dict_file_with_minicnn_names(tmp_path):
    src = Network(SPEC, (1, 6, 6), seed=1, dtype=np.float64, device="numpy")
    torch.save({k: torch.from_numpy(v) for k, v in src.state_dict().items()}, tmp_path / "mini.pt")
    net = Network(SPEC, (1, 6, 6), seed=2, dtype=np.float64, device="numpy")
    source = mt.load_state_dict_file(net, str(tmp_path / "mini.pt"))
    assert source == {n: n for n in net.param_names}
    assert np.array_equal(net.get_flat_params(), src.get_flat_params())
    torch.save(src.to_torch().state_dict(), tmp_path / "back.pt")      # and via to_torch
    net.reset_parameters(seed=5)
    mt.load_state_dict_file(net, tmp_path / "back.pt")
    assert np.array_equal(net.get_flat_params(), src.get_flat_params())


def load_error(net, state, tmp_path, name="bad.pt"):
    path = tmp_path / name
    torch.save(state, path)
    before = net.get_flat_params()
    with pytest.raises(ConfigError) as e:
        mt.load_state_dict_file(net, path)
    assert np.array_equal(net.get_flat_params(), before)               # nothing half-loaded
    return e


def test_state_dict_mismatches_are_named(tmp_path):
    net = Network(SPEC, (1, 6, 6), seed=0, device="numpy")
    state = sequential_model().state_dict()
    wrong = dict(state, **{"5.weight": torch.zeros(5, 17)})
    one_line(load_error(net, wrong, tmp_path), "wrong shape 5.weight (5, 17) for fc1.weight (5, 16)")
    fewer = {k: v for k, v in state.items() if not k.startswith("5.")}
    one_line(load_error(net, fewer, tmp_path), "missing fc1.weight, fc1.bias")
    more = dict(state, **{"7.weight": torch.zeros(2, 5), "7.bias": torch.zeros(2)})
    one_line(load_error(net, more, tmp_path), "unexpected 7.weight, 7.bias")
    mini = {k: torch.from_numpy(v) for k, v in net.state_dict().items()}
    mini["fc2.weight"] = mini.pop("fc1.weight")
    one_line(load_error(net, mini, tmp_path), "missing fc1.weight", "unexpected fc2.weight")
    mini = {k: torch.from_numpy(v) for k, v in net.state_dict().items()}
    mini["conv2.weight"] = mini["conv2.weight"].to(torch.int64)
    one_line(load_error(net, mini, tmp_path), "not floating point conv2.weight")
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                       nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    msg = one_line(load_error(net, bn.state_dict(), tmp_path), "unexpected 1.weight, 1.bias, 1.running_mean")
    assert "wrong shape" not in msg                     # the BatchNorm group is skipped, the rest lines up


def test_bad_files_are_one_line_errors(tmp_path):
    net = Network(SPEC, (1, 6, 6), seed=0, device="numpy")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ConfigError) as e:
        mt.load_state_dict_file(net, text)
    one_line(e, "notes.pt is not a file torch.load can read", "torch.save(model.state_dict(), path)")
    one_line(load_error(net, sequential_model(), tmp_path), "torch.save(model, path)", "weights_only")
    one_line(load_error(net, {"model": sequential_model().state_dict(), "epoch": 3}, tmp_path),
             "not a state_dict of tensors", "'model' (", "'epoch' (int)")
    one_line(load_error(net, [torch.zeros(3)], tmp_path), "holds a list, not a state_dict")
    with pytest.raises(ConfigError) as e:
        mt.load_state_dict_file(net, tmp_path / "missing.pt")
    one_line(e, "no file", "missing.pt")


# --------------------------------------------------------------------------- without PyTorch
def test_import_minicnn_does_not_import_torch():
    code = ("import sys, minicnn; f, g = minicnn.from_torch, minicnn.torch.load_state_dict_file; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert minicnn.torch.__name__ == 'minicnn.torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_torch_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)                   # import torch now raises ImportError
    net = Network("fc2", (1, 2, 2), device="numpy")
    for call in (lambda: minicnn.from_torch(None, (1, 2, 2)), net.to_torch,
                 lambda: mt.load_state_dict_file(net, "x.pt")):
        with pytest.raises(ConfigError) as e:
            call()
        one_line(e, "PyTorch is not installed; pip install 'minicnn[torch]'")


def test_train_init_from_a_state_dict_file(tmp_path):
    """minicnn train --init-from FILE.pt starts from the file's weights (the step-0 checkpoint holds
    them exactly); a file that does not fit the --arch is a one-line error and exit 1."""
    from click.testing import CliRunner

    from minicnn.cli.main import main
    from minicnn.rundir import checkpoint_path
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 10))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    spec = minicnn.from_torch(model, (1, 28, 28)).spec
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--arch", spec, "--init-from", str(tmp_path / "m.pt"), "--steps", "2",
                                    "--n-train", "64", "--n-val", "32", "-q", "--out", str(out)])
    assert res.exit_code == 0, res.output
    with np.load(checkpoint_path(str(out), 0)) as z:
        for (name, t), key in zip(model.state_dict().items(), ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias"]):
            np.testing.assert_array_equal(z[f"param/{key}"], t.numpy(), err_msg=name)
    res = CliRunner().invoke(main, ["train", "--arch", "conv8k3p1-relu-maxpool2-fc10", "--init-from",
                                    str(tmp_path / "m.pt"), "--steps", "2", "-q", "--out", str(tmp_path / "r2")])
    assert res.exit_code == 1 and "wrong shape" in res.output and len(res.output.strip().splitlines()) == 1
