"""Glimpses as one adaptive sparse layer whose structure is learned along two dimensions (§3.2).

All ``g`` glimpses of ``size x size`` pixels share one sparse tensor ``W`` of shape
``(g, c, size, size) + (c, h, w)`` (output dims first), so one call reads every glimpse. Each output
pixel ``(glimpse, ch, i, j)`` has exactly one continuous index tuple whose first five coordinates
are fixed integers (the output pixel itself and its channel ``ch``); only the input row and column
(dimensions 5 and 6) are learned, sampled and weighted (``learn_dims=(5, 6)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from estimators.sparse import functional as SF
from estimators.sparse.functional import SparseLayerError

__all__ = ["SparseGlimpse", "glimpse_means"]

_LEARNED = (5, 6)  # input row and column in (g, c, size, size, c, h, w)


def glimpse_means(boxes: Tensor, image_shape: Sequence[int], size: int) -> Tensor:
    """Index-space means ``(b, g * c * size * size, 7)`` for raw boxes ``(b, g, 4)``.

    A box is ``(row_a, col_a, row_b, col_b)`` in unconstrained coordinates; ``size`` equally spaced
    points between the corners are placed first and the sigmoid and rescaling to pixel indices are
    applied afterwards, as in the paper (so a glimpse may be non-uniformly spaced on the image).
    """
    c, h, w = (int(n) for n in image_shape)
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise SparseLayerError(f"boxes must be (b, glimpses, 4), got {tuple(boxes.shape)}")
    b, g, _ = boxes.shape
    steps = torch.linspace(0, 1, size, dtype=boxes.dtype, device=boxes.device) if size > 1 else (
        boxes.new_full((1,), 0.5)
    )  # (size,)
    rows = boxes[..., 0:1] + (boxes[..., 2:3] - boxes[..., 0:1]) * steps  # (b, g, size)
    cols = boxes[..., 1:2] + (boxes[..., 3:4] - boxes[..., 1:2]) * steps  # (b, g, size)
    rows = torch.sigmoid(rows) * (h - 1)
    cols = torch.sigmoid(cols) * (w - 1)

    grid = (g, c, size, size)
    fixed = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=boxes.device) for n in grid), indexing="ij"), -1
    ).to(boxes.dtype)  # (g, c, size, size, 4): glimpse, channel, out row, out col
    means = torch.cat(
        [
            fixed.expand(b, *grid, 4),
            fixed[..., 1:2].expand(b, *grid, 1),  # input channel = output channel
            rows[:, :, None, :, None, None].expand(b, *grid, 1),
            cols[:, :, None, None, :, None].expand(b, *grid, 1),
        ],
        dim=-1,
    )  # (b, g, c, size, size, 7)
    return means.reshape(b, -1, 7)


class SparseGlimpse(nn.Module):
    """``forward(images (b, c, h, w), boxes (b, g, 4)) -> (b, g, c, size, size)``.

    Learned: one value per glimpse (shared by all its connections, init 1) and one raw sigma per
    glimpse (the variance along rows and columns, as ``functional.transform_sigmas``). Defaults are
    the paper's attention settings: ``a_l=32``, ``a_g=16``, a ``(20, 20)`` sampling region.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        size: int,
        glimpses: int,
        *,
        a_l: int = 32,
        a_g: int = 16,
        region: Sequence[int] = (20, 20),
        tau: float = 0.1,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise SparseLayerError(f"image_shape must be (c, h, w), got {tuple(image_shape)}")
        if size < 1 or glimpses < 1:
            raise SparseLayerError(f"size and glimpses must be >= 1, got {size}, {glimpses}")
        if len(region) != 2:
            raise SparseLayerError(f"region must be (rows, cols), got {tuple(region)}")
        self.image_shape = tuple(int(n) for n in image_shape)
        self.size, self.glimpses = size, glimpses
        c = self.image_shape[0]
        self.out_shape = (glimpses, c, size, size)
        self.shape = SF.weight_shape(self.image_shape, self.out_shape)
        self.region = SF._region((1, 1, 1, 1, 1, *region), self.shape)
        SF._counts(a_l, a_g)
        self.a_l, self.a_g, self.tau, self.chunk = a_l, a_g, tau, chunk
        self.values = nn.Parameter(torch.ones(glimpses))
        self.sigmas_raw = nn.Parameter(torch.zeros(glimpses))

    def forward(self, images: Tensor, boxes: Tensor) -> Tensor:
        b = images.shape[0]
        per_glimpse = self.image_shape[0] * self.size * self.size
        means = glimpse_means(boxes, self.image_shape, self.size)  # (b, k, 7)
        values = self.values.repeat_interleave(per_glimpse).expand(b, -1)  # (b, k)
        if not self.training:
            return SF.rounded_product(images, means, values, self.image_shape, self.out_shape)
        sigmas = SF.transform_sigmas(self.sigmas_raw, self.shape, self.tau)  # (g, 7)
        sigmas = sigmas.repeat_interleave(per_glimpse, dim=0).expand(b, -1, -1)  # (b, k, 7)
        return SF.sparse_product(
            images, means, sigmas, values, self.image_shape, self.out_shape, a_l=self.a_l,
            a_g=self.a_g, region=self.region, learn_dims=_LEARNED, chunk=self.chunk,
        )
