"""Real datasets: MNIST, Fashion-MNIST and CIFAR-10, with checksummed download and a cache.

    data = load_dataset("mnist")                    # downloads once into cache_dir("mnist")
    data["x_train"].shape                           # (60000, 1, 28, 28) float32 in [0, 1]
    data = load_dataset("mnist", data_dir="data", download=False)
    folder = load_image_folder("photos/", image_size=32)

Where files are looked for, in order (each file separately):
    data_dir, data_dir/<name>        when ``data_dir`` is given
    cache_dir(<name>)                $MINICNN_DATA_DIR/<name>, else $XDG_CACHE_HOME/minicnn/<name>
                                     (default ~/.cache/minicnn/<name>)
A file found locally is never downloaded again. Missing files are downloaded (``download=True``)
into data_dir/<name> when ``data_dir`` is given, else into the cache.

File formats accepted:
    mnist, fashion-mnist   the four IDX files, gzipped (``*.gz`` as published) or decompressed:
                           train-images-idx3-ubyte, train-labels-idx1-ubyte,
                           t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
                           (gzip is recognised by content, so a decompressed file that kept
                           its ``.gz`` name is fine too)
    cifar10                the python pickle batches data_batch_1..5 and test_batch (in
                           cifar-10-batches-py/ or directly in the folder), or the archive
                           cifar-10-python.tar.gz, which is extracted into the cache

Integrity: every file whose MD5 is published (``CHECKSUMS``) is verified, both after a download
and when found locally; a mismatch raises ``DataError``. Files with no known checksum (e.g. a
decompressed Fashion-MNIST file) are accepted after structural validation. Every structural
problem (bad magic number, truncated file, wrong dimensions, label count or range) raises
``DataError`` naming the file, on one line.

Downloads go to a temporary file in the destination folder, are verified, then moved into place
with ``os.replace``; on any failure (offline, checksum mismatch, Ctrl-C) the temporary file is
removed, so nothing half-written is ever left behind. ``MIRRORS`` and ``CHECKSUMS`` are plain
module-level dicts so tests can point downloads at a local server.

If only the test split is present (e.g. only the t10k files), ``split=0.8`` splits it
deterministically (seed 0) into train/test parts instead of failing; the returned dict says
so under ``"note"``.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .errors import ConfigError, DataError

DATASETS = ("mnist", "fashion-mnist", "cifar10")

# Base URLs tried in order for each dataset; a file URL is base + file name.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}

# Published MD5 checksums, by dataset and file name (as torchvision lists them; the decompressed
# MNIST ones are those of the decompressed published .gz files).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}

DOWNLOAD_TIMEOUT = 30.0          # seconds, per connect / read
CHUNK_SIZE = 1 << 16             # bytes per read while downloading
SPLIT_SEED = 0                   # the fixed seed of the split=... fallback

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_IDX_FILES = {  # split -> (images, labels), decompressed names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SHAPE = (28, 28)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_ROW = 3 * 32 * 32

_ALIASES = {"fashion": "fashion-mnist", "fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar": "cifar10"}

Progress = Optional[Callable[[int, Optional[int]], None]]


# ----------------------------------------------------------------------------- locations

def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    return key


def cache_dir(name: Optional[str] = None) -> Path:
    """The download cache: $MINICNN_DATA_DIR, else $XDG_CACHE_HOME/minicnn, else ~/.cache/minicnn.

    With ``name``, the dataset's own subfolder. Nothing is created.
    """
    root = os.environ.get("MINICNN_DATA_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minicnn"
    return base / _canonical(name) if name is not None else base


def _search_dirs(name: str, data_dir) -> list[Path]:
    dirs = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if root.exists() and not root.is_dir():
            raise DataError(f"{root}: data_dir is a file, not a folder; accepted: a folder holding "
                            f"the {name} files (directly or in a '{name}' subfolder)")
        dirs += [root, root / name]
    dirs.append(cache_dir(name))
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _target_dir(name: str, data_dir) -> Path:
    return Path(data_dir).expanduser() / name if data_dir is not None else cache_dir(name)


# ----------------------------------------------------------------------------- download

def _one_line(text) -> str:
    return " ".join(str(text).split())


def _md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)


def _network_error(url: str, exc: BaseException) -> DataError:
    if isinstance(exc, urllib.error.HTTPError):
        reason = f"HTTP error {exc.code} ({exc.reason})"
    elif isinstance(exc, urllib.error.URLError):
        reason = exc.reason
    else:
        reason = exc
    return DataError(_one_line(f"could not download {url}: {reason or type(exc).__name__}"))


def download_file(url: str, dest, md5: Optional[str] = None, progress: Progress = None,
                  timeout: Optional[float] = None) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` when given.

    The data goes to a hidden temporary file next to ``dest`` and is moved into place with
    ``os.replace`` only once complete and verified; on any failure, including Ctrl-C, the
    temporary file is removed and nothing is left at ``dest`` (the folder is only created once
    the server answers). ``progress(bytes_done, bytes_total)`` is called as chunks arrive
    (``bytes_total`` is None if the server does not say). Network problems and checksum
    mismatches raise ``DataError``.
    """
    dest = Path(dest)
    request = urllib.request.Request(url, headers={"User-Agent": "minicnn"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout or DOWNLOAD_TIMEOUT)
    except _NETWORK_ERRORS as exc:
        raise _network_error(url, exc) from exc
    with response:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    digest, done, total = _stream(response, out, progress)
            except _NETWORK_ERRORS as exc:
                raise _network_error(url, exc) from exc
            if total is not None and done != total:
                raise DataError(f"could not download {url}: the connection closed after {done} of {total} bytes")
            if md5 is not None and digest != md5:
                raise DataError(f"download of {url} has MD5 {digest} but the published checksum is {md5}; "
                                f"nothing was saved (the mirror may serve a different or damaged file)")
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    return dest


def _stream(response, out, progress: Progress):
    """Copy ``response`` to the file ``out`` in chunks; returns (md5, bytes copied, bytes announced)."""
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    digest = hashlib.md5()
    done = 0
    if progress is not None:
        progress(0, total)
    while True:
        chunk = response.read(CHUNK_SIZE)
        if not chunk:
            break
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return digest.hexdigest(), done, total


def _download(name: str, filename: str, target: Path, progress: Progress) -> Path:
    """Fetch ``filename`` of dataset ``name`` into ``target`` from the first mirror that works."""
    mirrors = MIRRORS.get(name) or []
    if not mirrors:
        raise DataError(f"could not download {filename}: no download mirror is configured for {name}")
    md5 = CHECKSUMS.get(name, {}).get(filename)
    errors = []
    for base in mirrors:
        try:
            return download_file(base.rstrip("/") + "/" + filename, target / filename, md5, progress)
        except DataError as exc:
            errors.append(str(exc))
    raise DataError("; ".join(errors))


# ----------------------------------------------------------------------------- file checks

def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(_one_line(f"{path}: cannot be read ({exc.strerror or exc})")) from exc


def _verify(path: Path, name: str, stored_as: str, md5: str) -> None:
    """Raise if ``stored_as`` has a published checksum for ``name`` and ``md5`` differs."""
    expected = CHECKSUMS.get(name, {}).get(stored_as)
    if expected is not None and md5 != expected:
        raise DataError(f"{path}: MD5 {md5} does not match the published checksum {expected} of {name} "
                        f"{stored_as}; the file is damaged or not the original - delete it "
                        f"(it is downloaded again) or replace it with the original")


# ----------------------------------------------------------------------------- IDX (MNIST)

_IDX_KINDS = {  # kind -> (magic, number of dimensions after the count)
    "images": (2051, 2),
    "labels": (2049, 0),
}


def _decode_idx_file(path: Path):
    """Read an IDX file (gzip detected by content); returns (data, md5 of file, published name)."""
    blob = _read_file(path)
    md5 = hashlib.md5(blob).hexdigest()
    plain_name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if blob[:2] != b"\x1f\x8b":
        return blob, md5, plain_name
    try:
        data = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(_one_line(
            f"{path}: not a valid gzip file ({exc}); accepted: the .gz file as published, "
            f"or the decompressed IDX file")) from exc
    return data, md5, plain_name + ".gz"


def _parse_idx(data: bytes, path: Path, kind: str) -> np.ndarray:
    magic_expected, ndims = _IDX_KINDS[kind]
    header = 8 + 4 * ndims
    what = f"an IDX {kind[:-1]} file"
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, too short for {what} (header {header} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != magic_expected:
        other = {m: k for k, (m, _) in _IDX_KINDS.items()}.get(magic)
        hint = f" (this is an IDX {other[:-1]} file: images and labels swapped?)" if other else ""
        raise DataError(f"{path}: bad magic number {magic} (0x{magic:08x}){hint}; "
                        f"expected {magic_expected} for {what}")
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte header of {what}")
    count = int.from_bytes(data[4:8], "big")
    dims = tuple(int.from_bytes(data[8 + 4 * i:12 + 4 * i], "big") for i in range(ndims))
    expected = header + count * int(np.prod(dims, dtype=np.int64))
    shape_text = "x".join(str(v) for v in (count,) + dims)
    if len(data) < expected:
        raise DataError(f"{path}: truncated: the header promises {shape_text} {kind} = {expected} bytes "
                        f"but the (decompressed) file has {len(data)}")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} unexpected bytes after the {shape_text} {kind} "
                        f"the header describes; accepted: an unmodified IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape((count,) + dims)


def read_idx_images(path) -> np.ndarray:
    """The images of an IDX image file (gzipped or not) as uint8 (N, rows, cols)."""
    path = Path(path)
    data, _, _ = _decode_idx_file(path)
    return _parse_idx(data, path, "images")


def read_idx_labels(path) -> np.ndarray:
    """The labels of an IDX label file (gzipped or not) as int64 (N,)."""
    path = Path(path)
    data, _, _ = _decode_idx_file(path)
    return _parse_idx(data, path, "labels").astype(np.int64)


def _find_idx(dirs: Sequence[Path], plain_name: str) -> Optional[Path]:
    for d in dirs:
        for candidate in (d / plain_name, d / (plain_name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_part(name: str, images_path: Path, labels_path: Path):
    data, md5, stored_as = _decode_idx_file(images_path)
    images = _parse_idx(data, images_path, "images")
    _verify(images_path, name, stored_as, md5)
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: contains no images; accepted: an IDX file with at least one image")
    if images.shape[1:] != _IDX_SHAPE:
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]} but {name} "
                        f"images are {_IDX_SHAPE[0]}x{_IDX_SHAPE[1]}")
    data, md5, stored_as = _decode_idx_file(labels_path)
    labels = _parse_idx(data, labels_path, "labels")
    _verify(labels_path, name, stored_as, md5)
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: has {labels.shape[0]} labels but {images_path.name} has "
                        f"{images.shape[0]} images; accepted: matching image and label files")
    _check_labels(labels, labels_path, len(CLASS_NAMES[name]))
    return _to_unit_float(images[:, None, :, :]), labels.astype(np.int64)


