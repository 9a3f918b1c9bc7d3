"""Cluttered MNIST: determinism, bounds, provenance of every digit, geometry, cache, PNG grid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.testing import DEVICES
from plugins.data.cluttered import (
    VARIANTS,
    ClutterConfig,
    ClutteredSet,
    _draw_layout,
    _Layout,
    _render,
    cluttered_mnist,
    save_sample_grid,
)
from plugins.data.mnist import DataConfigError, DigitSet, MNISTSplits, load_mnist


@pytest.fixture(scope="module")
def splits() -> MNISTSplits:
    return load_mnist()


def _fields(s: ClutteredSet) -> list[torch.Tensor]:
    return [s.images, s.labels, s.boxes, s.digit_index, s.clutter_index]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_range_labels_and_boxes(splits: MNISTSplits, variant: str) -> None:
    cfg = ClutterConfig(variant=variant)
    s = cluttered_mnist(splits.test, 40, cfg, seed=3)
    assert s.images.shape == (40, 1, 100, 100) and s.images.dtype == torch.float32
    assert s.images.min() >= 0.0 and s.images.max() <= 1.0
    assert torch.equal((s.images * 255).round() / 255, s.images)  # 8-bit levels
    assert s.labels.dtype == torch.int64 and s.labels.shape == (40,)
    assert torch.equal(s.labels, splits.test.labels[s.digit_index])
    assert s.clutter_index.shape == (40, cfg.pieces)

    x0, y0, x1, y1 = s.boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 100).all() and (y1 <= 100).all()
    side = torch.stack([x1 - x0, y1 - y0], 1)  # (40, 2)
    if variant == "deepmind":  # unrotated, unscaled 28 x 28 at integer positions
        assert torch.equal(side, torch.full_like(side, 28.0))
        assert torch.equal(s.boxes, s.boxes.round())
    else:  # scale 0.8..1.2, rotation up to 30 degrees
        widest = 28 * 1.2 * (math.cos(math.pi / 6) + math.sin(math.pi / 6))
        assert (side >= 28 * 0.8 - 1e-4).all() and (side <= widest + 1e-4).all()
    # the digit carries ink inside its box, not only clutter
    for i in range(8):
        bx0, by0, bx1, by1 = (int(v) for v in s.boxes[i].floor())
        assert s.images[i, 0, by0 : by1 + 1, bx0 : bx1 + 1].sum() > 10


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deterministic_from_seed(splits: MNISTSplits, variant: str) -> None:
    cfg = ClutterConfig(variant=variant)
    a = cluttered_mnist(splits.train, 12, cfg, seed=7)
    b = cluttered_mnist(splits.train, 12, cfg, seed=7)
    c = cluttered_mnist(splits.train, 12, cfg, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(_fields(a), _fields(b), strict=True))
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.digit_index, c.digit_index)


def test_test_images_use_test_digits_only(splits: MNISTSplits) -> None:
    test = splits.test
    s = cluttered_mnist(test, 64, ClutterConfig(variant="deepmind"), seed=0)
    assert int(s.digit_index.max()) < len(test) and int(s.clutter_index.max()) < len(test)
    assert not (s.clutter_index == s.digit_index[:, None]).any()  # clutter from other digits
    # deepmind adds layers and clips at 1, so the pasted test digit lies under its box untouched
    for i in range(len(s)):
        x0, y0 = int(s.boxes[i, 0]), int(s.boxes[i, 1])
        window = s.images[i, 0, y0 : y0 + 28, x0 : x0 + 28]
        assert (window >= test.images[s.digit_index[i]] - 1e-6).all()


def _reference_ram(layout: _Layout, images: torch.Tensor, canvas: int) -> torch.Tensor:
    """Integer slicing, one image and one layer at a time: the deepmind script's arithmetic."""
    count, n_layers = layout.source.shape
    out = torch.zeros(count, 1, canvas, canvas)
    for i in range(count):
        for k in range(n_layers):
            x, y, w, h = layout.crop[i, k].tolist()
            tx, ty = (int(v) for v in layout.offset[i, k])
            crop = images[layout.source[i, k], y : y + h, x : x + w]
            # a piece may hang over the canvas edge only when larger than it; not here
            out[i, 0, ty : ty + h, tx : tx + w] += crop
    return out.clamp_(0, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_ram_render_matches_dense_reference(splits: MNISTSplits, device: str) -> None:
    cfg = ClutterConfig(variant="deepmind")
    layout = _draw_layout(len(splits.test), 20, cfg, seed=5)
    got = _render(layout, splits.test.images.to(device), cfg).cpu()
    want = _reference_ram(layout, splits.test.images, cfg.canvas)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _single_layer(angle: float, scale: float, offset: tuple[float, float]) -> _Layout:
    footprint = 28 * scale * (abs(math.cos(angle)) + abs(math.sin(angle)))
    return _Layout(
        source=torch.zeros(1, 1, dtype=torch.int64),
        crop=torch.tensor([[[0, 0, 28, 28]]]),
        angle=torch.tensor([[angle]]),
        scale=torch.tensor([[scale]]),
        offset=torch.tensor([[offset]]),
        footprint=torch.tensor([[[footprint, footprint]]]),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_and_scale_geometry(splits: MNISTSplits, device: str) -> None:
    digit = splits.test.images[:1]  # (1, 28, 28)
    add = ClutterConfig(canvas=64, variant="deepmind")  # additive: one layer renders as itself

    rotated = _render(_single_layer(math.pi / 2, 1.0, (10.0, 20.0)), digit.to(device), add)
    want = torch.zeros(64, 64)
    want[20:48, 10:38] = torch.rot90(digit[0], k=-1)  # positive angle: clockwise on screen
    torch.testing.assert_close(rotated[0, 0].cpu(), want, atol=1e-4, rtol=0)

    scaled = _render(_single_layer(0.0, 2.0, (3.0, 5.0)), digit.to(device), add)[0, 0].cpu()
    up = F.interpolate(digit[None], scale_factor=2, mode="bilinear", align_corners=False)[0, 0]
    # the interior agrees; at the border grid_sample blends with the zero padding
    torch.testing.assert_close(scaled[6:60, 4:58], up[1:-1, 1:-1], atol=1e-4, rtol=0)
    assert scaled[:5].abs().max() == 0 and scaled[:, :3].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_rotated_scaled_pastes_with_itself_as_alpha(splits: MNISTSplits, device: str) -> None:
    digit = splits.test.images[:1]
    layout = _single_layer(0.0, 1.0, (4.0, 4.0))
    add = _render(layout, digit.to(device), ClutterConfig(canvas=64, variant="deepmind")).cpu()
    over = _render(layout, digit.to(device), ClutterConfig(canvas=64, variant="rotated-scaled")).cpu()
    torch.testing.assert_close(over, add * add, atol=1e-5, rtol=0)  # PIL paste(fg, mask=fg)


def test_cache_hit_is_identical_and_config_change_misses(tmp_path: Path) -> None:
    digits = DigitSet(load_mnist().test.images[:200], load_mnist().test.labels[:200])
    cfg = ClutterConfig(variant="deepmind")
    first = cluttered_mnist(digits, 16, cfg, seed=1, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("cluttered-deepmind-*.pt")
    stamp = cached.stat().st_mtime_ns

    hit = cluttered_mnist(digits, 16, cfg, seed=1, cache_dir=tmp_path)
    assert all(torch.equal(u, v) for u, v in zip(_fields(first), _fields(hit), strict=True))
    assert cached.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1
    assert all(torch.equal(u, v) for u, v in zip(
        _fields(first), _fields(cluttered_mnist(digits, 16, cfg, seed=1)), strict=True))

    cluttered_mnist(digits, 16, ClutterConfig(variant="deepmind", pieces=7), seed=1, cache_dir=tmp_path)
    cluttered_mnist(digits, 16, cfg, seed=2, cache_dir=tmp_path)
    cluttered_mnist(digits, 17, cfg, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 4 and not list(tmp_path.glob("*.tmp*"))


def test_config_resolves_variant_defaults_and_overrides() -> None:
    rsc = ClutterConfig(variant="rotated-scaled")
    assert (rsc.pieces, rsc.piece_min, rsc.piece_max) == (10, 4, 10)
    assert (rsc.piece_scale_min, rsc.piece_scale_max) == (0.5, 4.5)
    deepmind = ClutterConfig()  # the default: the paper's generator (footnote 5)
    assert deepmind.variant == "deepmind"
    assert (deepmind.pieces, deepmind.piece_min, deepmind.piece_max, deepmind.digit_rotation) == (
        8, 8, 8, 0.0)
    assert ClutterConfig(variant="deepmind", pieces=3).pieces == 3
    # 30 == 30.0: one cache key
    assert ClutterConfig(variant="rotated-scaled", digit_rotation=30).key() == rsc.key()
    assert rsc.key() != deepmind.key()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"variant": "nope"}, "nope"),
        ({"digit_scale_max": 4.0}, "digit_scale_max"),
        ({"canvas": 20}, "canvas"),
        ({"piece_min": 0}, "piece_min"),
        ({"piece_rotation": 200.0}, "piece_rotation"),
        ({"pieces": 2.5}, "pieces"),
    ],
    ids=["variant", "digit-too-big", "canvas", "piece-min", "rotation", "fractional-pieces"],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(DataConfigError, match=named):
        ClutterConfig(**kwargs)


def test_count_must_be_positive(splits: MNISTSplits) -> None:
    with pytest.raises(DataConfigError, match="count=0"):
        cluttered_mnist(splits.test, 0, ClutterConfig(), seed=0)


def test_save_sample_grid_writes_png(tmp_path: Path, splits: MNISTSplits) -> None:
    from matplotlib.image import imread

    s = cluttered_mnist(splits.test, 10, ClutterConfig(), seed=0)
    path = tmp_path / "grid" / "sample.png"
    save_sample_grid(s.images, s.labels, path, rows=2, cols=6, boxes=s.boxes)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank page
