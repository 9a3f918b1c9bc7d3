"""The identity task (paper §3.1): learn ``W`` with ``W x = x`` from ``x ~ N(0, I_n)``.

Loss: per-instance MSE between ``W x`` and ``x``. Evaluation: ``eval_samples`` test vectors and as
many validation vectors, each drawn once per seed from a generator of its own (apart from the
training stream and from each other), with the structure made deterministic (``eval()``: rounded
means for sampled estimators, Hungarian for Gumbel-Sinkhorn). ``val/mse`` and ``test/mse`` are the
MSE on each; the validation generator draws nothing from the training stream, so training is
bit-identical with or without it.

``val/rows_correct`` and ``test/rows_correct`` (one number, logged under both keys: it reads ``W``,
not the data): the fraction of rows of the deterministic ``W`` whose largest-magnitude
entry sits on the diagonal and carries at least 90% of the row's absolute mass. For the sampled
sparse layer this is exact structure (one tuple per row at the right column); the mass rule lets a
dense ``W`` count only once it is near-diagonal. ``W`` is read column by column by feeding basis
vectors through the layer, so the metric uses the same forward pass that is being judged.

Target: ``val/mse <= 0``, the rounded structure exactly I. ``stop_after`` = K > 0 ends a cell once
K evaluations in a row met it (the harness's stop rule); 0 trains the full ``steps``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from estimators.base import (
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    repeat_samples,
    training_samples,
)
from harness.hookspecs import hookimpl
from harness.task import CellSetup, Range, Target, Task, TaskRun

__all__ = ["IdentityTask", "rows_correct"]

EVAL_SEED_OFFSET = 1_000_003  # test vectors never coincide with the training stream
VAL_SEED_OFFSET = 4_000_037  # nor validation vectors with either
SNAPSHOT_SEED_OFFSET = 2_000_003  # the step-0 snapshot's own draw (Fig. 3), apart from both
ROW_MASS = 0.9
TARGET = Target("val/mse", 0.0)  # exact I: the rounded structure reproduces every validation vector


def rows_correct(weight: torch.Tensor) -> float:
    """Fraction of rows of ``weight`` (n, n) that are structurally those of the identity."""
    mag = weight.abs()
    mass = mag.sum(dim=1).clamp_min(1e-12)
    right = (mag.argmax(dim=1) == torch.arange(len(weight), device=weight.device)) & (
        mag.diagonal() >= ROW_MASS * mass
    )
    return right.float().mean().item()


class IdentityTask(Task):
    name = "identity"
    description = "learn the n x n identity from x ~ N(0, I) (paper §3.1, Fig. 2/3)"
    kinds = ("sparse_matrix", "permutation")
    size_key = "n"
    primary_metric = "test/mse"
    select_metric = "val/mse"
    defaults: Mapping[str, Any] = {
        "n": 8,
        "steps": 2000,
        "eval_every": 250,
        "lr": 0.005,
        "batch_size": 64,
        "eval_samples": 10000,
        "snapshots": [0, 1000, 5000, 9000, 13000],  # the steps of the paper's Fig. 3
        "stop_after": 0,  # K > 0: stop once exact I has held for K evaluations in a row
    }
    # lr for every estimator: the span of the paper's REINFORCE grid that the other estimators' rates
    # (0.005, 0.001 in A.1) sit in, on a log scale (docs/protocols.md, "Tuning")
    space: Mapping[str, Any] = {"lr": Range(1e-4, 1e-1, "log")}
    smoke: Mapping[str, Any] = {"n": 4, "steps": 3, "eval_every": 3, "batch_size": 8, "eval_samples": 64}
    positive = ("n", "steps", "eval_every", "lr", "batch_size", "eval_samples")
    non_negative = ("snapshots", "stop_after")
    resources: Mapping[str, float] = {"num_cpus": 1, "num_gpus": 0.25}  # four small cells share a GPU

    def expected_seconds(self, params: Mapping[str, Any]) -> float:
        return params["steps"] * 0.001 * params["n"]  # measured: 8-19 ms per step at n = 16

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        n = params["n"]
        if kind == "sparse_matrix":
            return SparseMatrixSpec(in_shape=(n,), out_shape=(n,), k=n)
        return PermutationSpec(n=n, source="free")

    def setup(self, cell: CellSetup) -> TaskRun:
        n, batch, device = cell.params["n"], cell.params["batch_size"], cell.device
        layer = cell.layer
        train_gen = torch.Generator(device=device).manual_seed(cell.seed)
        eval_gen = torch.Generator(device=device).manual_seed(cell.seed + EVAL_SEED_OFFSET)
        x_eval = torch.randn(cell.params["eval_samples"], n, generator=eval_gen, device=device)
        val_gen = torch.Generator(device=device).manual_seed(cell.seed + VAL_SEED_OFFSET)
        x_val = torch.randn(cell.params["eval_samples"], n, generator=val_gen, device=device)
        apply = _apply_permutation if cell.kind == "permutation" else _apply_matrix

        def train_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            x = torch.randn(batch, n, generator=train_gen, device=device)  # (b, n)
            x = repeat_samples(x, training_samples(layer))  # (S * b, n), sample-major
            per_sample = ((apply(layer, x) - x) ** 2).mean(dim=1)  # (S * b,)
            return layer.objective(per_sample), {"train/mse": per_sample.mean().item()}

        def mse(x: torch.Tensor) -> float:
            per_vector = [((apply(layer, xb) - xb) ** 2).mean(dim=1) for xb in x.split(2048)]
            return torch.cat(per_vector).mean().item()

        def evaluate() -> dict[str, float]:
            weight = apply(layer, torch.eye(n, device=device)).T  # row j of the output = W e_j
            rows = rows_correct(weight)
            return {"val/mse": mse(x_val), "val/rows_correct": rows,
                    "test/mse": mse(x_eval), "test/rows_correct": rows}

        def write_artifacts(step: int, out_dir: Path) -> None:
            snap = layer.snapshot()
            if "means" in snap and "samples" not in snap and layer.training:
                snap = _snapshot_with_sample(layer, apply, n, cell.seed + SNAPSHOT_SEED_OFFSET, device)
            if snap:
                payload = {k: v.detach().cpu().tolist() for k, v in snap.items()}
                (out_dir / "layer.json").write_text(json.dumps({"step": step, "n": n, **payload}))

        return TaskRun(
            model=layer,
            steps=cell.params["steps"],
            eval_every=cell.params["eval_every"],
            train_step=train_step,
            evaluate=evaluate,
            write_artifacts=write_artifacts,
            snapshot_steps=tuple(cell.params["snapshots"]),
            provenance={"data.source": "synthetic-normal", "data.eval_size": str(len(x_eval)),
                        "data.val_size": str(len(x_val))},
            # the training vectors are a stream: a resumed cell continues it where it stopped
            state_dict=lambda: {"train_gen": train_gen.get_state()},
            load_state_dict=lambda state: train_gen.set_state(state["train_gen"].cpu()),
            target=TARGET,
            stop_after=cell.params["stop_after"],
        )


def _snapshot_with_sample(
    layer: StructureLayer, apply: Callable[[StructureLayer, torch.Tensor], torch.Tensor], n: int,
    seed: int, device: torch.device,
) -> dict[str, torch.Tensor]:
    """The layer's snapshot after one training-mode forward of its own, for a snapshot taken before
    the first training step (Fig. 3's step 0), which has no sampled tuples yet.

    The draw is seeded apart from training and every RNG it touches is restored afterwards, so the
    cell's training numbers are bit-identical with or without this snapshot; the next training
    forward overwrites the sample it leaves on the layer.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        apply(layer, torch.randn(1, n, device=device))
        return layer.snapshot()


def _apply_matrix(layer: StructureLayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def _apply_permutation(layer: StructureLayer, x: torch.Tensor) -> torch.Tensor:
    perm = layer(x.shape[0]).matrix  # (b, n, n)
    return (perm @ x.unsqueeze(-1)).squeeze(-1)


@hookimpl
def register_tasks(register) -> None:
    register(IdentityTask())
