"""The sorting task (paper §3.3, Table 3, appendix A.3, Fig. 6 and 7): learn keys that sort MNIST numbers.

An instance is ``n`` random ``digits``-digit numbers, each shown as ``digits`` MNIST images of the
right labels (train digits for training, test digits for evaluation). A key network (Table 3)
maps every number to one scalar key; the estimator's permutation layer turns the keys into
(soft) permutation matrices; the task sorts the instance's images with them and compares the
result with the correctly sorted images by binary cross-entropy. Only the key network learns.

Protocols (task param ``protocol``):

- ``"bloem"``: the paper's, 3-digit numbers and ``n`` in 4, 8, 16; ``eval/error_pct`` is the share
  of test instances whose key order is not a correct sort (the paper's "error out of 10 000").
- ``"neuralsort"``: the later literature's (Grover et al. 2019): 4-digit numbers (``digits`` must
  be 4), ``n`` in 3, 5, 7, 9, 15; additionally logs ``eval/all_correct`` and
  ``eval/per_element_correct`` as fractions, the names that literature reports. Quicksort needs
  ``n`` a power of two, so its cells for other ``n`` are ``n/a`` (the estimator decides that).

Loss, per instance: ``BCE(clamp(P @ x), t)`` averaged over items and pixels, with ``x`` the
instance's images ``(n, digits * 784)`` in input order, ``t`` the images in ascending order of the
numbers (ties kept in input order, so ``t`` is one of the correct sorts) and the clamp the paper's
footnote 8. Layers whose output is marked ``intermediate`` (the sparse quicksort; see
``estimators.base.PermutationOutput``) get the intermediate loss of §3.3 instead when
``intermediate_loss`` is true: the target is fed back through the transposed half-permutations and
``BCE(x_d, t_d)`` is summed over ``d = 0 .. log2 n``. The per-instance loss goes through
``layer.objective`` (Plackett-Luce adds its score-function term there). ``train/final_bce`` is
the final-step term alone, comparable across estimators.

Evaluation uses the keys only (no sorting layer; BatchNorm in eval mode) on ``eval_instances`` test
instances drawn from a stream fixed by the sizes alone (``evaluation_instances``), so every cell
of every seed meets the same instances. A key order counts as correct when it is *a* correct sort:
ties between equal numbers may come in either order (``plugins.data.numbers.sorting_correct``).
``eval/per_element_acc`` is the fraction of positions that hold a number of the right value.

Artifact ``quicksort_steps.json`` (written at the ``snapshots`` steps, before that step's update,
from that step's first training instance with the layer in training mode; the data of Fig. 7;
``L`` is the number of steps the layer returns: ``log2 n`` for quicksort, 1 for the others)::

    {
      "schema": "sparsebench.sorting.quicksort_steps/1",
      "step": int, "n": int, "digits": int,
      "layer": str,                      # class name of the permutation layer
      "values": [n] int,                 # the numbers, input order
      "keys": [n] float,                 # the key network's keys, input order
      "order": [n] int,                  # input index at every sorted position (stable)
      "matrices": [L][n][n] float,       # P_d, with x_d = P_d @ x_{d-1} (soft in training)
      "x": {"values": [L+1][n] float, "intensity": [L+1][n] float},   # x_0 (input) .. x_L
      "t": {"values": [L+1][n] float, "intensity": [L+1][n] float}    # t_0 .. t_L (sorted)
    }

``values`` rows are the numbers mixed by the matrices, ``intensity`` rows the items' mean pixel
intensity mixed the same way; ``t_L`` is the sorted input and ``t_{d-1} = P_d^T t_d``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import PermutationOutput, PermutationSpec, Spec, StructureLayer
from harness.errors import UsageError
from harness.hookspecs import hookimpl
from harness.task import CellSetup, Task, TaskRun, data_root
from plugins.data.mnist import DigitSet
from plugins.data.numbers import (
    NEURALSORT_PROTOCOL,
    sorting_correct,
    sorting_indices,
    target_permutation,
)
from plugins.data.sources import DATASETS, load_digits, resolve_dataset

__all__ = [
    "ARTIFACT",
    "ARTIFACT_SCHEMA",
    "PROTOCOLS",
    "KeyNetwork",
    "SortingModel",
    "SortingTask",
    "evaluation_instances",
    "instance_bce",
    "quicksort_steps",
    "register_tasks",
    "sorted_targets",
    "sorting_loss",
]

PROTOCOLS = ("bloem", "neuralsort")
ARTIFACT = "quicksort_steps.json"
ARTIFACT_SCHEMA = "sparsebench.sorting.quicksort_steps/1"
BCE_EPS = 1e-6  # outputs are clamped into [BCE_EPS, 1 - BCE_EPS] before the BCE
FEATURES = 8  # per-digit ConvNet output size (Table 3)
EVAL_IMAGES = 4096  # digit images per key-network pass in evaluation (bounds memory at n = 16)
# Seed-stream tags: training batches, the fixed training pool and the test instances never share a seed.
_TRAIN, _POOL, _EVAL = 1, 2, 3


def _conv_block(c_in: int, c: int) -> list[nn.Module]:
    """Three 3x3 convolutions, BatchNorm, 2x2 max-pool; the bias of the conv before BN is off."""
    return [
        nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False), nn.ReLU(),
        nn.BatchNorm2d(c),
        nn.MaxPool2d(2),
    ]


class KeyNetwork(nn.Module):
    """Table 3: a ConvNet shared by all digits (-> 8 features each), an MLP over a number's digits.

    ``forward(images: (b, n, digits, 28, 28)) -> keys (b, n)``.
    """

    def __init__(self, digits: int):
        super().__init__()
        self.digits = digits
        self.convnet = nn.Sequential(
            *_conv_block(1, 16),  # 28 -> 14
            *_conv_block(16, 64),  # 14 -> 7
            *_conv_block(64, 128),  # 7 -> 3
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(),
            nn.Linear(128, FEATURES),
        )
        self.mlp = nn.Sequential(
            nn.Linear(FEATURES * digits, 256), nn.ReLU(),
            nn.Linear(256, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, n, d = images.shape[:3]
        if d != self.digits or images.shape[3:] != (28, 28):
            raise ValueError(
                f"images must be (batch, n, {self.digits}, 28, 28), got {tuple(images.shape)}"
            )
        feats = self.convnet(images.reshape(b * n * d, 1, 28, 28))  # (b n d, 8)
        return self.mlp(feats.view(b * n, d * FEATURES)).view(b, n)  # (b, n)


class SortingModel(nn.Module):
    """The key network and the permutation layer as one module, so the runner trains both."""

    def __init__(self, keynet: KeyNetwork, layer: StructureLayer):
        super().__init__()
        self.keynet, self.layer = keynet, layer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, PermutationOutput]:
        """``(b, n, digits, 28, 28)`` -> keys ``(b, n)`` and the layer's permutation output."""
        keys = self.keynet(images)
        return keys, self.layer(keys)


