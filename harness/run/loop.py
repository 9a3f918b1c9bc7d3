"""One cell's training loop, the only one: Adam over the task's model, a step at a time, with
evaluations on the task's schedule in eval mode.

The runner (``harness.run.cell``) and ``check-plugin`` (``harness.plugins.conformance``) both train
through ``Loop``, so a plugin is checked exactly as it is run. What the runner adds (the metrics
sink, checkpoints when due, the heartbeat and its fencing, signals, snapshots, progress) hangs on
``Hooks``; ``check-plugin`` passes none. The order of random draws, optimiser steps, evaluations
and hook calls is part of the contract: a resumed cell must train bit for bit as an uninterrupted
one, so change it only knowing that every stored metric moves with it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager

import torch

from harness.task import TaskRun, evaluating

__all__ = ["BadObjective", "Diverged", "Hooks", "Loop"]


class Diverged(Exception):
    """A non-finite loss or metric at ``step``; the cell ends as ``diverged``. ``values`` are all
    that ``during`` (``train_step`` or ``evaluate``) gave, ``key`` the first one not finite."""

    def __init__(self, values: Mapping[str, float], step: int, during: str) -> None:
        super().__init__(dict(values), step, during)
        self.values, self.step, self.during = dict(values), step, during
        self.key = next(k for k, v in self.values.items() if not math.isfinite(v))

    def __str__(self) -> str:
        return f"{self.key} = {self.values[self.key]} is not finite"


class BadObjective(Exception):
    """``train_step`` broke the contract: its objective is not a 0-dim tensor."""


class Hooks:
    """What a runner hangs on the loop; each a no-op here, which is how ``check-plugin`` trains."""

    def section(self) -> AbstractContextManager[object]:
        """Wraps one step (and a final snapshot): a signal waits for it to end."""
        return contextlib.nullcontext()

    def boundary(self, step: int, last: bool = False) -> None:
        """Before ``step`` (``last``: after the final step): fencing, checkpoints, signals."""

    def snapshot(self, step: int) -> None:
        """At one of the task's snapshot steps, before that step trains."""

    def trained(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        """After the optimiser step of ``step``, before any evaluation it makes due."""

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation of the model as it is after ``step`` steps (0: untrained)."""

    def advanced(self, loss: float) -> None:
        """At the very end of a step."""


def _finite(values: Mapping[str, float], step: int, during: str) -> None:
    if not all(math.isfinite(value) for value in values.values()):
        raise Diverged(values, step, during)


class Loop:
    """``Loop(run, lr, hooks).train()``; ``step`` is the number of steps taken (a resume sets it)."""

    def __init__(self, run: TaskRun, lr: float, hooks: Hooks | None = None) -> None:
        self.run, self.hooks = run, hooks or Hooks()
        self.optimiser = torch.optim.Adam(run.model.parameters(), lr=lr)
        self.step = 0

    def evaluate(self) -> dict[str, float]:
        """The task's metrics, in eval mode without gradients; raises ``Diverged`` if any is not finite."""
        with evaluating(self.run.model):
            metrics = self.run.evaluate()
        _finite(metrics, self.step, "evaluate")
        return metrics

    def train(self, stop: int | None = None, evaluate_first: bool = True) -> None:
        """Train from ``step`` to ``stop`` (default: the task's steps), evaluating first (a fresh
        start: the untrained model's metrics at step 0) and every ``eval_every`` steps."""
        run, hooks, optimiser = self.run, self.hooks, self.optimiser
        stop = run.steps if stop is None else stop
        run.model.train()
        if evaluate_first:
            hooks.evaluated(0, self.evaluate())
        for step in range(self.step, stop):
            hooks.boundary(step)
            with hooks.section():
                if step in run.snapshot_steps:
                    hooks.snapshot(step)
                objective, metrics = run.train_step(step)
                if not isinstance(objective, torch.Tensor) or objective.dim() != 0:
                    raise BadObjective(f"train_step returned objective {objective!r}, not a 0-dim tensor")
                loss = float(objective.detach())
                _finite({"train/objective": loss, **metrics}, step, "train_step")
                optimiser.zero_grad(set_to_none=True)
                objective.backward()
                optimiser.step()
                hooks.trained(step, loss, metrics)
                done = step + 1
                self.step = done
                if done % run.eval_every == 0 or done == run.steps:
                    hooks.evaluated(done, self.evaluate())
                hooks.advanced(loss)
        hooks.boundary(stop, last=True)
        if stop in run.snapshot_steps:
            with hooks.section():
                hooks.snapshot(stop)
