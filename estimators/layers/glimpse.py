"""Glimpse layers: read ``size x size`` pixels from an image at a box the source network predicts.

Every layer here answers a ``GlimpseSpec`` and shares the box parametrisation of the contract's
``estimators.base.GlimpseLayer`` (re-exported here), so that estimators differ only in how a
gradient reaches the box:

- the source network emits four raw values per glimpse, ``(y0, x0, y1, x1)``: two opposite corners
  as (row, column) in *logit* space (the layout of ``estimators.sparse.glimpse_means``); a fixed
  offset ``(-o, -o, +o, +o)`` makes the untrained box cover the middle of
  the image (``sigmoid(+-1)`` spans about 46% of each side) instead of a point;
- ``size x size`` equally spaced points are placed between the corners, still in logit space;
- the sigmoid and the rescaling to pixel coordinates are applied to the points afterwards (the
  paper's order, section 3.2), so a point's pixel coordinate is ``sigmoid(z) * (extent - 1)``.

Layers:

- ``SparseGlimpse`` (``sparse``): the adaptive sparse layer (Algorithm 1; all glimpses in one
  tensor); each output pixel has one continuous index tuple whose input ``(h, w)`` is learned and
  sampled to integer tuples.
- ``BilinearGlimpse`` (``bilinear``): bilinear interpolation at the points (``grid_sample``, as in
  spatial transformer networks); exact gradient to the box.
- ``ReinforceGlimpse`` (``reinforce``): a Gaussian policy over the corners (as in RAM); the glimpse
  reads the nearest pixels of a sampled box, and the source network learns through the
  score-function term that ``objective`` adds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import GlimpseLayer, GlimpseSpec
from estimators.sparse import SparseGlimpse as SparseGlimpseCore
from estimators.sparse import default_region

__all__ = [
    "BilinearGlimpse",
    "GlimpseLayer",
    "ReinforceGlimpse",
    "SparseGlimpse",
    "box_points",
]


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


class SparseGlimpse(GlimpseLayer):
    """The paper's glimpse (section 3.2): ``estimators.sparse.SparseGlimpse`` behind the shared box.

    Each output pixel has one continuous index tuple; only its input row and column are learned and
    sampled (``2^2`` nearest + ``a_l`` local in ``region`` + ``a_g`` global integer tuples). One
    value per glimpse (shared by its connections) and one sigma per glimpse are free parameters.
    ``eval()`` reads the pixel at each rounded point. ``region=None`` samples locally in
    ``ceil(log2)`` of the image's height and width (the library default). ``chunk`` > 0 bounds
    memory (checkpointed chunks of that many tuples); 0 computes all tuples at once.
    """

    def __init__(
        self,
        spec: GlimpseSpec,
        box_offset: float = 1.0,
        a_l: int = 32,
        a_g: int = 16,
        region: Sequence[int] | None = (20, 20),
        tau: float = 0.1,
        chunk: int = 0,
    ) -> None:
        super().__init__(spec, box_offset)
        if region is None:  # the library's default: log2 of the image's height and width
            region = default_region(spec.image_shape[1:])
        self.core = SparseGlimpseCore(
            spec.image_shape,
            spec.size,
            spec.glimpses,
            a_l=a_l,
            a_g=a_g,
            region=tuple(region),
            tau=tau,
            chunk=chunk or None,
        )

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        return self.core(images, self.corners(boxes))  # (b, g, c, k, k)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {
            "values": self.core.values.detach().clone(),
            "sigmas_raw": self.core.sigmas_raw.detach().clone(),
        }


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


class ReinforceGlimpse(GlimpseLayer):
    """A Gaussian policy over the box corners, trained with the score function (as in RAM).

    In training each glimpse's corners are sampled from ``N(corners, std)`` in logit space and the
    glimpse reads the nearest pixels at the sampled box, so no gradient flows through the read-out;
    ``objective`` adds ``log p(sample) * (loss - baseline)`` with the baseline detached, an
    exponential moving average of the batch loss. ``eval()`` reads at the mean box.

    ``std`` is the initial standard deviation (logit units); it is learned per glimpse and corner
    (as a log-std) unless ``learn_std`` is False.
    """

    def __init__(
        self,
        spec: GlimpseSpec,
        box_offset: float = 1.0,
        std: float = 0.5,
        learn_std: bool = True,
        baseline_decay: float = 0.9,
    ) -> None:
        super().__init__(spec, box_offset)
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        log_std = torch.full((spec.glimpses, 4), math.log(std))
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)
        self.baseline_decay = baseline_decay
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))
        self.last_log_p: torch.Tensor | None = None  # (b,) log-probability of the last sample
        self.last_indices: torch.Tensor | None = None  # (b, g, k, k, 2) pixels read last

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        b, c, h, w = images.shape
        g, k = self.spec.glimpses, self.spec.size
        mean = self.corners(boxes)  # (b, g, 4)
        if self.training:
            policy = torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))
            corners = policy.sample()  # (b, g, 4), no gradient
            self.last_log_p = policy.log_prob(corners).sum(dim=(1, 2))  # (b,)
        else:
            corners = mean.detach()
            self.last_log_p = None
        pixels = self.to_pixels(box_points(corners, k), h, w).round().long()  # (b, g, k, k, 2)
        limit = torch.tensor([h - 1, w - 1], device=images.device)
        pixels = torch.minimum(pixels.clamp(min=0), limit)
        self.last_indices = pixels
        flat = (pixels[..., 0] * w + pixels[..., 1]).reshape(b, 1, g * k * k)  # (b, 1, g*k*k)
        out = images.reshape(b, c, h * w).gather(2, flat.expand(b, c, g * k * k))  # (b, c, g*k*k)
        return out.reshape(b, c, g, k, k).transpose(1, 2)  # (b, g, c, k, k)

    def objective(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Mean loss plus the score-function surrogate ``log p * (loss - baseline)``.

        The loss is the negative reward; its gradient reaches the classifier directly and the
        source network (the policy mean) and ``log_std`` through ``log p`` only.
        """
        loss = per_sample_loss.mean()
        if self.last_log_p is None:  # eval mode, or no sample since the last objective
            return loss
        cost = per_sample_loss.detach()  # (b,)
        if not bool(self.baseline_ready):
            self.baseline.copy_(cost.mean())
            self.baseline_ready.fill_(True)
        surrogate = (self.last_log_p * (cost - self.baseline)).mean()
        decay = self.baseline_decay
        self.baseline.copy_(decay * self.baseline + (1 - decay) * cost.mean())
        self.last_log_p = None  # one surrogate per sample: never reuse a freed graph
        return loss + surrogate

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"std": self.log_std.detach().exp(), "baseline": self.baseline.detach().clone()}
