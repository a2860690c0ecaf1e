"""Tests of minicnn.datasets: IDX / CIFAR / image-folder loaders, validation, download, cache.

Everything runs offline: small data files are written into tmp_path, downloads are served by a
local http.server on 127.0.0.1, and every mirror is pointed at a refusing port by default so
no test can reach the internet. The real MNIST files in /work/shared/data/mnist are read in
place (never copied into the repo) when present.
"""
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minicnn import datasets
from minicnn.datasets import DataError, cache_dir, load_dataset, load_image_folder, normalize
from minicnn.errors import ConfigError

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused

IMAGES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


# ----------------------------------------------------------------------------- helpers

def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_images(images: np.ndarray, magic=2051, count=None) -> bytes:
    n, rows, cols = images.shape
    header = b"".join(v.to_bytes(4, "big") for v in (magic, n if count is None else count, rows, cols))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic=2049, count=None) -> bytes:
    header = b"".join(v.to_bytes(4, "big") for v in (magic, len(labels) if count is None else count))
    return header + np.asarray(labels, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def make_mnist(folder: Path, parts=("train", "test"), gz=True, n=None, seed=0):
    """Small valid IDX files; returns {part: (uint8 images, labels)}."""
    n = n or {"train": 30, "test": 20}
    rng = np.random.default_rng(seed)
    out = {}
    for part in parts:
        images = rng.integers(0, 256, size=(n[part], 28, 28), dtype=np.uint8)
        labels = np.arange(n[part]) % 10
        write(folder / IMAGES[part], idx_images(images), gz)
        write(folder / LABELS[part], idx_labels(labels), gz)
        out[part] = (images, labels)
    return out


def cifar_batch(n=12, seed=0, **override) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {"batch_label": "fake", "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             "labels": [int(v) for v in np.arange(n) % 10], "filenames": [f"{i}.png" for i in range(n)]}
    batch.update(override)
    for key in [k for k, v in override.items() if v is None]:
        del batch[key]
    return pickle.dumps(batch, protocol=2)


def make_cifar(folder: Path, files=None, n=12):
    files = files or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(files):
        (folder / name).write_bytes(cifar_batch(n, seed=i))


def one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and mirrors that refuse connections."""
    monkeypatch.setenv("MINICNN_DATA_DIR", str(tmp_path / "cache"))
    for name in datasets.DATASETS:
        monkeypatch.setitem(datasets.MIRRORS, name, [UNREACHABLE])
    return tmp_path / "cache"


@pytest.fixture
def unverified(monkeypatch):
    """Forget the published checksums, for tests that write their own small files."""
    for name in datasets.DATASETS:
        monkeypatch.setitem(datasets.CHECKSUMS, name, {})


@pytest.fixture
def server(tmp_path):
    """A local HTTP server (one per test, shut down afterwards) serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, fmt, *args):  # quiet; record which files were asked for
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}/", requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def files_in(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------- cache_dir

def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICNN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "data"
    assert cache_dir("mnist") == tmp_path / "data" / "mnist"
    monkeypatch.delenv("MINICNN_DATA_DIR")
    assert cache_dir("cifar10") == tmp_path / "xdg" / "minicnn" / "cifar10"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("fashion-mnist") == tmp_path / "home" / ".cache" / "minicnn" / "fashion-mnist"


def test_unknown_dataset_name():
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'; accepted: mnist, fashion-mnist, cifar10"):
        load_dataset("svhn")
    assert cache_dir("Fashion_MNIST").name == "fashion-mnist"


@pytest.mark.parametrize("split", [0, 1, 1.5, -0.2, True, "0.8"])
def test_bad_split_value(split):
    with pytest.raises(ConfigError, match="split must be a fraction"):
        load_dataset("mnist", split=split)


