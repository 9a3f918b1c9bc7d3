"""Glimpse geometry shared by the built-in glimpse layers: where a box's read-out points lie.

Every glimpse layer answers a ``GlimpseSpec`` and shares the box parametrisation of the contract's
``estimators.base.GlimpseLayer``, so that estimators differ only in how a gradient reaches the box:

- the source network emits four raw values per glimpse, ``(y0, x0, y1, x1)``: two opposite corners
  as (row, column) in *logit* space (the layout of ``estimators.sparse.glimpse_means``); a fixed
  offset ``(-o, -o, +o, +o)`` makes the untrained box cover the middle of
  the image (``sigmoid(+-1)`` spans about 46% of each side) instead of a point;
- ``size x size`` equally spaced points are placed between the corners, still in logit space;
- the sigmoid and the rescaling to pixel coordinates are applied to the points afterwards (the
  paper's order, section 3.2), so a point's pixel coordinate is ``sigmoid(z) * (extent - 1)``.

The layers: ``SparseGlimpseLayer`` (``estimators.plugins.sparse``), ``BilinearGlimpse``
(``estimators.plugins.bilinear``) and ``ReinforceGlimpse`` (``estimators.plugins.reinforce``).
"""

from __future__ import annotations

import torch

__all__ = ["box_points"]


def box_points(corners: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` equally spaced points between two corners; all in logit space.

    corners: ``(..., 4)`` as ``(y0, x0, y1, x1)``. Returns ``(..., size, size, 2)`` with ``(y, x)``
    in the last dimension; point ``[0, 0]`` sits on ``(y0, x0)`` and ``[-1, -1]`` on ``(y1, x1)``.
    """
    steps = torch.linspace(0.0, 1.0, size, device=corners.device, dtype=corners.dtype)
    if size == 1:  # one point: the centre of the box
        steps = steps + 0.5
    y0, x0, y1, x1 = corners.unbind(-1)  # each (...)
    ys = y0[..., None] + steps * (y1 - y0)[..., None]  # (..., size)
    xs = x0[..., None] + steps * (x1 - x0)[..., None]  # (..., size)
    grid_y = ys[..., :, None].expand(*ys.shape, size)  # (..., size, size)
    grid_x = xs[..., None, :].expand(*xs.shape[:-1], size, size)  # (..., size, size)
    return torch.stack([grid_y, grid_x], dim=-1)
