"""Readers for the official downsampled ImageNet 32×32 and the CIFAR-10 python batches, without
executing pickle code.

ImageNet32 ("downsampled ImageNet", image-net.org): ``train_data_batch_1`` … ``train_data_batch_10``
and ``val_data``, each a pickled dict with ``data`` (N, 3072) uint8 (channel-major RGB planes, like
CIFAR) and ``labels`` (1-based class ids 1..1000); some releases ship ``.npz`` files with the same
keys (``train_data_batch_1.npz`` …), read with ``numpy.load(allow_pickle=False)``.

Pickles are read by :class:`RestrictedUnpickler`, which resolves only the few globals that numpy
arrays and scalars need (``numpy ... _reconstruct``, ``ndarray``, ``dtype``, ``scalar`` and
``_codecs.encode`` for protocol-2 bytes). A file whose pickle names anything else (``os.system``,
``builtins.eval``, any class) is refused before that object exists, so nothing in it runs.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from experiments.common import CLIError

__all__ = [
    "CIFAR_FILES",
    "DEFAULT_CLASSES",
    "IMAGENET_TRAIN_FILES",
    "IMAGENET_VAL_FILE",
    "MEAN",
    "STD",
    "RestrictedUnpickler",
    "Uint8Data",
    "UnsafePickleError",
    "load_cifar10",
    "load_imagenet32",
    "normalize",
    "read_batch",
    "restricted_load",
]

IMAGENET_TRAIN_FILES = [f"train_data_batch_{i}" for i in range(1, 11)]
IMAGENET_VAL_FILE = "val_data"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

# The reference's normalisation (the usual ImageNet channel statistics), applied to x / 255.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The reference keeps a fixed list of 250 of the 1000 classes, but that list is not in the material
# pinet was built from; pinet's fixed default is every fourth class id, 1, 5, 9, ..., 997 (spread
# evenly over the WordNet-ordered ids). --imagenet-classes selects any other list.
DEFAULT_CLASSES = tuple(range(1, 1001, 4))

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the numpy-array allow-list (it could run code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals numpy arrays need (module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"forbidden global {module}.{name} (only numpy arrays, lists, dicts, numbers "
            "and strings are read)"
        )


def restricted_load(path: str):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="latin1"``: Python 2 pickles too)."""
    with open(path, "rb") as f:
        data = f.read()
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _find(folder: str, name: str) -> str | None:
    for cand in (name, name + ".npz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


def read_batch(path: str, *, label_base: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``data`` (N, 3072) uint8 and ``labels`` (N,) int64 minus ``label_base``
    (1 for ImageNet32's 1-based ids, 0 for CIFAR-10). A :class:`CLIError` names the file on any
    problem (unsafe pickle, missing keys, wrong shapes)."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        else:
            obj = restricted_load(path)
    except UnsafePickleError as e:
        raise CLIError(f"refusing to read {path}: its pickle carries code ({e})") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CLIError(
            f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(obj, dict):
        raise CLIError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise CLIError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, obj))}")
    X = np.asarray(obj["data"])
    labels = np.asarray(obj["labels"])
    if labels.size == 0:
        # An empty list of labels reads as float64 and an empty int64 array does not: decided here,
        # before the dtype, so that an empty batch is one error whatever container holds it.
        rows = X.shape[0] if X.ndim else X.size
        if rows == 0:
            raise CLIError(f"{path} holds no images ('data' has 0 rows and 'labels' is empty)")
        raise CLIError(f"{path}: 'data' has {rows} rows but 'labels' is empty; expected one label per row")
    if labels.dtype.kind not in "iu":  # strings or fractions are not class ids; do not truncate them
        raise CLIError(f"{path}: 'labels' must be integers, got {labels.dtype} values such as {labels.reshape(-1)[:3].tolist()}")
    y = labels.astype(np.int64).reshape(-1) - label_base
    if X.dtype != np.uint8 or X.ndim != 2 or X.shape[1] != 3072 or X.shape[0] != y.shape[0]:
        raise CLIError(
            f"{path}: 'data' must be (N, 3072) uint8 with one label per row, got {X.dtype} "
            f"{X.shape} and {y.shape[0]} labels"
        )
    return X, y


def _missing(folder: str, names: list[str], what: str, flag: str, hint: str) -> None:
    missing = [n for n in names if _find(folder, n) is None]
    if missing:
        where = f"{folder} lacks {', '.join(missing)}" if os.path.isdir(folder) else f"no directory {folder}"
        raise CLIError(f"{what} not found: {where}; expected {hint} in the folder given by {flag}")


def parse_classes(text: str | None) -> tuple[int, ...]:
    """``--imagenet-classes``: ``None`` -> :data:`DEFAULT_CLASSES`; ``"all"``; comma-separated 1-based
    ids; or a path to a file with ids separated by commas/whitespace. Sorted, unique, in 1..1000."""
    if text is None:
        return DEFAULT_CLASSES
    if text == "all":
        return tuple(range(1, 1001))
    src = text
    if os.path.isfile(text):
        with open(text) as f:
            src = f.read()
    try:
        ids = sorted({int(t) for t in src.replace(",", " ").split()})
    except ValueError:
        raise CLIError(
            f"--imagenet-classes: expected 'all', comma-separated class ids 1..1000 or a file of them, "
            f"got {text!r}"
        ) from None
    if not ids or ids[0] < 1 or ids[-1] > 1000:
        raise CLIError(f"--imagenet-classes: class ids must be in 1..1000, got {text!r}")
    return tuple(ids)


def load_imagenet32(
    folder: str, classes=DEFAULT_CLASSES, *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ImageNet32 training and validation rows of ``classes`` (1-based ids): ``(X_train (N, 3072)
    uint8, y_train (N,), X_val, y_val)``, labels renumbered ``0..len(classes)-1`` in id order. Rows
    of other classes are dropped batch by batch, so memory is that of the kept rows."""
    hint = (
        "ImageNet32 batches " + ", ".join(IMAGENET_TRAIN_FILES[:2]) + ", …, train_data_batch_10 and val_data "
        "(pickled dicts, or the same names with .npz)"
    )
    _missing(folder, IMAGENET_TRAIN_FILES + [IMAGENET_VAL_FILE], "ImageNet32", "--imagenet-data", hint)
    lut = np.full(1000, -1, dtype=np.int64)
    lut[np.asarray(classes) - 1] = np.arange(len(classes))

    def keep(path):
        X, y = read_batch(path, label_base=1)
        if y.size and (y.min() < 0 or y.max() > 999):
            raise CLIError(f"{path}: labels must be 1-based ImageNet class ids 1..1000")
        new = lut[y]
        m = new >= 0
        return X[m], new[m]

    names = IMAGENET_TRAIN_FILES
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="reading ImageNet32", leave=False)
    parts = [keep(_find(folder, n)) for n in it]
    Xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    Xva, yva = keep(_find(folder, IMAGENET_VAL_FILE))
    if Xtr.shape[0] == 0:
        raise CLIError(f"{folder}: no training image belongs to the {len(classes)} selected classes")
    if Xva.shape[0] == 0:
        # Evaluated on nothing, every epoch reported a validation loss and accuracy of 0.0 (in the
        # history, log.csv and checkpoint) as if measured.
        raise CLIError(f"{folder}: no validation image ({IMAGENET_VAL_FILE}) belongs to the {len(classes)} selected classes")
    return Xtr, ytr, Xva, yva


def cifar10_folder(root: str) -> str:
    """The folder holding CIFAR-10's python batches under ``root`` (``root/cifar-10-batches-py`` or
    ``root`` itself); a :class:`CLIError` naming ``--cifar-data`` if a batch is missing. Cheap: a
    command checks it before it loads anything else."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder) and all(_find(root, n) for n in CIFAR_FILES):
        folder = root
    hint = "cifar-10-batches-py/ with data_batch_1, …, data_batch_5 and test_batch (extract cifar-10-python.tar.gz)"
    _missing(folder, CIFAR_FILES, "CIFAR-10", "--cifar-data", hint)
    return folder


def load_cifar10(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10's python batches under ``root/cifar-10-batches-py`` (or ``root`` itself):
    ``(X_train (50000, 3072) uint8, y_train, X_test (10000, 3072), y_test)``, read like ImageNet32."""
    folder = cifar10_folder(root)
    parts = [read_batch(_find(folder, n), label_base=0) for n in CIFAR_FILES]
    Xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    Xte, yte = parts[5]
    for y, name in ((ytr, "training"), (yte, "test")):
        if y.size and (y.min() < 0 or y.max() > 9):
            raise CLIError(f"{folder}: CIFAR-10 {name} labels must be 0..9")
    return Xtr, ytr, Xte, yte


def normalize(X: np.ndarray | Tensor, dtype=torch.float32) -> Tensor:
    """uint8 rows (b, 3072) (RGB planes) -> ``((x/255 - mean) / std)`` per channel, (b, 3072)."""
    x = torch.as_tensor(X).to(dtype).reshape(-1, 3, 1024) / 255.0
    mean = torch.tensor(MEAN, dtype=dtype)[None, :, None]
    std = torch.tensor(STD, dtype=dtype)[None, :, None]
    return ((x - mean) / std).reshape(-1, 3072)


class Uint8Data:
    """Classification data kept as uint8 (ImageNet32 at 250 classes is ~1 GB so, 4 GB as float32),
    normalised batch by batch. Same interface as :class:`experiments.common.TensorData`."""

    def __init__(self, name: str, X_train, y_train, X_test, y_test, num_classes: int) -> None:
        self.name = name
        self.X_train, self.X_test = (
            torch.from_numpy(np.ascontiguousarray(X_train)),
            torch.from_numpy(np.ascontiguousarray(X_test)),
        )
        self.y_train, self.y_test = torch.from_numpy(y_train).long(), torch.from_numpy(y_test).long()
        self.d_in, self.d_out = 3072, num_classes
        self.n_train, self.n_test = self.X_train.shape[0], self.X_test.shape[0]

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled normalised mini-batches ``(b, 3072) float32, (b,)``; the order comes from ``generator``."""
        perm = torch.randperm(self.n_train, generator=generator)
        for i in range(0, self.n_train, batch_size):
            idx = perm[i : i + batch_size]
            yield normalize(self.X_train[idx]), self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set in order, normalised."""
        for i in range(0, self.n_test, batch_size):
            yield normalize(self.X_test[i : i + batch_size]), self.y_test[i : i + batch_size]
