"""The sorting task (paper §3.3, Table 3, appendix A.1, Fig. 6 and 7): learn to sort MNIST numbers.

An instance is ``n`` random ``digits``-digit numbers, each shown as ``digits`` MNIST images of the
right labels, most significant first (train digits for training, test digits for evaluation). A
scoring network maps every number to scores, the same network for every number; the estimator's
permutation layer turns the scores into (soft) permutation matrices. Only the network learns.
How many scores per number the network emits is the layer's ``scores_per_item``: 1 (a key, for
quicksort, NeuralSort, Plackett-Luce) or ``n`` (one per output position, Gumbel-Sinkhorn as Mena
et al. 2018); the task sizes the network's head to match (``estimators.base.PermutationSpec``).

Protocols (task param ``protocol``) fix the data, the network and the metrics:

- ``"bloem"``: the paper's. 3-digit numbers, ``n`` in 4, 8, 16; Table 3's key network (a ConvNet
  per digit, an MLP per number); ``error_pct`` is the share of instances whose key order is not a
  correct sort, ``error_strict_pct`` the share not in *the* sorted order (tied numbers in input
  order: the authors' index comparison, so the error of the paper's "error out of 10 000"),
  ``per_element_acc`` the share of positions that hold a number of the right value. As §3.3 says,
  evaluation ignores the sorting layer and sorts by the keys; a layer that reads ``n`` scores per
  item has no keys, so its evaluation takes the permutation its ``eval()`` mode returns (a hard
  matching). Target at ``n`` = 4: ``val/error_pct <= 10``, §3.3's "reaching an error below 10%".
- ``"neuralsort"``: Grover et al. 2019, §6.1 and appendix D.1. 4-digit numbers (``digits`` must
  be 4), ``n`` in 3, 5, 7, 9, 15; every number one ``112 x 28`` image (its digits stacked, as
  NeuralSort's ``tf/mnist_input.py`` builds them) through NeuralSort's CNN
  (``plugins.sorting_networks.LargeMnistCNN``). Besides the metrics above, ``all_correct`` and
  ``per_element_correct`` (fractions, the names that literature reports). The report selects, like
  Grover et al., the evaluation (checkpoint) and the temperature with the best validation
  all-correct and shows the test numbers there. Quicksort needs ``n`` a power of two, so its cells
  at these ``n`` are ``n/a`` (the estimator decides that).

Both protocols hold every 6th training digit out as the validation split (50k / 10k of MNIST's
60k: appendix D of Grover et al.; §3.3 of the paper says only "a validation split of the MNIST
training data"); training instances use the other digits. Each evaluation scores
``eval_instances`` validation instances (``val/...``, from the held-out digits) and as many test
instances (``test/...``, from the test digits).

Losses (task param ``loss``), per instance:

- ``"intermediate_bce"`` (§3.3, the paper's): for layers whose output is marked ``intermediate``
  (the sparse quicksort; see ``estimators.base.PermutationOutput``), the target is fed back
  through the transposed half-permutations and ``BCE(x_d, t_d)`` is summed over
  ``d = 0 .. log2 n``; other layers get ``"bce"``.
- ``"bce"``: ``BCE(clamp(P @ x), t)`` averaged over items and pixels, with ``x`` the instance's
  images ``(n, digits * 784)`` in input order, ``t`` the images in ascending order of the numbers
  (ties kept in input order, so ``t`` is one of the correct sorts) and the clamp the paper's
  footnote 8.
- ``"permutation_ce"`` (Grover et al. 2019, D.1): the row-wise cross-entropy between the true
  permutation matrix and the layer's (relaxed) one, ``-mean_i sum_j T_ij log(P_ij + 1e-20)``, the
  ``1e-20`` as in NeuralSort's ``tf/run_sort.py``. Rows are output positions in ascending order;
  NeuralSort sorts descending, which reverses the rows and leaves the mean unchanged. Ties take
  the stable order (NeuralSort's target splits a row between tied items; 4-digit ties are rare).

The per-instance loss goes through ``layer.objective`` (Plackett-Luce adds its score-function
term there). ``train/final_bce`` (BCE losses) is the final-step term alone, comparable across
estimators.

Evaluation runs the network in eval mode (BatchNorm's running statistics) on ``eval_instances``
instances drawn from streams fixed by the sizes alone (``evaluation_instances``), so every cell
of every seed meets the same instances. A predicted order counts as correct when it is *a*
correct sort: ties between equal numbers may come in either order
(``plugins.data.numbers.order_correct``; ``error_pct``). ``error_strict_pct`` is the
authors' error, which compares indices: tied numbers must come in input order
(``order_strict``). Both are logged; ``ties`` (``"any_order"`` or ``"strict"``) says which one
the report's Fig. 6 shows.

Artifacts (written at the ``snapshots`` steps, before that step's update, from that step's first
training instance with the layer in training mode; the data of Fig. 7; ``L`` is the number of
steps the layer returns: ``log2 n`` for quicksort, 1 for the others). ``quicksort_steps.json``::

    {
      "schema": "sparsebench.sorting.quicksort_steps/2",
      "step": int, "n": int, "digits": int, "protocol": str,
      "layer": str,                      # class name of the permutation layer
      "values": [n] int,                 # the numbers, input order
      "scores": [n] or [n][n] float,     # the network's scores, input order
      "order": [n] int,                  # input index at every sorted position (stable)
      "matrices": [L][n][n] float,       # P_d, with x_d = P_d @ x_{d-1} (soft in training)
      "x": {"values": [L+1][n] float, "intensity": [L+1][n] float},   # x_0 (input) .. x_L
      "t": {"values": [L+1][n] float, "intensity": [L+1][n] float},   # t_0 .. t_L (sorted)
      "images": "quicksort_steps.npz"
    }

and ``quicksort_steps.npz`` with float32 arrays ``x`` and ``t``, each ``(L+1, n, digits, 28, 28)``:
the images as every step mixes them (Fig. 7 draws these). ``values`` rows are the numbers mixed
by the matrices, ``intensity`` rows the items' mean pixel intensity mixed the same way; ``t_L`` is
the sorted input and ``t_{d-1} = P_d^T t_d``.
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

from estimators.base import (
    PermutationOutput,
    PermutationSpec,
    Spec,
    StructureLayer,
    repeat_samples,
    training_samples,
)
from harness.hookspecs import hookimpl
from harness.task import CellSetup, ParamError, Range, Target, Task, TaskRun, data_root
from plugins.data.mnist import DigitSet
from plugins.data.numbers import (
    NEURALSORT_PROTOCOL,
    VALIDATION_EVERY,
    order_correct,
    order_strict,
    sorting_indices,
    target_permutation,
    validation_split,
)
from plugins.data.sources import DATASETS, load_digits, resolve_dataset
from plugins.sorting_networks import KeyNetwork, LargeMnistCNN

__all__ = [
    "ARTIFACT",
    "ARTIFACT_IMAGES",
    "ARTIFACT_SCHEMA",
    "LOSSES",
    "PROTOCOLS",
    "SortingModel",
    "SortingTask",
    "evaluation_instances",
    "instance_bce",
    "permutation_cross_entropy",
    "quicksort_steps",
    "register_tasks",
    "scoring_network",
    "sorted_targets",
    "sorting_loss",
]

PROTOCOLS = ("bloem", "neuralsort")
LOSSES = ("intermediate_bce", "bce", "permutation_ce")
TIES = ("any_order", "strict")  # which error the report shows; both are logged
ARTIFACT = "quicksort_steps.json"
ARTIFACT_IMAGES = "quicksort_steps.npz"
ARTIFACT_SCHEMA = "sparsebench.sorting.quicksort_steps/2"
BCE_EPS = 1e-6  # outputs are clamped into [BCE_EPS, 1 - BCE_EPS] before the BCE
CE_EPS = 1e-20  # added inside the log of the permutation cross-entropy (NeuralSort's run_sort.py)
EVAL_IMAGES = 4096  # digit images per network pass in evaluation (bounds memory at n = 16)
# Seed-stream tags: training batches, the fixed training pool, the test and the validation
# instances never share a seed.
_TRAIN, _POOL, _EVAL, _VAL = 1, 2, 3, 4
#: §3.3: "for size 4 instances, the method performs very well, reaching an error below 10%".
PAPER_TARGET_N, PAPER_TARGET = 4, Target("val/error_pct", 10.0)


class SortingModel(nn.Module):
    """The scoring network and the permutation layer as one module, so the runner trains both."""

    def __init__(self, scorer: nn.Module, layer: StructureLayer):
        super().__init__()
        self.scorer, self.layer = scorer, layer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, PermutationOutput]:
        """``(b, n, digits, 28, 28)`` -> scores (``(b, n)`` or ``(b, n, n)``) and the layer's output.

        The network scores every instance once; the layer sees the scores repeated for its
        ``samples`` (``S * b`` rows, sample-major; ``estimators.base.repeat_samples``)."""
        scores = self.scorer(images)
        return scores, self.layer(repeat_samples(scores, training_samples(self.layer)))


def scoring_network(protocol: str, digits: int, scores: int) -> nn.Module:
    """The protocol's network with a head of ``scores`` units per number."""
    if protocol == "neuralsort":
        return LargeMnistCNN(digits, scores)
    return KeyNetwork(digits, scores)


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


