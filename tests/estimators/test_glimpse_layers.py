"""Glimpse layers: shapes, bounds, exact read-outs at known boxes, gradients, the REINFORCE sign."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from estimators.base import GlimpseLayer, GlimpseSpec, PermutationSpec, Unsupported
from estimators.plugins.bilinear import BilinearEstimator, BilinearGlimpse, register_estimators
from estimators.plugins.reinforce import ReinforceGlimpse
from estimators.plugins.sparse import SparseGlimpseLayer
from estimators.shared.glimpse import box_points
from estimators.sparse import glimpse_means, sample_indices
from harness.testing import DEVICES

LAYERS = [SparseGlimpseLayer, BilinearGlimpse, ReinforceGlimpse]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _raw_box(
    layer: GlimpseLayer, corners_px: tuple[float, float, float, float], h: int, w: int
) -> torch.Tensor:
    """Raw source outputs that put the corners (y0, x0, y1, x1) exactly on those pixel centres."""
    y0, x0, y1, x1 = corners_px
    z = torch.tensor(
        [_logit(y0 / (h - 1)), _logit(x0 / (w - 1)), _logit(y1 / (h - 1)), _logit(x1 / (w - 1))],
        dtype=torch.float64,
    )
    return (z - layer.offset.double().cpu()).float()


def _pattern(b: int, c: int, h: int, w: int, device: str) -> torch.Tensor:
    """Every pixel of every channel and instance distinct: value = flat index."""
    return torch.arange(b * c * h * w, dtype=torch.float32, device=device).reshape(b, c, h, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("g,k", [(1, 5), (3, 4), (2, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_shapes(device: str, cls: type[GlimpseLayer], g: int, k: int, training: bool) -> None:
    spec = GlimpseSpec((2, 17, 23), size=k, glimpses=g)
    layer = cls(spec).to(device).train(training)
    out = layer(torch.rand(3, 2, 17, 23, device=device), torch.randn(3, g, 4, device=device))
    assert out.shape == (3, g, 2, k, k)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_wrong_box_shape_is_rejected(cls: type[GlimpseLayer]) -> None:
    layer = cls(GlimpseSpec((1, 10, 10), size=3, glimpses=2))
    with pytest.raises(ValueError, match=r"boxes \(b, 2, 4\)"):
        layer(torch.rand(4, 1, 10, 10), torch.zeros(4, 1, 4))


def test_box_points_span_the_corners() -> None:
    corners = torch.tensor([[-1.0, -2.0, 3.0, 4.0]])
    pts = box_points(corners, 4)  # (1, 4, 4, 2)
    assert pts.shape == (1, 4, 4, 2)
    assert pts[0, 0, 0].tolist() == [-1.0, -2.0]
    assert pts[0, -1, -1].tolist() == [3.0, 4.0]
    assert pts[0, :, 0, 0].tolist() == pytest.approx(np.linspace(-1, 3, 4).tolist())  # rows vary
    assert pts[0, 0, :, 1].tolist() == pytest.approx(np.linspace(-2, 4, 4).tolist())  # cols vary
    assert box_points(corners, 1)[0, 0, 0].tolist() == [1.0, 1.0]  # one point: the centre


def _reference_pixels(z: np.ndarray, size: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 rendering of the documented mapping: points in logit space, then
    sigmoid and scaling to pixel centres."""
    y0, x0, y1, x1 = z
    t = np.linspace(0.0, 1.0, size)
    ys = 1 / (1 + np.exp(-(y0 + t * (y1 - y0)))) * (h - 1)
    xs = 1 / (1 + np.exp(-(x0 + t * (x1 - x0)))) * (w - 1)
    return ys, xs


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, img.shape[0] - 1), min(x0 + 1, img.shape[1] - 1)
    fy, fx = y - y0, x - x0
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_known_box_reads_the_right_pixels(device: str, cls: type[GlimpseLayer]) -> None:
    h, w, k = 16, 20, 5
    layer = cls(GlimpseSpec((2, h, w), size=k, glimpses=2)).to(device).eval()
    images = _pattern(2, 2, h, w, device)
    # glimpse 0 on pixel centres (2, 3)-(9, 12); glimpse 1 flipped, (13, 17)-(1, 2)
    boxes = torch.stack([_raw_box(layer, (2, 3, 9, 12), h, w), _raw_box(layer, (13, 17, 1, 2), h, w)])
    boxes = boxes.expand(2, 2, 4).to(device)
    out = layer(images, boxes).detach().cpu().double().numpy()  # (2, 2, 2, k, k)
    z = layer.corners(boxes).cpu().double().numpy()  # (2, 2, 4)
    img = images.cpu().double().numpy()
    for b in range(2):
        for g in range(2):
            ys, xs = _reference_pixels(z[b, g], k, h, w)
            for c in range(2):
                if cls is BilinearGlimpse:
                    want = np.array([[_bilinear(img[b, c], y, x) for x in xs] for y in ys])
                else:  # eval mode: the pixel at each rounded point
                    want = img[b, c][np.rint(ys).astype(int)][:, np.rint(xs).astype(int)]
                np.testing.assert_allclose(out[b, g, c], want, rtol=1e-5, atol=1e-3)
    # the corners land exactly on the chosen pixels for every layer
    close = {"abs": 1e-2}
    assert out[0, 0, 0, 0, 0] == pytest.approx(img[0, 0, 2, 3], **close)
    assert out[0, 0, 0, -1, -1] == pytest.approx(img[0, 0, 9, 12], **close)
    assert out[1, 1, 1, 0, 0] == pytest.approx(img[1, 1, 13, 17], **close)
    assert out[1, 1, 1, -1, -1] == pytest.approx(img[1, 1, 1, 2], **close)


