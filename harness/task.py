"""The task side of the plugin contract: ``Task`` (what a plugin registers) and ``TaskRun``.

The runner owns the loop (optimiser, progress, evaluation schedule, divergence checks, logging);
a task owns data, model and metrics. That split keeps every task's training identical in the parts
that a comparison must hold fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from estimators.base import Spec, StructureLayer

__all__ = ["CellSetup", "Task", "TaskRun"]


@dataclass(frozen=True)
class CellSetup:
    """Everything a task needs to build one cell; plain data plus the built structure layer."""

    params: Mapping[str, Any]  # the task's resolved parameters (defaults < preset < overrides)
    layer: StructureLayer  # the estimator's answer to ``Task.spec``
    kind: str  # which of ``Task.kinds`` the layer serves
    device: torch.device
    seed: int
    cache_dir: Path  # where generated data may be cached across cells (keyed by config hash)


@dataclass
class TaskRun:
    """One cell's model and the three callables the runner drives.

    - ``train_step(step)`` returns ``(objective, metrics)``: the scalar to backpropagate (already
      passed through ``layer.objective``) and floats to log at that step (``train/...``).
    - ``evaluate()`` runs under ``torch.no_grad()`` and ``model.eval()`` and returns floats
      (``eval/...``); the first key listed in ``Task.primary_metric`` is the summary metric.
    - ``write_artifacts(step, out_dir)`` may write files (snapshots, figures' data) that the
      runner logs under ``artifacts/step=<step>/``; it is called at ``Task``'s snapshot steps.
    """

    model: nn.Module
    steps: int
    eval_every: int
    train_step: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]]
    write_artifacts: Callable[[int, Path], None] | None = None
    provenance: dict[str, str] = field(default_factory=dict)  # logged as data.* tags
    snapshot_steps: tuple[int, ...] = ()


class Task:
    """Base class for task plugins. Subclass it and register an instance.

    Required:
    - ``name``: unique identifier (``identity``, ``attention``, ``sorting``).
    - ``description``: one line for ``sparsebench list``.
    - ``kinds``: structure kinds the task can use, most preferred first; the harness hands the
      estimator the first kind it supports, else the cell is ``n/a``.
    - ``defaults``: every task parameter with its default. It must contain ``steps``,
      ``eval_every``, ``lr`` and ``batch_size`` (the runner reads them) and ``size_key``'s key.
    - ``size_key``: the parameter that ``--size`` selects on (``n``, ``glimpse``).
    - ``primary_metric``: the eval metric that summaries and reports rank by (lower is better).
    - ``spec(kind, params)``: the structure spec to ask the estimator for.
    - ``setup(cell)``: build data and model on ``cell.device`` and return a ``TaskRun``.
    Optional:
    - ``choices``: for parameters with a fixed set of values, that set (checked with the config).
    - ``check(params)``: raise ``harness.errors.UsageError`` for a problem found before any training
      (missing data root, a size the task cannot take); the CLI turns it into exit code 2.
    - ``smoke``: parameter overrides that make one cell take seconds (tiny sizes and data, a few
      steps); ``sparsebench check-plugin`` trains every estimator it checks on them.

    How the kind is chosen: for a cell, the harness walks ``kinds`` in order, asks ``spec(kind,
    params)`` for each, and takes the first whose spec the estimator's ``unsupported`` accepts; if
    none, the cell is ``n/a`` with the estimator's reasons. ``setup`` learns the choice from
    ``CellSetup.kind``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    size_key: ClassVar[str] = "n"
    primary_metric: ClassVar[str] = "eval/loss"
    smoke: ClassVar[Mapping[str, Any]] = {}

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        raise NotImplementedError

    def setup(self, cell: CellSetup) -> TaskRun:
        raise NotImplementedError

    def check(self, params: Mapping[str, Any]) -> None:
        return None
