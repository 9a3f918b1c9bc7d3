"""The ``bilinear`` estimator: a differentiable glimpse by bilinear sampling (as in STNs).

A second baseline for the attention task beside the paper's dense ConvNet: the glimpse is placed
exactly as the sparse layer places it, but every read-out point interpolates its four neighbouring
pixels, so the box gets an exact (if very local) gradient with no sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from estimators.base import Estimator, GlimpseSpec, Spec, StructureLayer, Unsupported, hookimpl
from estimators.layers.glimpse import BilinearGlimpse

__all__ = ["BilinearEstimator", "register_estimators"]


class BilinearEstimator(Estimator):
    """Builds a ``BilinearGlimpse`` for a ``GlimpseSpec``; no other kind."""

    name: ClassVar[str] = "bilinear"
    description: ClassVar[str] = "bilinear-sampling glimpse (spatial-transformer style), exact gradient"
    kinds: ClassVar[frozenset[str]] = frozenset({"glimpse"})
    defaults: ClassVar[Mapping[str, Any]] = {"box_offset": 1.0}
    positive: ClassVar[tuple[str, ...]] = ("box_offset",)

    def build(self, spec: Spec, params: Mapping[str, Any]) -> StructureLayer:
        if not isinstance(spec, GlimpseSpec):
            raise Unsupported(self.unsupported(spec) or f"{self.name} builds glimpses only")
        return BilinearGlimpse(spec, **{**self.defaults, **params})


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(BilinearEstimator())
