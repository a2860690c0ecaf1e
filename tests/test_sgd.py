import math

import numpy as np
import pytest

from minicnn import SGD, ConfigError, parse_schedule


def torch_rule(p, grads, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
    """torch.optim.SGD written out in NumPy (the documented algorithm)."""
    buf = None
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(weight_decay=0.01), dict(momentum=0.5, dampening=0.3, weight_decay=0.1)])
def test_update_rule(kw):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(5)]
    p = p0.copy()
    opt = SGD(lr=0.1, **kw)
    for g in grads:
        opt.step([p], [g])
    np.testing.assert_allclose(p, torch_rule(p0, grads, 0.1, **kw), rtol=1e-14, atol=1e-14)


def test_bad_hyperparameters():
    with pytest.raises(ConfigError):
        SGD(lr=-1)
    with pytest.raises(ConfigError):
        SGD(lr=float("nan"))
    with pytest.raises(ConfigError, match="Nesterov"):
        SGD(lr=0.1, nesterov=True)


def test_schedules():
    assert parse_schedule("constant", 0.1, 100)(57) == 0.1
    s = parse_schedule("step:10:0.5", 0.1, 100)
    assert s(9) == 0.1 and s(10) == 0.05 and s(25) == 0.025
    c = parse_schedule("cosine", 1.0, 100)
    assert c(0) == 1.0 and abs(c(50) - 0.5) < 1e-12 and c(100) == 0.0
    w = parse_schedule("warmup:10+cosine", 1.0, 100)
    assert abs(w(0) - 0.1) < 1e-12 and abs(w(9) - c(9)) < 1e-12
    lin = parse_schedule("linear:0.2", 1.0, 10)
    assert abs(lin(5) - 0.6) < 1e-12
    pw = parse_schedule("0:0.01,500:1.0,501:0.01", 0.1, 1000)
    assert pw(0) == 0.01 and pw(499) == 0.01 and pw(500) == 1.0 and pw(501) == 0.01 and pw(999) == 0.01
    assert parse_schedule("100:0.5", 0.1, 1000)(50) == 0.1
    assert math.isclose(parse_schedule("exp:1.1", 1e-3, 10)(2), 1e-3 * 1.21)


@pytest.mark.parametrize("bad", ["cosin", "step", "step:0", "warmup:x+cosine", "0:abc", "0:-1", "exp", "linear:1:2"])
def test_bad_schedules(bad):
    with pytest.raises(ConfigError, match="accepted"):
        parse_schedule(bad, 0.1, 100)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                dict(momentum=0.5, dampening=0.3, weight_decay=0.1)])
def test_steps_after_the_first_allocate_nothing_param_sized(kw):
    """The update runs in work arrays kept between steps: no parameter-sized allocation per step."""
    import tracemalloc
    rng = np.random.default_rng(1)
    p = rng.standard_normal(50_000).astype(np.float32)
    g = rng.standard_normal(50_000).astype(np.float32)
    opt = SGD(lr=0.1, **kw)
    opt.step([p], [g])
    opt.step([p], [g])
    tracemalloc.start()
    try:
        for _ in range(5):
            opt.step([p], [g])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < p.nbytes // 10, peak


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, nesterov=True, weight_decay=0.01)])
def test_public_api_steps_run_on_the_flat_buffers_with_the_same_result(kw):
    """SGD.step(net.params, grads) with loss_and_grads' gradients updates through the flat buffers
    (one pass, as train() does); the parameters are bit-identical to per-array steps, also when the
    two kinds of call alternate (the momentum buffers are re-viewed, never lost)."""
    from minicnn import Network
    from minicnn.network import FlatViews
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 10, 4)
    nets = [Network.from_spec("conv2-relu-maxpool2-fc10", (1, 8, 8), seed=1, dtype=np.float64) for _ in range(2)]
    opts = [SGD(lr=0.1, **kw) for _ in nets]
    for step in range(4):
        _, grads = nets[0].loss_and_grads(x, y)
        assert isinstance(grads, FlatViews) and grads.buffer() is not None
        opts[0].step(nets[0].params, grads if step != 2 else list(grads))     # step 2: per array
        _, grads = nets[1].loss_and_grads(x, y)
        opts[1].step(list(nets[1].params), [g.copy() for g in grads])        # always per array
        np.testing.assert_array_equal(nets[0].flat_params, nets[1].flat_params)
    params = nets[0].params
    params[0] = params[0].copy()                 # a replaced element: the list no longer covers the buffer
    assert params.buffer() is None


CHANGES = {"setitem": lambda v: v.__setitem__(0, v[0].copy()), "swap": lambda v: v.__setitem__(slice(0, 2), v[1::-1]),
           "delitem": lambda v: v.__delitem__(-1), "iadd": lambda v: v.__iadd__([]), "imul": lambda v: v.__imul__(1),
           "append": lambda v: v.append(v[0]), "extend": lambda v: v.extend([]), "insert": lambda v: v.insert(0, v[0]),
           "pop": lambda v: v.pop(), "remove": lambda v: v.remove(v[0]), "clear": lambda v: v.clear(),
           "sort": lambda v: v.sort(key=lambda a: 0), "reverse": lambda v: v.reverse()}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_list_of_views_is_stepped_element_by_element(change):
    """Any change to a FlatViews list, even one that leaves it as it was, makes SGD.step update
    its elements rather than the flat buffer (which may no longer be what it covers)."""
    from minicnn import Network
    net = Network.from_spec("conv2-relu-maxpool2-fc10", (1, 8, 8), seed=1, dtype=np.float64)
    params, before = net.params, net.flat_params.copy()
    assert params.buffer() is net.flat_params
    CHANGES[change](params)
    assert params.buffer() is None and params.changed
    grads = [np.ones_like(p) for p in params]
    SGD(lr=0.5).step(params, grads)
    moved = np.flatnonzero(net.flat_params != before)
    seen = {id(p) for p in params}
    expected = [j for (a, b, _), v in zip(net._layout, params.originals) if id(v) in seen for j in range(a, b)]
    np.testing.assert_array_equal(moved, expected)             # each element in the list once, nothing else
