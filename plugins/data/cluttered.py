"""Cluttered MNIST (paper §3.2): one digit on a large canvas among pieces cropped from other digits.

Two generators, chosen by ``ClutterConfig.variant`` and named after what they are:

- ``"deepmind"`` (default): deepmind/mnist-cluttered, the generator of the RAM paper's data and
  the one the paper used (§3.2, footnote 5): 8 pieces, each an 8 x 8 crop of another digit at an
  integer position, no rotation or scaling, the digit unscaled; layers are added and the sum
  clipped to [0, 1]. (deepmind draws its distractors from any digit, the shown one included, one
  chance in 60,000; we never clutter a digit with itself.)
- ``"rotated-scaled"``: after the authors' *later* generator, sparse-hyper
  ``scripts/generate.mnist.py`` ("mnist-rsc", added in January 2019, after the paper, for a
  rotated and scaled dataset, and changed several times until July 2019): 10 clutter pieces, one
  piece shape per image with height and width each drawn from 4..10 px, cropped at random from
  other digits, each rotated by a uniform angle (full circle) and scaled by 0.5..4.5, then the
  digit itself. Every layer is pasted with itself as alpha, as PIL's ``paste(fg, mask=fg)`` does:
  ``canvas = canvas * (1 - l) + l * l``. The script also rotated the digit by any angle and
  scaled it up to 4.5, which makes 6 and 9 the same class and can overflow a 100 px canvas (its
  ``randint`` then fails); we rotate the digit by at most 30 degrees and scale it by 0.8..1.2 so
  that it stays legible and always fits. We crop the pieces with their own width (the script
  cropped ``h:h+nw`` on both axes) and resample bilinearly (the script used bicubic). Not the
  paper's data: a harder set for experiments of our own.

``None`` in a ``ClutterConfig`` field means "the variant's default" and is resolved when the
config is built, so ``ClutterConfig(variant="deepmind")`` is the deepmind generator and any field can
still be set explicitly.

Every layer is placed at an integer position where its rotated, scaled footprint lies inside the
canvas (a piece larger than the canvas, impossible with the defaults, overhangs by a random amount
and is clipped). All randomness is drawn up front from one ``torch.Generator`` seeded by ``seed``,
so results do not depend on chunking or thread count. Rendering is batched: one sampling grid
(what ``affine_grid`` builds, computed separably) and one ``grid_sample`` per layer (11 for
rotated-scaled)
over a chunk of images, with no per-image or per-pixel Python loop. Images are quantised to 8 bits
(the original saved PNGs) so that a cached set, stored as uint8, is bit-identical to a fresh one.

Use ``splits.test`` for test images: clutter comes from the same ``DigitSet`` as the digits.

Speed, from ``python -c "import plugins.data.cluttered as c; c.measure_throughput()"`` (2,000
100 x 100 images from the embedded digits, on the 2-core development CPU at low load):
rotated-scaled about 950 images/s with ``torch.set_num_threads(1)`` and 1,800 with 2 threads;
deepmind about 1,250 and 2,400 (a single thread's CPU-time rate agreed: 900 and 1,235). So 60,000
images take about a minute once, then come from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from plugins.data.mnist import DataConfigError, DataError, DigitSet, digit_set_sha256

__all__ = [
    "VARIANTS",
    "ClutterConfig",
    "ClutteredSet",
    "cluttered_mnist",
    "measure_throughput",
    "save_sample_grid",
]

log = logging.getLogger(__name__)

_SIDE = 28  # MNIST digit side
_GENERATOR_VERSION = 1  # part of the cache key: bump when the generated pixels change
_CANVAS = 100  # the paper's 100 x 100 canvas
_CHUNK = 256  # images rendered at once: (256, 1, 100, 100) floats per buffer, a few MB

# variant -> defaults for the fields left as None
VARIANTS: dict[str, dict[str, float | int]] = {
    "deepmind": dict(
        pieces=8, piece_min=8, piece_max=8, piece_rotation=0.0, piece_scale_min=1.0,
        piece_scale_max=1.0, digit_rotation=0.0, digit_scale_min=1.0, digit_scale_max=1.0,
    ),
    "rotated-scaled": dict(
        pieces=10, piece_min=4, piece_max=10, piece_rotation=180.0, piece_scale_min=0.5,
        piece_scale_max=4.5, digit_rotation=30.0, digit_scale_min=0.8, digit_scale_max=1.2,
    ),
}


@dataclass(frozen=True)
class ClutterConfig:
    """How to clutter: canvas side, variant, and the variant's overridable parameters.

    Angles are the largest absolute rotation in degrees (drawn uniformly in [-a, a]); scales are
    drawn uniformly in [min, max]; piece sides in px are drawn from piece_min..piece_max.
    """

    canvas: int = _CANVAS
    variant: str = "deepmind"
    pieces: int | None = None  # deepmind 8, rotated-scaled 10
    piece_min: int | None = None  # deepmind 8, rotated-scaled 4
    piece_max: int | None = None  # deepmind 8, rotated-scaled 10
    piece_rotation: float | None = None  # deepmind 0, rotated-scaled 180
    piece_scale_min: float | None = None  # deepmind 1, rotated-scaled 0.5
    piece_scale_max: float | None = None  # deepmind 1, rotated-scaled 4.5
    digit_rotation: float | None = None  # deepmind 0, rotated-scaled 30
    digit_scale_min: float | None = None  # deepmind 1, rotated-scaled 0.8
    digit_scale_max: float | None = None  # deepmind 1, rotated-scaled 1.2

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise DataConfigError(
                f"unknown clutter variant {self.variant!r}; choose one of {sorted(VARIANTS)}"
            )
        for name, default in {"canvas": _CANVAS, **VARIANTS[self.variant]}.items():
            value = getattr(self, name)
            value = default if value is None else value
            if isinstance(default, int) and value != int(value):
                raise DataConfigError(f"clutter {name}={value!r}: must be a whole number")
            # 30 and 30.0 must give one cache key, so every field takes its default's type
            object.__setattr__(self, name, type(default)(value))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> DataConfigError:
            return DataConfigError(f"clutter {name}={getattr(self, name)!r}: {why}")

        if self.canvas < _SIDE:
            raise bad("canvas", f"must be at least {_SIDE} so that a digit fits")
        if self.pieces < 0:
            raise bad("pieces", "must be >= 0")
        if not 1 <= self.piece_min <= self.piece_max <= _SIDE:
            raise bad("piece_min", f"need 1 <= piece_min <= piece_max <= {_SIDE}")
        for name in ("piece_rotation", "digit_rotation"):
            if not 0.0 <= getattr(self, name) <= 180.0:
                raise bad(name, "must be in [0, 180] degrees")
        for part in ("piece", "digit"):
            lo, hi = getattr(self, f"{part}_scale_min"), getattr(self, f"{part}_scale_max")
            if not 0.0 < lo <= hi:
                raise bad(f"{part}_scale_min", f"need 0 < {part}_scale_min <= {part}_scale_max")
        rot = math.radians(min(self.digit_rotation, 45.0))  # the footprint peaks at 45 degrees
        largest = _SIDE * self.digit_scale_max * (math.cos(rot) + math.sin(rot))
        if math.ceil(largest - 1e-4) > self.canvas:
            raise bad(
                "digit_scale_max",
                f"a digit rotated by up to {self.digit_rotation} degrees at this scale spans "
                f"{largest:.1f} px, more than the {self.canvas} px canvas; lower the scale or "
                "rotation, or enlarge the canvas",
            )

    def key(self) -> dict[str, float | int | str]:
        """The resolved parameters, as logged and hashed for the cache."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ClutteredSet:
    """Generated images, the digit boxes that glimpse evaluation needs, and every source index.

    ``boxes`` hold the pasted digit's footprint (the axis-aligned box of the rotated, scaled
    28 x 28 tile) as (x0, y0, x1, y1) in pixel-edge coordinates: pixel column i spans [i, i + 1).
    """

    images: torch.Tensor  # (count, 1, canvas, canvas) float32 in [0, 1], multiples of 1/255
    labels: torch.Tensor  # (count,) int64
    boxes: torch.Tensor  # (count, 4) float32
    digit_index: torch.Tensor  # (count,) int64 index of the digit into the source DigitSet
    clutter_index: torch.Tensor  # (count, pieces) int64 indices of the clutter sources

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class _Layout:
    """Every random draw for ``count`` images; L = pieces + 1 layers, the digit last."""

    source: torch.Tensor  # (count, L) int64 index into the digit pool
    crop: torch.Tensor  # (count, L, 4) int64 (x, y, w, h) of the crop inside the 28 x 28 source
    angle: torch.Tensor  # (count, L) float32 radians; positive turns clockwise as displayed
    scale: torch.Tensor  # (count, L) float32
    offset: torch.Tensor  # (count, L, 2) float32 integer-valued (x, y) of the footprint corner
    footprint: torch.Tensor  # (count, L, 2) float32 (w, h) of the rotated, scaled crop


