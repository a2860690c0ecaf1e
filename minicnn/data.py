"""Datasets for training: the built-in synthetic shapes, a user's .npz, and real image datasets.

    ds = load_data("shapes", seed=0)          # built-in, no download
    ds = load_data("my_data.npz")             # arrays x (N,C,H,W) or (N,H,W), y int labels
    ds = load_data("mnist", data_dir=...)     # see minicnn.datasets

Every loader returns a ``Dataset`` with float arrays in NCHW and int64 labels, validated: a bad
file gets one ``DataError`` line saying what was wrong and what is accepted.
"""
import os
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ArgumentTypeError, DataError

BUILTIN = "shapes"
NAMED = ("mnist", "fashion-mnist", "cifar10")
DATA_HELP = (f"'{BUILTIN}' (built-in, no download), {', '.join(NAMED)}, a .npz file with arrays x "
             "(N,C,H,W or N,H,W) and y (N,) int labels, or a folder of class subfolders of images")
DEFAULT_TRAIN, DEFAULT_VAL = 12000, 2000
VAL_FRACTION = 0.1       # of a user's .npz when it has no x_val / y_val
ZIP_MAGIC = b"PK\x03\x04"  # every .npz is a zip archive and starts with these bytes


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray          # (N, C, H, W) float32
    y_train: np.ndarray          # (N,) int64
    x_val: np.ndarray            # (M, C, H, W)
    y_val: np.ndarray            # (M,)
    num_classes: int
    class_names: list = field(default_factory=list)
    note: str = ""

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])

    def scaled(self, factor):
        """The same data with every input multiplied by ``factor`` (e.g. 255: pixels left un-normalised)."""
        if factor == 1:
            return self
        return replace(self, x_train=self.x_train * np.float32(factor), x_val=self.x_val * np.float32(factor),
                       note="; ".join(filter(None, [self.note, f"inputs x {factor:g}"])))

    def describe(self):
        C, H, W = self.input_shape
        s = (f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val images of {C}x{H}x{W}, "
             f"{self.num_classes} classes")
        return s + (f" ({self.note})" if self.note else "")


def validate(x, y, what, num_classes=None):
    """Check and convert one split: x to float32 NCHW, y to int64; raise DataError otherwise."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what}: x must have shape (N, C, H, W) or (N, H, W), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{what}: y must have shape ({len(x)},) to match x, got {y.shape}")
    if len(x) == 0:
        raise DataError(f"{what}: no samples")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                   and np.all(np.mod(y, 1) == 0))):
        raise DataError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DataError(f"{what}: x must be numeric, got dtype {x.dtype}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise DataError(f"{what}: x contains {bad} NaN/inf values; only finite numbers are accepted")
    y = y.astype(np.int64)
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        accepted = "class indices >= 0" if num_classes is None else f"class indices in 0..{num_classes - 1}"
        raise DataError(f"{what}: labels must be {accepted}, got labels from {y.min()} to {y.max()}")
    return x, y


def load_npz(path, seed=0):
    """A user's .npz: x and y, optionally x_val and y_val; else a seeded 10% validation split."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if head != ZIP_MAGIC:
        kind = "an empty file" if not head else ("a .npy array" if head.startswith(b"\x93NUMPY") else
                                                 "a text file" if _is_text(path) else f"a file starting {head!r}")
        raise DataError(f"{path} is not a .npz archive (it is {kind}); accepted: a file written by "
                        "numpy.savez(path, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/OSError: all mean "not a readable .npz"
        raise DataError(f"cannot read {path} as a .npz file ({type(e).__name__}: {e}); "
                        "write it with numpy.savez(path, x=..., y=...)") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {sorted(arrays) or 'none'}; "
                        "accepted: x (N,C,H,W or N,H,W) and y (N,) int labels, optional x_val, y_val")
    x, y = validate(arrays["x"], arrays["y"], f"{path} (x, y)")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path}: x_val and y_val must be given together")
    if "x_val" in arrays:
        xv, yv = validate(arrays["x_val"], arrays["y_val"], f"{path} (x_val, y_val)")
        if xv.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_val images are {xv.shape[1:]}, x images are {x.shape[1:]}")
    else:
        if len(x) < 2:
            raise DataError(f"{path}: need at least 2 samples to split off a validation set")
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, int(round(VAL_FRACTION * len(x))))
        x, y, xv, yv = x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]
    num_classes = int(max(y.max(), yv.max())) + 1
    return Dataset(os.path.basename(path), x, y, xv, yv, num_classes, [str(i) for i in range(num_classes)])