# ----------------------------------------------------------------------------- MNIST-style IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, unverified, gz):
    written = make_mnist(tmp_path / "d", gz=gz)
    data = load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    assert data["name"] == "mnist" and "note" not in data
    assert data["class_names"] == [str(i) for i in range(10)]
    assert data["x_train"].shape == (30, 1, 28, 28) and data["x_test"].shape == (20, 1, 28, 28)
    assert data["x_train"].dtype == np.float32 and data["y_train"].dtype == np.int64
    np.testing.assert_array_equal(np.rint(data["x_train"][:, 0] * 255), written["train"][0])
    np.testing.assert_array_equal(data["y_test"], written["test"][1])
    assert 0.0 <= data["x_train"].min() and data["x_train"].max() <= 1.0


def test_idx_in_dataset_subfolder_and_fashion_names(tmp_path, unverified):
    make_mnist(tmp_path / "d" / "fashion-mnist")
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "d", download=False)
    assert data["class_names"][0] == "T-shirt/top" and data["class_names"][9] == "Ankle boot"


def test_gz_named_file_that_was_decompressed(tmp_path, unverified):
    """Browsers often decompress but keep the .gz name: recognised by content."""
    images = np.zeros((3, 28, 28), np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(idx_images(images))
    assert datasets.read_idx_images(path).shape == (3, 28, 28)


def corrupt_case(kind, tmp_path):
    """Write one broken file among otherwise valid ones; returns (folder, broken file name, pattern)."""
    folder = tmp_path / "d"
    make_mnist(folder, gz=False)
    images = np.zeros((30, 28, 28), np.uint8)
    labels = np.arange(30) % 10
    target = folder / IMAGES["train"]
    if kind == "bad magic":
        target.write_bytes(idx_images(images, magic=1234))
        pattern = r"bad magic number 1234 .*expected 2051"
    elif kind == "swapped":
        target.write_bytes(idx_labels(labels))
        pattern = r"bad magic number 2049 .*images and labels swapped"
    elif kind == "truncated":
        target.write_bytes(idx_images(images)[:-100])
        pattern = r"truncated: the header promises 30x28x28 images = 23536 bytes but .* has 23436"
    elif kind == "short header":
        target.write_bytes(idx_images(images)[:10])
        pattern = r"truncated: 10 bytes, shorter than the 16-byte header"
    elif kind == "trailing bytes":
        target.write_bytes(idx_images(images) + b"\0" * 7)
        pattern = r"7 unexpected bytes after"
    elif kind == "wrong dimensions":
        target.write_bytes(idx_images(np.zeros((30, 27, 28), np.uint8)))
        pattern = r"images are 27x28 but mnist images are 28x28"
    elif kind == "no images":
        target.write_bytes(idx_images(np.zeros((0, 28, 28), np.uint8)))
        (folder / LABELS["train"]).write_bytes(idx_labels(labels[:0]))
        pattern = r"contains no images"
    elif kind == "label count":
        target = folder / LABELS["train"]
        target.write_bytes(idx_labels(labels[:29]))
        pattern = r"has 29 labels but train-images-idx3-ubyte has 30 images"
    elif kind == "label range":
        target = folder / LABELS["train"]
        target.write_bytes(idx_labels(np.where(np.arange(30) == 4, 12, labels)))
        pattern = r"label 12 at index 4 is out of range .*accepted: 0\.\.9"
    elif kind == "bad gzip":
        target.unlink()
        target = folder / (IMAGES["train"] + ".gz")
        target.write_bytes(gzip.compress(idx_images(images))[:-20])
        pattern = r"not a valid gzip file"
    else:  # pragma: no cover
        raise AssertionError(kind)
    return folder, target.name, pattern


@pytest.mark.parametrize("kind", ["bad magic", "swapped", "truncated", "short header", "trailing bytes",
                                  "wrong dimensions", "no images", "label count", "label range", "bad gzip"])
def test_corrupt_idx_names_the_file(tmp_path, unverified, kind):
    folder, broken, pattern = corrupt_case(kind, tmp_path)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset("mnist", data_dir=folder, download=False)
    message = str(info.value)
    assert str(folder / broken) in message and one_line(message)


def test_checksum_mismatch_of_local_gz(tmp_path):
    make_mnist(tmp_path / "d", gz=True)  # valid structure, but not the published files
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: MD5 [0-9a-f]{32} does not match the "
                                        r"published checksum f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_dataset("mnist", data_dir=tmp_path / "d", download=False)


def test_checksum_mismatch_of_local_raw_with_known_md5(tmp_path):
    make_mnist(tmp_path / "d", gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: MD5 .* 6bbc9ace898e44ae57da46a324031adb"):
        load_dataset("mnist", data_dir=tmp_path / "d", download=False)


def test_raw_file_without_known_md5_is_accepted(tmp_path):
    """Fashion-MNIST publishes only .gz checksums: decompressed files pass on structure alone."""
    make_mnist(tmp_path / "d", gz=False)
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "d", download=False)
    assert data["x_train"].shape == (30, 1, 28, 28)


def test_only_test_split_error_message(tmp_path, unverified):
    make_mnist(tmp_path / "d", parts=("test",))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path / "d", download=False)
    message = str(info.value)
    assert one_line(message)
    assert "found " + str(tmp_path / "d" / "t10k-images-idx3-ubyte.gz") in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert "missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in message
    assert f"place them in {tmp_path / 'd' / 'mnist'}" in message
    assert "--split 0.8" in message


