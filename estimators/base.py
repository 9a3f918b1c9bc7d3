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

from estimators.params import KINDS, Kinds, ParamError, Parameters

__all__ = [
    "KINDS",
    "MAX_OUTCOMES",
    "Estimator",
    "Outcomes",
    "FullImageReadout",
    "GlimpseLayer",
    "GlimpseSpec",
    "PermutationOutput",
    "ParamError",
    "PermutationSpec",
    "SparseMatrixSpec",
    "Spec",
    "StructureLayer",
    "Unsupported",
    "hookimpl",
    "repeat_samples",
    "training_samples",
]

#: Marks a plugin's hook implementations; the same marker as ``harness.hookimpl``.
hookimpl = pluggy.HookimplMarker("sparsebench")

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
    Layers subclass ``GlimpseLayer``, whose ``corners`` and ``box_pixels`` give the task the box
    geometry. An estimator that reads the whole image instead returns a ``FullImageReadout``.
    """

    image_shape: tuple[int, int, int]
    size: int
    glimpses: int
    kind: ClassVar[Literal["glimpse"]] = "glimpse"


Spec = SparseMatrixSpec | PermutationSpec | GlimpseSpec


@dataclass
class PermutationOutput:
    """Soft (training) or hard (eval) permutation matrices, ``x_sorted = matrix @ x``.

    ``steps`` holds the factors in order of application, each ``(b, n, n)``: one entry for
    estimators that produce the permutation at once, several for one that sorts in stages
    (quicksort's ``log2 n`` half-permutations). ``intermediate`` says the stages are a sorting
    procedure's intermediate states that a task may supervise one by one (the sorting task's
    intermediate loss, §3.3, and the states of Fig. 7); tasks read them only through
    ``intermediate_inputs`` and ``intermediate_targets``, so any estimator can offer them.
    ``extras`` holds whatever else the layer wants to expose (logged or ignored by tasks).
    """

    steps: list[torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    intermediate: bool = False

    @property
    def matrix(self) -> torch.Tensor:
        """The composed permutation, ``steps[-1] @ ... @ steps[0]``; ``(b, n, n)``."""
        out = self.steps[0]
        for step in self.steps[1:]:
            out = step @ out
        return out

    def intermediate_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x_0 = x``, ``x_d = P_d x_{d-1}``: the data ``(b, n, ...)`` after every step."""
        out = [x]
        for step in self.steps:
            out.append(_apply(step, out[-1]))
        return out

    def intermediate_targets(self, target: torch.Tensor) -> list[torch.Tensor]:
        """``t_L = target`` (sorted), ``t_{d-1} = P_d^T t_d``; aligned with ``intermediate_inputs``.

        The reversed steps tell every intermediate state what it should hold if the keys were in
        the right order (the paper's intermediate loss sums ``BCE(x_d, t_d)`` over ``d``).
        """
        out = [target]
        for step in reversed(self.steps):
            out.insert(0, _apply(step.transpose(-1, -2), out[0]))
        return out


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` over the item axis of ``x: (b, n, *rest)``; ``matrix`` is ``(b, n, n)``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)  # (b, n, m)
    return (matrix @ flat).view_as(x)


#: The most outcomes ``StructureLayer.outcomes`` lists; a layer raises ``ValueError`` beyond it.
MAX_OUTCOMES = 20_000


@dataclass
class Outcomes:
    """A layer's own distribution, listed: every hard structure its training forward can draw for
    the given inputs and the log-probability of drawing it. ``structures`` is ``(m, n, n)``
    permutation matrices (``permutation``), ``(m, *out_shape, *in_shape)`` weights
    (``sparse_matrix``) or the pixels read ``(m, g, size, size, 2)`` as ``(row, col)``
    (``glimpse``); ``log_probs`` is ``(m,)``, differentiable in the layer's parameters and
    its inputs, so that the exact gradient of an expected loss is ``grad sum_j p_j L(structure_j)``.
    """

    structures: torch.Tensor
    log_probs: torch.Tensor


class StructureLayer(nn.Module):
    """Base for the layers estimators build.

    ``forward`` follows the contract of the spec's kind (see each spec's docstring); ``eval()``
    makes the structure deterministic. Optional overrides:

    - ``samples``: how many structures the layer wants per instance in *training* (an int >= 1,
      default 1; set it in ``__init__``). The task repeats every training instance ``S =
      samples`` times at the layer's input, *sample-major*: a batch of ``b`` instances reaches
      ``forward`` as ``S * b`` rows (``repeat_samples``), row ``s * b + i`` being sample ``s`` of
      instance ``i``, so the layer draws one structure per row, adaptive (per-input) structures
      included. The task's networks before the layer run once per instance (their outputs are
      repeated); what follows the layer runs per row. Evaluation is always one deterministic
      pass per instance, whatever ``samples`` says.
    - ``objective(per_sample_loss)``: turns the losses into the scalar to minimise. A task calls
      it exactly once after every *training* forward, with ``per_sample_loss`` of shape ``(S *
      b,)`` in the same sample-major layout (``per_sample_loss.view(S, b)[s, i]`` is sample ``s``
      of instance ``i``), whatever the layer sampled internally (a layer that draws several
      structures per row assigns them itself and regroups the losses here). The default is the
      mean over (sample, instance). Score-function estimators add their surrogate term from what
      they recorded in the last ``forward``, on the *detached* losses: the gradient of the result
      with respect to ``per_sample_loss`` must stay the mean's (``1/(S b)`` each), so the task's
      own networks train alike under every estimator (their gradient is the mean over sample and
      instance).
    - ``snapshot()``: tensors worth logging as an artifact at set steps (means, sigmas, samples).
    - ``outcomes(*inputs)``: the layer's distribution over hard structures, enumerated
      (``Outcomes``), for the gradient study (``plugins.gradient_study``) to compute the exact
      gradient of the expected loss that the layer's gradient estimates; ``inputs`` are one
      instance's forward inputs (keys ``(1, n)`` or scores ``(1, n, n)`` for a ``permutation``;
      none for a ``sparse_matrix``; images ``(1, c, h, w)`` and boxes ``(1, g, 4)`` for a
      ``glimpse``). The default, ``None``, declares no distribution (a
      deterministic relaxation, or probabilities with no closed form): the study then reports
      what is defined without one (variance) and marks the estimator. Small problems only: the
      study keeps ``m`` in the hundreds.
    - ``scores_per_item`` (``permutation`` kind, ``source="keys"``): how many scores per item
      ``forward`` reads, 1 (a scalar key, the default) or the spec's ``n`` (one score per output
      position). Set it in ``__init__``; tasks size their scoring network's head by it, so one
      task serves key-based and position-scoring estimators alike.

    Register every tensor the layer keeps as a parameter or buffer, so ``.to(device)`` moves it
    and ``state_dict()`` checkpoints it.
    """

    scores_per_item: int = 1
    samples: int = 1

    def objective(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        return per_sample_loss.mean()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {}

    def outcomes(self, *inputs: torch.Tensor) -> Outcomes | None:
        return None


def training_samples(layer: nn.Module) -> int:
    """``S``, the rows per instance a task feeds ``layer`` now: its ``samples`` in training, 1 in
    ``eval()``. ``ValueError`` naming the layer unless ``samples`` is an int >= 1."""
    if not layer.training:
        return 1
    samples = getattr(layer, "samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"{type(layer).__name__}.samples = {samples!r}: the training samples per instance "
            "must be an int >= 1"
        )
    return samples


def repeat_samples(x: torch.Tensor, samples: int) -> torch.Tensor:
    """``x`` ``(b, ...)`` repeated ``samples`` times, sample-major: ``(samples * b, ...)`` with row
    ``s * b + i`` a copy of ``x[i]``; ``x`` itself when ``samples`` is 1 (no copy, so that one
    sample per instance computes exactly what it did before several were possible)."""
    if samples == 1:
        return x
    return x.repeat(samples, *([1] * (x.dim() - 1)))


class GlimpseLayer(StructureLayer):
    """Base for layers that answer a ``GlimpseSpec`` by reading pixels inside a box.

    The box geometry is part of the contract, so that a task can measure and draw the boxes of any
    estimator (the attention task's saturation metric and Fig. 4's boxes):

    - the source network emits four raw values per glimpse, ``(y0, x0, y1, x1)``: two opposite
      corners as (row, column) in *logit* space; ``corners(boxes)`` adds a fixed offset
      ``(-o, -o, +o, +o)`` (``box_offset``) so that the untrained box covers the middle of the
      image instead of a point, and returns the corners' sigmoid pre-activations;
    - read-out points are placed between the corners in logit space; the sigmoid and the rescaling
      to pixel coordinates (``to_pixels``) come afterwards (the paper's order, §3.2), so a point's
      pixel coordinate is ``sigmoid(z) * (extent - 1)``;
    - ``box_pixels(boxes, h, w)`` is the box outline in pixel coordinates.

    Subclasses implement ``forward(images (b, c, h, w), boxes (b, g, 4)) -> (b, g, c, k, k)``;
    one with another parametrisation overrides ``corners`` and ``to_pixels`` together.
    """

    def __init__(self, spec: GlimpseSpec, box_offset: float = 1.0) -> None:
        super().__init__()
        if spec.size < 1 or spec.glimpses < 1:
            raise ValueError(f"glimpse size and count must be >= 1, got {spec.size}, {spec.glimpses}")
        self.spec = spec
        offset = torch.tensor([-box_offset, -box_offset, box_offset, box_offset])
        self.register_buffer("offset", offset, persistent=False)

    def corners(self, boxes: torch.Tensor) -> torch.Tensor:
        """Raw source outputs ``(b, g, 4)`` -> corner pre-activations ``(b, g, 4)`` (logit space)."""
        return boxes + self.offset

    def to_pixels(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Logit-space ``(..., 2)`` points ``(y, x)`` -> continuous pixel coordinates ``(..., 2)``."""
        extent = torch.tensor([height - 1, width - 1], device=z.device, dtype=z.dtype)
        return torch.sigmoid(z) * extent

    def box_pixels(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The box outline in pixel coordinates, ``(b, g, 4)`` as ``(y0, x0, y1, x1)``."""
        pairs = self.corners(boxes).unflatten(-1, (2, 2))  # (b, g, 2, 2): [[y0, x0], [y1, x1]]
        return self.to_pixels(pairs, height, width).flatten(-2)  # (b, g, 4)

    def check_input(self, images: torch.Tensor, boxes: torch.Tensor) -> None:
        b, g = images.shape[0], self.spec.glimpses
        if images.dim() != 4 or boxes.shape != (b, g, 4):
            raise ValueError(
                f"expected images (b, c, h, w) and boxes (b, {g}, 4), "
                f"got {tuple(images.shape)} and {tuple(boxes.shape)}"
            )


class FullImageReadout(StructureLayer):
    """The answer to a ``GlimpseSpec`` from an estimator that takes no glimpse at all.

    The task then classifies from the source network's own features (the paper's dense baseline:
    the same ConvNet extended with a classification layer).
    """

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FullImageReadout takes no glimpse; the task reads source features")


class Estimator(Parameters):
    """Base class for estimator plugins. Subclass it and register an instance.

    Required:
    - ``name``: unique, lower-case identifier used on the command line and in run names.
    - ``description``: one line for ``sparsebench list``.
    - ``kinds``: the structure kinds this estimator can build (drawn from ``KINDS``).
    - a builder for every kind in ``kinds``: ``build_sparse_matrix``, ``build_permutation``,
      ``build_glimpse`` (``(spec, params) -> StructureLayer``), which ``build`` calls once
      ``unsupported`` has passed the spec; or ``build(spec, params)`` itself, which must then
      raise ``Unsupported`` for what it cannot serve. ``params`` is the resolved ``defaults``
      (every key present, values checked).
    Optional:
    - ``defaults``, ``choices``, ``positive``, ``non_negative`` and ``check(params)``: the
      parameters, declared as a task declares its own (``estimators.params.Parameters``); the
      config section is ``[estimators.<name>]``, and ``check`` raises ``ParamError`` (or any
      ``ValueError``) naming the key, so a bad value stops the command before anything is written.
    - ``space``: what a ``[tuning]`` ruleset may try for each parameter (``Range``, ``Choice``),
      so that the estimator is tuned as every other one is, not run at its defaults.
    - ``unsupported(spec, params)``: a reason string when a spec of a supported kind (or these
      parameters) still cannot be served; checked before any training, so the matrix says ``n/a``.
      It must agree with ``build`` (``sparsebench check-plugin`` verifies that); an ``Unsupported``
      that ``build`` raises anyway also makes the cell ``n/a``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kinds: ClassVar[Kinds] = frozenset()

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if spec.kind not in self.kinds:
            return f"{self.name} builds {sorted(self.kinds)}, not {spec.kind}"
        return None

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        """``Unsupported`` with ``unsupported``'s reason, else the layer of the spec's kind builder.

        The guard lives here once so that a builder only ever sees specs it serves.
        """
        reason = self.unsupported(spec, params)
        if reason:
            raise Unsupported(reason)
        if isinstance(spec, SparseMatrixSpec):
            return self.build_sparse_matrix(spec, params)
        if isinstance(spec, PermutationSpec):
            return self.build_permutation(spec, params)
        return self.build_glimpse(spec, params)

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        raise NotImplementedError(f"{self.name} claims sparse_matrix but defines no build_sparse_matrix")

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        raise NotImplementedError(f"{self.name} claims permutation but defines no build_permutation")

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        raise NotImplementedError(f"{self.name} claims glimpse but defines no build_glimpse")
