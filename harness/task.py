"""The task side of the plugin contract: ``Task`` (what a plugin registers) and ``TaskRun``.

The runner owns the loop (optimiser, progress, evaluation schedule, divergence checks, logging);
a task owns data, model and metrics. That split keeps every task's training identical in the parts
that a comparison must hold fixed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from estimators.base import Spec, StructureLayer
from estimators.params import Choice, Kinds, ParamError, Parameters, Range

__all__ = [
    "DATA_ROOT_ENV",
    "CellSetup",
    "Choice",
    "ParamError",
    "Range",
    "Target",
    "Task",
    "TaskRun",
    "data_root",
    "evaluating",
]

#: Where datasets live on this machine (``sparsebench run --data-root`` sets it for the run).
DATA_ROOT_ENV = "SPARSEBENCH_DATA_ROOT"


def data_root() -> Path | None:
    """The data root (``--data-root`` / ``$SPARSEBENCH_DATA_ROOT``), or None when unset.

    *Where* data lives, like the device: not part of a cell's config or id. A task's own
    parameters say *which* data a cell trains on; provenance tags record the files' sha256.
    """
    value = os.environ.get(DATA_ROOT_ENV, "")
    return Path(value).expanduser() if value else None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients, then back in the mode it was in: how the runner
    calls ``TaskRun.evaluate``, and how a task reads its model's deterministic answers elsewhere
    (a snapshot of predictions) without repeating the toggle."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class CellSetup:
    """Everything a task needs to build one cell; plain data plus the built structure layer."""

    params: Mapping[str, Any]  # the task's resolved parameters (defaults < preset < overrides)
    layer: StructureLayer  # the estimator's answer to ``Task.spec``
    kind: str  # which of ``Task.kinds`` the layer serves
    device: torch.device
    seed: int
    cache_dir: Path  # where generated data may be cached across cells (keyed by config hash)
    spec: Spec | None = None  # ``Task.spec(kind, params)``, as the layer was built for it (the runner's)


@dataclass(frozen=True)
class Target:
    """A goal on one validation metric (lower is better): met once ``metric <= value``. A task
    declares it so that the loop can record when a cell first got there and, if asked, stop a solved
    cell. It is judged on ``val/...``, never on ``test/...``, so that neither the stop rule nor the
    report's time to target ever reads the test set."""

    metric: str
    value: float

    def met(self, metrics: Mapping[str, float]) -> bool:
        return self.metric in metrics and metrics[self.metric] <= self.value

    def __str__(self) -> str:
        return f"{self.metric} <= {self.value:g}"


@dataclass
class TaskRun:
    """One cell's model and the three callables the runner drives.

    - ``train_step(step)`` returns ``(objective, metrics)``: the scalar to backpropagate (already
      passed through ``layer.objective``) and floats to log at that step (``train/...``). It
      feeds the layer every instance ``estimators.base.training_samples(layer)`` times,
      sample-major (``repeat_samples``), and hands ``objective`` one loss per row.
    - ``evaluate()`` runs under ``evaluating(model)`` (``torch.no_grad()``, ``model.eval()``; the
      runner enters it, the task need not) and returns floats, each metric twice: ``val/<m>`` on a
      validation split disjoint from the test data and ``test/<m>`` on the test data.
      ``Task.select_metric`` (a ``val/`` key) is what every selection reads; ``Task.primary_metric``
      (a ``test/`` key) is what summaries and reports show.
    - ``write_artifacts(step, out_dir)`` may write files (snapshots, figures' data) that the
      runner logs under ``artifacts/step=<step>/``; it is called at ``Task``'s snapshot steps,
      in training mode (``evaluating(model)`` for eval-mode answers).
    - ``state_dict()`` / ``load_state_dict(state)``: the task's own state beyond the model's
      parameters and buffers and the global random generators (which the runner saves itself),
      e.g. a data stream's generator, epoch and order. The runner puts it in every checkpoint
      and restores it before a resumed cell's first step, and a resumed cell must then train
      exactly as an uninterrupted one: a task whose batches are not a pure function of the step
      must provide both. Tensors, numbers, strings and lists/dicts of them only.
      Gradient diagnostics (``harness.run.diagnostics``) rely on the same: they call
      ``load_state_dict(state_dict())`` and then ``train_step(step)`` again (and ``step + 1``, ...)
      to draw extra gradients, and put everything back afterwards.
    - ``target``: the goal an evaluation may meet (``Target``); the loop logs the first step it
      was met at. ``stop_after`` > 0 ends the cell once the target has held for that many
      evaluations in a row (0: train the full ``steps``).
    """

    model: nn.Module
    steps: int
    eval_every: int
    train_step: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[], dict[str, float]]
    write_artifacts: Callable[[int, Path], None] | None = None
    provenance: dict[str, str] = field(default_factory=dict)  # logged as data.* tags
    snapshot_steps: tuple[int, ...] = ()
    state_dict: Callable[[], dict[str, Any]] | None = None
    load_state_dict: Callable[[dict[str, Any]], None] | None = None
    target: Target | None = None
    stop_after: int = 0


