from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.errors import DataError
from scenarios.sources.fashion_mnist import FILES, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fmnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        suffix = ".gz" if gz else ""
        write_idx(folder / (FILES[f"{split}_images"] + suffix), rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / (FILES[f"{split}_labels"] + suffix), np.arange(n) % 10)


def test_read_idx_roundtrip_and_corruption(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic")


def test_read_idx_inflates_large_and_multi_member_files_and_refuses_cut_ones(tmp_path):
    """Gzipped idx files are inflated piece by piece into the array: a file of several pieces, one of two gzip
    members (as ``gzip`` reads them), and refused when cut short or corrupt."""
    a = np.random.default_rng(0).integers(0, 256, (3000, 28, 28), dtype=np.uint8)  # 2.4 MB: several pieces
    write_idx(tmp_path / "a.gz", a)
    got = read_idx(tmp_path / "a.gz")
    assert np.array_equal(got, a) and got.flags.writeable
    data = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()
    (tmp_path / "two.gz").write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(read_idx(tmp_path / "two.gz"), a)
    whole = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "bad.gz").write_bytes(whole[:20] + bytes(200) + whole[220:])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "long").write_bytes(data + b"extra")
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "long")


@pytest.mark.parametrize("layout", ["flat", "torchvision", "torchvision_raw_unzipped"])
def test_roots_flat_or_torchvision(tmp_path, layout):
    folder = {"flat": tmp_path, "torchvision": tmp_path / "FashionMNIST" / "raw"}.get(
        layout, tmp_path / "raw"
    )
    fake_fmnist(folder, gz=layout != "torchvision_raw_unzipped")
    train, test, names = load_fashion_mnist(str(tmp_path))
    assert train.inputs.shape == (20, 1, 28, 28) and test.inputs.shape == (10, 1, 28, 28)
    assert train.inputs.dtype == torch.uint8 and train.targets.tolist() == list(range(10)) * 2
    assert len(names) == 10


def test_env_var_root(tmp_path, monkeypatch):
    fake_fmnist(tmp_path, n_train=30)
    monkeypatch.setenv("CLAGENT_FMNIST_ROOT", str(tmp_path))
    assert len(load_fashion_mnist()[0]) == 30


def test_missing_files_name_the_file_and_the_package(tmp_path):
    with pytest.raises(DataError) as err:
        load_fashion_mnist(str(tmp_path))
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "torchvision" in msg


@pytest.mark.realdata
def test_real_fashion_mnist(fmnist_root):
    start = time.perf_counter()
    train, test, names = load_fashion_mnist(str(fmnist_root))
    first = time.perf_counter() - start
    assert train.inputs.shape == (60000, 1, 28, 28) and test.inputs.shape == (10000, 1, 28, 28)
    assert train.inputs.dtype == torch.uint8
    assert names[0] == "T-shirt/top" and len(names) == 10
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    assert train.inputs.float().mean() > 50  # not blank
    start = time.perf_counter()
    again, _, _ = load_fashion_mnist(str(fmnist_root))
    assert time.perf_counter() - start < max(0.1, first / 5)  # cached
    assert again.inputs.data_ptr() == train.inputs.data_ptr()
