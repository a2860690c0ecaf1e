"""Whole networks: loss_and_grads against centred finite differences (float64), init, set_params."""
import numpy as np
import pytest
from conftest import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import ConfigError, Network


@st.composite
def small_specs(draw):
    """A random small network spec and an input shape it fits."""
    C = draw(st.integers(1, 2))
    H = draw(st.integers(5, 9))
    W = draw(st.integers(5, 9))
    tokens, h, w = [], H, W
    for _ in range(draw(st.integers(0, 2))):
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        p = draw(st.integers(0, 1))
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if oh < 1 or ow < 1:
            continue
        tokens.append(f"conv{draw(st.integers(1, 3))}k{k}s{s}p{p}")
        h, w = oh, ow
        if draw(st.booleans()):
            tokens.append("relu")
        if h >= 2 and w >= 2 and draw(st.booleans()):
            tokens.append("maxpool2")
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    if draw(st.booleans()):
        tokens += [f"fc{draw(st.integers(2, 5))}", "relu"]
    tokens.append(f"fc{draw(st.integers(2, 4))}")
    return "-".join(tokens), (C, H, W)


def numeric_grad(net, x, y, idx, eps=1e-6):
    out = []
    for i in idx:
        old = net.flat_params[i]
        net.flat_params[i] = old + eps
        lp = net.loss(x, y)
        net.flat_params[i] = old - eps
        lm = net.loss(x, y)
        net.flat_params[i] = old
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


def rel_error(a, b):
    return np.max(np.abs(a - b)) / max(1e-8, np.max(np.abs(a) + np.abs(b)))


@settings(max_examples=25, deadline=None)
@given(spec=small_specs(), seed=st.integers(0, 10_000), device=st.sampled_from(["numpy", "cpu"]))
def test_loss_and_grads_match_finite_differences(spec, seed, device):
    spec, shape = spec
    net = Network.from_spec(spec, input_shape=shape, seed=seed, dtype=np.float64, device=device)
    rng = np.random.default_rng(seed)
    x, y = random_batch(rng, 3, shape, classes=net.num_classes)
    loss, grads = net.loss_and_grads(x, y)
    flat = np.concatenate([g.ravel() for g in grads])
    idx = rng.choice(net.num_params, size=min(40, net.num_params), replace=False)
    num = numeric_grad(net, x, y, idx)
    assert rel_error(flat[idx], num) < 1e-6, (spec, rel_error(flat[idx], num))
    assert np.isclose(loss, net.loss(x, y), rtol=0, atol=0)


def test_cpu_backend_matches_reference_float32():
    rng = np.random.default_rng(0)
    x, y = random_batch(rng, 8, (1, 28, 28), dtype=np.float32)
    a = Network.from_spec("small", (1, 28, 28), seed=3, device="numpy")
    b = Network.from_spec("small", (1, 28, 28), seed=3, device="cpu")
    la, ga = a.loss_and_grads(x, y)
    lb, gb = b.loss_and_grads(x, y)
    assert abs(la - lb) < 1e-5
    for u, v in zip(ga, gb):
        assert np.max(np.abs(u - v)) <= 1e-5 * max(1.0, np.max(np.abs(u)))


@pytest.mark.parametrize("init", ["torch", "he", "xavier"])
def test_init_statistics(init):
    net = Network.from_spec("conv64k3-relu-fc200-relu-fc10", (8, 10, 10), seed=0, init=init, device="numpy")
    w = net.params[0]
    fan_in = 8 * 9
    if init == "torch":
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
        assert np.abs(net.params[1]).max() <= bound
    elif init == "he":
        assert abs(w.std() - np.sqrt(2 / fan_in)) < 0.05 * np.sqrt(2 / fan_in)
        assert not net.params[1].any()
    else:
        a = np.sqrt(6 / (fan_in + 64 * 9))
        assert np.abs(w).max() <= a and np.abs(w).max() > 0.95 * a


def test_init_scale_and_seed():
    a = Network.from_spec("small", (1, 28, 28), seed=1, device="numpy")
    b = Network.from_spec("small", (1, 28, 28), seed=1, init_scale=3.0, device="numpy")
    c = Network.from_spec("small", (1, 28, 28), seed=2, device="numpy")
    np.testing.assert_allclose(b.flat_params, 3 * a.flat_params, rtol=1e-6)
    assert not np.array_equal(a.flat_params, c.flat_params)
    d64 = Network.from_spec("small", (1, 28, 28), seed=1, dtype=np.float64, device="numpy")
    np.testing.assert_array_equal(d64.flat_params.astype(np.float32), a.flat_params)


