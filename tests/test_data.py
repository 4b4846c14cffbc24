"""edgesep.data: digits, every file format, every error path, and the shared datasets when present."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgesep.data import Dataset, list_datasets, load_dataset, read_idx
from edgesep.errors import DatasetError, UnknownNameError

RNG = np.random.default_rng(1234)


def _mnist_arrays(n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    return {
        "x_train": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % 10,
    }


def _cifar_arrays(n_train: int = 10, n_test: int = 5) -> dict[str, np.ndarray]:
    return {
        "x_train": RNG.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": RNG.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % 10,
    }


def _raises(match: str, fn, *args):
    with pytest.raises(DatasetError) as e:
        fn(*args)
    for part in match.split("|"):
        assert part in str(e.value), f"{part!r} not in {str(e.value)!r}"
    return e.value


# ----------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_dtype():
    d = load_dataset("digits")
    assert isinstance(d, Dataset)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.x_train.min() >= 0.0 and d.x_train.max() == 1.0 and d.x_test.max() <= 1.0
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and d.classes == tuple("0123456789")
    # stratified: every class has 20% (rounded) of its images in the test split
    for c in range(10):
        n = (d.y_train == c).sum() + (d.y_test == c).sum()
        assert (d.y_test == c).sum() == round(0.2 * n)
    np.testing.assert_allclose(d.mean, [d.x_train.mean(dtype=np.float64)], rtol=1e-6)
    np.testing.assert_allclose(d.std, [d.x_train.std(dtype=np.float64)], rtol=1e-6)
    assert "digits" in repr(d)


def test_digits_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.mean == b.mean and a.std == b.std


def test_data_does_not_import_torch():
    code = "import sys, edgesep.data as d; d.load_dataset('digits'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_list_and_unknown_name():
    assert list_datasets() == ["cifar10", "digits", "fashion_mnist", "mnist"]
    with pytest.raises(UnknownNameError) as e:
        load_dataset("svhn")
    assert "svhn" in str(e.value) and "mnist" in str(e.value) and e.value.valid == list_datasets()


def test_file_dataset_needs_data_dir():
    _raises("data_dir", load_dataset, "mnist")


# ----------------------------------------------------------------------------------------------------------
# .npz


def test_npz_roundtrip_and_file_or_dir(tmp_path):
    a = _mnist_arrays()
    np.savez(tmp_path / "mnist.npz", **a)
    for where in (tmp_path, tmp_path / "mnist.npz"):
        d = load_dataset("mnist", where)
        assert d.x_train.shape == (12, 1, 28, 28) and d.x_train.dtype == np.float32
        np.testing.assert_allclose(d.x_train[:, 0], a["x_train"] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(d.y_test, a["y_test"])  # mnist keeps the file order
    # a parent directory with a <name>/ subfolder works too
    (tmp_path / "root" / "mnist").mkdir(parents=True)
    np.savez(tmp_path / "root" / "mnist" / "mnist.npz", **a)
    assert load_dataset("mnist", tmp_path / "root").x_test.shape == (6, 1, 28, 28)


def test_npz_layouts_nchw_nhwc_float(tmp_path):
    a = _mnist_arrays()
    np.savez(tmp_path / "a.npz", **{**a, "x_train": a["x_train"][..., None], "x_test": a["x_test"][:, None]})
    d = load_dataset("mnist", tmp_path / "a.npz")
    np.testing.assert_allclose(d.x_train[:, 0], a["x_train"] / 255.0, rtol=1e-6)
    f = {**a, "x_train": a["x_train"].astype(np.float64) / 255, "x_test": a["x_test"].astype(np.float32) / 255}
    np.savez(tmp_path / "b.npz", **f)
    d = load_dataset("mnist", tmp_path / "b.npz")
    assert d.x_train.dtype == np.float32
    np.testing.assert_allclose(d.x_train[:, 0], a["x_train"] / 255.0, rtol=1e-6)


def test_npz_cifar_split_files_merged_and_train_shuffled(tmp_path):
    a = _cifar_arrays()
    np.savez(tmp_path / "cifar10_test.npz", x_test=a["x_test"], y_test=a["y_test"])
    np.savez(tmp_path / "cifar10_train.npz", x_train=a["x_train"], y_train=a["y_train"], src_index=np.arange(10))
    d = load_dataset("cifar10", tmp_path)
    assert d.input_shape == (3, 32, 32) and d.classes[0] == "airplane" and len(d.mean) == 3
    perm = np.random.default_rng(0).permutation(10)
    np.testing.assert_array_equal(d.y_train, a["y_train"][perm])
    np.testing.assert_allclose(d.x_train, a["x_train"][perm].transpose(0, 3, 1, 2) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, a["y_test"])  # test order kept
    expected_mean = (a["x_train"] / 255.0).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(d.mean, expected_mean, rtol=1e-5)


def test_npz_ignores_other_datasets_files(tmp_path):
    np.savez(tmp_path / "mnist.npz", **_mnist_arrays())
    _raises(f"no fashion_mnist files found in {tmp_path}|looked for|train-images-idx3-ubyte",
            load_dataset, "fashion_mnist", tmp_path)  # fmt: skip


def test_missing_path_names_it_and_what_was_looked_for(tmp_path):
    missing = tmp_path / "nowhere"
    _raises(f"{missing} does not exist|x_train|t10k-labels-idx1-ubyte", load_dataset, "mnist", missing)
    _raises("no cifar10 files found|data_batch_1|test_batch.bin|.npz", load_dataset, "cifar10", tmp_path)


def test_npz_missing_keys(tmp_path):
    a = _mnist_arrays()
    np.savez(tmp_path / "mnist.npz", x_train=a["x_train"], y_train=a["y_train"], x_test=a["x_test"])
    _raises("mnist.npz|lacks y_test|found keys|x_train, y_train, x_test|needs", load_dataset, "mnist", tmp_path)


def test_npz_duplicate_key_across_files(tmp_path):
    a = _cifar_arrays()
    np.savez(tmp_path / "cifar10_a.npz", **a)
    np.savez(tmp_path / "cifar10_b.npz", x_test=a["x_test"])
    _raises("x_test is in both", load_dataset, "cifar10", tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_train": np.arange(11) % 10}, "x_train has 12 images but y_train has 11 labels"),
        ({"x_train": np.zeros((12, 28, 28), np.int64)}, "dtype int64|uint8"),
        ({"x_test": np.full((6, 28, 28), 2.0, np.float32)}, "float x_test must be finite and in [0, 1]"),
        ({"y_train": np.zeros(12, np.float32)}, "y_train has dtype float32|integers"),
        ({"y_test": np.zeros((6, 1), np.int64)}, "one-dimensional"),
        ({"y_test": np.array([0, 1, 2, 3, 4, 10])}, "labels in [0, 10]|[0, 9]"),
        ({"y_test": np.array([0, 1, 2, 3, 4, -1])}, "labels in [-1, 4]"),
        ({"x_train": np.zeros((12, 32, 32), np.uint8)}, "x_train has shape (12, 32, 32)|(N, 28, 28)"),
        ({"x_train": np.zeros((12, 3, 28, 28), np.uint8)}, "shape (12, 3, 28, 28)"),
        ({"x_train": np.zeros((0, 28, 28), np.uint8), "y_train": np.zeros(0, np.int64)}, "train split is empty"),
    ],
)
def test_npz_bad_contents(tmp_path, change, message):
    np.savez(tmp_path / "mnist.npz", **{**_mnist_arrays(), **change})
    _raises(f"{tmp_path / 'mnist.npz'}|{message}", load_dataset, "mnist", tmp_path)


def test_npz_object_array_refused_without_pickle(tmp_path):
    a = _mnist_arrays()
    np.savez(tmp_path / "mnist.npz", **{**a, "y_test": np.array([1, "x", None, 3, 4, 5], dtype=object)})
    _raises("y_test cannot be read without pickle", load_dataset, "mnist", tmp_path)


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 definitely not a zip file")
    _raises("mnist.npz is not a readable .npz file", load_dataset, "mnist", tmp_path)


def test_unrecognized_single_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    _raises("not a recognized mnist file", load_dataset, "mnist", tmp_path / "notes.txt")


# ----------------------------------------------------------------------------------------------------------
# IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


def _write_idx(folder: Path, a: dict[str, np.ndarray], gz: bool) -> None:
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in names.items():
        data = _idx_bytes(a[key].astype(np.uint8))
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    a = _mnist_arrays()
    _write_idx(tmp_path / "FashionMNIST" / "raw", a, gz)
    d = load_dataset("fashion_mnist", tmp_path)  # found below data_dir in FashionMNIST/raw
    np.testing.assert_allclose(d.x_train[:, 0], a["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_train, a["y_train"])
    np.testing.assert_array_equal(d.y_test, a["y_test"])
    assert d.classes[-1] == "Ankle boot"
    # pointing at one of the files loads the folder
    suffix = ".gz" if gz else ""
    d2 = load_dataset("fashion_mnist", tmp_path / "FashionMNIST" / "raw" / f"t10k-images-idx3-ubyte{suffix}")
    np.testing.assert_array_equal(d2.x_test, d.x_test)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_dtypes(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    (tmp_path / "f").write_bytes(_idx_bytes(arr))
    out = read_idx(tmp_path / "f")
    np.testing.assert_array_equal(out, arr)
    assert out.dtype.isnative and out.flags.writeable


def test_idx_errors(tmp_path):
    good = _idx_bytes(np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    _raises("magic|bad magic number", read_idx, tmp_path / "magic")
    (tmp_path / "code").write_bytes(good[:2] + b"\x07" + good[3:])
    _raises("unknown IDX data type code 0x07", read_idx, tmp_path / "code")
    (tmp_path / "short").write_bytes(good[:-5])
    _raises("says shape (2, 28, 28)|truncated or corrupt", read_idx, tmp_path / "short")
    (tmp_path / "hdr").write_bytes(good[:6])
    _raises("truncated inside its IDX header", read_idx, tmp_path / "hdr")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    _raises("bad.gz cannot be read", read_idx, tmp_path / "bad.gz")


def test_idx_partial_set_and_wrong_ndim(tmp_path):
    a = _mnist_arrays()
    _write_idx(tmp_path, a, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    _raises(f"{tmp_path} holds part|not t10k-labels-idx1-ubyte", load_dataset, "mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros((6, 2), np.uint8)))
    _raises("t10k-labels-idx1-ubyte: an IDX label file must have 1 dim", load_dataset, "mnist", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (written here with pickle; read back through the restricted unpickler) and binary


def _cifar_batches(n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        out[name] = (RNG.integers(0, 256, (n, 3072), dtype=np.uint8), RNG.integers(0, 10, n))
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_batches(tmp_path, protocol):
    batches = _cifar_batches()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, (x, y) in batches.items():
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": x,
             b"filenames": [b"f%d.png" % i for i in range(len(y))]}  # fmt: skip
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    d = load_dataset("cifar10", tmp_path)
    x_train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_train = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    perm = np.random.default_rng(0).permutation(15)
    np.testing.assert_array_equal(d.y_train, y_train[perm])
    # rows are the R plane, then G, then B: (N, 3072) -> (N, 3, 32, 32)
    np.testing.assert_allclose(d.x_train, x_train[perm].reshape(-1, 3, 32, 32) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, batches["test_batch"][1])
    assert d.x_train[0, 1, 0, 0] == np.float32(x_train[perm[0], 1024] / 255.0)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    batches = _cifar_batches()
    marker = tmp_path / "pwned"
    for name, (x, y) in batches.items():
        payload = {b"data": x, b"labels": y.tolist()} if name != "data_batch_3" else {b"data": _Evil(marker)}
        (tmp_path / name).write_bytes(pickle.dumps(payload, protocol=2))
    err = _raises("data_batch_3|refusing to unpickle", load_dataset, "cifar10", tmp_path)
    assert "system" in str(err)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins eval", "numpy load", "subprocess Popen"])
def test_cifar_unpickler_refuses_other_globals(tmp_path, target):
    module, name = target.split()
    # protocol-2 pickle: GLOBAL 'module name', empty tuple, REDUCE, STOP
    (tmp_path / "data_batch_1").write_bytes(f"c{module}\n{name}\n)R.".encode())
    for other in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (tmp_path / other).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    _raises(f"references {module}.{name}", load_dataset, "cifar10", tmp_path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"garbage", "not a readable CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "a CIFAR-10 batch is a dict"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}), "needs keys 'data'"),
        (pickle.dumps({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}), "(N, 3072)"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}), "must be uint8"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but 'labels' has 1"),
    ],
)
def test_cifar_python_bad_batches(tmp_path, payload, message):
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        good = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
        (tmp_path / name).write_bytes(payload if name == "data_batch_2" else good)
    _raises(f"data_batch_2|{message}", load_dataset, "cifar10", tmp_path)


def test_cifar_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = RNG.integers(0, 10, 2).astype(np.uint8)
        pixels = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
        records[name] = (labels, pixels)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    d = load_dataset("cifar10", folder)
    labels, pixels = records["test_batch.bin"]
    np.testing.assert_array_equal(d.y_test, labels)
    np.testing.assert_allclose(d.x_test, pixels.reshape(2, 3, 32, 32) / 255.0, rtol=1e-6)
    assert d.x_train.shape == (10, 3, 32, 32)
    (folder / "data_batch_4.bin").write_bytes(b"\x00" * 3000)
    _raises("data_batch_4.bin holds 3000 bytes|3073", load_dataset, "cifar10", folder)
    (folder / "test_batch.bin").write_bytes(np.full((1, 3073), 11, np.uint8).tobytes())
    (folder / "data_batch_4.bin").write_bytes(np.zeros((1, 3073), np.uint8).tobytes())
    _raises("test_batch.bin|labels in [11, 11]", load_dataset, "cifar10", folder)


# ----------------------------------------------------------------------------------------------------------
# the shared datasets (skipped when ../shared is absent)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shared_mnist(shared_data):
    path = shared_data / "mnist" / "mnist.npz"
    assert _sha256(path) == "094b831e432331f1f6d6829ab9bfff4551410a81e1f816c9cce482d3e9b3ba57"
    d = load_dataset("mnist", shared_data)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9] and d.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    np.testing.assert_allclose(d.mean + d.std, (0.1307, 0.3081), atol=1e-4)


def test_shared_fashion_mnist(shared_data):
    path = shared_data / "fashion_mnist" / "fashion_mnist.npz"
    assert _sha256(path) == "c2c37d617253c9f5a6fc23ba8553045734f3682da04a81934b27e6c7c2363beb"
    d = load_dataset("fashion_mnist", path)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [6000] * 10 and np.bincount(d.y_test).tolist() == [1000] * 10
    assert d.y_train[:5].tolist() == [9, 0, 0, 3, 0] and d.y_test[:5].tolist() == [9, 2, 1, 1, 6]
    np.testing.assert_allclose(d.mean + d.std, (0.2860, 0.3530), atol=1e-4)


def test_shared_cifar10(shared_data):
    folder = shared_data / "cifar10_jpeg"
    assert _sha256(folder / "cifar10_jpeg_test.npz") == (
        "954ded5dd048f4aca6b954d4a97c6abb84c76fbcb30c1cd12fb9b13e26c971a2"
    )
    assert _sha256(folder / "cifar10_jpeg_train_subset.npz") == (
        "d44e7653b2ad2d86b63c62817a8a3f234d824868d048e21f7d44f271a8e60306"
    )
    d = load_dataset("cifar10", shared_data)
    assert d.x_train.shape == (20000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert np.bincount(d.y_train).tolist() == [2000] * 10 and np.bincount(d.y_test).tolist() == [1000] * 10
    assert len(set(d.y_train[:50].tolist())) > 5  # the class-sorted train split was shuffled
    assert d.y_test[:1000].tolist() == [0] * 1000  # the test split keeps the file's (class-sorted) order
    np.testing.assert_allclose(d.mean, (0.4926, 0.4828, 0.4471), atol=2e-4)


def test_eval_subsets_are_seeded_permutations_not_the_first_images():
    """cifar10_jpeg's test split is sorted by class: a first-N subset would hold one class. Training and `edgesep
    eval` take the first N of a seeded permutation instead."""
    from edgesep.data import eval_indices

    y_sorted = np.repeat(np.arange(10), 1000)  # like cifar10_jpeg's test labels
    idx = eval_indices(len(y_sorted), 500)
    assert len(set(idx.tolist())) == 500 and np.bincount(y_sorted[idx], minlength=10).min() >= 30
    np.testing.assert_array_equal(idx, eval_indices(len(y_sorted), 500))  # the same subset every time
    assert len(eval_indices(10, 50)) == 10
