"""minicnn: a small, autograd-free CNN whose every SGD step you can watch and explain.

    import minicnn
    net = minicnn.Network.from_spec("small", input_shape=(1, 28, 28), seed=0)
    loss, grads = net.loss_and_grads(x, y)
    minicnn.SGD(lr=0.1).step(net.params, grads)
    result = minicnn.train(lr=0.1, epochs=3, out="runs/demo")
    net = minicnn.from_torch(model, input_shape=(1, 28, 28))    # and net.to_torch(): PyTorch in and out
"""
from .config import TrainConfig
from .data import Dataset, load_data
from .errors import ConfigError, DataError, DeviceError, MinicnnError, SpecError
from .network import Network
from .rundir import Run, load_run
from .sgd import SGD, parse_schedule
from .spec import PRESETS, parse_spec
from .stepper import Stepper
from .trainer import RunResult, Trainer, train

__version__ = "0.1.0"


def __getattr__(name):
    """minicnn.from_torch and minicnn.torch, imported on first use (minicnn.torch imports PyTorch
    only inside its functions, so neither needs PyTorch to be installed until it is called)."""
    if name in ("from_torch", "torch"):
        import minicnn.torch
        return minicnn.torch.from_torch if name == "from_torch" else minicnn.torch
    raise AttributeError(f"module 'minicnn' has no attribute '{name}'")

__all__ = ["Network", "SGD", "parse_schedule", "train", "Trainer", "TrainConfig", "RunResult", "load_data",
           "Dataset", "load_run", "Run", "Stepper", "parse_spec", "PRESETS", "MinicnnError", "SpecError", "DataError",
           "ConfigError", "DeviceError", "from_torch", "__version__"]
