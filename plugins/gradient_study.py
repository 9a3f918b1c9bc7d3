"""The gradient study: each estimator's gradient against the exact one, on problems small enough to
list every outcome (``sparsebench run --preset gradient-study``).

Three tasks, one per structure kind, each with a listable support:

- ``study_permutation``: sort ``n <= 5`` fixed values by learned keys ``theta`` (``(1, n)``, or
  ``(1, n, n)`` scores for a layer reading one score per output position); the loss of a
  permutation ``P`` is ``mean((P x - sorted(x))^2)``.
- ``study_matrix``: a learned ``n x n`` sparse matrix with ``k`` tuples (``(n^2)^k`` outcomes)
  applied to one fixed vector ``x``; the loss of ``W`` is ``mean((W x - x)^2)`` (the identity task's).
- ``study_glimpse``: ``glimpses`` reads of ``size x size`` pixels (one-pixel reads list ``(image^2)^g``
  outcomes) from a fixed ``image x image`` picture, placed by a learned raw box; the loss of a read
  is ``mean((pixel - 1/2)^2)``. An estimator that reads no glimpse (``FullImageReadout``) has
  nothing that depends on the box: zero gradient, marked.

The exact gradient is that of the expected loss under the layer's own distribution,
``grad sum_j p_j L(structure_j)``, from ``StructureLayer.outcomes`` (the layer lists its outcomes
and their log-probabilities); a layer that declares none (a deterministic relaxation, or
probabilities with no closed form) gets no bias, only what is defined without it, and
``test/declared = 0`` marks it. An estimate from S samples is the gradient of the layer's own
``objective`` on S samples of ONE instance, as the several-samples contract has training take
them: the layer's ``samples`` is set to S and it is fed the instance S times (``b = 1`` in the
sample-major layout), so rloo's leave-one-out baseline is taken among those S; a layer's
``min_samples`` (rloo: 2) leaves out the counts below it (no number rather than a made-up one).
``draws`` such estimates give, for each S in ``samples``, the variance ``tr Cov``, the squared
bias ``||E g - g*||^2`` (less the ``var / draws`` its estimate carries, so it is unbiased) and
their sum, the mean squared error, all relative to ``||g*||^2`` (to ``||E g||^2`` without a
distribution); and the cosine of ``E g`` to ``g*``. ``var`` repeats the variance at the largest
S the layer took, the cell's primary metric (defined for every estimator). A relaxation's temperature is an
estimator parameter, so the preset sweeps it like any other.

Before the draws the layer trains ``warmup`` forwards (with its own ``samples``, no optimiser
step) so that a running baseline holds a typical value; every draw then starts from that same
state. The study is a cell like any other (the matrix, n/a, the store, the report): its one
training step computes it (in training mode, from the cell's seed, putting the layer's state
back) and returns a zero objective, which leaves the parameters where they are; the evaluation
after it reports it. The numbers come twice, from two independent seeds of draws: ``test/*``
from the cell's seed and ``val/*`` from the next, so that a sweep (a relaxation's temperature)
is chosen on draws the reported numbers never saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from estimators.base import (
    FullImageReadout,
    GlimpseSpec,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    hookimpl,
    training_samples,
)
from harness.task import CellSetup, Task, TaskRun

__all__ = [
    "GlimpseStudy",
    "GradientStudy",
    "MatrixStudy",
    "PermutationStudy",
    "register_tasks",
    "study_metrics",
]

#: (the model, S -> per-sample losses of S fresh draws (S,), structures -> their losses (m,), inputs
#: of one instance for ``StructureLayer.outcomes``)
Problem = tuple[nn.Module, Callable[[int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], tuple]

_COMMON: Mapping[str, Any] = {
    "steps": 1,
    "eval_every": 1,
    "lr": 0.001,  # the runner's; the objective is zero, so nothing moves
    "batch_size": 1,
    "draws": 200,  # estimates per sample count
    "samples": [1, 4, 16],  # S: structures per estimate
    "warmup": 20,  # training forwards before the draws, for running baselines
}


class GradientStudy(Task):
    """What both studies share: the parameters, the metrics and the cell's shape."""

    # the variance at the largest S: every estimator has it (rloo has none from one sample)
    primary_metric = "test/var"
    select_metric = "val/var"
    size_key = "n"
    resources: Mapping[str, float] = {"num_cpus": 1, "num_gpus": 0.0}

    def expected_seconds(self, params: Mapping[str, Any]) -> float:
        return 0.002 * params["draws"] * sum(params["samples"])

    def check(self, params: Mapping[str, Any]) -> None:
        if not params["samples"] or min(params["samples"]) < 1:
            raise ValueError(f"samples = {params['samples']!r}: give sample counts >= 1")
        if params["draws"] < 2:
            raise ValueError(f"draws = {params['draws']}: the variance needs at least 2")

    def problem(self, cell: CellSetup, gen: torch.Generator) -> Problem:
        raise NotImplementedError

    def setup(self, cell: CellSetup) -> TaskRun:
        gen = torch.Generator().manual_seed(cell.seed)
        model, draw, losses, inputs = self.problem(cell, gen)
        model.to(cell.device)
        params = [p for p in model.parameters() if p.requires_grad]
        found: dict[str, float] = {}

        def train_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            if not found:  # once, in training mode; seeded apart, so whoever calls first gets the same
                for split, seed in (("test", cell.seed), ("val", cell.seed + 1)):
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        found.update(
                            study_metrics(cell.layer, params, draw, losses, inputs, cell.params, split)
                        )
            return torch.stack([p.sum() for p in params]).sum() * 0.0, {}

        def evaluate() -> dict[str, float]:
            return dict(found)  # nothing before the first step computes it

        return TaskRun(
            model=model,
            steps=cell.params["steps"],
            eval_every=cell.params["eval_every"],
            train_step=train_step,
            evaluate=evaluate,
            provenance={"data.source": f"synthetic-{self.name}"},
        )