def test_set_params_checks_shapes():
    net = Network.from_spec("small", (1, 28, 28), device="numpy")
    new = [np.full(p.shape, 0.5) for p in net.params]
    net.set_params(new)
    assert np.all(net.flat_params == 0.5)
    with pytest.raises(ConfigError, match="conv1.weight has shape"):
        net.set_params([np.zeros((3, 3))] + new[1:])
    with pytest.raises(ConfigError, match="got 2 arrays"):
        net.set_params(new[:2])


def test_bad_inputs_to_forward():
    net = Network.from_spec("small", (1, 28, 28), device="numpy")
    with pytest.raises(ConfigError, match="input must have shape"):
        net.forward(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ConfigError, match="labels must be in 0..9"):
        net.loss_and_grads(np.zeros((2, 1, 28, 28)), np.array([0, 10]))


def test_cpu_network_fuses_pools_and_skips_unneeded_buffers():
    """On the cpu backend conv -> relu -> maxpool runs as one conv op: the pool layers hold no
    gradient buffer of the conv output's size, the first layer no input gradient; results as on
    the reference backend."""
    net = Network.from_spec("small", (1, 28, 28), seed=3, device="cpu")
    assert [layer.name for layer in net.layers if getattr(layer, "conv_fused", False)] == ["pool1", "pool2"]
    rng = np.random.default_rng(0)
    x, y = random_batch(rng, 4, (1, 28, 28), dtype=np.float32)
    loss, grads = net.loss_and_grads(x, y)
    names = set(net._ws.bufs)
    assert ("conv1", "dx") not in names and ("pool1", "dx") not in names and ("pool2", "dx") not in names
    ref_net = Network.from_spec("small", (1, 28, 28), seed=3, device="numpy")
    ref_loss, ref_grads = ref_net.loss_and_grads(x, y)
    assert abs(loss - ref_loss) < 1e-5
    for u, v in zip(grads, ref_grads):
        assert np.max(np.abs(u - v)) <= 1e-5 * max(1.0, np.max(np.abs(v)))


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_the_buffers_a_network_keeps_start_on_64_byte_boundaries(device):
    """Parameters, gradients (each buffer loss_and_grads moves to), momentum, activations and the
    conv scratch start on a cache line (ops.ref.empty): NumPy's own are 16-byte aligned, at an
    offset that changes from run to run (and with it the speed, 1-3% a step)."""
    from minicnn import SGD
    from minicnn.ops.ref import ALIGN, empty, zeros
    for shape, dt in (((3, 5), np.float32), (7, np.int64), ((2, 0, 4), np.float64), ((), np.int32)):
        for make in (empty, zeros):
            a = make(shape, dt)
            assert a.shape == np.empty(shape).shape and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable
            assert a.ctypes.data % ALIGN == 0 or a.size == 0
        assert not zeros(shape, dt).any()
    net = Network.from_spec("conv4k3p1-relu-maxpool2-conv6k3-relu-fc10", (2, 8, 8), seed=0, device=device)
    opt = SGD(lr=0.1, momentum=0.9)
    x, y = random_batch(np.random.default_rng(0), 3, (2, 8, 8), dtype=np.float32)
    held = [net.loss_and_grads(x, y)[1] for _ in range(3)]          # three buffers
    opt.step(net.params, held[-1])
    arrays = [net.flat_params, *[g.flat_buffer for g in held], *opt.buffers]
    for v in net._ws.bufs.values():
        arrays += [a for a in (v.values() if isinstance(v, dict) else [v]) if isinstance(a, np.ndarray)]
    assert len(arrays) > 10 and all(a.ctypes.data % ALIGN == 0 for a in arrays if a.size > 1)


