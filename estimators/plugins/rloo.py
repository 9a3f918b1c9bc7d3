"""The ``rloo`` estimator: REINFORCE with the leave-one-out baseline over several samples of every
instance (Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!").

The layer asks for ``samples`` = S structures per instance (the contract's ``samples``); the task
feeds it every instance S times and hands back the S losses of each. Sample ``s`` of instance
``i`` gets the advantage ``L_si - mean_{s' != s} L_s'i``; the surrogate ``mean_si(advantage *
log p_si)`` is an unbiased estimate of the gradient of the expected loss, with no state and no
decay to tune. The sampling and the log-probabilities are the ``reinforce`` estimator's own
layers (``estimators.plugins.reinforce``), drawn once per row; only the baseline differs:

- ``sparse_matrix``: ``ReinforceMatrixLayer``, one integer tuple per continuous tuple per sample,
  the discretised log-probability by default (the score of the rounded tuple);
- ``permutation`` from keys: Plackett-Luce orderings (``PlackettLuceLayer``);
- ``glimpse``: the Gaussian box policy of ``ReinforceGlimpse``.

Default ``samples = 4``: the paper's title and its main setting (k = 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from estimators.base import (
    Estimator,
    GlimpseSpec,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    hookimpl,
)
from estimators.plugins.reinforce import PlackettLuceLayer, ReinforceGlimpse, ReinforceMatrixLayer
from estimators.shared.score_function import leave_one_out

__all__ = [
    "RlooEstimator",
    "RlooGlimpse",
    "RlooMatrixLayer",
    "RlooPlackettLuceLayer",
    "register_estimators",
]


class RlooEstimator(Estimator):
    name: ClassVar[str] = "rloo"
    description: ClassVar[str] = (
        "REINFORCE with a leave-one-out baseline over several samples per instance (Kool et al. 2019)"
    )
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "samples": 4,  # structures per instance (Kool et al. 2019: k = 4)
        # sparse_matrix, as the reinforce estimator's defaults
        "log_prob": "discretised",
        "fix_values": True,
        "tau": 0.1,
        "sigma": "variance",
        # glimpse, as the reinforce estimator's defaults
        "box_offset": 1.0,
        "std": 0.5,
        "learn_std": True,
    }
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "log_prob": ("discretised", "continuous"),
        "sigma": ("variance", "std"),
    }
    positive: ClassVar[tuple[str, ...]] = ("samples", "tau", "box_offset", "std")

    def check(self, params: Mapping[str, Any]) -> None:
        if params["samples"] < 2:
            raise ValueError(
                f"samples = {params['samples']}: a leave-one-out baseline needs 2 or more samples"
            )

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec) and spec.source != "keys":
            return "rloo samples permutations from keys (Plackett-Luce); no free permutation"
        return super().unsupported(spec, params)

    def build_sparse_matrix(self, spec: SparseMatrixSpec, params: Mapping[str, Any]) -> StructureLayer:
        return RlooMatrixLayer(
            spec,
            samples=params["samples"],
            log_prob=params["log_prob"],
            tau=params["tau"],
            fix_values=params["fix_values"],
            sigma=params["sigma"],
        )

    def build_permutation(self, spec: PermutationSpec, params: Mapping[str, Any]) -> StructureLayer:
        return RlooPlackettLuceLayer(spec, samples=params["samples"])

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        return RlooGlimpse(
            spec,
            samples=params["samples"],
            box_offset=params["box_offset"],
            std=params["std"],
            learn_std=params["learn_std"],
        )


def _check_samples(samples: int) -> int:
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a leave-one-out baseline, got {samples}")
    return samples


class RlooMatrixLayer(ReinforceMatrixLayer):
    """``ReinforceMatrixLayer`` drawing one structure per row (``S`` per instance), baseline LOO."""

    min_samples = 2  # the fewest samples per instance a leave-one-out baseline takes

    def __init__(self, spec: SparseMatrixSpec, *, samples: int = 4, **kwargs: Any) -> None:
        super().__init__(spec, baseline="none", samples=0, **kwargs)  # samples=0: a draw per row
        self.samples = _check_samples(samples)

    def baseline_of(self, draw_loss: torch.Tensor) -> torch.Tensor:
        return leave_one_out(draw_loss, self.samples)


class RlooPlackettLuceLayer(PlackettLuceLayer):
    """``PlackettLuceLayer`` with ``S`` orderings per instance, baseline LOO."""

    min_samples = 2  # the fewest samples per instance a leave-one-out baseline takes

    def __init__(self, spec: PermutationSpec, *, samples: int = 4) -> None:
        super().__init__(spec, baseline="none", samples=_check_samples(samples))

    def baseline_of(self, loss: torch.Tensor) -> torch.Tensor:
        return leave_one_out(loss, self.samples)


class RlooGlimpse(ReinforceGlimpse):
    """``ReinforceGlimpse`` with ``S`` boxes per image, baseline LOO."""

    min_samples = 2  # the fewest samples per instance a leave-one-out baseline takes

    def __init__(self, spec: GlimpseSpec, *, samples: int = 4, **kwargs: Any) -> None:
        super().__init__(spec, baseline="none", **kwargs)
        self.samples = _check_samples(samples)

    def baseline_of(self, cost: torch.Tensor) -> torch.Tensor:
        return leave_one_out(cost, self.samples)


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(RlooEstimator())
