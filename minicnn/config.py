"""A run's configuration: ``TrainConfig``, its validation, and ``setup`` (config -> data + network).

    cfg = TrainConfig(lr=0.1, epochs=3)
    cfg, data, net = setup(cfg)            # validated, threads set, data loaded and scaled, network built

Every rule that turns options into a run lives here: the default number of steps, the trace level
``auto`` picks, and the fixed samples lambda_max is measured on.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ConfigError
from .trace import TRACE_LEVELS, parse_sharpness

DTYPES = ("float32", "float64")
# "auto" trace: full when the run is small enough that doubling a step's cost is cheap
AUTO_FULL_TRACE_MAX_STEPS = 20000
DEFAULT_EPOCHS = 3
# Periodic checkpoints (RUN_DIR/checkpoints/step_XXXXXXX.npz, before step 0 and every K steps):
# replaying to any step T costs at most K steps. A checkpoint of the default network is ~170 kB
# (weights + momentum + previous gradient), so even a 20,000-step run keeps them under 20 MB.
CHECKPOINT_EVERY = 200
# lambda_max is measured on this many fixed training samples (each measurement costs tens of
# gradient evaluations on them), drawn by SHARPNESS_STREAM from the run's seed.
SHARPNESS_SAMPLES = 256
SHARPNESS_STREAM = 1 << 20
# The probe: every PROBE_EVERY steps, the network's units and predictions on PROBE_SIZE fixed
# held-out (validation) images, drawn by PROBE_STREAM from the run's seed. A unit is dead when it
# is zero on all of them -- on a training batch of 2 nearly every unit is zero for both images even
# while the network learns (0.95-0.99 measured on the batch-2 runs of minicnn explain), so only the
# probe says whether units are dead. 256 images make a dead fraction a property of the units, not
# of the batch; the forward pass on them costs about one training step of batch 64 forward-only
# (measured overhead: benchmarks/NOTES.md, session 5), so every PROBE_EVERY steps is cheap enough
# for the light trace.
PROBE_EVERY = 10
PROBE_SIZE = 256
PROBE_STREAM = 1 << 21


@dataclass
class TrainConfig:
    data: str = "shapes"
    data_dir: str = None
    n_train: int = None
    n_val: int = None
    arch: str = "small"
    lr: float = 0.1
    lr_schedule: str = "constant"
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    batch_size: int = 64
    epochs: float = None          # default DEFAULT_EPOCHS when neither epochs nor steps is given
    steps: int = None
    init: str = "torch"
    init_scale: float = 1.0
    input_scale: float = 1.0      # multiply every input by this (255: what un-normalised pixels do)
    seed: int = 0
    eval_every: int = None        # steps between evaluations; default once per epoch
    dtype: str = "float32"
    device: str = "cpu"
    trace: str = "auto"
    sharpness_every: int = 0
    sharpness: str = "lambda_max"  # what a sharpness measurement measures (trace.SHARPNESS_MEASURES)
    noise_every: int = 0          # steps between gradient-noise measurements on the training batch (0: none)
    threads: int = None
    split: float = None
    image_size: int = None
    checkpoint_every: int = CHECKPOINT_EVERY   # steps between periodic checkpoints (0: none)
    init_from: str = None         # a PyTorch state_dict file (.pt) to start from instead of the init
    probe_every: int = PROBE_EVERY   # steps between probe measurements (0: none; needs trace light/full)
    probe_size: int = PROBE_SIZE     # held-out images the probe measures on

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0,
             f"--lr must be a finite number >= 0, got {self.lr}")
        need(isinstance(self.input_scale, (int, float)) and math.isfinite(self.input_scale) and self.input_scale > 0,
             f"--input-scale must be a finite number > 0, got {self.input_scale}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        need(self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        need(self.trace in TRACE_LEVELS + ("auto",),
             f"--trace must be one of auto, {', '.join(TRACE_LEVELS)}, got {self.trace}")
        need(self.sharpness_every >= 0, f"--sharpness-every must be >= 0, got {self.sharpness_every}")
        parse_sharpness(self.sharpness)            # raises ConfigError naming what is accepted
        need(self.noise_every >= 0, f"--noise-every must be >= 0, got {self.noise_every}")
        need(not self.noise_every or self.batch_size >= 2,
             f"--noise-every needs --batch-size >= 2 (the noise is the spread of a batch's per-sample "
             f"gradients), got {self.batch_size}")
        need(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        need(self.probe_every >= 0, f"--probe-every must be >= 0, got {self.probe_every}")
        need(self.probe_size >= 1, f"--probe-size must be >= 1, got {self.probe_size}")

    # ------------------------------------------------------------------ derived
    def total_steps(self, steps_per_epoch):
        """Steps the run takes: ``steps``, else ``epochs`` (default DEFAULT_EPOCHS) epochs."""
        if self.steps is not None:
            return self.steps
        return int(math.ceil((self.epochs or DEFAULT_EPOCHS) * steps_per_epoch))

    def trace_level(self, total_steps):
        """The trace level: ``trace``, with auto = full up to AUTO_FULL_TRACE_MAX_STEPS steps, else light."""
        if self.trace != "auto":
            return self.trace
        return "full" if total_steps <= AUTO_FULL_TRACE_MAX_STEPS else "light"


def sharpness_batch(n, seed, samples=SHARPNESS_SAMPLES):
    """The indices of the fixed training samples lambda_max is measured on."""
    return np.random.default_rng([seed, SHARPNESS_STREAM]).permutation(n)[:min(n, samples)]


def probe_batch(n_val, seed, samples=PROBE_SIZE):
    """The indices of the fixed validation images the probe measures on."""
    return np.random.default_rng([seed, PROBE_STREAM]).permutation(n_val)[:min(n_val, samples)]


def set_threads(threads):
    """Numba's thread count (None: leave it, all cores)."""
    if threads:
        import numba

        from .ops import cpu  # noqa: F401  (first: it picks Numba's threading layer, which set_num_threads launches)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def setup(config=None, data=None, **overrides):
    """(config, data, network) for a run: the config validated (overrides applied), threads set, the
    data loaded (unless given) and scaled by input_scale, the network built and checked against it."""
    from .data import load_data
    from .network import Network
    cfg = TrainConfig(**{**(config.to_dict() if config else {}), **overrides})
    cfg.validate()
    set_threads(cfg.threads)
    if data is None:
        data = load_data(cfg.data, seed=cfg.seed, data_dir=cfg.data_dir, n_train=cfg.n_train,
                         n_val=cfg.n_val, split=cfg.split, image_size=cfg.image_size)
    data = data.scaled(cfg.input_scale)
    net = Network.from_spec(cfg.arch, input_shape=data.input_shape, seed=cfg.seed, dtype=cfg.dtype,
                            init=cfg.init, init_scale=cfg.init_scale, device=cfg.device)
    if net.num_classes < data.num_classes:
        raise ConfigError(f"the network has {net.num_classes} outputs but the data has {data.num_classes} "
                          f"classes; end the spec with fc{data.num_classes}")
    if cfg.init_from:
        from .torch import load_state_dict_file  # imports PyTorch only on this path
        load_state_dict_file(net, cfg.init_from)
    return cfg, data, net
