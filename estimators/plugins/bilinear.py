"""The ``bilinear`` estimator: a differentiable glimpse by bilinear sampling (as in STNs).

A second baseline for the attention task beside the paper's dense ConvNet: the glimpse is placed
exactly as the sparse layer places it, but every read-out point interpolates its four neighbouring
pixels, so the box gets an exact (if very local) gradient with no sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from estimators.base import Estimator, GlimpseLayer, GlimpseSpec, StructureLayer, hookimpl
from estimators.shared.glimpse import box_points

__all__ = ["BilinearEstimator", "BilinearGlimpse", "register_estimators"]


class BilinearEstimator(Estimator):
    """Builds a ``BilinearGlimpse`` for a ``GlimpseSpec``; no other kind."""

    name: ClassVar[str] = "bilinear"
    description: ClassVar[str] = "bilinear-sampling glimpse (spatial-transformer style), exact gradient"
    kinds: ClassVar[frozenset[str]] = frozenset({"glimpse"})
    defaults: ClassVar[Mapping[str, Any]] = {"box_offset": 1.0}
    positive: ClassVar[tuple[str, ...]] = ("box_offset",)

    def build_glimpse(self, spec: GlimpseSpec, params: Mapping[str, Any]) -> StructureLayer:
        return BilinearGlimpse(spec, box_offset=params["box_offset"])


class BilinearGlimpse(GlimpseLayer):
    """Differentiable glimpse by bilinear sampling at the box's points (STN-style).

    The gradient reaches the box through the interpolation weights, i.e. through the local image
    gradient only (within one pixel of each point); no sampling, no variance.
    """

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        b, c, h, w = images.shape
        g, k = self.spec.glimpses, self.spec.size
        pixels = self.to_pixels(box_points(self.corners(boxes), k), h, w)  # (b, g, k, k, 2) (y, x)
        # grid_sample wants (x, y) in [-1, 1]; with align_corners=True, -1 and 1 are pixel centres
        scale = torch.tensor([w - 1, h - 1], device=images.device, dtype=images.dtype).clamp(min=1)
        grid = pixels.flip(-1) / scale * 2 - 1  # (b, g, k, k, 2)
        grid = grid.reshape(b, g * k, k, 2)
        out = F.grid_sample(images, grid, mode="bilinear", align_corners=True)  # (b, c, g*k, k)
        return out.reshape(b, c, g, k, k).transpose(1, 2)  # (b, g, c, k, k)


@hookimpl
def register_estimators(register: Callable[[Estimator], None]) -> None:
    register(BilinearEstimator())
