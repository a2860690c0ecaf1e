import pytest

from minicnn import Network, SpecError, parse_spec
from minicnn.spec import PRESETS, canonical_spec


def test_defaults_and_flatten_implied():
    ls = parse_spec("conv16-relu-maxpool2-fc10")
    assert [l.kind for l in ls] == ["conv", "relu", "maxpool", "flatten", "fc"]
    conv, pool = ls[0], ls[2]
    assert (conv.out, conv.k, conv.stride, conv.pad) == (16, 3, 1, 0)
    assert (pool.k, pool.stride) == (2, 2)


def test_full_tokens_and_presets():
    assert canonical_spec("conv8k5s2p2-maxpool3s2-flatten-fc10") == "conv8k5s2p2-maxpool3s2-fc10"
    assert canonical_spec("small") == "conv16k3s1p1-relu-maxpool2s2-conv32k3s1p1-relu-maxpool2s2-fc10"
    for name in PRESETS:
        parse_spec(name)


@pytest.mark.parametrize("spec,token", [
    ("conv16-relu-pool2-fc10", "pool2"),
    ("conv16x-fc10", "conv16x"),
    ("conv0-fc10", "conv0"),
    ("fc10-conv3", "conv3"),
    ("conv4-relu", "relu"),
    ("", None),
])
def test_bad_spec_names_token_and_grammar(spec, token):
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg
    if token:
        assert f"'{token}'" in msg
        assert "conv<F>[k<K>][s<S>][p<P>]" in msg


def test_spec_that_does_not_fit_input():
    with pytest.raises(SpecError, match="does not fit"):
        Network.from_spec("conv4k7-fc10", input_shape=(1, 5, 5))
    with pytest.raises(SpecError, match="does not fit"):
        Network.from_spec("maxpool4-maxpool4-fc10", input_shape=(1, 8, 8))


def test_shapes_and_param_layouts():
    net = Network.from_spec("small", input_shape=(1, 28, 28), device="numpy")
    assert [p.shape for p in net.params] == [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 1568), (10,)]
    assert net.param_names == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"]
    assert net.num_params == 20490
    # params are views into one flat buffer
    net.params[0][0, 0, 0, 0] = 42.0
    assert net.flat_params[0] == 42.0
