"""The data sets curvlab ships with or finds on disk: scikit-learn's digits and Fashion-MNIST.

Every loader of the library (the zoo, the phenomena, the benchmark problems) reads its data here.

*Digits*: scikit-learn's 1,797 8×8 images, bundled with scikit-learn, so always available.

*Fashion-MNIST* (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747): looked for, in order, in
``root`` (when given), ``$CURVLAB_DATA/fashion-mnist`` and Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). ``$CURVLAB_DATA``
(default ``~/.cache/curvlab/data``) is the one environment variable. Every file is checked against
its SHA-256 before use. Downloads happen only when asked (``download=True``), from ``base_url``
into ``$CURVLAB_DATA/fashion-mnist``: the bytes go to a temporary file, are verified, then renamed
into place, so an interrupted download never leaves a half file behind. The IDX format is
big-endian: magic ``0x00000803`` (uint8 images, 3 dims) or ``0x00000801`` (labels), then one uint32
per dimension, then the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import DataNotFoundError, InvalidArgumentError

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "data_dir",
    "digits",
    "fashion_mnist",
    "fashion_mnist_arrays",
    "fashion_mnist_available",
    "read_idx",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: SHA-256 of the four gzip files (identical in Debian's package and upstream).
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_SPLITS = {"train": "train", "test": "t10k"}

_HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts the files in "
    "/usr/share/datasets/fashion-mnist), or put the four .gz files in $CURVLAB_DATA/fashion-mnist, "
    "or download them with curvlab.datasets.fashion_mnist(download=True)."
)


def digits(
    num: int | None = None, *, standardize: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits: ``(X [n, 64], y [n])``, the first ``num`` of the 1,797 images.

    Pixels are scaled to [0, 1] (``value / 16``); with ``standardize=True`` each pixel column is
    instead centred and divided by its standard deviation plus 1e-6 (on the raw 0–16 scale), over
    the ``n`` rows returned.

    Args:
        num: how many images (default: all 1,797).
        standardize: per-pixel zero mean and unit variance instead of [0, 1].
        dtype: floating dtype of ``X``; ``y`` is int64.

    Example:
        >>> X, y = digits(10)
        >>> tuple(X.shape), int(y[0]), float(X.max()) <= 1.0
        ((10, 64), 0, True)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data[:num], dtype=dtype)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6) if standardize else x / 16.0
    return x, torch.tensor(bunch.target[:num], dtype=torch.int64)


def data_dir() -> Path:
    """curvlab's writable data directory: ``$CURVLAB_DATA`` or ``~/.cache/curvlab/data``."""
    env = os.environ.get("CURVLAB_DATA")
    return Path(env) if env else Path(os.path.expanduser("~/.cache/curvlab/data"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    first = [Path(root)] if root is not None else []
    return [*first, data_dir() / "fashion-mnist", DEBIAN_FASHION_MNIST]


def _find(root: str | os.PathLike[str] | None, files: Mapping[str, str]) -> Path | None:
    for folder in _candidates(root):
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def fashion_mnist_available(root: str | os.PathLike[str] | None = None) -> bool:
    """Whether the four Fashion-MNIST files are present (not yet verified) in a searched folder."""
    return _find(root, FASHION_MNIST_FILES) is not None


def _download(url: str, dest: Path, sha256: str) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        got = _sha256(Path(tmp))
        if got != sha256:
            raise DataNotFoundError(
                f"downloaded {url} but its SHA-256 is {got}, expected {sha256}; the file was "
                "discarded. Retry, or install the data another way: " + _HOW_TO_GET
            )
        os.replace(tmp, dest)
    except OSError as exc:
        raise DataNotFoundError(f"could not download {url}: {exc}. {_HOW_TO_GET}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (gzip-compressed or plain) IDX file of unsigned bytes into a numpy array.

    Raises:
        DataNotFoundError: the file is not a uint8 IDX file or is truncated.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataNotFoundError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path} is truncated: expected {np.prod(dims)} bytes of data")
    return data.reshape(dims)


def fashion_mnist_arrays(
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    base_url: str = FASHION_MNIST_URL,
    files: Mapping[str, str] = FASHION_MNIST_FILES,
) -> dict[str, np.ndarray]:
    """The Fashion-MNIST files as numpy arrays, every file verified by SHA-256.

    Args:
        root: a directory to look in first.
        download: fetch missing files from ``base_url`` into ``$CURVLAB_DATA/fashion-mnist``.
        base_url: where to download from (``file://`` URLs work, which is how the loader is tested).
        files: file name -> SHA-256; override only to test the loader on small files.

    Returns:
        ``{file name without .gz: array}``; images ``[n, 28, 28]`` uint8, labels ``[n]`` uint8.

    Raises:
        DataNotFoundError: files missing (the message says how to get them) or a checksum mismatch.

    Example:
        >>> fashion_mnist_arrays(root="/nonexistent", files={"x.gz": "0"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        curvlab.errors.DataNotFoundError: Fashion-MNIST files not found...
    """
    found = _find(root, files)
    if found is None:
        if not download:
            raise DataNotFoundError(
                f"Fashion-MNIST files not found in {[str(p) for p in _candidates(root)]}. "
                + _HOW_TO_GET
            )
        found = data_dir() / "fashion-mnist"
        for name, sha in files.items():
            if not (found / name).is_file():
                _download(base_url.rstrip("/") + "/" + name, found / name, sha)
    out: dict[str, np.ndarray] = {}
    for name, sha in files.items():
        path = found / name
        got = _sha256(path)
        if got != sha:
            raise DataNotFoundError(
                f"{path} has SHA-256 {got}, expected {sha}: the file is corrupt or a different "
                "version. Delete it and get the data again. " + _HOW_TO_GET
            )
        out[name.removesuffix(".gz")] = read_idx(path)
    return out


def fashion_mnist(
    split: str = "train",
    num: int | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images as float32 ``[n, 28, 28]`` in [0, 1] and their int64 labels ``[n]``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        num: keep the first ``num`` images (default: all).
        root: a directory to look in first (see the module docstring for the search order).
        download: fetch missing files (checksummed) into ``$CURVLAB_DATA/fashion-mnist``.

    Raises:
        InvalidArgumentError: ``split`` is neither ``"train"`` nor ``"test"``.
        DataNotFoundError: the files are absent (the message says how to get them) or corrupt.
    """
    if split not in _SPLITS:
        raise InvalidArgumentError(f"split must be 'train' or 'test', got {split!r}")
    stem = _SPLITS[split]
    # read and verify the split's two files only (hashing all four doubles the cost of a test split)
    files = {n: sha for n, sha in FASHION_MNIST_FILES.items() if n.startswith(f"{stem}-")}
    arrays = fashion_mnist_arrays(root, download=download, files=files)
    images = arrays[f"{stem}-images-idx3-ubyte"][:num].astype(np.float32) / 255.0
    labels = arrays[f"{stem}-labels-idx1-ubyte"][:num].astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)
