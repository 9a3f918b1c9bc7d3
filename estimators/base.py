"""The estimator side of the plugin contract: structure specs, layers and the Estimator base class.

A task asks for a discrete structure of one *kind* (see ``KINDS``) by handing an estimator a spec;
the estimator answers with a ``StructureLayer`` (an ``nn.Module``) or raises ``Unsupported``, which
the matrix shows as ``n/a`` with its reason. This module imports nothing from ``harness`` so that a
third-party estimator package depends on ``estimators`` and ``pluggy`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pluggy
import torch
from torch import nn

__all__ = [
    "KINDS",
    "Estimator",
    "FullImageReadout",
    "GlimpseSpec",
    "PermutationOutput",
    "PermutationSpec",
    "SparseMatrixSpec",
    "Spec",
    "StructureLayer",
    "Unsupported",
    "hookimpl",
]

#: Marks a plugin's hook implementations; the same marker as ``harness.hookimpl``.
hookimpl = pluggy.HookimplMarker("sparsebench")

#: The fixed vocabulary that joins tasks and estimators.
KINDS: tuple[str, ...] = ("sparse_matrix", "permutation", "glimpse")


class Unsupported(Exception):
    """Raised by ``Estimator.build`` when it has no layer for a spec; the message is the reason."""


@dataclass(frozen=True)
class SparseMatrixSpec:
    """A learned (free-parameter) linear map ``y = W x`` with ``W`` of shape ``out_shape + in_shape``.

    Layer contract: ``forward(x: (b, *in_shape)) -> (b, *out_shape)``. In ``eval()`` mode the
    structure is deterministic (rounded means for sampled estimators), so feeding basis vectors
    reads ``W`` column by column.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    k: int  # number of continuous index tuples (nonzero entries the structure may hold)
    kind: ClassVar[Literal["sparse_matrix"]] = "sparse_matrix"


@dataclass(frozen=True)
class PermutationSpec:
    """An ``n x n`` permutation, either computed from per-item keys or learned as free parameters.

    Layer contract:
    - ``source="keys"``: the task scores every item with a network and hands the scores to
      ``forward``, which returns a ``PermutationOutput`` that sorts the items ascending. How many
      scores per item the layer reads is the layer's ``scores_per_item`` (see ``StructureLayer``):
      1 (the default): ``forward(keys: (b, n))``, the permutation that sorts the keys (quicksort,
      NeuralSort, Plackett-Luce); ``n``: ``forward(scores: (b, n, n))`` with ``scores[:, j, k]``
      item ``j``'s score for output position ``k`` (Gumbel-Sinkhorn as Mena et al. 2018). The task
      reads the attribute from the built layer and sizes its network's head to match.
    - ``source="free"``: ``forward(batch_size: int) -> PermutationOutput``, one (noisy) permutation
      per instance from learned logits.
    In ``eval()`` mode the matrices are hard permutations.
    """

    n: int
    source: Literal["keys", "free"]
    kind: ClassVar[Literal["permutation"]] = "permutation"


@dataclass(frozen=True)
class GlimpseSpec:
    """``glimpses`` read-outs of ``size x size`` pixels from an image, each placed by a box.

    Layer contract: ``forward(images: (b, c, h, w), boxes: (b, glimpses, 4)) -> (b, glimpses, c,
    size, size)``. ``boxes`` are the source network's raw (unconstrained) outputs; each layer maps
    them into the image itself (the paper applies sigmoid and rescaling after placing the points).
    An estimator that reads the whole image instead returns a ``FullImageReadout``.
    """

    image_shape: tuple[int, int, int]
    size: int
    glimpses: int
    kind: ClassVar[Literal["glimpse"]] = "glimpse"


Spec = SparseMatrixSpec | PermutationSpec | GlimpseSpec


@dataclass
class PermutationOutput:
    """Soft (training) or hard (eval) permutation matrices, ``x_sorted = matrix @ x``.

    ``steps`` holds the factors in order of application (quicksort's half-permutations; one entry
    for estimators that produce the permutation at once), each ``(b, n, n)``.
    """

    steps: list[torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def matrix(self) -> torch.Tensor:
        """The composed permutation, ``steps[-1] @ ... @ steps[0]``; ``(b, n, n)``."""
        out = self.steps[0]
        for step in self.steps[1:]:
            out = step @ out
        return out


class StructureLayer(nn.Module):
    """Base for the layers estimators build.

    Optional overrides:
    - ``objective(per_sample_loss)``: turns per-instance losses ``(b,)`` into the scalar to
      minimise. The default is the mean; score-function estimators add their surrogate term using
      what they recorded in the last ``forward``.
    - ``snapshot()``: tensors worth logging as an artifact at set steps (means, sigmas, samples).
    - ``scores_per_item`` (``permutation`` kind, ``source="keys"``): how many scores per item
      ``forward`` reads, 1 (a scalar key, the default) or the spec's ``n`` (one score per output
      position). Set it in ``__init__``; tasks size their scoring network's head by it, so one
      task serves key-based and position-scoring estimators alike.
    """

    scores_per_item: int = 1

    def objective(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        return per_sample_loss.mean()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {}


class FullImageReadout(StructureLayer):
    """The answer to a ``GlimpseSpec`` from an estimator that takes no glimpse at all.

    The task then classifies from the source network's own features (the paper's dense baseline:
    the same ConvNet extended with a classification layer).
    """

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FullImageReadout takes no glimpse; the task reads source features")


class Estimator:
    """Base class for estimator plugins. Subclass it and register an instance.

    Required:
    - ``name``: unique, lower-case identifier used on the command line and in run names.
    - ``description``: one line for ``sparsebench list``.
    - ``kinds``: the structure kinds this estimator can build (subset of ``KINDS``).
    - ``build(spec, params)``: return a ``StructureLayer`` for the spec, or raise ``Unsupported``.
    Optional:
    - ``defaults``: hyperparameters and their default values; config keys under
      ``[estimators.<name>]`` must be among them (their types are checked against the defaults).
    - ``choices``: for string parameters with a fixed set of values, that set (checked too).
    - ``unsupported(spec, params)``: a reason string when a spec of a supported kind (or these
      parameters) still cannot be served; checked before any training, so the matrix says ``n/a``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kinds: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if spec.kind not in self.kinds:
            return f"{self.name} builds {sorted(self.kinds)}, not {spec.kind}"
        return None

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        raise NotImplementedError
