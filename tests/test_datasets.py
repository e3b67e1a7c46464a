"""curvlab.datasets: digits, and the Fashion-MNIST loader on tiny IDX files made here."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlab.datasets import (
    digits,
    fashion_mnist,
    fashion_mnist_arrays,
    fashion_mnist_available,
    read_idx,
)
from curvlab.errors import DataNotFoundError, InvalidArgumentError


def _idx(path: Path, arr: np.ndarray) -> str:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_set(tmp_path: Path) -> tuple[Path, dict[str, str], np.ndarray, np.ndarray]:
    src = tmp_path / "mirror"
    src.mkdir()
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    files = {
        "imgs-idx3-ubyte.gz": _idx(src / "imgs-idx3-ubyte.gz", images),
        "labs-idx1-ubyte.gz": _idx(src / "labs-idx1-ubyte.gz", labels),
    }
    return src, files, images, labels


def test_reads_verified_files_from_root(tiny_set) -> None:  # type: ignore[no-untyped-def]
    src, files, images, labels = tiny_set
    out = fashion_mnist_arrays(src, files=files)
    assert np.array_equal(out["imgs-idx3-ubyte"], images) and np.array_equal(
        out["labs-idx1-ubyte"], labels
    )


def test_download_verifies_and_places_files(
    tiny_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    src, files, images, _ = tiny_set
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("curvlab.datasets.DEBIAN_FASHION_MNIST", tmp_path / "nodebian")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_arrays(files=files)
    out = fashion_mnist_arrays(files=files, download=True, base_url=src.as_uri())
    assert np.array_equal(out["imgs-idx3-ubyte"], images)
    assert (tmp_path / "data" / "fashion-mnist" / "imgs-idx3-ubyte.gz").is_file()
    assert not list((tmp_path / "data" / "fashion-mnist").glob("*.part"))


def test_checksum_mismatch_is_refused(
    tiny_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    src, files, _, _ = tiny_set
    bad = {k: "0" * 64 for k in files}
    with pytest.raises(DataNotFoundError, match="expected 0000"):
        fashion_mnist_arrays(src, files=bad)
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "d2"))
    monkeypatch.setattr("curvlab.datasets.DEBIAN_FASHION_MNIST", tmp_path / "nodebian")
    with pytest.raises(
        DataNotFoundError, match=r"SHA-256 is .* expected 0+; the file was discarded"
    ):
        fashion_mnist_arrays(files=bad, download=True, base_url=src.as_uri())
    assert not (tmp_path / "d2" / "fashion-mnist" / "imgs-idx3-ubyte.gz").exists()


def test_truncated_and_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataNotFoundError, match="bad magic"):
        read_idx(p)


@pytest.fixture
def no_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("curvlab.datasets.DEBIAN_FASHION_MNIST", tmp_path / "nodebian")
    return tmp_path


def test_missing_fashion_mnist_says_how_to_install(no_fashion_mnist: Path) -> None:
    assert not fashion_mnist_available(no_fashion_mnist)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", 10, root=no_fashion_mnist)


def test_one_environment_variable_points_at_the_data(no_fashion_mnist: Path) -> None:
    folder = no_fashion_mnist / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"")
    assert not fashion_mnist_available()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(b"")
    assert fashion_mnist_available()


def test_bad_split_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="split must be 'train' or 'test'"):
        fashion_mnist("validation")


def test_a_split_reads_and_verifies_its_own_two_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    files = {
        "t10k-images-idx3-ubyte.gz": _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images),
        "t10k-labels-idx1-ubyte.gz": _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels),
        "train-images-idx3-ubyte.gz": "0" * 64,  # corrupt: the test split must not read it
        "train-labels-idx1-ubyte.gz": "0" * 64,
    }
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"corrupt")
    monkeypatch.setattr("curvlab.datasets.FASHION_MNIST_FILES", files)
    x, y = fashion_mnist("test", root=tmp_path)
    assert torch.equal(x, torch.from_numpy(images).float() / 255) and y.tolist() == [7, 1]
    with pytest.raises(DataNotFoundError, match="has SHA-256"):
        fashion_mnist("train", root=tmp_path)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST absent")
def test_fashion_mnist_images_and_labels() -> None:
    x, y = fashion_mnist("test", 100)
    assert x.shape == (100, 28, 28) and x.dtype == torch.float32 and y.shape == (100,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) <= set(range(10))


def test_digits_scaled_and_standardized() -> None:
    x, y = digits()
    assert x.shape == (1797, 64) and y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    x64, _ = digits(dtype=torch.float64)
    assert torch.equal(x64.float(), x)
    z, y5 = digits(500, standardize=True)
    assert z.shape == (500, 64) and torch.equal(y5, y[:500])
    raw = x[:500] * 16
    assert torch.allclose(z, (raw - raw.mean(0)) / (raw.std(0) + 1e-6), atol=1e-6)
