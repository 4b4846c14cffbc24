"""Image-classification datasets as numpy arrays: float32 NCHW images in [0, 1], int64 labels.

Numpy only (no torch), so the device side can read evaluation data too. ``digits`` ships with
scikit-learn (imported lazily); ``mnist``, ``fashion_mnist`` and ``cifar10`` are read from a directory the
user gives, in any of the standard formats, detected automatically:

- ``.npz`` with keys ``x_train, y_train, x_test, y_test`` (uint8 N×H×W or N×H×W×C, or float in [0, 1]); the
  keys may be spread over several ``.npz`` files in one directory (the shared CIFAR-10 copy keeps each split
  in its own file), which are merged.
- MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte`` ..., raw or ``.gz``).
- CIFAR-10 python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``), read through a restricted
  unpickler that only rebuilds numpy arrays, or the CIFAR-10 binary batches (``data_batch_1.bin`` ...).

``data_dir`` may be the directory holding the files, a parent of it (``data_dir/<name>/`` and the usual folder
names such as ``cifar-10-batches-py`` are searched), or a single file.

Order: the train split of ``cifar10`` is shuffled with ``np.random.default_rng(0)`` after loading (the shared
JPEG copy is sorted by class); every test split keeps its file order (for the shared CIFAR-10 copy that is
class-sorted: shuffle before taking a prefix). MNIST / Fashion-MNIST keep the original order in both splits.
``digits`` is split 80/20 per class with a fixed seed.

Normalization is not applied here: ``Dataset.mean`` / ``Dataset.std`` (per channel, on the training split) are
for the ``Normalize`` module inside the model, so every model takes pixels in [0, 1].
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesep.errors import DatasetError, UnknownNameError

__all__ = ["Dataset", "eval_indices", "list_datasets", "load_dataset", "read_idx"]

_SPLITS = ("train", "test")
_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of an image-classification dataset.

    Images are float32 NCHW in [0, 1]; labels int64 in [0, num_classes). ``mean`` / ``std`` are per channel,
    computed on the training split, for the normalization module inside the model.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, classes={self.num_classes})"
        )


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    subdirs: tuple[str, ...]  # folder names searched below data_dir
    formats: tuple[str, ...]  # "npz", "idx", "cifar-py", "cifar-bin"
    shuffle_train: bool = False


_DIGITS = tuple(str(i) for i in range(10))
_SPECS: dict[str, _Spec] = {
    "digits": _Spec("digits", (1, 8, 8), _DIGITS, (), ()),
    "mnist": _Spec("mnist", (1, 28, 28), _DIGITS, ("mnist", "MNIST", "MNIST/raw"), ("npz", "idx")),
    "fashion_mnist": _Spec(
        "fashion_mnist",
        (1, 28, 28),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        ("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
        ("npz", "idx"),
    ),
    "cifar10": _Spec(
        "cifar10",
        (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        ("cifar10", "cifar10_jpeg", "cifar-10", "cifar-10-batches-py", "cifar-10-batches-bin"),
        ("npz", "cifar-py", "cifar-bin"),
        shuffle_train=True,
    ),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_SPECS)


def eval_indices(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of an ``n``-image evaluation subset of a test split of ``n_total``: the first ``n`` of a seeded
    permutation (the same subset every time). Never the first ``n`` images: cifar10_jpeg's test split is sorted by
    class, so those would all be airplanes."""
    return np.random.default_rng(seed).permutation(n_total)[: min(n, n_total)]


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of :func:`list_datasets` (``digits`` needs no files).
        data_dir: directory (or single file) holding the dataset files, for everything but ``digits``.
    Returns:
        The :class:`Dataset`, images float32 NCHW in [0, 1], labels int64.
    Raises:
        UnknownNameError: unknown dataset name.
        DatasetError: missing, malformed or inconsistent files (the message names the file and the fix).
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise UnknownNameError("dataset", name, _SPECS)
    if name == "digits":
        splits = _load_digits()
    else:
        if data_dir is None:
            raise DatasetError(
                f"dataset {name!r} is read from files: pass data_dir, the directory holding them "
                f"(formats: {', '.join(spec.formats)}); only 'digits' ships with scikit-learn"
            )
        splits = _load_files(spec, Path(data_dir).expanduser())
    (x_train, y_train), (x_test, y_test) = splits
    if spec.shuffle_train:
        perm = np.random.default_rng(0).permutation(len(y_train))
        x_train, y_train = x_train[perm], y_train[perm]
    # float64 accumulators: float32 sums over ~50M pixels lose digits
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=spec.classes,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


