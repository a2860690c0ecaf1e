import numpy as np
import pytest

from minicnn import DataError, load_data


def test_builtin_default():
    ds = load_data("shapes", n_train=500, n_val=100)
    assert ds.x_train.shape == (500, 1, 28, 28) and ds.x_val.shape == (100, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10
    assert not np.array_equal(ds.x_train[:100], ds.x_val)


def test_npz_roundtrip_and_split(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.integers(0, 256, (50, 8, 8)).astype(np.uint8), y=rng.integers(0, 3, 50))
    ds = load_data(str(p))
    assert ds.x_train.shape == (45, 1, 8, 8) and ds.x_val.shape == (5, 1, 8, 8)
    assert ds.x_train.max() <= 1.0
    p2 = tmp_path / "e.npz"
    np.savez(p2, x=rng.random((20, 3, 4, 4)), y=rng.integers(0, 2, 20), x_val=rng.random((4, 3, 4, 4)),
             y_val=np.array([0, 1, 1, 0]))
    ds2 = load_data(str(p2))
    assert len(ds2.y_train) == 20 and len(ds2.y_val) == 4 and ds2.num_classes == 2


@pytest.mark.parametrize("arrays,msg", [
    (dict(x=np.zeros((5, 2))), "missing array"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5, int)), "x must have shape"),
    (dict(x=np.zeros((5, 4, 4)), y=np.zeros(4, int)), "y must have shape"),
    (dict(x=np.full((5, 4, 4), np.nan), y=np.zeros(5, int)), "NaN"),
    (dict(x=np.zeros((5, 4, 4)), y=np.array([0, 1, -1, 0, 1])), "labels must be class indices >= 0"),
    (dict(x=np.zeros((5, 4, 4)), y=np.array([0, 0.5, 1, 0, 1])), "integer class labels"),
])
def test_bad_npz(tmp_path, arrays, msg):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=msg) as e:
        load_data(str(p))
    assert "\n" not in str(e.value)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "nope.npz"))
    p = tmp_path / "junk.npz"
    p.write_text("not a zip")
    with pytest.raises(DataError, match=r"is not a .npz archive \(it is a text file\)"):
        load_data(str(p))
    with pytest.raises(DataError, match="unknown dataset"):
        load_data("imagenet")
