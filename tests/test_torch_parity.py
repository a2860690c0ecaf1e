"""The default network against PyTorch from identical weights and batches (llm.c's test_gpt2 idea).

Forward logits, loss, every gradient tensor, and 20 SGD steps (plain, and with momentum + weight
decay + Nesterov) must agree: float64 to ~1e-10, float32 to ~1e-5. Skipped without torch.
"""
import numpy as np
import pytest

from minicnn import SGD, Network

torch = pytest.importorskip("torch")

SPEC = "small"


def torch_net(net):
    """The same architecture in torch.nn with the minicnn weights copied in (minicnn.torch.to_torch,
    itself checked against PyTorch on drawn models in test_torch_interop.py)."""
    model = net.to_torch()
    assert [tuple(p.shape) for p in model.parameters()] == [p.shape for p in net.params]
    return model


def batches(dtype, n_steps, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((n, 1, 28, 28)).astype(dtype), rng.integers(0, 10, n)) for _ in range(n_steps)]


@pytest.mark.parametrize("device", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_forward_loss_and_gradients_match_torch(device, dtype, tol):
    torch.set_num_threads(2)
    net = Network.from_spec(SPEC, (1, 28, 28), seed=0, dtype=dtype, device=device)
    model = torch_net(net)
    (x, y), = batches(dtype, 1)
    loss, grads = net.loss_and_grads(x, y)
    logits = net.forward(x)
    tl = model(torch.from_numpy(x))
    tloss = torch.nn.functional.cross_entropy(tl, torch.from_numpy(y))
    tloss.backward()
    np.testing.assert_allclose(logits, tl.detach().numpy(), rtol=0, atol=tol * 10)
    assert abs(loss - tloss.item()) < tol * 10
    for name, g, tp in zip(net.param_names, grads, model.parameters()):
        tg = tp.grad.numpy()
        err = np.max(np.abs(g - tg)) / max(1e-12, np.max(np.abs(tg)))
        assert err < tol * 10, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("device", ["cpu"])      # the numpy backend is checked against cpu elsewhere
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("opt_kw", [dict(lr=0.1), dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)])
def test_twenty_sgd_steps_match_torch(device, dtype, tol, opt_kw):
    torch.set_num_threads(2)
    net = Network.from_spec(SPEC, (1, 28, 28), seed=1, dtype=dtype, device=device)
    model = torch_net(net)
    opt = SGD(**opt_kw)
    topt = torch.optim.SGD(model.parameters(), **opt_kw)
    for step, (x, y) in enumerate(batches(dtype, 20, seed=1)):
        loss, grads = net.loss_and_grads(x, y)
        opt.step(net.params, grads)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        tloss.backward()
        topt.step()
        assert abs(loss - tloss.item()) <= tol * max(1.0, abs(loss)) * 10, f"step {step}: {loss} vs {tloss.item()}"
    for p, tp in zip(net.params, model.parameters()):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=tol * 100)