def cluttered_mnist(
    digits: DigitSet,
    count: int,
    config: ClutterConfig,
    seed: int,
    cache_dir: Path | None = None,
) -> ClutteredSet:
    """``count`` cluttered images of digits from ``digits`` (clutter from the same pool).

    Deterministic in (digits, count, config, seed). With ``cache_dir`` the set is stored as
    ``cluttered-<variant>-<sha>.pt``, keyed by the sha256 of the resolved config, the digits'
    sha256, seed, count and generator version; a hit is loaded instead of generated.
    """
    if count < 1:
        raise DataConfigError(f"cluttered MNIST count={count!r}: must be >= 1")
    if len(digits) < 2:
        raise DataError(f"cluttered MNIST needs at least 2 source digits, got {len(digits)}")

    path = None
    if cache_dir is not None:
        key = {
            "config": config.key(),
            "digits_sha256": digit_set_sha256(digits),
            "seed": seed,
            "count": count,
            "version": _GENERATOR_VERSION,
        }
        sha = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        path = Path(cache_dir) / f"cluttered-{config.variant}-{sha[:24]}.pt"
        if path.exists():
            log.info("cluttered MNIST: cache hit %s", path)
            return _unpack(torch.load(path, weights_only=True))

    layout = _draw_layout(len(digits), count, config, seed)
    images = _render(layout, digits.images, config)  # (count, 1, C, C) float32
    corner = layout.offset[:, -1]  # (count, 2) the digit's footprint corner
    packed = {
        "images": images.mul_(255.0).round_().to(torch.uint8),
        "labels": digits.labels[layout.source[:, -1]].clone(),
        "boxes": torch.cat([corner, corner + layout.footprint[:, -1]], 1),  # (count, 4)
        "digit_index": layout.source[:, -1].clone(),
        "clutter_index": layout.source[:, :-1].clone(),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(packed, tmp)
        os.replace(tmp, path)  # atomic: parallel cells never read half a file
        log.info("cluttered MNIST: generated %d images into %s", count, path)
    return _unpack(packed)


def _unpack(packed: dict[str, torch.Tensor]) -> ClutteredSet:
    return ClutteredSet(
        images=packed["images"].to(torch.float32).div_(255.0),
        labels=packed["labels"],
        boxes=packed["boxes"],
        digit_index=packed["digit_index"],
        clutter_index=packed["clutter_index"],
    )


def _draw_layout(pool: int, count: int, cfg: ClutterConfig, seed: int) -> _Layout:
    g = torch.Generator().manual_seed(seed)
    p, n_layers = cfg.pieces, cfg.pieces + 1
    # digits: shuffled passes over the pool (each digit once per pass), like deepmind's epochs
    passes = -(-count // pool)
    digit = torch.cat([torch.randperm(pool, generator=g) for _ in range(passes)])[:count]
    # clutter from any digit but the one shown
    other = torch.randint(0, pool - 1, (count, p), generator=g)  # (count, p)
    source = torch.cat([(digit[:, None] + 1 + other) % pool, digit[:, None]], 1)  # (count, L)

    # one piece shape (w, h) per image, as in the original script; the digit keeps 28 x 28
    shape = torch.randint(cfg.piece_min, cfg.piece_max + 1, (count, 1, 2), generator=g)
    size = torch.cat([shape.expand(count, p, 2), torch.full((count, 1, 2), _SIDE)], 1)
    corner = (torch.rand((count, n_layers, 2), generator=g) * (_SIDE - size + 1)).floor().long()

    def per_layer(piece: float, digit: float) -> torch.Tensor:  # (L,) pieces first, digit last
        return torch.tensor([piece] * p + [digit], dtype=torch.float32)

    rot = per_layer(cfg.piece_rotation, cfg.digit_rotation).deg2rad()
    s_lo = per_layer(cfg.piece_scale_min, cfg.digit_scale_min)
    s_hi = per_layer(cfg.piece_scale_max, cfg.digit_scale_max)
    angle = (torch.rand((count, n_layers), generator=g) * 2 - 1) * rot  # (count, L)
    scale = s_lo + torch.rand((count, n_layers), generator=g) * (s_hi - s_lo)  # (count, L)

    # footprint of the rotated, scaled w x h crop (PIL's rotate(expand=True), then resize)
    c, s = angle.cos().abs(), angle.sin().abs()
    w, h = size[..., 0].float(), size[..., 1].float()
    footprint = scale[..., None] * torch.stack([w * c + h * s, w * s + h * c], -1)  # (count, L, 2)
    free = cfg.canvas - (footprint - 1e-4).ceil()  # room left; negative for oversized pieces
    lo, hi = free.clamp(max=0), free.clamp(min=0)
    offset = lo + (torch.rand((count, n_layers, 2), generator=g) * (hi - lo + 1)).floor()
    return _Layout(
        source=source,
        crop=torch.cat([corner, size], -1),
        angle=angle,
        scale=scale,
        offset=offset,
        footprint=footprint,
    )


def _theta(layout: _Layout, canvas: int) -> torch.Tensor:
    """(count, L, 2, 3) affine maps from canvas to source coordinates, as ``affine_grid`` wants.

    In pixel-edge coordinates a canvas point q maps to the source point
    ``R(-angle) (q - c_t) / scale + c_s`` (c_t, c_s: footprint and crop centres). ``affine_grid``
    works in normalised coordinates (align_corners=False: q = (x + 1) * side / 2), so we compose.
    """
    cos, sin = layout.angle.cos(), layout.angle.sin()
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    inv = inv / layout.scale[..., None, None]  # (count, L, 2, 2)
    c_t = layout.offset + layout.footprint / 2  # (count, L, 2)
    crop = layout.crop.float()
    c_s = crop[..., :2] + crop[..., 2:] / 2  # (count, L, 2)
    half = canvas / 2
    lin = inv * (half * 2 / _SIDE)  # (count, L, 2, 2)
    shift = (inv @ (half - c_t)[..., None]).squeeze(-1) + c_s  # (count, L, 2) source px
    return torch.cat([lin, (shift * (2 / _SIDE) - 1)[..., None]], -1)


def _grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """``F.affine_grid(theta, (b, 1, side, side), align_corners=False)``, three times faster.

    An affine map of a square grid is separable: one (b, C, 2) term per column plus one per row,
    so one broadcast add builds the (b, C, C, 2) grid instead of a (b, C*C, 3) @ (b, 3, 2) matmul.
    """
    xs = (torch.arange(side, device=theta.device, dtype=theta.dtype) * 2 + 1) / side - 1  # (C,)
    col = xs[None, :, None] * theta[:, None, :, 0] + theta[:, None, :, 2]  # (b, C, 2) by column
    row = xs[None, :, None] * theta[:, None, :, 1]  # (b, C, 2) by row
    return col[:, None, :, :] + row[:, :, None, :]  # (b, C rows, C cols, 2) as (x, y)


def _render(layout: _Layout, images: torch.Tensor, cfg: ClutterConfig) -> torch.Tensor:
    """(count, 1, C, C) float32 canvases, unquantised, on ``images``' device."""
    dev, side = images.device, cfg.canvas
    count, n_layers = layout.source.shape
    theta = _theta(layout, side).to(dev)  # (count, L, 2, 3)
    crop = layout.crop.to(dev)
    source = layout.source.to(dev)
    ar = torch.arange(_SIDE, device=dev)
    out = torch.empty(count, 1, side, side, device=dev)
    for start in range(0, count, _CHUNK):
        sl = slice(start, min(start + _CHUNK, count))
        b = sl.stop - sl.start
        canvas = torch.zeros(b, 1, side, side, device=dev)
        for layer in range(n_layers):  # 11 for rotated-scaled: a loop over layers, not images
            x, y, w, h = crop[sl, layer].unbind(-1)  # each (b,)
            keep_x = (ar >= x[:, None]) & (ar < (x + w)[:, None])  # (b, 28)
            keep_y = (ar >= y[:, None]) & (ar < (y + h)[:, None])  # (b, 28)
            mask = keep_y[:, :, None] & keep_x[:, None, :]  # (b, 28, 28) rows = y
            src = (images[source[sl, layer]] * mask)[:, None]  # (b, 1, 28, 28)
            grid = _grid(theta[sl, layer], side)  # (b, C, C, 2)
            paste = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)  # (b, 1, C, C)
            if cfg.variant == "rotated-scaled":
                canvas.mul_(1 - paste).addcmul_(paste, paste)  # paste with itself as alpha
            else:
                canvas.add_(paste)
        out[sl] = canvas.clamp_(0.0, 1.0)
    return out


def save_sample_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    rows: int = 4,
    cols: int = 8,
    boxes: torch.Tensor | None = None,
) -> None:
    """Write the first rows x cols images (N, H, W) or (N, 1, H, W) as a labelled PNG.

    ``boxes`` (N, 4) in pixel-edge coordinates, e.g. ``ClutteredSet.boxes``, are outlined.
    """
    # matplotlib is imported here, and without pyplot: no global figure state, no GUI backend
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(1.3 * cols, 1.45 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        img = images[i].detach().cpu().reshape(images.shape[-2], images.shape[-1])
        ax.imshow(img.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(str(int(labels[i])), fontsize=9)
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            # imshow centres pixel i at i, so an edge coordinate e sits at e - 0.5
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="tab:red", linewidth=0.8))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def measure_throughput(count: int = 2000) -> dict[str, float]:
    """Images/s per variant at 1 thread and at the default thread count (printed and returned)."""
    from plugins.data.mnist import load_mnist

    digits, rates = load_mnist().train, {}
    default_threads = torch.get_num_threads()
    try:
        for threads in dict.fromkeys((1, default_threads)):
            torch.set_num_threads(threads)
            for variant in VARIANTS:
                start = time.perf_counter()
                cluttered_mnist(digits, count, ClutterConfig(variant=variant), seed=0)
                name = f"{variant}/threads={threads}"
                rates[name] = count / (time.perf_counter() - start)
                print(f"{name}: {rates[name]:,.0f} images/s")
    finally:
        torch.set_num_threads(default_threads)
    return rates
