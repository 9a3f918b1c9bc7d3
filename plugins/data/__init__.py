"""Data for the tasks: MNIST (torchvision root or embedded 5k), cluttered MNIST, numbers to sort.

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

__all__ = [
    "NEURALSORT_PROTOCOL",
    "PAPER_PROTOCOL",
    "VARIANTS",
    "ClutterConfig",
    "ClutteredSet",
    "DataConfigError",
    "DataError",
    "DigitSet",
    "MNISTSplits",
    "SortingProtocol",
    "cluttered_mnist",
    "digit_set_sha256",
    "load_mnist",
    "save_sample_grid",
    "sorting_correct",
    "sorting_indices",
    "sorting_instances",
    "target_permutation",
]
