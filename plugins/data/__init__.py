"""Data for the tasks: MNIST-format digits (MNIST, Fashion-MNIST, the embedded 5k), cluttered MNIST,
numbers to sort.

Harness-free apart from ``harness.errors.UsageError``, so tasks and scripts can use it alone.
"""

from plugins.data.cluttered import (
    VARIANTS,
    ClutterConfig,
    ClutteredSet,
    cluttered_mnist,
    save_sample_grid,
)
from plugins.data.mnist import (
    DataConfigError,
    DataError,
    DigitSet,
    MNISTSplits,
    digit_set_sha256,
    load_fashion_mnist,
    load_mnist,
)
from plugins.data.numbers import (
    NEURALSORT_PROTOCOL,
    PAPER_PROTOCOL,
    SortingProtocol,
    sorting_correct,
    sorting_indices,
    sorting_instances,
    target_permutation,
)
from plugins.data.sources import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    EMBEDDED,
    DatasetFiles,
    check_dataset,
    load_digits,
    resolve_dataset,
)

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "EMBEDDED",
    "NEURALSORT_PROTOCOL",
    "PAPER_PROTOCOL",
    "VARIANTS",
    "ClutterConfig",
    "ClutteredSet",
    "DataConfigError",
    "DataError",
    "DatasetFiles",
    "DigitSet",
    "MNISTSplits",
    "SortingProtocol",
    "check_dataset",
    "cluttered_mnist",
    "digit_set_sha256",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "resolve_dataset",
    "save_sample_grid",
    "sorting_correct",
    "sorting_indices",
    "sorting_instances",
    "target_permutation",
]