def _check_labels(labels: np.ndarray, path: Path, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: label {int(labels[i])} at index {i} is out of range "
                        f"({bad.size} such labels); accepted: 0..{num_classes - 1}")


def _to_unit_float(u8: np.ndarray) -> np.ndarray:
    out = u8.astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)
    return out


# ----------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # pickles written by numpy 1.x
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_cifar_batch(path: Path, name: str = "cifar10"):
    """One CIFAR-10 python batch -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    blob = _read_file(path)
    accepted = (f"accepted: a CIFAR-10 python batch (a pickled dict with 'data' uint8 (10000, {_CIFAR_ROW}) "
                f"and 'labels' a list of 10000 ints 0..9)")
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise DataError(_one_line(f"{path}: cannot be unpickled ({type(exc).__name__}: {exc}); {accepted}")) from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a dict; {accepted}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(k) for k in missing)} key "
                        f"(keys: {', '.join(sorted(map(str, batch)))}); {accepted}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_ROW or data.shape[0] == 0:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {got}; {accepted}")
    try:
        labels = np.asarray(batch["labels"])
    except Exception:  # noqa: BLE001 - ragged or odd objects
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' is not a list of ints; {accepted}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images; {accepted}")
    _check_labels(labels, path, len(CLASS_NAMES[name]))
    _verify(path, name, path.name, hashlib.md5(blob).hexdigest())
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _find_cifar(dirs: Sequence[Path], filename: str) -> Optional[Path]:
    for d in dirs:
        for candidate in (d / _CIFAR_FOLDER / filename, d / filename):
            if candidate.is_file():
                return candidate
    return None


def _extract_cifar(archive: Path, dest: Path) -> None:
    """Extract only the known batch files of ``archive`` into ``dest``/cifar-10-batches-py.

    Members are matched by exact name (cifar-10-batches-py/<file>); anything else, including
    absolute paths, ``..``, links and devices, is skipped. Each file is written atomically.
    """
    wanted = set(_CIFAR_FILES["train"] + _CIFAR_FILES["test"]) | {"batches.meta"}
    out_dir = dest / _CIFAR_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) != 2 or parts[0] != _CIFAR_FOLDER or parts[1] not in wanted:
                    continue
                source = tar.extractfile(member)
                fd, tmp_name = tempfile.mkstemp(prefix=f".{parts[1]}.", suffix=".part", dir=out_dir)
                try:
                    with os.fdopen(fd, "wb") as out:
                        for block in iter(lambda s=source: s.read(1 << 20), b""):
                            out.write(block)
                    os.chmod(tmp_name, 0o644)
                    os.replace(tmp_name, out_dir / parts[1])
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp_name)
                    raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(_one_line(f"{archive}: cannot be extracted ({exc}); "
                                  f"accepted: the original {_CIFAR_ARCHIVE}")) from exc


# ----------------------------------------------------------------------------- load_dataset

def _check_split(split) -> Optional[float]:
    if split is None:
        return None
    if isinstance(split, bool) or not isinstance(split, (int, float, np.floating)) \
            or not 0.0 < float(split) < 1.0:
        raise ConfigError(f"split must be a fraction strictly between 0 and 1 (e.g. 0.8), got {split!r}")
    return float(split)


def _split_one(x: np.ndarray, y: np.ndarray, split: float, source: str, files: Sequence[Path]):
    n = len(y)
    n_train = int(round(n * split))
    if not 0 < n_train < n:
        raise DataError(f"split {split} of the {n} {source} samples leaves an empty part; "
                        f"accepted: a fraction that keeps at least one sample on each side")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    a, b = np.sort(order[:n_train]), np.sort(order[n_train:])
    note = (f"only the {source} split was found ({', '.join(p.name for p in files)}): its {n} samples were "
            f"split {split:g}/{1 - split:g} (seed {SPLIT_SEED}) into {n_train} train and {n - n_train} test "
            f"samples; accuracy is not comparable with the official test set")
    return x[a], y[a], x[b], y[b], note


def _missing_message(name, dirs, target, located, plain_names, alt_suffix, download, download_error,
                     alternative="") -> str:
    """One line: what failed, what was found, what is missing, where to put it, and --split."""
    found = [str(p) for p in located.values() if p is not None]
    missing = [n + alt_suffix for n, p in located.items() if p is None]
    have = {part: all(located[f] is not None for f in files) for part, files in plain_names.items()}
    parts = [f"{name}: " + (f"{download_error}; " if download_error else "")]
    parts.append(f"found {', '.join(found)}" if found else "found none of its files")
    parts.append(f"; missing {', '.join(missing)}{alternative}")
    parts.append(f"; place them in {target}")
    others = [str(d) for d in dirs if d != target]
    if others:
        parts.append(f" (also searched: {', '.join(others)})")
    if not download:
        parts.append(" or allow downloading")
    if have["test"] and not have["train"]:
        parts.append(" - or pass --split 0.8 (split=0.8) to split the test set into train/test parts")
    elif have["train"] and not have["test"]:
        parts.append(" - or pass --split 0.8 (split=0.8) to split the training set into train/test parts")
    return "".join(parts)


def _assemble(name, loaded: dict, split, located, note_files) -> dict:
    note = None
    if "train" in loaded and "test" in loaded:
        (x_train, y_train), (x_test, y_test) = loaded["train"], loaded["test"]
        if split is not None:
            note = f"split={split:g} ignored: both the training and the test files are present"
    else:
        source = "test" if "test" in loaded else "train"
        x_train, y_train, x_test, y_test, note = _split_one(*loaded[source], split, source, note_files[source])
    result = {"name": name, "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
              "class_names": list(CLASS_NAMES[name]),
              "files": [str(p) for p in located.values() if p is not None]}
    if note is not None:
        result["note"] = note
    return result


def _load_idx_dataset(name, data_dir, download, split, progress) -> dict:
    dirs, target = _search_dirs(name, data_dir), _target_dir(name, data_dir)
    plain = [f for files in _IDX_FILES.values() for f in files]
    located = {f: _find_idx(dirs, f) for f in plain}
    download_error = None
    if download:
        for f in plain:
            if located[f] is None:
                try:
                    located[f] = _download(name, f + ".gz", target, progress)
                except DataError as exc:
                    download_error = exc
                    break
    have = {part: all(located[f] is not None for f in files) for part, files in _IDX_FILES.items()}
    if not all(have.values()) and (split is None or not any(have.values())):
        raise DataError(_missing_message(name, dirs, target, located, _IDX_FILES, "[.gz]", download, download_error))
    loaded = {part: _load_idx_part(name, *(located[f] for f in files))
              for part, files in _IDX_FILES.items() if have[part]}
    note_files = {part: [located[f] for f in files] for part, files in _IDX_FILES.items()}
    return _assemble(name, loaded, split, located, note_files)


def _load_cifar_dataset(name, data_dir, download, split, progress) -> dict:
    dirs, target = _search_dirs(name, data_dir), _target_dir(name, data_dir)
    every = _CIFAR_FILES["train"] + _CIFAR_FILES["test"]
    located = {f: _find_cifar(dirs, f) for f in every}
    download_error = None
    if any(p is None for p in located.values()):
        archive = next((d / _CIFAR_ARCHIVE for d in dirs if (d / _CIFAR_ARCHIVE).is_file()), None)
        if archive is not None:
            _verify(archive, name, _CIFAR_ARCHIVE, _md5_file(archive))
        elif download:
            try:
                archive = _download(name, _CIFAR_ARCHIVE, target, progress)
            except DataError as exc:
                download_error = exc
        if archive is not None:
            _extract_cifar(archive, cache_dir(name))
            located = {f: located[f] or _find_cifar(dirs, f) for f in every}
    have = {part: all(located[f] is not None for f in files) for part, files in _CIFAR_FILES.items()}
    if not all(have.values()) and (split is None or not any(have.values())):
        raise DataError(_missing_message(name, dirs, target, located, _CIFAR_FILES, "", download, download_error,
                                         alternative=f" (or {_CIFAR_ARCHIVE})"))
    loaded = {}
    for part, files in _CIFAR_FILES.items():
        if have[part]:
            batches = [_load_cifar_batch(located[f], name) for f in files]
            x = _to_unit_float(np.concatenate([b[0] for b in batches]))
            loaded[part] = (x, np.concatenate([b[1] for b in batches]))
    note_files = {part: [located[f] for f in files] for part, files in _CIFAR_FILES.items()}
    return _assemble(name, loaded, split, located, note_files)


def load_dataset(name: str, data_dir=None, download: bool = True, split: Optional[float] = None,
                 progress: Progress = None) -> dict:
    """Load ``name`` (one of ``DATASETS``) as float32 arrays in [0, 1].

    Returns a dict with ``x_train`` (N, C, H, W) float32, ``y_train`` int64, ``x_test``,
    ``y_test``, ``class_names``, ``name`` and ``files`` (the paths read), plus ``note`` (a
    sentence about how the data was split) only when there is something to say. See the module docstring for where
    files are looked
    for and downloaded to. ``split`` (a fraction in (0, 1)) is used only when just one of the
    train/test splits is present: that split is then divided deterministically (seed 0).
    ``progress(bytes_done, bytes_total)`` is called while downloading.
    """
    key = _canonical(name)
    split = _check_split(split)
    loader = _load_cifar_dataset if key == "cifar10" else _load_idx_dataset
    return loader(key, data_dir, download, split, progress)


# ----------------------------------------------------------------------------- normalisation

def normalize(x: np.ndarray, mean=None, std=None):
    """Standardise ``x`` (N, C, H, W) per channel; returns ``(x_normalised, mean, std)``.

    With ``mean``/``std`` None they are computed per channel from ``x`` (pass the training set),
    so the test set can reuse them: ``normalize(x_test, mean, std)``. Scalars or one value per
    channel are accepted. A channel with zero spread is divided by 1, not 0.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise DataError(f"normalize expects (N, C, H, W) images, got shape {x.shape}")
    channels = x.shape[1]
    if mean is None or std is None:
        total = np.zeros(channels)
        squares = np.zeros(channels)
        for start in range(0, len(x), 4096):  # chunked float64 sums: no full-size temporaries
            block = x[start:start + 4096].astype(np.float64)
            total += block.sum(axis=(0, 2, 3))
            squares += np.einsum("nchw,nchw->c", block, block)
        count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
        computed_mean = total / count
        computed_std = np.sqrt(np.maximum(squares / count - computed_mean ** 2, 0.0))
        mean = computed_mean if mean is None else mean
        std = computed_std if std is None else std
    mean = _per_channel(mean, channels, "mean")
    std = _per_channel(std, channels, "std")
    std = np.where(std > 1e-12, std, 1.0).astype(np.float32)
    out = (x.astype(np.float32) - mean[None, :, None, None]) / std[None, :, None, None]
    return out, mean, std