def _is_text(path, probe=4096):
    """True when the first ``probe`` bytes of a file decode as UTF-8 text without NUL bytes."""
    with open(path, "rb") as f:
        head = f.read(probe)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def load_shapes(seed=0, n_train=DEFAULT_TRAIN, n_val=DEFAULT_VAL):
    """The built-in synthetic dataset; train and validation drawn from independent seeds."""
    from .synthetic import CLASS_NAMES, make_shapes
    xt, yt = make_shapes(n_train, seed=seed)
    xv, yv = make_shapes(n_val, seed=seed + 1_000_003)
    return Dataset(BUILTIN, xt, yt, xv, yv, len(CLASS_NAMES), list(CLASS_NAMES))


def load_data(spec=BUILTIN, seed=0, data_dir=None, n_train=None, n_val=None, split=None,
              image_size=None, progress=None):
    """Load a dataset by name or path (see DATA_HELP)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ArgumentTypeError(f"data must be a name or a path, got {type(spec).__name__} {spec!r}; "
                                f"accepted: {DATA_HELP}")
    spec = os.fspath(spec)
    if spec == BUILTIN:
        return load_shapes(seed, n_train or DEFAULT_TRAIN, n_val or DEFAULT_VAL)
    if spec in NAMED:
        from .datasets import load_dataset
        d = load_dataset(spec, data_dir=data_dir, split=split, progress=progress)
        x, y = validate(d["x_train"], d["y_train"], f"{spec} train")
        xv, yv = validate(d["x_test"], d["y_test"], f"{spec} test")
        ds = Dataset(spec, x, y, xv, yv, len(d["class_names"]), list(d["class_names"]),
                     d.get("note", "validation = the official test set"))
    elif os.path.isdir(spec):
        from .datasets import load_image_folder
        d = load_image_folder(spec, image_size=image_size)
        x, y = validate(d["x"], d["y"], spec)
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = max(1, int(round(VAL_FRACTION * len(x))))
        ds = Dataset(os.path.basename(os.path.normpath(spec)), x[perm[n_val:]], y[perm[n_val:]],
                     x[perm[:n_val]], y[perm[:n_val]], len(d["class_names"]), list(d["class_names"]))
    elif spec.endswith(".npz") or os.path.isfile(spec):
        ds = load_npz(spec, seed)
    else:
        raise DataError(f"unknown dataset '{spec}'; accepted: {DATA_HELP}")
    if ds.num_classes < 2:
        raise DataError(f"{spec}: the data has a single class ({', '.join(ds.class_names) or 0}); a classifier "
                        f"needs at least 2 (for an image folder: one subfolder per class)")
    for name, n, have in (("--n-train", n_train, len(ds.y_train)), ("--n-val", n_val, len(ds.y_val))):
        if n and n > have:
            raise DataError(f"{name} {n:,} is more than the {have:,} {name[4:]} samples of {ds.name}; "
                            f"accepted: 1..{have:,}")
    if n_train:
        ds.x_train, ds.y_train = ds.x_train[:n_train], ds.y_train[:n_train]
    if n_val:
        ds.x_val, ds.y_val = ds.x_val[:n_val], ds.y_val[:n_val]
    return ds