# ----------------------------------------------------------------------------------------------------------
# digits (scikit-learn)


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """sklearn's 1797 8x8 digits, split per class (stratified) with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is in the train extra
        raise DatasetError("dataset 'digits' needs scikit-learn: pip install 'edgesep[train]'") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 8, 8) in 0..16 -> (N, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test = np.sort(np.concatenate(test_idx))
    train = rng.permutation(np.setdiff1d(np.arange(len(y)), test))
    return (x[train], y[train]), (x[test], y[test])


# ----------------------------------------------------------------------------------------------------------
# format detection

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_PY = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_BIN = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}


def _find(folder: Path, name: str, gz: bool) -> Path | None:
    for cand in (name, name + ".gz") if gz else (name,):
        p = folder / cand
        if p.is_file():
            return p
    return None


def _all_names(table: dict[str, tuple[str, ...]]) -> list[str]:
    return [n for split in _SPLITS for n in table[split]]


def _looked_for(spec: _Spec) -> str:
    parts = []
    if "npz" in spec.formats:
        parts.append("*.npz with keys " + ", ".join(_KEYS))
    if "idx" in spec.formats:
        parts.append("IDX files " + ", ".join(_all_names(_IDX_FILES)) + " (raw or .gz)")
    if "cifar-py" in spec.formats:
        parts.append("CIFAR-10 python batches " + ", ".join(_all_names(_CIFAR_PY)))
    if "cifar-bin" in spec.formats:
        parts.append("CIFAR-10 binary batches " + ", ".join(_all_names(_CIFAR_BIN)))
    return "; ".join(parts)


def _candidate_dirs(spec: _Spec, root: Path) -> list[Path]:
    dirs = [root]
    for sub in spec.subdirs:
        for base in (root, root / spec.name):
            d = base / sub
            if d.is_dir() and d not in dirs:
                dirs.append(d)
    return dirs


def _npz_files(spec: _Spec, folder: Path) -> list[Path]:
    """The .npz files of `folder` that belong to the dataset: ``<name>.npz``, else those whose name starts
    with the dataset's name, else all of them but those named after another dataset."""
    files = sorted(p for p in folder.glob("*.npz") if p.is_file())
    exact = [p for p in files if p.stem == spec.name]
    if exact:
        return exact
    prefixed = [p for p in files if _norm(p.stem).startswith(_norm(spec.name))]
    if prefixed:
        return prefixed
    # never pick up another dataset's file (mnist.npz when fashion_mnist was asked for)
    others = [_norm(n) for n in _SPECS if n != spec.name]
    return [p for p in files if not any(_norm(p.stem).startswith(o) for o in others)]


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_Split = tuple[np.ndarray, np.ndarray]


def _load_files(spec: _Spec, root: Path) -> tuple[_Split, _Split]:
    if not root.exists():
        raise DatasetError(
            f"{root} does not exist; pass data_dir pointing at the {spec.name} files (looked for: {_looked_for(spec)})"
        )
    if root.is_file():
        return _load_single_file(spec, root)
    for folder in _candidate_dirs(spec, root):
        found = _load_folder(spec, folder)
        if found is not None:
            return found
    searched = ", ".join(str(d) for d in _candidate_dirs(spec, root))
    raise DatasetError(
        f"no {spec.name} files found in {searched}; looked for: {_looked_for(spec)}. "
        f"Point data_dir at the folder holding them"
    )