def test_box_pixels_gives_the_outline() -> None:
    layer = BilinearGlimpse(GlimpseSpec((1, 16, 20), size=3, glimpses=1))
    boxes = _raw_box(layer, (2, 3, 9, 12), 16, 20).view(1, 1, 4)
    assert layer.box_pixels(boxes, 16, 20)[0, 0].tolist() == pytest.approx([2, 3, 9, 12], abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_samples_stay_inside_the_image(device: str) -> None:
    """The sparse glimpse's integer tuples (the library's sampler at the glimpse's settings)."""
    h, w = 30, 40
    layer = SparseGlimpseLayer(GlimpseSpec((1, h, w), size=6, glimpses=2)).to(device)
    boxes = torch.cat([torch.full((2, 2, 4), 40.0), torch.full((2, 2, 4), -40.0), torch.randn(2, 2, 4) * 5])
    means = glimpse_means(layer.corners(boxes.to(device)), (1, h, w), 6)  # (6, k, 7)
    core = layer.core
    idx = sample_indices(means, core.shape, a_l=core.a_l, a_g=core.a_g, region=core.region, learn_dims=(5, 6))
    assert idx.shape[-2] == 4 + 32 + 16  # 2^2 nearest + a_l + a_g
    assert (idx >= 0).all()
    assert (idx[..., 5] < h).all() and (idx[..., 6] < w).all()


@pytest.mark.parametrize("device", DEVICES)
def test_reinforce_reads_inside_the_image(device: str) -> None:
    h, w = 12, 9
    layer = ReinforceGlimpse(GlimpseSpec((1, h, w), size=7, glimpses=3), std=3.0).to(device)
    boxes = torch.cat([torch.randn(50, 3, 4) * 20, torch.full((2, 3, 4), 1e4), torch.full((2, 3, 4), -1e4)])
    images = _pattern(54, 1, h, w, device)
    out = layer(images, boxes.to(device))
    pix = layer.last_indices  # (b, g, k, k, 2)
    assert pix is not None
    assert (pix >= 0).all() and (pix[..., 0] < h).all() and (pix[..., 1] < w).all()
    assert pix[:, :, :, :, 0].max() == h - 1 and pix[:, :, :, :, 1].min() == 0  # bounds are reached
    # what it read is what sits at the recorded pixels
    b = torch.arange(54, device=device)[:, None, None, None]
    assert torch.equal(out[:, :, 0], images[b, 0, pix[..., 0], pix[..., 1]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [SparseGlimpseLayer, BilinearGlimpse], ids=lambda c: c.__name__)
def test_gradient_reaches_the_boxes(device: str, cls: type[GlimpseLayer]) -> None:
    torch.manual_seed(0)
    layer = cls(GlimpseSpec((1, 24, 24), size=6, glimpses=2)).to(device)
    images = torch.rand(4, 1, 24, 24, device=device)
    boxes = (torch.randn(4, 2, 4, device=device) * 0.5).requires_grad_()
    (layer(images, boxes) * torch.randn(4, 2, 1, 6, 6, device=device)).sum().backward()
    assert boxes.grad is not None and torch.isfinite(boxes.grad).all()
    assert (boxes.grad.abs().sum(dim=(0, 1)) > 0).all()  # every corner coordinate moves


def test_bilinear_gradcheck() -> None:
    torch.manual_seed(0)
    layer = BilinearGlimpse(GlimpseSpec((1, 9, 11), size=3, glimpses=2)).double()
    images = torch.rand(2, 1, 9, 11, dtype=torch.float64, requires_grad=True)
    boxes = (torch.randn(2, 2, 4, dtype=torch.float64) * 0.7).requires_grad_()
    assert torch.autograd.gradcheck(layer, (images, boxes), eps=1e-6, atol=1e-5)


def test_sparse_layer_learns_its_value_and_sigma() -> None:
    layer = SparseGlimpseLayer(GlimpseSpec((1, 20, 20), size=4, glimpses=2), a_l=4, a_g=2, region=(5, 5))
    out = layer(torch.rand(3, 1, 20, 20), torch.randn(3, 2, 4))
    out.sum().backward()
    assert layer.core.values.grad is not None and (layer.core.values.grad != 0).all()
    assert layer.core.sigmas_raw.grad is not None and torch.isfinite(layer.core.sigmas_raw.grad).all()
    assert set(layer.snapshot()) == {"values", "sigmas_raw"}


def test_sparse_region_none_is_the_library_default() -> None:
    layer = SparseGlimpseLayer(GlimpseSpec((1, 30, 64), size=4, glimpses=1), region=None)
    assert layer.core.region[5:] == (5, 6)  # ceil(log2 30), ceil(log2 64)


@pytest.mark.parametrize("device", DEVICES)
def test_reinforce_gradient_reaches_policy_only_through_log_p(device: str) -> None:
    torch.manual_seed(0)
    layer = ReinforceGlimpse(GlimpseSpec((1, 16, 16), size=4, glimpses=2)).to(device)
    images = torch.rand(8, 1, 16, 16, device=device)
    boxes = torch.randn(8, 2, 4, device=device, requires_grad=True)
    glimpses = layer(images, boxes)
    assert not glimpses.requires_grad  # a hard read: no pathwise gradient
    losses = glimpses.flatten(1).mean(1) + torch.arange(8.0, device=device)  # (b,) varied costs
    layer.objective(losses).backward()
    assert boxes.grad is not None and boxes.grad.abs().sum() > 0
    assert layer.log_std.grad is not None and layer.log_std.grad.abs().sum() > 0
    assert layer.last_log_p is None  # consumed: a second objective adds no stale surrogate


def test_reinforce_eval_is_deterministic_and_plain_mean() -> None:
    layer = ReinforceGlimpse(GlimpseSpec((1, 16, 16), size=4, glimpses=1)).eval()
    images, boxes = torch.rand(5, 1, 16, 16), torch.randn(5, 1, 4)
    assert torch.equal(layer(images, boxes), layer(images, boxes))
    losses = torch.rand(5)
    assert layer.objective(losses) == losses.mean()


def test_reinforce_baseline_is_a_moving_average() -> None:
    layer = ReinforceGlimpse(GlimpseSpec((1, 8, 8), size=2, glimpses=1), baseline_decay=0.5)
    images, boxes = torch.rand(4, 1, 8, 8), torch.zeros(4, 1, 4)
    for cost, expected in [(2.0, 2.0), (4.0, 3.0), (0.0, 1.5)]:
        layer(images, boxes)
        layer.objective(torch.full((4,), cost))
        assert float(layer.baseline) == pytest.approx(expected)


def test_reinforce_fixed_std_is_not_a_parameter() -> None:
    layer = ReinforceGlimpse(GlimpseSpec((1, 8, 8), size=2, glimpses=3), std=0.25, learn_std=False)
    assert not any(name == "log_std" for name, _ in layer.named_parameters())
    assert torch.allclose(layer.snapshot()["std"], torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="std must be > 0"):
        ReinforceGlimpse(GlimpseSpec((1, 8, 8), size=2, glimpses=1), std=0.0)


def test_reinforce_sign_on_a_bandit() -> None:
    """Loss = -(mean brightness of the glimpse); the bright half is on the right: the policy's
    column corners must move right (an estimator with the wrong sign moves them left)."""
    torch.manual_seed(0)
    h = w = 20
    layer = ReinforceGlimpse(GlimpseSpec((1, h, w), size=3, glimpses=1), std=1.0, learn_std=False)
    images = torch.zeros(64, 1, h, w)
    images[..., w // 2 :] = 1.0
    box = torch.zeros(1, 1, 4, requires_grad=True)  # the policy mean, as a free parameter
    opt = torch.optim.SGD([box], lr=0.05)
    for _ in range(150):
        glimpses = layer(images, box.expand(64, 1, 4))
        layer.objective(-glimpses.flatten(1).mean(1)).backward()
        opt.step()
        opt.zero_grad()
    assert box[0, 0, 1] > 0.5 and box[0, 0, 3] > 0.5  # both column corners moved right
    layer.eval()
    assert layer(images[:1], box.detach()).mean() == 1.0  # every point of the glimpse is bright


def test_bilinear_estimator_builds_glimpses_only() -> None:
    est = BilinearEstimator()
    layer = est.build(GlimpseSpec((1, 10, 10), size=3, glimpses=2), {"box_offset": 2.0})
    assert isinstance(layer, BilinearGlimpse)
    assert layer.offset.tolist() == [-2.0, -2.0, 2.0, 2.0]
    assert est.unsupported(PermutationSpec(n=4, source="keys")) is not None
    with pytest.raises(Unsupported, match="glimpse"):
        est.build(PermutationSpec(n=4, source="keys"), {})


def test_bilinear_estimator_registers_through_its_hook() -> None:
    registered: list[object] = []
    register_estimators(register=registered.append)
    assert [type(e) for e in registered] == [BilinearEstimator]
    assert registered[0].name == "bilinear" and registered[0].kinds == {"glimpse"}