def permutation_cross_entropy(matrix: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Row-wise cross-entropy of ``matrix`` ``(b, n, n)`` against the sort of ``values`` ``(b, n)``.

    ``-mean_i log(matrix[i, order_i] + CE_EPS)`` with ``order`` the stable ascending sort: the
    loss of Grover et al. 2019 (D.1) between the true permutation matrix and the relaxed one.
    Returns ``(b,)``.
    """
    order = target_permutation(values)  # (b, n): the item each output row should take
    picked = matrix.gather(-1, order.unsqueeze(-1)).squeeze(-1)  # (b, n)
    return -(picked + CE_EPS).log().mean(-1)


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
    protocol: str,
    layer: StructureLayer,
    images: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    out: PermutationOutput,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The artifact payload (schema in the module docstring) for instance 0 of a batch.

    Returns the JSON document and the arrays of ``quicksort_steps.npz``.
    """
    n, digits = images.shape[1], images.shape[2]
    pixels = images[0].flatten(1).to(torch.float64)  # (n, digits * 784)
    items = torch.cat([values[0, :, None].to(torch.float64), pixels], dim=1)  # (n, 1 + pixels)
    target, order = sorted_targets(items[None], values[:1])  # (1, n, 1 + pixels)
    first = PermutationOutput(steps=[s[:1].to(torch.float64) for s in out.steps])  # L x (1, n, n)
    steps = first.steps
    xs = first.intermediate_inputs(items[None])  # (L+1) x (1, n, 1 + pixels)
    ts = first.intermediate_targets(target)

    def rows(states: list[torch.Tensor]) -> dict[str, list[list[float]]]:
        return {
            "values": [s[0, :, 0].tolist() for s in states],
            "intensity": [s[0, :, 1:].mean(1).tolist() for s in states],
        }

    def stack(states: list[torch.Tensor]) -> np.ndarray:
        mixed = torch.stack([s[0, :, 1:] for s in states])  # (L+1, n, pixels)
        return mixed.view(len(states), n, digits, 28, 28).to(torch.float32).numpy()

    data = {
        "schema": ARTIFACT_SCHEMA,
        "step": step,
        "n": n,
        "digits": digits,
        "protocol": protocol,
        "layer": type(layer).__name__,
        "values": [int(v) for v in values[0].tolist()],
        "scores": scores[0].tolist(),
        "order": order[0].tolist(),
        "matrices": [s[0].tolist() for s in steps],
        "x": rows(xs),
        "t": rows(ts),
        "images": ARTIFACT_IMAGES,
    }
    return data, {"x": stack(xs), "t": stack(ts)}


def _seed(*parts: int) -> int:
    """A 32-bit seed from independent stream parts (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class SortingTask(Task):
    name = "sorting"
    description = "learn to sort multi-digit MNIST numbers (paper §3.3, Fig. 6/7; NeuralSort's protocol)"
    kinds = ("permutation",)
    size_key = "n"
    primary_metric = "test/error_pct"
    select_metric = "val/error_pct"
    space: Mapping[str, Any] = {"lr": Range(1e-5, 1e-2, "log")}  # around A.1's 5e-5 (docs/protocols.md)
    defaults: Mapping[str, Any] = {
        "n": 4,
        "digits": 3,
        "protocol": "bloem",
        "loss": "intermediate_bce",  # §3.3; "bce" final output only; "permutation_ce" NeuralSort's
        "steps": 30_000,  # the authors' n = 4 run (sparse-hyper: plot.sort.py at the preprint)
        "eval_every": 500,
        "lr": 5e-5,
        "batch_size": 64,
        "eval_instances": 10_000,
        "train_instances": 0,  # 0: fresh random instances every step; else a fixed pool
        "dataset": "mnist",  # "mnist", "fashion-mnist" or "embedded-mnist" (plugins.data.sources)
        "snapshots": [0],  # steps that write quicksort_steps.json (Fig. 7: the first batch)
        "ties": "any_order",  # the error the report shows: "any_order" or "strict" (the authors')
    }
    smoke: Mapping[str, Any] = {
        "n": 4, "digits": 1, "steps": 3, "eval_every": 3, "batch_size": 4, "eval_instances": 16,
        "dataset": "embedded-mnist",
    }  # fmt: skip
    positive = ("n", "digits", "steps", "eval_every", "lr", "batch_size", "eval_instances")
    non_negative = ("train_instances", "snapshots")

    def expected_seconds(self, params: Mapping[str, Any]) -> float:
        # the key network dominates: ~2-7 ms per digit image per step on one CPU thread (measured:
        # 1.8 s per step at n = 4, batch 64, 3 digits; ~1.1 s at n = 5, batch 20, 4-digit images)
        return params["steps"] * 3e-3 * params["batch_size"] * params["n"] * params["digits"]

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        return PermutationSpec(n=params["n"], source="keys")

    def check(self, params: Mapping[str, Any]) -> None:
        for key, allowed in (("protocol", PROTOCOLS), ("loss", LOSSES), ("ties", TIES)):
            if params[key] not in allowed:
                raise ParamError(
                    f"sorting: {key} = {params[key]!r}; choose one of {', '.join(allowed)}"
                )
        if params["n"] < 2:
            raise ParamError(f"sorting: n = {params['n']} must be at least 2 (items per instance)")
        if params["digits"] < 1:
            raise ParamError(f"sorting: digits = {params['digits']} must be at least 1")
        wanted = NEURALSORT_PROTOCOL.digits_per_number
        if params["protocol"] == "neuralsort" and params["digits"] != wanted:
            raise ParamError(
                f"sorting: protocol 'neuralsort' uses {wanted}-digit numbers, but digits = "
                f"{params['digits']}; set digits = {wanted}"
            )
        if params["eval_instances"] < 1:
            raise ParamError(f"sorting: eval_instances = {params['eval_instances']} must be positive")
        if params["train_instances"] < 0:
            raise ParamError(
                f"sorting: train_instances = {params['train_instances']} must be 0 (fresh "
                "instances every step) or a positive pool size"
            )
        if params["dataset"] not in DATASETS:
            raise ParamError(
                f"sorting: dataset = {params['dataset']!r}; choose one of {', '.join(DATASETS)}"
            )

    def check_data(self, params: Mapping[str, Any], allow_embedded: bool = False) -> Mapping[str, Any]:
        return {**params, "dataset": resolve_dataset(params["dataset"], data_root(), allow_embedded)}

    def setup(self, cell: CellSetup) -> TaskRun:
        p, device = cell.params, cell.device
        n, digits, protocol = p["n"], p["digits"], p["protocol"]
        splits = load_digits(p["dataset"], data_root())  # DataError (a UsageError) names the gap
        train, provenance = splits.train, dict(splits.provenance)
        provenance["data.name"] = f"{digits}-digit numbers/{p['dataset']}"
        train, val = validation_split(train)
        streams = {"val": (val, _VAL), "test": (splits.test, _EVAL)}
        provenance["data.validation"] = (
            f"every {VALIDATION_EVERY}th training digit: {len(train)} train, {len(val)} validation"
        )
        evaluation = {
            name: _EvalSet(pool, *evaluation_instances(pool, p["eval_instances"], n, digits, tag),
                           device)
            for name, (pool, tag) in streams.items()
        }
        train_images = train.images.to(device)  # (N, 28, 28); batches gather on the device
        layer, scores = cell.layer, cell.layer.scores_per_item
        if scores not in (1, n):
            raise ValueError(
                f"{type(layer).__name__}.scores_per_item = {scores}: a permutation layer reads "
                f"1 score per item (a key) or n = {n} (one per output position)"
            )
        model = SortingModel(scoring_network(protocol, digits, scores), layer)
        model = model.to(device)
        next_batch = _training_batches(train, p, cell.seed)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            index, values = next_batch(step)
            return train_images[index.to(device)], values.to(device)  # (b, n, d, 28, 28), (b, n)

        def train_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            images, values = batch(step)
            _, out = model(images)  # S * b permutations, sample-major
            samples = training_samples(model.layer)
            images, values = repeat_samples(images, samples), repeat_samples(values, samples)
            if p["loss"] == "permutation_ce":
                loss = permutation_cross_entropy(out.matrix, values)
                return model.layer.objective(loss), {"train/loss": loss.mean().item()}
            x = images.flatten(2)  # (b, n, d * 784): the data being sorted
            target, _ = sorted_targets(x, values)
            intermediate = p["loss"] == "intermediate_bce"
            loss, final = sorting_loss(model.layer, out, x, target, intermediate)
            metrics = {"train/loss": loss.mean().item(), "train/final_bce": final.mean().item()}
            return model.layer.objective(loss), metrics

        def evaluate() -> dict[str, float]:  # in eval mode (the runner's): never batch statistics
            metrics = {}
            for split, ev in evaluation.items():
                whole, item, strict = _score(model, ev)
                metrics |= {
                    f"{split}/error_pct": 100.0 * (1.0 - whole),
                    f"{split}/error_strict_pct": 100.0 * (1.0 - strict),
                    f"{split}/per_element_acc": item,
                }
                if protocol == "neuralsort":
                    metrics |= {f"{split}/all_correct": whole, f"{split}/per_element_correct": item}
            return metrics

        def write_artifacts(step: int, out_dir: Path) -> None:
            images, values = batch(step)
            # the whole batch, so that BatchNorm sees the statistics train_step(step) sees
            scores, out = _without_side_effects(model, device, lambda: model(images))
            data, arrays = quicksort_steps(
                step, protocol, model.layer, images[:1].cpu(), values[:1].cpu(),
                scores[:1].cpu(), _first(out),
            )
            (out_dir / ARTIFACT).write_text(json.dumps(data))
            np.savez_compressed(out_dir / ARTIFACT_IMAGES, **arrays)

        return TaskRun(
            model=model,
            steps=p["steps"],
            eval_every=p["eval_every"],
            train_step=train_step,
            evaluate=evaluate,
            write_artifacts=write_artifacts,
            provenance=provenance,
            snapshot_steps=tuple(p["snapshots"]),
            target=PAPER_TARGET if protocol == "bloem" and n == PAPER_TARGET_N else None,
            # no state_dict: batches are a pure function of the step (``_training_batches``) and
            # the layers draw from the global generators, which the runner checkpoints itself
        )


class _EvalSet:
    """Held-out instances on the device: digit images ``(N, 28, 28)``, indices, values."""

    def __init__(self, pool: DigitSet, index: torch.Tensor, values: torch.Tensor,
                 device: torch.device):
        self.images = pool.images.to(device)
        self.index, self.values = index.to(device), values.to(device)  # (count, n, d), (count, n)


def evaluation_instances(
    pool: DigitSet, count: int, n: int, digits: int, tag: int = _EVAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out instances: digit indices into ``pool`` (count, n, digits) and values (count, n).

    One stream per ``tag`` (test or validation) fixed by the sizes alone, so every estimator and
    seed meets the same instances.
    """
    return sorting_indices(pool, count, n, digits, _seed(tag))


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


def _score(model: SortingModel, ev: _EvalSet) -> tuple[float, float, float]:
    """All-correct, per-element and strictly-correct fractions of the model's orders on held-out
    instances (strict: tied numbers in input order, ``order_strict``).

    A key-based layer is left out (§3.3: sort by the keys, stable); a layer that reads ``n``
    scores per item gives its hard ``eval()`` permutation, read as the item at every position.
    """
    n, d = ev.index.shape[1:]
    per_pass = max(1, EVAL_IMAGES // (n * d))  # instances per network pass
    orders = []
    for part in ev.index.split(per_pass):
        scores = model.scorer(ev.images[part])  # (p, n) or (p, n, n)
        if model.layer.scores_per_item == 1:
            orders.append(scores.argsort(dim=-1, stable=True))
        else:
            orders.append(model.layer(scores).matrix.argmax(dim=-1))
    order = torch.cat(orders)  # (count, n)
    whole, items = order_correct(order, ev.values)  # (count,), (count, n) bool
    strict = order_strict(order, ev.values)  # (count,) bool
    return whole.double().mean().item(), items.double().mean().item(), strict.double().mean().item()


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