class Task(Parameters):
    """Base class for task plugins. Subclass it and register an instance.

    Required:
    - ``name``: unique identifier (``identity``, ``attention``, ``sorting``).
    - ``description``: one line for ``sparsebench list``.
    - ``kinds``: structure kinds the task can use, most preferred first; the harness hands the
      estimator the first kind it supports, else the cell is ``n/a``.
    - ``defaults``: every task parameter with its default. It must contain ``steps``,
      ``eval_every``, ``lr`` and ``batch_size`` (the runner reads them) and ``size_key``'s key.
    - ``size_key``: the parameter that ``--size`` selects on (``n``, ``glimpse``).
    - ``primary_metric``: the ``test/`` metric that summaries and reports show (lower is better).
    - ``select_metric``: the ``val/`` metric that every selection (the report's best configuration
      of a sweep, a tuning trial) reads (lower is better): the test data never chooses.
    - ``spec(kind, params)``: the structure spec to ask the estimator for.
    - ``setup(cell)``: build data and model on ``cell.device`` and return a ``TaskRun``.
    Optional:
    - ``choices``, ``positive`` / ``non_negative``, ``space`` and ``check(params)``: the
      parameters, declared as an estimator declares its own (``estimators.params.Parameters``);
      a task's ``space`` (its optimiser's ``lr`` at least) is searched for every estimator. ``check`` raises
      ``ParamError`` (``harness.errors.UsageError`` is accepted too) for a problem found before any
      training (a size the task cannot take); the CLI turns it into one line and exit code 2.
    - ``check_data(params, allow_embedded)``: check that the data ``params`` name is present,
      readable and complete under ``data_root()`` (headers and sizes, not a full load), and return
      the params to run with; raise ``UsageError`` naming what is missing and how to provide it.
      Called for every runnable cell before anything is written. ``allow_embedded`` (the user's
      ``--embedded-digits``) lets a task return params naming a small embedded stand-in for data
      that is missing; the changed params change the cell's id, so its record says so.
    - ``smoke``: parameter overrides that make one cell take seconds (tiny sizes and data, a few
      steps); ``sparsebench check-plugin`` trains every estimator it checks on them.
    - ``resources``: what one cell asks of a Ray node (``num_cpus``; ``num_gpus`` when it runs on
      CUDA, fractional so that small cells share a GPU). A config overrides it per task or variant
      (``resources = {num_gpus = 0.25}``); it never changes a cell's id or its results.
    - ``expected_seconds(params)``: a rough figure for one cell's training time on one CPU thread
      (the default: ``steps`` x 0.1 s). Parallel backends start the longest cells first, so that
      a matrix does not end on one straggler; once the same cell has finished in the store (any
      seed), its measured time is used instead. Only the order depends on it.

    How the kind is chosen: for a cell, the harness walks ``kinds`` in order, asks ``spec(kind,
    params)`` for each, and takes the first whose spec the estimator's ``unsupported`` accepts; if
    none, the cell is ``n/a`` with the estimator's reasons. ``setup`` learns the choice from
    ``CellSetup.kind``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kinds: ClassVar[Kinds] = ()
    size_key: ClassVar[str] = "n"
    primary_metric: ClassVar[str] = "test/loss"
    select_metric: ClassVar[str] = "val/loss"
    smoke: ClassVar[Mapping[str, Any]] = {}
    resources: ClassVar[Mapping[str, float]] = {"num_cpus": 1, "num_gpus": 1}

    def expected_seconds(self, params: Mapping[str, Any]) -> float:
        return params["steps"] * 0.1

    def spec(self, kind: str, params: Mapping[str, Any]) -> Spec:
        raise NotImplementedError

    def setup(self, cell: CellSetup) -> TaskRun:
        raise NotImplementedError

    def check_data(self, params: Mapping[str, Any], allow_embedded: bool = False) -> Mapping[str, Any]:
        return params