def sorted_targets(x: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(b, n, ...)`` in ascending order of ``values`` ``(b, n)``, ties in input order.

    Returns the sorted data and the order ``(b, n)`` (input index at every sorted position).
    """
    order = target_permutation(values)  # (b, n)
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index), order


def instance_bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``output`` against ``target``; ``(b, ...)`` -> ``(b,)``.

    ``output`` is clamped into ``(0, 1)`` (footnote 8): a soft permutation of black pixels is
    exactly 0 where a fed-back target is grey, and BCE's gradient there is unbounded (NaN in
    practice). Fed-back targets are matrix products too, so they are clamped into ``[0, 1]``.
    """
    y = output.clamp(BCE_EPS, 1.0 - BCE_EPS)
    bce = F.binary_cross_entropy(y, target.clamp(0.0, 1.0), reduction="none")
    return bce.flatten(1).mean(1)


def sorting_loss(
    layer: StructureLayer,
    out: PermutationOutput,
    x: torch.Tensor,
    target: torch.Tensor,
    intermediate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance training loss and final-step BCE, both ``(b,)``; ``x``, ``target`` ``(b, n, m)``.

    With ``intermediate`` and an output that offers it, the loss is the §3.3 sum over all
    intermediate states; otherwise it is the BCE of the fully sorted output.
    """
    if intermediate and out.intermediate:
        xs = out.intermediate_inputs(x)  # x_0 .. x_L
        ts = out.intermediate_targets(target)  # t_0 .. t_L
        terms = [instance_bce(xd, td) for xd, td in zip(xs, ts, strict=True)]
        return torch.stack(terms).sum(0), terms[-1]
    final = instance_bce(out.matrix @ x, target)
    return final, final


def quicksort_steps(
    step: int,
    layer: StructureLayer,
    images: torch.Tensor,
    values: torch.Tensor,
    keys: torch.Tensor,
    out: PermutationOutput,
) -> dict[str, Any]:
    """The artifact payload (schema in the module docstring) for instance 0 of a batch."""
    n, digits = images.shape[1], images.shape[2]
    feats = torch.stack(
        [values[0].to(torch.float64), images[0].flatten(1).mean(1).to(torch.float64)], dim=1
    )  # (n, 2): value and mean intensity of every item
    target, order = sorted_targets(feats[None], values[:1])  # (1, n, 2)
    first = PermutationOutput(steps=[s[:1].to(torch.float64) for s in out.steps])  # L x (1, n, n)
    steps = first.steps
    xs = first.intermediate_inputs(feats[None])  # (L+1) x (1, n, 2)
    ts = first.intermediate_targets(target)

    def rows(states: list[torch.Tensor]) -> dict[str, list[list[float]]]:
        return {
            "values": [s[0, :, 0].tolist() for s in states],
            "intensity": [s[0, :, 1].tolist() for s in states],
        }

    return {
        "schema": ARTIFACT_SCHEMA,
        "step": step,
        "n": n,
        "digits": digits,
        "layer": type(layer).__name__,
        "values": [int(v) for v in values[0].tolist()],
        "keys": keys[0].tolist(),
        "order": order[0].tolist(),
        "matrices": [s[0].tolist() for s in steps],
        "x": rows(xs),
        "t": rows(ts),
    }


def _seed(*parts: int) -> int:
    """A 32-bit seed from independent stream parts (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class SortingTask(Task):
    name = "sorting"
    description = "learn keys that sort multi-digit MNIST numbers (paper §3.3, Fig. 6/7)"
    kinds = ("permutation",)
    size_key = "n"
    primary_metric = "eval/error_pct"
    defaults: Mapping[str, Any] = {
        "n": 4,
        "digits": 3,
        "protocol": "bloem",
        "steps": 100_000,
        "eval_every": 5_000,
        "lr": 5e-5,
        "batch_size": 64,
        "eval_instances": 10_000,
        "train_instances": 0,  # 0: fresh random instances every step; else a fixed pool
        "dataset": "mnist",  # "mnist", "fashion-mnist" or "embedded-mnist" (plugins.data.sources)
        "intermediate_loss": True,  # §3.3, for layers that offer it (quicksort)
        "snapshots": [0],  # steps that write quicksort_steps.json (Fig. 7: the first batch)
    }
    smoke: Mapping[str, Any] = {
        "n": 4, "digits": 1, "steps": 3, "eval_every": 3, "batch_size": 4, "eval_instances": 16,
        "dataset": "embedded-mnist",
    }  # fmt: skip
    positive = ("n", "digits", "steps", "eval_every", "lr", "batch_size", "eval_instances")
    non_negative = ("train_instances", "snapshots")

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        return PermutationSpec(n=params["n"], source="keys")

    def check(self, params: Mapping[str, Any]) -> None:
        if params["protocol"] not in PROTOCOLS:
            raise UsageError(
                f"sorting: protocol = {params['protocol']!r}; choose one of {', '.join(PROTOCOLS)}"
            )
        if params["n"] < 2:
            raise UsageError(f"sorting: n = {params['n']} must be at least 2 (items per instance)")
        if params["digits"] < 1:
            raise UsageError(f"sorting: digits = {params['digits']} must be at least 1")
        wanted = NEURALSORT_PROTOCOL.digits_per_number
        if params["protocol"] == "neuralsort" and params["digits"] != wanted:
            raise UsageError(
                f"sorting: protocol 'neuralsort' uses {wanted}-digit numbers, but digits = "
                f"{params['digits']}; set digits = {wanted}"
            )
        if params["eval_instances"] < 1:
            raise UsageError(f"sorting: eval_instances = {params['eval_instances']} must be positive")
        if params["train_instances"] < 0:
            raise UsageError(
                f"sorting: train_instances = {params['train_instances']} must be 0 (fresh "
                "instances every step) or a positive pool size"
            )
        if params["dataset"] not in DATASETS:
            raise UsageError(
                f"sorting: dataset = {params['dataset']!r}; choose one of {', '.join(DATASETS)}"
            )

    def check_data(self, params: Mapping[str, Any], allow_embedded: bool = False) -> Mapping[str, Any]:
        return {**params, "dataset": resolve_dataset(params["dataset"], data_root(), allow_embedded)}

    def setup(self, cell: CellSetup) -> TaskRun:
        p, device = cell.params, cell.device
        n, digits = p["n"], p["digits"]
        splits = load_digits(p["dataset"], data_root())  # DataError (a UsageError) names the gap
        train_images = splits.train.images.to(device)  # (N, 28, 28); batches gather on the device
        test_images = splits.test.images.to(device)
        eval_index, eval_values = evaluation_instances(splits.test, p["eval_instances"], n, digits)
        eval_index, eval_values = eval_index.to(device), eval_values.to(device)
        model = SortingModel(KeyNetwork(digits), cell.layer).to(device)
        next_batch = _training_batches(splits.train, p, cell.seed)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            index, values = next_batch(step)
            return train_images[index.to(device)], values.to(device)  # (b, n, d, 28, 28), (b, n)

        def train_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            images, values = batch(step)
            x = images.flatten(2)  # (b, n, d * 784): the data being sorted
            target, _ = sorted_targets(x, values)
            _, out = model(images)
            loss, final = sorting_loss(model.layer, out, x, target, p["intermediate_loss"])
            metrics = {"train/loss": loss.mean().item(), "train/final_bce": final.mean().item()}
            return model.layer.objective(loss), metrics

        def evaluate() -> dict[str, float]:
            was_training = model.training
            model.eval()  # the runner does this too; evaluation must never use batch statistics
            try:
                with torch.no_grad():
                    return _evaluate(
                        model.keynet, test_images, eval_index, eval_values, p["protocol"]
                    )
            finally:
                model.train(was_training)

        def write_artifacts(step: int, out_dir: Path) -> None:
            images, values = batch(step)
            # the whole batch, so that BatchNorm sees the statistics train_step(step) sees
            keys, out = _without_side_effects(model, device, lambda: model(images))
            data = quicksort_steps(
                step, model.layer, images[:1].cpu(), values[:1].cpu(), keys[:1].cpu(), _first(out)
            )
            (out_dir / ARTIFACT).write_text(json.dumps(data))

        return TaskRun(
            model=model,
            steps=p["steps"],
            eval_every=p["eval_every"],
            train_step=train_step,
            evaluate=evaluate,
            write_artifacts=write_artifacts,
            provenance={**splits.provenance, "data.name": f"{digits}-digit numbers/{p['dataset']}"},
            snapshot_steps=tuple(p["snapshots"]),
            # no state_dict: batches are a pure function of the step (``_training_batches``) and
            # the layers draw from the global generators, which the runner checkpoints itself
        )


def evaluation_instances(
    test: DigitSet, count: int, n: int, digits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test instances: digit indices into ``test`` (count, n, digits) and values (count, n).

    One stream fixed by the sizes alone, so every estimator and seed meets the same instances.
    """
    return sorting_indices(test, count, n, digits, _seed(_EVAL))


def _training_batches(
    train: DigitSet, p: Mapping[str, Any], seed: int
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batch(step)`` -> (digit indices (b, n, d), values (b, n)), a pure function of the step.

    Being a function of the step (not a stream) lets ``write_artifacts`` see exactly the batch that
    ``train_step`` of the same step trains on. Indices, not images: a pool of 10k instances of 16
    three-digit numbers is 4 MB as indices and 1.5 GB as images.
    """
    n, digits, batch, pool_size = p["n"], p["digits"], p["batch_size"], p["train_instances"]
    if pool_size == 0:
        return lambda step: sorting_indices(train, batch, n, digits, _seed(_TRAIN, seed, step))
    pool_index, pool_values = sorting_indices(train, pool_size, n, digits, _seed(_POOL, seed))

    def from_pool(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_seed(_TRAIN, seed, step))
        pick = torch.randint(pool_size, (batch,), generator=gen)  # (b,), with replacement
        return pool_index[pick], pool_values[pick]

    return from_pool


def _evaluate(
    keynet: KeyNetwork,
    images: torch.Tensor,
    index: torch.Tensor,
    values: torch.Tensor,
    protocol: str,
) -> dict[str, float]:
    """Score the keys of the test instances ``index`` (count, n, d) into ``images`` (N, 28, 28)."""
    n, d = index.shape[1:]
    per_pass = max(1, EVAL_IMAGES // (n * d))  # instances per key-network pass
    keys = torch.cat([keynet(images[part]) for part in index.split(per_pass)])  # (count, n)
    whole, items = sorting_correct(keys, values)  # (count,), (count, n) bool
    whole_frac, item_frac = whole.double().mean().item(), items.double().mean().item()
    metrics = {"eval/error_pct": 100.0 * (1.0 - whole_frac), "eval/per_element_acc": item_frac}
    if protocol == "neuralsort":
        metrics |= {"eval/all_correct": whole_frac, "eval/per_element_correct": item_frac}
    return metrics


def _without_side_effects(model: nn.Module, device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` without gradients, then restore the model's buffers and the RNG state.

    Snapshots are taken between training steps, in training mode; BatchNorm's running statistics
    and the layers' random draws must not differ from a run that takes none.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        result = fn()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return result


def _first(out: PermutationOutput) -> PermutationOutput:
    """Instance 0 of a batched output, on the CPU."""
    return PermutationOutput(steps=[s[:1].cpu() for s in out.steps])


@hookimpl
def register_tasks(register: Callable[[Task], None]) -> None:
    register(SortingTask())
