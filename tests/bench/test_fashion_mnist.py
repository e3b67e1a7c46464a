"""The Fashion-MNIST loader on tiny IDX files made here: search, checksum, download, errors."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from curvlab.bench.problems.fashion_mnist import load_fashion_mnist, read_idx
from curvlab.errors import DataNotFoundError


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
    out = load_fashion_mnist(src, files=files)
    assert np.array_equal(out["imgs-idx3-ubyte"], images) and np.array_equal(
        out["labs-idx1-ubyte"], labels
    )


def test_download_verifies_and_places_files(
    tiny_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    src, files, images, _ = tiny_set
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("curvlab.bench.problems.fashion_mnist.DEBIAN_DIR", tmp_path / "nodebian")
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(files=files)
    out = load_fashion_mnist(files=files, download=True, base_url=src.as_uri())
    assert np.array_equal(out["imgs-idx3-ubyte"], images)
    assert (tmp_path / "data" / "fashion-mnist" / "imgs-idx3-ubyte.gz").is_file()
    assert not list((tmp_path / "data" / "fashion-mnist").glob("*.part"))


def test_checksum_mismatch_is_refused(
    tiny_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    src, files, _, _ = tiny_set
    bad = {k: "0" * 64 for k in files}
    with pytest.raises(DataNotFoundError, match="expected 0000"):
        load_fashion_mnist(src, files=bad)
    monkeypatch.setenv("CURVLAB_DATA", str(tmp_path / "d2"))
    monkeypatch.setattr("curvlab.bench.problems.fashion_mnist.DEBIAN_DIR", tmp_path / "nodebian")
    with pytest.raises(
        DataNotFoundError, match=r"SHA-256 is .* expected 0+; the file was discarded"
    ):
        load_fashion_mnist(files=bad, download=True, base_url=src.as_uri())
    assert not (tmp_path / "d2" / "fashion-mnist" / "imgs-idx3-ubyte.gz").exists()


def test_truncated_and_bad_magic(tmp_path: Path) -> None:
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DataNotFoundError, match="bad magic"):
        read_idx(p)