def test_loss_and_grads_returns_gradients_nothing_else_changes():
    """loss_and_grads reuses the buffer of gradients it returned two calls back only when nothing
    refers to it any more (see Network._unshare_grads): a loop that drops them writes one in place,
    and gradients still held (the list, a view, a view of a view, the flat buffer, a list of the
    views) keep their values through later calls; a list its caller changed is never reused while
    it holds it, and is made whole again when it does not."""
    net = Network.from_spec("conv4k3p1-relu-maxpool2-fc10", (1, 8, 8), seed=0, device="cpu")
    rng = np.random.default_rng(0)

    def batch():
        return rng.standard_normal((3, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 3)

    buffers = []
    for _ in range(6):
        _, grads = net.loss_and_grads(*batch())
        buffers.append(id(grads.flat_buffer))
        del grads
    assert len(set(buffers)) == 1                         # dropped each time: written in place, never moved
    held = []
    for keep in (lambda g: list(g), lambda g: [g[1]], lambda g: [g[0].reshape(-1)[2:]], lambda g: [g.flat_buffer],
                 lambda g: g):
        _, grads = net.loss_and_grads(*batch())
        kept = keep(grads)
        held.append((kept, [a.copy() for a in kept]))
        del grads
        for _ in range(3):
            net.loss_and_grads(*batch())
    for kept, values in held:
        for a, b in zip(kept, values):
            np.testing.assert_array_equal(a, b)
    _, grads = net.loss_and_grads(*batch())
    other = np.zeros(1)                 # held here too: as many references as the view it replaces
    grads[0] = other
    del grads
    for _ in range(3):
        _, grads = net.loss_and_grads(*batch())
        assert len(grads) == 4 and grads.buffer() is not None and grads[0].shape == (4, 1, 3, 3)
    grads[0], grads[1] = grads[1], grads[0]         # changed, then dropped with nothing else held:
    grads.append(other)                              # written in place, the list as it was made
    first, flat = id(grads.originals[0]), id(grads.flat_buffer)     # (ids: holding them would be holding them)
    del grads
    _, grads = net.loss_and_grads(*batch())
    assert id(grads.flat_buffer) == flat and len(grads) == 4 and id(grads[0]) == first and grads.buffer() is not None


def test_loss_and_grads_hands_out_the_buffer_and_moves_off_it_while_held(monkeypatch):
    """loss_and_grads returns net.grads itself (no copy); the next backward pass of any kind
    (backward, per_sample_backward, hessian_vector_product, loss_and_grads) writes into another
    buffer while the caller still holds them, so held gradients keep their values. A training loop
    alternates two buffers, the conv ops' kept calls hit for both (nothing re-checked), and the
    steps are the same bits as train()'s path (loss, backward, the update on the flat buffers)."""
    from minicnn import SGD
    from minicnn.ops import cpu
    spec, shape = "conv4k3p1-relu-maxpool2-conv6k3-relu-fc10", (2, 8, 8)
    net, twin = (Network.from_spec(spec, shape, seed=3, device="cpu") for _ in range(2))
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((3,) + shape).astype(np.float32), rng.integers(0, 10, 3)) for _ in range(12)]
    opt, opt_twin = SGD(lr=0.05, momentum=0.9), SGD(lr=0.05, momentum=0.9)
    keeps = []
    ids = []
    for i, (x, y) in enumerate(batches):
        if i == 4:                      # warmed up: both buffers' calls kept
            real = cpu._keep_call
            monkeypatch.setattr(cpu, "_keep_call", lambda *a, real=real: keeps.append(a[1]) or real(*a))
        loss, grads = net.loss_and_grads(x, y)
        assert grads is net.grads and grads.flat_buffer is net.flat_grads
        ids.append(id(grads.flat_buffer))
        opt.step(net.params, grads)
        twin_loss = twin.loss(x, y)
        twin.backward()
        opt_twin.step([twin.flat_params], [twin.flat_grads])
        assert loss == twin_loss
        np.testing.assert_array_equal(grads.flat_buffer, twin.flat_grads)
    assert len(set(ids)) == 2 and ids[4:] == ids[2:-2], ids        # two buffers, in turns
    assert keeps == []
    np.testing.assert_array_equal(net.flat_params, twin.flat_params)

    x, y = batches[0]
    for write in (lambda: (net.loss(x, y), net.backward()), lambda: net.per_sample_grads(x, y),
                  lambda: net.hessian_vector_product(x, y, np.ones(net.num_params, np.float32)),
                  lambda: net.loss_and_grads(x, y)):
        _, grads = net.loss_and_grads(*batches[5])
        values = grads.flat_buffer.copy()
        write()
        assert net.flat_grads is not grads.flat_buffer
        np.testing.assert_array_equal(grads.flat_buffer, values)
        np.testing.assert_array_equal(net.flat_grads, twin.loss_and_grads(x, y)[1].flat_buffer)