def _load_single_file(spec: _Spec, path: Path) -> tuple[_Split, _Split]:
    if path.suffix == ".npz" and "npz" in spec.formats:
        return _from_npz(spec, [path])
    known = set()
    if "idx" in spec.formats:
        known |= {n + ext for n in _all_names(_IDX_FILES) for ext in ("", ".gz")}
    if "cifar-py" in spec.formats:
        known |= set(_all_names(_CIFAR_PY))
    if "cifar-bin" in spec.formats:
        known |= set(_all_names(_CIFAR_BIN))
    if path.name in known:  # one file of a multi-file format: the others lie beside it
        found = _load_folder(spec, path.parent)
        if found is not None:
            return found
    raise DatasetError(
        f"{path} is not a recognized {spec.name} file; pass its folder, or a file among: {_looked_for(spec)}"
    )


def _load_folder(spec: _Spec, folder: Path) -> tuple[_Split, _Split] | None:
    """Load from the first format present in `folder`; None if none is. A format partly present is an
    error."""
    if "npz" in spec.formats:
        files = _npz_files(spec, folder)
        if files:
            return _from_npz(spec, files)
    for fmt, table, gz in (
        ("idx", _IDX_FILES, True),
        ("cifar-py", _CIFAR_PY, False),
        ("cifar-bin", _CIFAR_BIN, False),
    ):
        if fmt not in spec.formats:
            continue
        paths = {n: _find(folder, n, gz) for n in _all_names(table)}
        if not any(paths.values()):
            continue
        missing = [n for n, p in paths.items() if p is None]
        if missing:
            raise DatasetError(
                f"{folder} holds part of the {spec.name} {fmt} files but not {', '.join(missing)}"
                f"{' (raw or .gz)' if gz else ''}; add the missing files"
            )
        reader = {"idx": _from_idx, "cifar-py": _from_cifar_py, "cifar-bin": _from_cifar_bin}[fmt]
        return reader(spec, {split: [paths[n] for n in table[split]] for split in _SPLITS})
    return None


# ----------------------------------------------------------------------------------------------------------
# validation: every reader ends here


def _to_images(spec: _Spec, x: np.ndarray, source: str, key: str) -> np.ndarray:
    """Check dtype / range / shape and convert to float32 NCHW in [0, 1]."""
    c, h, w = spec.shape
    if x.dtype == np.uint8:
        scale = 255.0
    elif x.dtype.kind == "f":
        scale = None
    else:
        raise DatasetError(
            f"{source}: {key} has dtype {x.dtype}; images must be uint8 (0..255) or float in [0, 1]. "
            f"Convert them, e.g. x.astype(np.uint8)"
        )
    shape = tuple(x.shape[1:])
    if shape == (c, h, w):
        pass  # NCHW already
    elif shape == (h, w, c):
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif c == 1 and shape == (h, w):
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    else:
        raise DatasetError(
            f"{source}: {key} has shape {tuple(x.shape)}; {spec.name} images must be (N, {h}, {w})"
            f"{'' if c > 1 else ' or'} (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}). Is this the right dataset?"
        )
    if scale is None:
        x = x.astype(np.float32, copy=False)
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise DatasetError(
                f"{source}: float {key} must be finite and in [0, 1] (got range "
                f"[{np.nanmin(x)}, {np.nanmax(x)}]); store pixels as uint8 or scale them to [0, 1]"
            )
        return np.ascontiguousarray(x)
    out = np.ascontiguousarray(x, dtype=np.float32)  # a fresh copy: safe to scale in place
    out /= np.float32(scale)
    return out