def test_only_test_split_with_split(tmp_path, unverified):
    written = make_mnist(tmp_path / "d", parts=("test",), n={"test": 50})
    first = load_dataset("mnist", data_dir=tmp_path / "d", download=False, split=0.8)
    again = load_dataset("mnist", data_dir=tmp_path / "d", download=False, split=0.8)
    assert first["x_train"].shape == (40, 1, 28, 28) and first["x_test"].shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(first["y_train"], again["y_train"])  # deterministic
    np.testing.assert_array_equal(first["x_test"], again["x_test"])
    # the two parts are disjoint and together are the whole test set
    both = np.concatenate([first["x_train"], first["x_test"]])[:, 0]
    assert sorted(map(bytes, np.rint(both * 255).astype(np.uint8))) == sorted(map(bytes, written["test"][0]))
    assert "only the test split was found" in first["note"] and "seed 0" in first["note"]
    assert "40 train and 10 test" in first["note"]


def test_split_is_ignored_with_full_data(tmp_path, unverified):
    make_mnist(tmp_path / "d")
    data = load_dataset("mnist", data_dir=tmp_path / "d", download=False, split=0.8)
    assert data["x_train"].shape[0] == 30 and "ignored" in data["note"]


def test_nothing_found_offline(tmp_path, offline_cache):
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert one_line(message)
    assert "could not download http://127.0.0.1:9/train-images-idx3-ubyte.gz" in message
    assert "found none of its files" in message
    assert f"place them in {offline_cache / 'mnist'}" in message
    assert "--split" not in message  # nothing to split
    assert not offline_cache.exists()  # not even an empty folder


def test_offline_falls_back_to_split(tmp_path, unverified, offline_cache):
    make_mnist(offline_cache / "mnist", parts=("test",))
    data = load_dataset("mnist", split=0.5)  # download attempted, refused, then the test set is split
    assert data["x_train"].shape[0] == 10 and data["note"]


# ----------------------------------------------------------------------------- real MNIST

