"""The ``gumbel_sinkhorn`` estimator (Mena et al. 2018): permutations only.

Log-space Sinkhorn over Gumbel-perturbed scores; the hard permutation at evaluation is the
Hungarian solution (scipy's ``linear_sum_assignment``). On identity it learns ``n x n`` logits;
on sorting it reads ``n`` scores per item (one per output position) from the task's network, as
Mena et al.'s sorting networks do. It has no glimpse, so attention cells are n/a.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from estimators.base import Estimator, PermutationOutput, PermutationSpec, StructureLayer, hookimpl
from estimators.params import Choice
from estimators.shared.permutation import check_positive
from estimators.shared.sinkhorn import gumbel_sinkhorn, hungarian

__all__ = ["GumbelSinkhornEstimator", "GumbelSinkhornLayer", "register_estimators"]


class GumbelSinkhornEstimator(Estimator):
    name: ClassVar[str] = "gumbel_sinkhorn"
    description: ClassVar[str] = (
        "Gumbel-Sinkhorn relaxation (Mena et al. 2018), n_s samples per instance, Hungarian "
        "matching at evaluation"
    )
    kinds: ClassVar[frozenset[str]] = frozenset({"permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "temperature": 1.0,
        "iterations": 20,
        "noise": 1.0,
        "samples": 1,  # Gumbel samples per instance in training (Mena et al.'s n_s)
    }
    positive: ClassVar[tuple[str, ...]] = ("temperature", "iterations", "samples")
    non_negative: ClassVar[tuple[str, ...]] = ("noise",)  # 0: deterministic Sinkhorn
    # the relaxation's temperature: Grover et al. 2019 (D.1) tune the Sinkhorn baselines on this grid
    space: ClassVar[Mapping[str, Any]] = {"temperature": Choice((1.0, 2.0, 4.0, 8.0, 16.0))}

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return GumbelSinkhornLayer(
            spec,
            temperature=params["temperature"],
            iterations=params["iterations"],
            noise=params["noise"],
            samples=params["samples"],
        )


class GumbelSinkhornLayer(StructureLayer):
    """Gumbel-Sinkhorn (Mena et al. 2018) from per-item scores or from learned ``n x n`` logits.

    ``source="keys"``: as Mena et al.'s networks, the task's network gives every item ``n`` scores,
    one per output position (``scores_per_item = n``); ``forward(scores: (b, n, n))`` with
    ``scores[:, j, k]`` item ``j``'s score for position ``k``. Mena et al.'s operator runs on that
    item-major matrix (rows first, as ``google/gumbel_sinkhorn``'s ``sinkhorn_ops.py``) and the
    result is transposed into this package's convention ``x_sorted = P @ x`` (rows = positions);
    Mena et al. normalise the item-major columns last, so every output row sums to 1 exactly.
    ``source="free"`` learns the position-major logits and ``forward(batch_size)`` draws one noisy
    matrix per instance. ``eval()``: the Hungarian solution of the noiseless scores.

    ``samples`` (Mena et al.'s ``n_s``): Gumbel samples per instance in training, the contract's
    ``samples``: the task repeats every instance, each row draws its own noise, and the loss is
    the mean over samples and instances.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        *,
        temperature: float = 1.0,
        iterations: int = 20,
        noise: float = 1.0,
        samples: int = 1,
    ):
        super().__init__()
        check_positive("temperature", temperature)
        check_positive("iterations", iterations)
        check_positive("samples", samples)
        self.samples = samples
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.spec, self.temperature, self.iterations, self.noise = (
            spec,
            temperature,
            iterations,
            noise,
        )
        self.scores_per_item = spec.n if spec.source == "keys" else 1
        # small random logits break the symmetry of an all-zero start when noise is 0
        self.logits = (
            nn.Parameter(0.01 * torch.randn(spec.n, spec.n)) if spec.source == "free" else None
        )
        self._last: torch.Tensor | None = None

    @staticmethod
    def unsupported(spec: PermutationSpec) -> str | None:
        return None

    def forward(
        self, inputs: torch.Tensor | int, generator: torch.Generator | None = None
    ) -> PermutationOutput:
        if self.logits is None:
            n = self.spec.n
            if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or inputs.shape[1:] != (n, n):
                got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else inputs
                raise ValueError(
                    f"GumbelSinkhornLayer(source='keys') takes scores of shape (batch, {n}, {n}): "
                    f"{n} per item, one per output position; got {got!r}"
                )
            item_major, transpose = inputs, True  # (b, n items, n positions)
        else:
            if isinstance(inputs, torch.Tensor) or inputs < 1:
                raise TypeError(
                    f"GumbelSinkhornLayer(source='free') takes a batch size, got {inputs!r}"
                )
            item_major, transpose = self.logits.expand(inputs, -1, -1), False  # position-major
        if self.training:
            matrix = gumbel_sinkhorn(
                item_major,
                temperature=self.temperature,
                iterations=self.iterations,
                noise=self.noise,
                generator=generator,
            )
        elif self.logits is None:
            matrix = hungarian(item_major)
        else:  # one assignment serves every instance of the free permutation
            matrix = hungarian(self.logits.unsqueeze(0)).expand(inputs, -1, -1)
        if transpose:
            matrix = matrix.transpose(-1, -2)  # (b, positions, items)
        self._last = matrix[0].detach()
        return PermutationOutput(steps=[matrix])

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {} if self._last is None else {"matrix": self._last}
        if self.logits is not None:
            out["logits"] = self.logits.detach()
        return out


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(GumbelSinkhornEstimator())