def _to_labels(spec: _Spec, y: np.ndarray, source: str, key: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: {key} has dtype {y.dtype}; labels must be integers, e.g. y.astype(np.int64)")
    if y.ndim != 1:
        raise DatasetError(f"{source}: {key} has shape {tuple(y.shape)}; labels must be one-dimensional (N,)")
    k = len(spec.classes)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise DatasetError(
            f"{source}: {key} holds labels in [{y.min()}, {y.max()}]; {spec.name} has {k} classes, so labels "
            f"must lie in [0, {k - 1}]. Is this the right dataset?"
        )
    return y.astype(np.int64)


def _validate(spec: _Spec, x: np.ndarray, y: np.ndarray, source: str, split: str) -> _Split:
    if len(x) != len(y):
        raise DatasetError(
            f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; they must match"
        )
    if len(y) == 0:
        raise DatasetError(f"{source}: the {split} split is empty")
    return _to_images(spec, x, source, f"x_{split}"), _to_labels(spec, y, source, f"y_{split}")


# ----------------------------------------------------------------------------------------------------------
# .npz


def _from_npz(spec: _Spec, files: Sequence[Path]) -> tuple[_Split, _Split]:
    arrays: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    found: dict[Path, list[str]] = {}
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as z:
                found[path] = list(z.files)
                for key in z.files:
                    if key not in _KEYS:
                        continue  # extra keys (e.g. src_index) are allowed
                    if key in arrays:
                        raise DatasetError(f"{key} is in both {origin[key]} and {path}; keep one copy in data_dir")
                    try:
                        arrays[key], origin[key] = z[key], path
                    except ValueError as e:  # object arrays need pickle, which is refused
                        raise DatasetError(
                            f"{path}: {key} cannot be read without pickle ({e}); save plain numeric arrays"
                        ) from e
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DatasetError(f"{path} is not a readable .npz file ({e}); re-create it with np.savez") from e
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        have = "; ".join(f"{p.name}: {', '.join(ks) or '(none)'}" for p, ks in found.items())
        raise DatasetError(
            f"{', '.join(str(p) for p in files)} lack{'s' if len(files) == 1 else ''} {', '.join(missing)} "
            f"(found keys {have}); {spec.name} needs {', '.join(_KEYS)} (they may be split over several .npz "
            "files in one folder: pass that folder as data_dir)"
        )
    out = []
    for split in _SPLITS:
        src = str(origin[f"x_{split}"])
        if origin[f"y_{split}"] != origin[f"x_{split}"]:
            src += f" / {origin[f'y_{split}']}"
        out.append(_validate(spec, arrays[f"x_{split}"], arrays[f"y_{split}"], src, split))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path} cannot be read ({e}); download it again") from e


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (raw or .gz) with numpy: magic (0, 0, dtype code, ndim), big-endian uint32 dims,
    then the data.

    Raises:
        DatasetError: bad magic number, unknown dtype code, or a size that does not match the header.
    """
    path = Path(path)
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number); download it again")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02x}; download it again")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetError(f"{path} is truncated inside its IDX header; download it again")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - header != expected:
        raise DatasetError(
            f"{path}: the IDX header says shape {dims} ({expected} data bytes) but the file holds "
            f"{len(buf) - header}; the file is truncated or corrupt, download it again"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native byte order, writable


def _from_idx(spec: _Spec, paths: dict[str, list[Path]]) -> tuple[_Split, _Split]:
    out = []
    for split in _SPLITS:
        xp, yp = paths[split]
        x, y = read_idx(xp), read_idx(yp)
        if x.ndim != 3:
            raise DatasetError(f"{xp}: an IDX image file must have 3 dims (N, H, W), got shape {x.shape}")
        if y.ndim != 1:
            raise DatasetError(f"{yp}: an IDX label file must have 1 dim (N,), got shape {y.shape}")
        out.append(_validate(spec, x, y, f"{xp} / {yp.name}", split))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (pickles, read through an allow-list) and binary batches

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What numpy array pickles reference, under both numpy 1 (numpy.core) and numpy 2 (numpy._core) names,
    and the latin-1 encode that Python 3 protocol-2 pickles use for bytes."""
    if not _ALLOWED_GLOBALS:
        try:
            from numpy._core import multiarray, numeric
        except ImportError:  # pragma: no cover - numpy < 2
            from numpy.core import multiarray, numeric
        for mod in ("numpy.core", "numpy._core"):
            _ALLOWED_GLOBALS[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
            # protocol-5 pickles written by numpy rebuild arrays through _frombuffer
            _ALLOWED_GLOBALS[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
        _ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
        _ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype
        # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
        _ALLOWED_GLOBALS[("_codecs", "encode")] = _latin1_encode
    return _ALLOWED_GLOBALS


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` limited to the latin-1 round trip pickle uses for bytes (no other codec runs)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise DatasetError(
                f"{self._source} references {module}.{name}, which a CIFAR-10 batch never needs; refusing to "
                "unpickle it. Use the original CIFAR-10 python batches, or the binary / .npz version"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self._source} uses persistent ids, which a CIFAR-10 batch never needs")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _RestrictedUnpickler(f, str(path)).load()
    except DatasetError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
    ) as e:
        raise DatasetError(f"{path} is not a readable CIFAR-10 python batch ({e}); download it again") from e
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: a CIFAR-10 batch is a dict, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DatasetError(
            f"{path}: a CIFAR-10 batch needs keys 'data' and 'labels' (found {sorted(map(str, d))}); "
            "is it a CIFAR-100 batch (fine_labels)?"
        )
    x, y = d["data"], d["labels"]
    if not isinstance(x, np.ndarray):
        raise DatasetError(f"{path}: 'data' must be a numpy array, got {type(x).__name__}")
    try:
        y = np.asarray(y)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: 'labels' is not a list of integers ({e})") from e
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must have shape (N, 3072), got {tuple(x.shape)}")
    if x.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' must be uint8, got {x.dtype}")
    return x.reshape(-1, 3, 32, 32), y  # (N, 3072) -> (N, C, H, W): rows are R plane, G plane, B plane


def _from_cifar_py(spec: _Spec, paths: dict[str, list[Path]]) -> tuple[_Split, _Split]:
    out = []
    for split in _SPLITS:
        xs, ys = [], []
        for p in paths[split]:
            x, y = _load_cifar_batch(p)
            if len(x) != len(y):
                raise DatasetError(f"{p}: 'data' has {len(x)} images but 'labels' has {len(y)}; download it again")
            xs.append(x)
            ys.append(y)
        src = f"{paths[split][0].parent}/{{{','.join(p.name for p in paths[split])}}}"
        out.append(_validate(spec, np.concatenate(xs), np.concatenate(ys), src, split))
    return out[0], out[1]


_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes


def _from_cifar_bin(spec: _Spec, paths: dict[str, list[Path]]) -> tuple[_Split, _Split]:
    out = []
    for split in _SPLITS:
        xs, ys = [], []
        for p in paths[split]:
            buf = _read_bytes(p)
            if len(buf) == 0 or len(buf) % _CIFAR_RECORD:
                raise DatasetError(
                    f"{p} holds {len(buf)} bytes, not a multiple of the {_CIFAR_RECORD}-byte CIFAR-10 record "
                    "(1 label byte + 3072 pixel bytes); it is truncated or not CIFAR-10 (CIFAR-100 records "
                    "have 2 label bytes)"
                )
            rec = np.frombuffer(buf, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)  # (N, 3073)
            ys.append(rec[:, 0].astype(np.int64))
            xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))  # (N, 3072) -> (N, C, H, W)
        src = f"{paths[split][0].parent}/{{{','.join(p.name for p in paths[split])}}}"
        out.append(_validate(spec, np.concatenate(xs), np.concatenate(ys), src, split))
    return out[0], out[1]