@pytest.fixture(scope="module")
def real_mnist():
    if not (REAL_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST files not present in {REAL_MNIST}")
    with pytest.MonkeyPatch.context() as mp:
        for name in datasets.DATASETS:
            mp.setitem(datasets.MIRRORS, name, [UNREACHABLE])
        start = time.perf_counter()
        data = load_dataset("mnist", data_dir=REAL_MNIST, download=False)  # verifies the MD5s in place
        data["seconds"] = time.perf_counter() - start
    return data


def test_real_mnist(real_mnist):
    d = real_mnist
    assert "note" not in d
    assert d["x_train"].shape == (60000, 1, 28, 28) and d["x_test"].shape == (10000, 1, 28, 28)
    assert d["x_train"].dtype == np.float32 and d["y_train"].dtype == np.int64
    assert d["x_train"].min() == 0.0 and d["x_train"].max() == 1.0
    assert np.bincount(d["y_train"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(d["y_test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert d["y_train"][0] == 5 and d["y_test"][0] == 7
    assert all(f.startswith(str(REAL_MNIST)) for f in d["files"])
    assert abs(float(d["x_train"].mean()) - 0.1307) < 1e-3


def test_real_mnist_normalize(real_mnist):
    x, mean, std = normalize(real_mnist["x_train"])
    assert mean.shape == (1,) and abs(mean[0] - 0.1307) < 1e-3 and abs(std[0] - 0.3081) < 1e-3
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_real_mnist_decompressed_test_split_only(real_mnist, tmp_path):
    """The decompressed t10k files (known MD5s) alone, with split=0.8."""
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((REAL_MNIST / (name + ".gz")).read_bytes()))
    data = load_dataset("mnist", data_dir=tmp_path, download=False, split=0.8)
    assert data["x_train"].shape == (8000, 1, 28, 28) and data["x_test"].shape == (2000, 1, 28, 28)
    assert np.bincount(np.concatenate([data["y_train"], data["y_test"]])).tolist()[:2] == [980, 1135]


# ----------------------------------------------------------------------------- download

def test_download_into_cache_then_reuse(server, unverified, offline_cache, monkeypatch):
    make_mnist(server.root, gz=True)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [server.url])
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", {p.name: md5(p.read_bytes()) for p in server.root.iterdir()})
    calls = []
    data = load_dataset("mnist", progress=lambda done, total: calls.append((done, total)))
    assert data["x_train"].shape == (30, 1, 28, 28)
    assert files_in(offline_cache / "mnist") == sorted(p.name for p in server.root.iterdir())
    assert len(server.requests) == 4
    assert calls and all(total is not None and 0 <= done <= total for done, total in calls)
    assert calls[-1][0] == calls[-1][1]
    load_dataset("mnist")  # everything is local now: no request
    assert len(server.requests) == 4


def test_only_missing_files_are_downloaded_into_data_dir(server, unverified, tmp_path, monkeypatch):
    make_mnist(server.root, gz=True)
    make_mnist(tmp_path / "d", gz=False)
    (tmp_path / "d" / "train-labels-idx1-ubyte").unlink()
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [server.url])
    load_dataset("mnist", data_dir=tmp_path / "d")
    assert server.requests == ["/train-labels-idx1-ubyte.gz"]
    assert (tmp_path / "d" / "mnist" / "train-labels-idx1-ubyte.gz").is_file()


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path, offline_cache, monkeypatch):
    make_mnist(server.root, gz=True)  # the real checksums stay: these files do not match them
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [server.url])
    with pytest.raises(DataError, match=r"has MD5 [0-9a-f]{32} but the published checksum is "
                                        r"f68b3c2dcbeaaa9fbdd348bbdeb94873; nothing was saved") as info:
        load_dataset("mnist")
    assert one_line(str(info.value)) and "place them in" in str(info.value)
    assert files_in(offline_cache) == []


def test_download_unreachable(tmp_path):
    with pytest.raises(DataError, match=r"could not download http://127\.0\.0\.1:9/x\.gz: .*refused") as info:
        datasets.download_file(UNREACHABLE + "x.gz", tmp_path / "out" / "x.gz", md5="0" * 32)
    assert one_line(str(info.value))
    assert not (tmp_path / "out").exists()


def test_download_404(server, tmp_path):
    with pytest.raises(DataError, match=r"could not download .*/nope\.gz: HTTP error 404"):
        datasets.download_file(server.url + "nope.gz", tmp_path / "out" / "nope.gz")
    assert files_in(tmp_path / "out") == []


