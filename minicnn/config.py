"""A run's configuration: ``TrainConfig``, its validation, and ``setup`` (config -> data + network).

    cfg = TrainConfig(lr=0.1, epochs=3)
    cfg, data, net = setup(cfg)            # validated, threads set, data loaded and scaled, network built

Every rule that turns options into a run lives here: the default number of steps, the trace level
``auto`` picks, and the fixed samples lambda_max is measured on.
"""
import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ArgumentTypeError, ConfigError
from .sgd import parse_schedule
from .spec import parse_spec
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


# Longest run: steps.csv's step column is read back as float64, which counts exactly only up to 2^53
# (and a run that long would take centuries); larger values are typos.
MAX_STEPS = 2 ** 53
MAX_SEED = 2 ** 63 - 1          # seeds go into numpy's SeedSequence next to 64-bit stream numbers
# (name, smallest, largest, None allowed) of the whole-number options
INT_FIELDS = (("batch_size", 1, MAX_STEPS, False), ("steps", 1, MAX_STEPS, True),
              ("eval_every", 1, MAX_STEPS, True), ("sharpness_every", 0, MAX_STEPS, False),
              ("checkpoint_every", 0, MAX_STEPS, False), ("threads", 1, MAX_STEPS, True),
              ("seed", 0, MAX_SEED, False), ("n_train", 1, MAX_STEPS, True), ("n_val", 1, MAX_STEPS, True),
              ("probe_every", 0, MAX_STEPS, False), ("probe_size", 1, MAX_STEPS, False),
              ("noise_every", 0, MAX_STEPS, False))
# (name, bound, bound excluded) of the real-number options, each finite
FLOAT_FIELDS = (("lr", 0, False), ("momentum", 0, False), ("weight_decay", 0, False), ("epochs", 0, True),
                ("init_scale", 0, False), ("input_scale", 0, True))
# Training holds this many parameter-sized arrays: parameters, gradients, momentum, the SGD work
# array and the trace's three work vectors (weights before the step, the update, the previous gradient)
TRAIN_PARAM_COPIES = 7
# Inputs are stored as float32 whatever the run's dtype; --input-scale must keep them finite there
INPUT_DTYPE = np.float32
BUILTIN_IMAGE_BYTES = 28 * 28 * 4   # one image of the built-in data: 1x28x28 float32

# what a resumed run may change: its length (more steps or epochs) and the thread count (results do
# not depend on it); anything else would make the continued run a different one
RESUME_CHANGES = ("steps", "epochs", "threads")


def option(name):
    """The command-line option of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


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
        for name, lo, hi, optional in INT_FIELDS:
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ArgumentTypeError(f"{option(name)} must be a whole number >= {lo}, got {type(v).__name__} {v!r}")
            need(lo <= v <= hi, f"{option(name)} must be a whole number in {lo}..{hi:,}, got {v:,}")
        for name, lo, lo_open in FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None and name == "epochs":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ArgumentTypeError(f"{option(name)} must be a finite number, got {type(v).__name__} {v!r}")
            need(math.isfinite(v) and (v > lo if lo_open else v >= lo),
                 f"{option(name)} must be a finite number {'>' if lo_open else '>='} {lo:g}, got {v}")
        need(self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum} (at 1 the momentum buffer "
                                f"never decays: every past gradient would count forever)")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        need(self.trace in TRACE_LEVELS + ("auto",),
             f"--trace must be one of auto, {', '.join(TRACE_LEVELS)}, got {self.trace}")
        parse_spec(self.arch)              # a spec that does not parse: named now, not when a run starts
        # the schedule's form now; its lr at every step once the length is known (with --steps: now)
        parse_schedule(self.lr_schedule, self.lr, self.steps or 1)
        parse_sharpness(self.sharpness)            # raises ConfigError naming what is accepted
        need(not self.noise_every or self.batch_size >= 2,
             f"--noise-every needs --batch-size >= 2 (the noise is the spread of a batch's per-sample "
             f"gradients), got {self.batch_size}")

    # ------------------------------------------------------------------ derived
    def total_steps(self, steps_per_epoch):
        """Steps the run takes: ``steps``, else ``epochs`` (default DEFAULT_EPOCHS) epochs."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs or DEFAULT_EPOCHS
        total = math.ceil(epochs * steps_per_epoch)
        if total > MAX_STEPS:
            raise ConfigError(f"--epochs {epochs:g} of {steps_per_epoch:,} steps each is {total:.3g} steps, more than "
                              f"{MAX_STEPS:,}; accepted: fewer epochs")
        return int(total)

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


def available_threads():
    """The most Numba threads a run can use (NUMBA_NUM_THREADS: by default the machine's cores)."""
    import numba
    return numba.config.NUMBA_NUM_THREADS


def set_threads(threads):
    """Numba's thread count (None: leave it, all cores)."""
    if threads:
        import numba

        from .ops import cpu  # noqa: F401  (first: it picks Numba's threading layer, which set_num_threads launches)
        numba.set_num_threads(min(threads, available_threads()))


