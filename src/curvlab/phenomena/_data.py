"""Offline data for the phenomena: Fashion-MNIST from Debian's package, digits from scikit-learn."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataNotFoundError

__all__ = [
    "FASHION_MNIST_DIR",
    "fashion_mnist_available",
    "load_digits_tensors",
    "load_fashion_mnist",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _root(root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("CURVLAB_FASHION_MNIST", FASHION_MNIST_DIR))


def fashion_mnist_available(root: str | os.PathLike[str] | None = None) -> bool:
    """Whether the four Fashion-MNIST IDX files are present under ``root``."""
    folder = _root(root)
    return all((folder / f).is_file() for pair in _FILES.values() for f in pair)


def _read_idx(path: Path, count: int | None) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        n = dims[0] if count is None else min(count, dims[0])
        size = int(np.prod(dims[1:])) if ndim > 1 else 1
        data = np.frombuffer(f.read(n * size), dtype=np.uint8)
    return data.reshape((n, *dims[1:]))


def load_fashion_mnist(
    num: int | None = None, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor]:
    """The first ``num`` Fashion-MNIST images as float32 [num, 784] in [0, 1] and int64 labels.

    Read from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``,
    or ``$CURVLAB_FASHION_MNIST``, or ``root``).

    Raises:
        DataNotFoundError: the files are absent; the message says how to install them.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _root(root)
    if not fashion_mnist_available(folder):
        raise DataNotFoundError(
            f"Fashion-MNIST not found under {folder}. Install Debian's package: "
            "`sudo apt-get install -y dataset-fashion-mnist` (files in "
            "/usr/share/datasets/fashion-mnist), or point $CURVLAB_FASHION_MNIST at a folder "
            "holding the four *-ubyte.gz files"
        )
    images, labels = _FILES[split]
    x = _read_idx(folder / images, num).reshape(-1, 784).astype(np.float32) / 255.0
    y = _read_idx(folder / labels, num).reshape(-1).astype(np.int64)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def load_digits_tensors(num: int | None = None, standardise: bool = True) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits as float32 [num, 64] (standardised per pixel) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:num], dtype=torch.float32)
    if standardise:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(d.target[:num], dtype=torch.int64)