def test_download_interrupted_leaves_nothing(server, tmp_path):
    (server.root / "big.bin").write_bytes(os.urandom(datasets.CHUNK_SIZE * 3))

    def interrupt(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        datasets.download_file(server.url + "big.bin", tmp_path / "out" / "big.bin", progress=interrupt)
    assert files_in(tmp_path / "out") == []


def test_download_file_ok(server, tmp_path):
    payload = os.urandom(datasets.CHUNK_SIZE * 2 + 5)
    (server.root / "f.bin").write_bytes(payload)
    seen = []
    path = datasets.download_file(server.url + "f.bin", tmp_path / "out" / "f.bin", md5=md5(payload),
                                  progress=lambda d, t: seen.append(d))
    assert path.read_bytes() == payload and seen == sorted(seen) and seen[-1] == len(payload)
    assert files_in(tmp_path / "out") == ["f.bin"]  # no temporary file left over


def test_second_mirror_is_tried(server, unverified, monkeypatch):
    make_mnist(server.root, gz=True)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [UNREACHABLE, server.url])
    assert load_dataset("mnist")["x_test"].shape == (20, 1, 28, 28)


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar_batches(tmp_path, unverified):
    make_cifar(tmp_path / "d" / "cifar-10-batches-py")
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert data["x_train"].shape == (60, 3, 32, 32) and data["x_test"].shape == (12, 3, 32, 32)
    assert data["class_names"][0] == "airplane" and len(data["class_names"]) == 10
    raw = pickle.loads(cifar_batch(12, seed=0))["data"]
    # channel-major rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(np.rint(data["x_train"][0, 0] * 255).reshape(-1), raw[0, :1024])
    np.testing.assert_array_equal(np.rint(data["x_train"][0, 2] * 255).reshape(-1), raw[0, 2048:])


def test_cifar_only_test_batch(tmp_path, unverified):
    make_cifar(tmp_path / "d", files=["test_batch"], n=20)
    with pytest.raises(DataError, match=r"missing data_batch_1, .*data_batch_5 \(or cifar-10-python\.tar\.gz\); "
                                        r"place them in .*--split 0\.8"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False, split=0.75)
    assert data["x_train"].shape == (15, 3, 32, 32) and "test_batch" in data["note"]


@pytest.mark.parametrize("override, pattern", [
    ({"data": None}, r"no 'data' key"),
    ({"labels": None}, r"no 'labels' key"),
    ({"data": np.zeros((12, 3000), np.uint8)}, r"'data' is uint8 \(12, 3000\)"),
    ({"data": np.zeros((12, 3072), np.float32)}, r"'data' is float32"),
    ({"labels": [0] * 11}, r"11 labels for 12 images"),
    ({"labels": [10] * 12}, r"label 10 at index 0 is out of range"),
    ({"labels": ["cat"] * 12}, r"'labels' is not a list of ints"),
])
def test_corrupt_cifar_names_the_file(tmp_path, unverified, override, pattern):
    make_cifar(tmp_path / "d")
    (tmp_path / "d" / "data_batch_3").write_bytes(cifar_batch(12, **override))
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert str(tmp_path / "d" / "data_batch_3") in str(info.value) and one_line(str(info.value))


def test_cifar_not_a_pickle_and_unsafe_pickle(tmp_path, unverified):
    make_cifar(tmp_path / "d")
    (tmp_path / "d" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"test_batch: cannot be unpickled"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "d" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match=r"refusing to load builtins\.print"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)


def test_cifar_batch_checksum(tmp_path):
    make_cifar(tmp_path / "d")
    with pytest.raises(DataError, match=r"data_batch_1: MD5 .* c99cafc152244af753f735de768cd75f"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)


def cifar_archive(path: Path, extra=()):
    """A small cifar-10-python.tar.gz, plus hostile members that must not be extracted."""
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for i, name in enumerate(names):
            data = cifar_batch(8, seed=i)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for member_name in extra:
            info = tarfile.TarInfo(member_name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path


def test_cifar_local_archive_is_extracted_safely(tmp_path, unverified, offline_cache):
    (tmp_path / "d").mkdir()
    cifar_archive(tmp_path / "d" / "cifar-10-python.tar.gz",
                  extra=["../escape", "/tmp/minicnn-absolute-escape", "cifar-10-batches-py/../../escape2",
                         "cifar-10-batches-py/unexpected"])
    data = load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert data["x_train"].shape == (40, 3, 32, 32)
    extracted = offline_cache / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in extracted.iterdir()) == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "escape2").exists()
    assert not Path("/tmp/minicnn-absolute-escape").exists()


def test_cifar_archive_checksum(tmp_path, offline_cache):
    (tmp_path / "d").mkdir()
    cifar_archive(tmp_path / "d" / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: MD5 .* c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=False)
    assert files_in(offline_cache) == []