def setup(config=None, data=None, adjusted=None, **overrides):
    """(config, data, network) for a run: the config validated (overrides applied), threads set, the
    data loaded (unless given) and scaled by input_scale, the network built and checked against it.

    Values that cannot be used as asked (a batch larger than the training set, more threads than
    there are) are replaced in the returned config by the value used; ``adjusted`` (a dict, if given)
    receives {field: {"asked", "used", "why"}} for each."""
    from .data import NAMED, load_data
    from .network import Network
    if config is not None and not isinstance(config, TrainConfig):
        raise ArgumentTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    cfg = TrainConfig.from_dict({**(config.to_dict() if config else {}), **overrides})
    cfg.validate()
    adjusted = {} if adjusted is None else adjusted
    for name, used_by in (("data_dir", NAMED), ("split", NAMED), ("image_size", "an image folder")):
        if getattr(cfg, name) is not None and data is None and not (
                cfg.data in used_by if used_by is NAMED else os.path.isdir(cfg.data)):
            _adjust(cfg, adjusted, name, None, f"--data {cfg.data} does not use it (only "
                                              f"{', '.join(used_by) if used_by is NAMED else used_by} does)")
    if cfg.threads and cfg.threads > available_threads():
        _adjust(cfg, adjusted, "threads", available_threads(), "the most threads this machine runs (NUMBA_NUM_THREADS)")
    set_threads(cfg.threads)
    if data is None:
        check_data_memory(cfg)
        data = load_data(cfg.data, seed=cfg.seed, data_dir=cfg.data_dir, n_train=cfg.n_train,
                         n_val=cfg.n_val, split=cfg.split, image_size=cfg.image_size)
    check_input_scale(cfg.input_scale, data)
    data = data.scaled(cfg.input_scale)
    if cfg.batch_size > len(data.y_train):
        _adjust(cfg, adjusted, "batch_size", len(data.y_train),
                f"the size of the training set: every step uses all {len(data.y_train)} samples")
    net = Network.from_spec(cfg.arch, input_shape=data.input_shape, seed=cfg.seed, dtype=cfg.dtype,
                            init=cfg.init, init_scale=cfg.init_scale, device=cfg.device)
    if net.num_classes < data.num_classes:
        raise ConfigError(f"the network has {net.num_classes} outputs but the data has {data.num_classes} "
                          f"classes; end the spec with fc{data.num_classes}")
    check_train_memory(net, cfg.batch_size)
    if cfg.init_from:
        from .torch import load_state_dict_file  # imports PyTorch only on this path
        load_state_dict_file(net, cfg.init_from)
    return cfg, data, net


def _adjust(cfg, adjusted, name, used, why):
    adjusted[name] = {"asked": getattr(cfg, name), "used": used, "why": why}
    setattr(cfg, name, used)


def adjustment_text(name, a):
    """One line for an adjusted value: '--batch-size 512: used 200 instead, every step uses ...'."""
    return f"{option(name)} {a['asked']}: used {a['used']} instead, {a['why']}"


def check_input_scale(scale, data):
    """--input-scale must keep every (float32) input finite."""
    top = max((float(np.abs(x).max()) for x in (data.x_train, data.x_val) if x.size), default=0.0)
    info = np.finfo(INPUT_DTYPE)
    limit, tiny = float(info.max), float(info.tiny)
    if scale > limit or top * scale > limit:
        raise ConfigError(f"--input-scale {scale:g} takes the largest input ({top:g}) to {top * scale:.3g}, beyond "
                          f"the float32 range the inputs are stored in ({limit:.3g}); accepted: a scale up to "
                          f"{limit / max(top, 1.0):.3g}")
    if top > 0 and top * scale < tiny:
        raise ConfigError(f"--input-scale {scale:g} takes the largest input ({top:g}) to {top * scale:.3g}, below "
                          f"the smallest normal float32 ({tiny:.3g}): the inputs would be (nearly) all zero; accepted: "
                          f"a scale from {tiny / top:.3g}")


def check_data_memory(cfg):
    """The built-in data is generated: --n-train / --n-val images must fit in memory."""
    from .data import BUILTIN, DEFAULT_TRAIN, DEFAULT_VAL
    from .network import check_memory
    if cfg.data == BUILTIN:
        n = (cfg.n_train or DEFAULT_TRAIN) + (cfg.n_val or DEFAULT_VAL)
        check_memory(n * BUILTIN_IMAGE_BYTES, f"--n-train/--n-val: {n:,} images of the built-in data")


def check_train_memory(net, batch_size):
    """The network's training arrays and the activations of a training and an evaluation batch
    must fit in memory (checked before allocating them)."""
    from .network import EVAL_BATCH, check_memory
    params = net.num_params * net.dtype.itemsize * TRAIN_PARAM_COPIES
    acts = net.activation_bytes(batch_size) + net.activation_bytes(EVAL_BATCH)
    check_memory(params + acts, f"network {net.spec}: training it ({net.num_params:,} parameters, "
                                f"{TRAIN_PARAM_COPIES} copies, and the activations of a batch of {batch_size:,})")