def _per_channel(value, channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.full(channels, arr[0], dtype=np.float32)
    if arr.size != channels:
        raise ConfigError(f"{what} has {arr.size} values for {channels} channels; accepted: one value "
                          f"or one per channel")
    return arr


# ----------------------------------------------------------------------------- image folders

def _check_image_size(image_size) -> Optional[tuple[int, int]]:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                 for v in size):
        raise ConfigError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(size[0]), int(size[1])


def _image_folder_items(root, layout):
    """(class names in sorted order, [(image file, class index)]) of an ImageFolder tree."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: has no class subfolders; {layout}")
    items = []  # (file, class index)
    for index, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{root / cls}: class folder has no PNG/JPEG images; {layout}")
        items += [(f, index) for f in files]
    return classes, items


def load_image_folder(path, image_size: Union[int, tuple[int, int], None] = None,
                      grayscale: Optional[bool] = None) -> dict:
    """Load an ImageFolder tree: ``path/<class name>/<image>.png|.jpg|.jpeg``.

    Classes are the subfolders in sorted order. Images are resized (bilinear, Pillow) to
    ``image_size`` (int or (height, width)); without it all images must have the size of the
    first one. ``grayscale`` None means one channel if every image is grayscale, else RGB.
    Returns a dict with ``x`` (N, C, H, W) float32 in [0, 1], ``y`` int64, ``class_names``
    and ``files``.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow is only needed here

    root = Path(path).expanduser()
    size = _check_image_size(image_size)
    layout = f"accepted: {root}/<class name>/<image>{'|'.join(IMAGE_EXTENSIONS)}"
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {layout}")
    classes, items = _image_folder_items(root, layout)

    def open_image(file: Path, load: bool):
        try:
            image = Image.open(file)
            if load:
                image.load()
            return image
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(_one_line(f"{file}: not a readable image ({exc}); accepted: PNG or JPEG files")) from exc

    if grayscale is None:  # header-only pass: one channel only if every image is grayscale
        modes = set()
        for file, _ in items:
            with open_image(file, load=False) as image:
                modes.add(image.mode)
        grayscale = modes <= {"1", "L", "LA", "I", "I;16", "I;16B"}
    mode = "L" if grayscale else "RGB"

    arrays = []
    for file, _ in items:
        with open_image(file, load=True) as image:
            converted = _to_8bit(image).convert(mode)
            if size is None:
                size = (converted.height, converted.width)
            elif (converted.height, converted.width) != size:
                if image_size is None:
                    raise DataError(f"{file}: is {converted.height}x{converted.width} but {items[0][0]} "
                                    f"is {size[0]}x{size[1]}; pass image_size (e.g. --image-size 32) "
                                    f"to resize all images")
                converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.uint8)
        arrays.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    x = _to_unit_float(np.stack(arrays))
    y = np.array([index for _, index in items], dtype=np.int64)
    return {"x": x, "y": y, "class_names": classes, "files": [str(f) for f, _ in items]}


def _to_8bit(image):
    """16-bit grayscale PNGs (modes I, I;16) scaled to 8 bits; other images unchanged."""
    if image.mode not in ("I", "I;16", "I;16B"):
        return image
    from PIL import Image
    values = np.asarray(image, dtype=np.float64)
    if values.size and values.max() > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