def test_cifar_archive_download(server, unverified, offline_cache, monkeypatch):
    cifar_archive(server.root / "cifar-10-python.tar.gz")
    monkeypatch.setitem(datasets.MIRRORS, "cifar10", [server.url])
    data = load_dataset("cifar10")
    assert data["x_test"].shape == (8, 3, 32, 32)
    assert server.requests == ["/cifar-10-python.tar.gz"]
    load_dataset("cifar10")
    assert len(server.requests) == 1


# ----------------------------------------------------------------------------- normalize

def test_normalize_per_channel():
    rng = np.random.default_rng(1)
    x = np.stack([rng.uniform(0, 1, (50, 4, 4)), rng.uniform(0.2, 0.4, (50, 4, 4)),
                  np.full((50, 4, 4), 0.5)], axis=1).astype(np.float32)
    out, mean, std = normalize(x)
    assert out.dtype == np.float32 and mean.shape == std.shape == (3,)
    np.testing.assert_allclose(out[:, :2].mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, :2].std(axis=(0, 2, 3)), 1, atol=1e-4)
    assert std[2] == 1.0 and np.all(out[:, 2] == 0)  # constant channel: no division by zero
    again, _, _ = normalize(x[:5], mean, std)
    np.testing.assert_allclose(again, out[:5], atol=1e-6)
    scalar, m, s = normalize(x, 0.5, 0.25)
    np.testing.assert_allclose(scalar, (x - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ConfigError, match="mean has 2 values for 3 channels"):
        normalize(x, [0.1, 0.2], 1.0)


# ----------------------------------------------------------------------------- image folders

def save_image(path: Path, array: np.ndarray):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_rgb_and_gray(tmp_path):
    rng = np.random.default_rng(0)
    red = np.zeros((8, 6, 3), np.uint8)
    red[..., 0] = 255
    save_image(tmp_path / "imgs" / "cat" / "a.png", red)
    save_image(tmp_path / "imgs" / "cat" / "b.jpg", rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    save_image(tmp_path / "imgs" / "dog" / "c.PNG", rng.integers(0, 256, (8, 6), dtype=np.uint8))
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path / "imgs")
    assert data["class_names"] == ["cat", "dog"] and data["y"].tolist() == [0, 0, 1]
    assert data["x"].shape == (3, 3, 8, 6) and data["x"].dtype == np.float32
    np.testing.assert_array_equal(data["x"][0, :, 0, 0], [1.0, 0.0, 0.0])
    gray = load_image_folder(tmp_path / "imgs", image_size=4, grayscale=True)
    assert gray["x"].shape == (3, 1, 4, 4)
    assert load_image_folder(tmp_path / "imgs", image_size=(5, 7))["x"].shape == (3, 3, 5, 7)


def test_image_folder_auto_grayscale(tmp_path):
    save_image(tmp_path / "a" / "x" / "1.png", np.full((5, 5), 128, np.uint8))
    save_image(tmp_path / "a" / "y" / "2.png", np.full((5, 5), 255, np.uint8))
    data = load_image_folder(tmp_path / "a")
    assert data["x"].shape == (2, 1, 5, 5) and data["x"][1].min() == 1.0


def test_image_folder_errors(tmp_path):
    save_image(tmp_path / "a" / "x" / "1.png", np.zeros((5, 5), np.uint8))
    save_image(tmp_path / "a" / "x" / "2.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(DataError, match=r"2\.png: is 6x5 but .*1\.png is 5x5; pass image_size"):
        load_image_folder(tmp_path / "a")
    (tmp_path / "a" / "x" / "3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"3\.png: not a readable image"):
        load_image_folder(tmp_path / "a", image_size=5)
    (tmp_path / "a" / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: class folder has no PNG/JPEG images"):
        load_image_folder(tmp_path / "a", image_size=5)
    with pytest.raises(DataError, match=r"no such folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"has no class subfolders; accepted: .*/<class name>/<image>"):
        load_image_folder(tmp_path / "flat")
    with pytest.raises(ConfigError, match="image_size must be"):
        load_image_folder(tmp_path / "a", image_size=0)
