"""minicnn: a small, autograd-free CNN whose every SGD step you can watch and explain.

    import minicnn
    net = minicnn.Network.from_spec("small", input_shape=(1, 28, 28), seed=0)
    loss, grads = net.loss_and_grads(x, y)
    minicnn.SGD(lr=0.1).step(net.params, grads)
    result = minicnn.train(lr=0.1, epochs=3, out="runs/demo")
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

__all__ = ["Network", "SGD", "parse_schedule", "train", "Trainer", "TrainConfig", "RunResult", "load_data", "Dataset",
           "load_run", "Run", "Stepper", "parse_spec", "PRESETS", "MinicnnError", "SpecError", "DataError",
           "ConfigError", "DeviceError", "__version__"]
