"""The ``reinforce`` estimator: score-function gradients, with an optional detached baseline.

- ``sparse_matrix``: the sparse layer's parametrisation, one sampled integer tuple per continuous
  tuple (the paper's identity baseline, §3.1). With ``samples = 0``, ``baseline = "none"``,
  ``log_prob = "continuous"``, ``fix_values = true`` and ``sigma = "std"`` it is the authors'
  estimator (one structure per instance, the Gaussian log-density of the unrounded draw, values
  fixed at 1, as the sparse layer's, sigma read as a standard deviation); the defaults add our
  variance reduction and read sigma as a variance, as the sparse layer does.
- ``glimpse``: ours, a one-shot Gaussian policy over the glimpse box (not RAM, which is recurrent).
- ``permutation`` from keys: permutations sampled from a Plackett-Luce distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import (
    Estimator,
    GlimpseSpec,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
    hookimpl,
)

__all__ = ["ReinforceEstimator", "register_estimators"]


class ReinforceEstimator(Estimator):
    name: ClassVar[str] = "reinforce"
    description: ClassVar[str] = "score-function (REINFORCE) gradients; the paper's identity baseline"
    kinds: ClassVar[frozenset[str]] = frozenset({"sparse_matrix", "glimpse", "permutation"})
    defaults: ClassVar[Mapping[str, Any]] = {
        "baseline": "moving_average",  # or "leave_one_out" (two or more draws), or "none"
        "baseline_decay": 0.9,
        # sparse_matrix: "discretised" (score of the rounded tuple) or "continuous" (the authors')
        "log_prob": "discretised",
        "samples": 0,  # sparse_matrix: structures per step; 0 = one per instance (the authors')
        "fix_values": True,  # sparse_matrix: values fixed at 1, like the sparse estimator's
        "tau": 0.1,  # sigma floor, as in the sparse layer
        # sparse_matrix: sigma read as a "variance" (the sparse layer's) or "std" (the authors')
        "sigma": "variance",
        "box_offset": 1.0,  # glimpse: initial box half-width in logit space
        "std": 0.5,  # glimpse: initial policy standard deviation (logit space)
        "learn_std": True,
    }

    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {
        "baseline": ("moving_average", "leave_one_out", "none"),
        "log_prob": ("discretised", "continuous"),
        "sigma": ("variance", "std"),
    }
    positive: ClassVar[tuple[str, ...]] = ("tau", "box_offset", "std")
    non_negative: ClassVar[tuple[str, ...]] = ("samples", "baseline_decay")

    def check(self, params: Mapping[str, Any]) -> None:
        if not params["baseline_decay"] < 1:
            decay = params["baseline_decay"]
            raise ValueError(f"baseline_decay = {decay!r} must be below 1 (it is the weight on the past)")
        if params["baseline"] == "leave_one_out" and params["samples"] == 1:
            raise ValueError(
                "baseline 'leave_one_out' needs samples = 0 (one draw per instance) or >= 2 "
                "(it averages the other draws)"
            )

    def unsupported(self, spec: Spec, params: Mapping[str, Any] | None = None) -> str | None:
        if isinstance(spec, PermutationSpec):
            if spec.source != "keys":
                return "reinforce samples permutations from keys (Plackett-Luce); no free permutation"
            p = {**self.defaults, **(params or {})}
            if p["samples"] != 0 or p["baseline"] == "leave_one_out":  # one draw per instance
                return (
                    "Plackett-Luce draws one permutation per instance (samples = 0) with a "
                    "moving-average or no baseline"
                )
        return super().unsupported(spec, params)

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        reason = self.unsupported(spec, params)
        if reason:
            raise Unsupported(reason)
        p = {**self.defaults, **params}
        if isinstance(spec, SparseMatrixSpec):
            from estimators.layers.matrix import ReinforceMatrixLayer

            return ReinforceMatrixLayer(
                spec,
                baseline=p["baseline"],
                log_prob=p["log_prob"],
                samples=p["samples"],
                baseline_decay=p["baseline_decay"],
                tau=p["tau"],
                fix_values=p["fix_values"],
                sigma=p["sigma"],
            )
        if isinstance(spec, GlimpseSpec):
            from estimators.layers.glimpse import ReinforceGlimpse

            return ReinforceGlimpse(
                spec,
                box_offset=p["box_offset"],
                std=p["std"],
                learn_std=p["learn_std"],
                baseline_decay=p["baseline_decay"],
                baseline=p["baseline"],
            )
        from estimators.layers.permutation import PlackettLuceLayer

        return PlackettLuceLayer(spec, baseline=p["baseline"], baseline_decay=p["baseline_decay"])


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(ReinforceEstimator())
