"""The plugin contract is the only door: what the tasks read from a structure layer (box geometry,
intermediate sorting states) a third-party estimator can serve through ``estimators.base`` alone."""

from __future__ import annotations

import json

import torch

from estimators.base import GlimpseLayer, PermutationOutput, StructureLayer
from harness.task import CellSetup
from plugins.attention import AttentionTask
from plugins.sorting import instance_bce, sorted_targets, sorting_loss


class NearestGlimpse(GlimpseLayer):
    """A third-party glimpse: the nearest pixels of the box, with its own (steeper) geometry."""

    def corners(self, boxes: torch.Tensor) -> torch.Tensor:
        return 2 * boxes + self.offset

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        self.check_input(images, boxes)
        b, c, h, w = images.shape
        g, k = self.spec.glimpses, self.spec.size
        box = self.box_pixels(boxes, h, w)  # (b, g, 4)
        steps = torch.linspace(0, 1, k)
        ys = (box[..., 0:1] + steps * (box[..., 2:3] - box[..., 0:1])).round().long()  # (b, g, k)
        xs = (box[..., 1:2] + steps * (box[..., 3:4] - box[..., 1:2])).round().long()
        flat = (ys[..., :, None] * w + xs[..., None, :]).reshape(b, 1, g * k * k)
        out = images.reshape(b, c, h * w).gather(2, flat.expand(b, c, -1))
        return out.reshape(b, c, g, k, k).transpose(1, 2)  # (b, g, c, k, k)


def test_attention_reads_a_third_party_glimpse_through_the_contract(tmp_path):
    task = AttentionTask()
    params = {**task.defaults, **task.smoke}
    spec = task.spec("glimpse", params)
    layer = NearestGlimpse(spec)
    run = task.setup(CellSetup(params, layer, "glimpse", torch.device("cpu"), 0, tmp_path / "cache"))
    metrics = run.evaluate()
    assert 0.0 <= metrics["test/saturated_frac"] <= 1.0  # from the layer's own corners()
    boxes = torch.full((1, spec.glimpses, 4), 5.0)  # 2 * 5 +- 1: saturated in this layer's geometry
    assert torch.equal(run.model.preactivations(boxes), layer.corners(boxes))
    run.write_artifacts(0, tmp_path)
    record = json.loads((tmp_path / "glimpses.json").read_text())
    raw = torch.tensor(record["boxes_raw"])
    _, h, w = spec.image_shape
    torch.testing.assert_close(torch.tensor(record["boxes_yxyx"]), layer.box_pixels(raw, h, w))


class TwoStageSort(StructureLayer):
    """A third-party sorter in two stages (reverse, then the rest), offering its intermediate state."""

    def forward(self, keys: torch.Tensor) -> PermutationOutput:
        b, n = keys.shape
        order = keys.argsort(-1)
        full = torch.nn.functional.one_hot(order, n).float()  # (b, n, n)
        swap = torch.eye(n).flip(0).expand(b, n, n)  # reverse first, then sort the reversed items
        return PermutationOutput([swap, full @ swap.transpose(1, 2)], intermediate=True)


def test_sorting_supervises_a_third_party_layers_intermediate_states():
    torch.manual_seed(0)
    layer = TwoStageSort()
    values = torch.stack([torch.randperm(4) for _ in range(2)])  # (2, 4)
    x = (torch.rand(2, 4, 5) > 0.5).float()
    target, _ = sorted_targets(x, values)
    out = layer(values.float())
    torch.testing.assert_close(out.matrix @ x, target)
    loss, final = sorting_loss(layer, out, x, target, intermediate=True)
    xs, ts = out.intermediate_inputs(x), out.intermediate_targets(target)
    assert len(xs) == len(ts) == 3
    torch.testing.assert_close(loss, sum(instance_bce(a, t) for a, t in zip(xs, ts, strict=True)))
    torch.testing.assert_close(final, instance_bce(xs[-1], target))
    plain = PermutationOutput(out.steps)  # the same steps, not offered as intermediate states
    alone, _ = sorting_loss(layer, plain, x, target, intermediate=True)
    torch.testing.assert_close(alone, instance_bce(plain.matrix @ x, target))


def test_intermediate_targets_undo_each_step():
    steps = [torch.eye(3)[[1, 2, 0]].expand(1, 3, 3), torch.eye(3)[[2, 1, 0]].expand(1, 3, 3)]
    out = PermutationOutput(steps, intermediate=True)
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    xs = out.intermediate_inputs(x)
    ts = out.intermediate_targets(xs[-1])
    for state, target in zip(xs, ts, strict=True):  # the right keys: every state hits its target
        torch.testing.assert_close(state, target)