def _gradient(value: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    if not value.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
        for g, p in zip(grads, params, strict=True)
    ])  # fmt: skip


def study_metrics(
    layer: StructureLayer,
    params: list[nn.Parameter],
    draw: Callable[[int], torch.Tensor],
    losses: Callable[[torch.Tensor], torch.Tensor],
    inputs: tuple,
    p: Mapping[str, Any],
    split: str = "test",
) -> dict[str, float]:
    """The study's numbers for one layer (see the module's docstring), as ``<split>/<statistic>``."""
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    own = training_samples(layer)  # the layer's own S, restored at the end
    for _ in range(p["warmup"]):
        layer.objective(draw(own)).detach()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    outcomes = layer.outcomes(*inputs)
    out: dict[str, float] = {f"{split}/declared": float(outcomes is not None)}
    exact = None
    if outcomes is not None:
        expected = (outcomes.log_probs.exp() * losses(outcomes.structures)).sum()
        exact = _gradient(expected, params)
        out |= {f"{split}/expected_loss": expected.item(), f"{split}/exact_norm": float(exact.norm())}
    for s in p["samples"]:
        if s < getattr(layer, "min_samples", 1):
            continue  # no estimate from so few (rloo's baseline needs two): nothing to report
        estimates = []
        layer.samples = s  # S samples of the one instance: b = 1 in the sample-major layout
        for _ in range(p["draws"]):
            layer.load_state_dict(state)
            estimates.append(_gradient(layer.objective(draw(s)), params))
        layer.samples = own
        g = torch.stack(estimates)  # (draws, d)
        mean = g.mean(0)
        var = float(((g - mean) ** 2).sum(1).mean() * p["draws"] / (p["draws"] - 1))
        scale = float(exact @ exact) if exact is not None else float(mean @ mean)
        if scale <= 0:
            scale = 1.0  # nothing to be relative to: absolute numbers
        out[f"{split}/var_s{s}"] = var / scale
        if exact is not None:
            bias2 = max(float((mean - exact) @ (mean - exact)) - var / p["draws"], 0.0)
            out[f"{split}/bias2_s{s}"] = bias2 / scale
            out[f"{split}/mse_s{s}"] = (bias2 + var) / scale
            if mean.norm() > 0 and exact.norm() > 0:
                out[f"{split}/cos_s{s}"] = float(mean @ exact / (mean.norm() * exact.norm()))
    reached = [s for s in p["samples"] if f"{split}/var_s{s}" in out]
    if reached:
        out[f"{split}/var"] = out[f"{split}/var_s{max(reached)}"]
    layer.load_state_dict(before)
    return {k: v for k, v in out.items() if math.isfinite(v)}


class PermutationStudy(GradientStudy):
    name = "study_permutation"
    description = "gradient study: sort n <= 5 values by learned keys, every ordering listed"
    kinds = ("permutation",)
    defaults: Mapping[str, Any] = {**_COMMON, "n": 4}
    smoke: Mapping[str, Any] = {"n": 4, "draws": 4, "samples": [1, 2], "warmup": 2}
    positive = ("n", "steps", "eval_every", "lr", "batch_size", "draws", "samples")
    non_negative = ("warmup",)

    def check(self, params: Mapping[str, Any]) -> None:
        super().check(params)
        if params["n"] > 5:
            raise ValueError(f"n = {params['n']}: the study lists all n! orderings, n <= 5")

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        return PermutationSpec(n=params["n"], source="keys")

    def problem(self, cell: CellSetup, gen: torch.Generator) -> Problem:
        n, layer, device = cell.params["n"], cell.layer, cell.device
        shape = (1, n) if layer.scores_per_item == 1 else (1, n, n)
        model = _Keys(torch.randn(shape, generator=gen), layer)
        x = torch.randn(n, generator=gen).to(device)
        target = x.sort().values

        def losses(matrices: torch.Tensor) -> torch.Tensor:  # (m, n, n) -> (m,)
            return ((matrices @ x - target) ** 2).mean(-1)

        def draw(s: int) -> torch.Tensor:
            out: PermutationOutput = layer(model.theta.expand(s, *shape[1:]))
            return losses(out.matrix)

        return model, draw, losses, (model.theta,)


