"""Sizes no machine here can hold, refused when the matrix is resolved, not when a cell allocates.

A cell at ``n = 1e14`` or ``batch_size = 1e14`` would pass every type and sign check, open its run
and fail on its first allocation. Every structure a task asks for implies a tensor the cell must
hold whatever the estimator: its layer's input or output for one batch (``b x in_shape`` of a
sparse matrix, ``b x n`` keys or items of a permutation, ``b x c x h x w`` images for glimpses).
That lower bound, in float32, is checked against this machine's memory; it never refuses a cell
that could run, and it names the parameters that made it too large.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from estimators.base import GlimpseSpec, PermutationSpec, SparseMatrixSpec, Spec
from harness.errors import ConfigError

__all__ = ["check_fits", "least_tensor", "machine_memory"]

FLOAT32 = 4


def machine_memory() -> int:
    """Bytes of physical memory here (a large bound where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**50


def least_tensor(spec: Spec, batch_size: int) -> tuple[int, ...]:
    """The shape of a tensor that any cell with ``spec`` holds for one batch."""
    if isinstance(spec, SparseMatrixSpec):
        widest = max(spec.in_shape, spec.out_shape, key=math.prod)
        return (batch_size, *widest)
    if isinstance(spec, PermutationSpec):
        return (batch_size, spec.n)
    if isinstance(spec, GlimpseSpec):
        return (batch_size, *spec.image_shape)
    return (batch_size,)


def check_fits(where: str, params: Mapping[str, Any], size_key: str, spec: Spec, memory: int) -> None:
    """``ConfigError`` naming ``batch_size`` and the size when their least tensor exceeds ``memory``."""
    shape = least_tensor(spec, int(params["batch_size"]))
    need = FLOAT32 * math.prod(shape)
    if need > memory:
        raise ConfigError(
            f"{where}: batch_size = {params['batch_size']} with {size_key} = {params[size_key]} needs a "
            f"{' x '.join(map(str, shape))} float32 tensor ({need / 2**30:.3g} GiB) at least; this "
            f"machine has {memory / 2**30:.3g} GiB of memory"
        )