class _Keys(nn.Module):
    """The learned keys, scores or box and the layer: the study's model."""

    def __init__(self, theta: torch.Tensor, layer: StructureLayer) -> None:
        super().__init__()
        self.theta, self.layer = nn.Parameter(theta), layer


class MatrixStudy(GradientStudy):
    name = "study_matrix"
    description = "gradient study: an n x n sparse matrix of k tuples on one vector, every draw listed"
    kinds = ("sparse_matrix",)
    defaults: Mapping[str, Any] = {**_COMMON, "n": 3, "k": 2}
    smoke: Mapping[str, Any] = {"n": 2, "k": 2, "draws": 4, "samples": [1, 2], "warmup": 2}
    positive = ("n", "k", "steps", "eval_every", "lr", "batch_size", "draws", "samples")
    non_negative = ("warmup",)

    def check(self, params: Mapping[str, Any]) -> None:
        super().check(params)
        if params["n"] ** (2 * params["k"]) > 20_000:
            raise ValueError(f"n = {params['n']}, k = {params['k']}: (n^2)^k outcomes, at most 20,000")

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        n = params["n"]
        return SparseMatrixSpec(in_shape=(n,), out_shape=(n,), k=params["k"])

    def problem(self, cell: CellSetup, gen: torch.Generator) -> Problem:
        n, layer = cell.params["n"], cell.layer
        x = torch.randn(1, n, generator=gen).to(cell.device)

        def losses(weights: torch.Tensor) -> torch.Tensor:  # (m, n, n) -> (m,)
            return ((weights @ x[0] - x[0]) ** 2).mean(-1)

        def draw(s: int) -> torch.Tensor:
            return ((layer(x.expand(s, n)) - x) ** 2).mean(-1)

        return layer, draw, losses, ()


class GlimpseStudy(GradientStudy):
    name = "study_glimpse"
    description = "gradient study: one-pixel glimpses of a small image from a learned box, every read listed"
    kinds = ("glimpse",)
    defaults: Mapping[str, Any] = {**_COMMON, "image": 3, "glimpses": 1, "size": 1}
    smoke: Mapping[str, Any] = {"image": 3, "draws": 4, "samples": [2, 4], "warmup": 2}
    positive = ("image", "glimpses", "size", "steps", "eval_every", "lr", "batch_size", "draws", "samples")
    non_negative = ("warmup",)
    size_key = "image"

    def check(self, params: Mapping[str, Any]) -> None:
        super().check(params)
        if params["image"] ** (2 * params["glimpses"]) > 20_000:
            raise ValueError(
                f"image = {params['image']}, glimpses = {params['glimpses']}: (image^2)^glimpses "
                "reads, at most 20,000"
            )

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        side = params["image"]
        return GlimpseSpec(image_shape=(1, side, side), size=params["size"], glimpses=params["glimpses"])

    def problem(self, cell: CellSetup, gen: torch.Generator) -> Problem:
        side, g, layer, device = cell.params["image"], cell.params["glimpses"], cell.layer, cell.device
        model = _Keys(0.5 * torch.randn(1, g, 4, generator=gen), layer)
        image = torch.rand(1, 1, side, side, generator=gen).to(device)
        target = 0.5

        def losses(pixels: torch.Tensor) -> torch.Tensor:  # (m, g, k, k, 2) read pixels -> (m,)
            return ((image[0, 0, pixels[..., 0], pixels[..., 1]] - target) ** 2).flatten(1).mean(-1)

        def draw(s: int) -> torch.Tensor:
            if isinstance(layer, FullImageReadout):  # no glimpse: nothing depends on the box
                return torch.full((s,), float(((image - target) ** 2).mean()), device=device)
            read = layer(image.expand(s, -1, -1, -1), model.theta.expand(s, -1, -1))  # (s, g, 1, k, k)
            return ((read - target) ** 2).flatten(1).mean(-1)

        return model, draw, losses, (image, model.theta)


@hookimpl
def register_tasks(register: Callable[[Task], None]) -> None:
    register(PermutationStudy())
    register(MatrixStudy())
    register(GlimpseStudy())
