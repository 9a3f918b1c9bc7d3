"""One cell's training loop, the only one: Adam over the task's model, a step at a time, with
evaluations on the task's schedule in eval mode.

The runner (``harness.run.cell``) and ``check-plugin`` (``harness.plugins.conformance``) both train
through ``Loop``, so a plugin is checked exactly as it is run. What the runner adds (the metrics
sink, checkpoints when due, the heartbeat and its fencing, signals, snapshots, progress) hangs on
``Hooks``; ``check-plugin`` passes none. The order of random draws, optimiser steps, evaluations
and hook calls is part of the contract: a resumed cell must train bit for bit as an uninterrupted
one, so change it only knowing that every stored metric moves with it.

After each evaluation the loop judges the task's ``Target``: it remembers the first step the target
was met at and how many evaluations in a row it has held (``streak``); with ``stop_after`` = K > 0
it ends the cell once K evaluations in a row met it. ``target_state`` goes into every checkpoint,
so a resumed cell continues the count exactly where it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager

import torch

from harness.run.diagnostics import Diagnostics
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

    def diagnosed(self, step: int, metrics: dict[str, float]) -> None:
        """After a gradient measurement (``harness.run.diagnostics``) at ``step``, before it trains."""


def _finite(values: Mapping[str, float], step: int, during: str) -> None:
    if not all(math.isfinite(value) for value in values.values()):
        raise Diverged(values, step, during)


class Loop:
    """``Loop(run, lr, hooks).train()``; ``step`` is the number of steps taken (a resume sets it).

    ``diagnostics`` (``harness.run.diagnostics``): measure the gradients before each step it makes
    due, after that step's snapshot; it puts back everything it draws from or changes, so the
    training it interleaves with is bit-identical to the training without it."""

    def __init__(
        self, run: TaskRun, lr: float, hooks: Hooks | None = None, diagnostics: Diagnostics | None = None
    ) -> None:
        self.run, self.hooks, self.diagnostics = run, hooks or Hooks(), diagnostics
        self.optimiser = torch.optim.Adam(run.model.parameters(), lr=lr)
        self.step = 0
        self.streak = 0  # evaluations in a row that met the task's target
        self.first_met: int | None = None  # the first step whose evaluation met it
        self.stopped: int | None = None  # the step the stop rule ended the cell at

    def target_state(self) -> dict[str, int | None]:
        """What a checkpoint keeps of the stop rule's count."""
        return {"streak": self.streak, "first_met": self.first_met}

    def load_target_state(self, state: Mapping[str, int | None]) -> None:
        self.streak, self.first_met = int(state.get("streak") or 0), state.get("first_met")

    def _judge(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Count ``step``'s evaluation against the target; whether the stop rule ends the cell."""
        target = self.run.target
        if target is None:
            return False
        if target.met(metrics):
            self.streak += 1
            if self.first_met is None:
                self.first_met = step
        else:
            self.streak = 0
        return 0 < self.run.stop_after <= self.streak

    def evaluate(self) -> dict[str, float]:
        """The task's metrics, in eval mode without gradients; raises ``Diverged`` if any is not finite."""
        with evaluating(self.run.model):
            metrics = self.run.evaluate()
        _finite(metrics, self.step, "evaluate")
        return metrics

    def train(self, stop: int | None = None, evaluate_first: bool = True) -> None:
        """Train from ``step`` to ``stop`` (default: the task's steps), evaluating first (a fresh
        start: the untrained model's metrics at step 0) and every ``eval_every`` steps; earlier
        (``stopped``) if the stop rule ends the cell."""
        run, hooks, optimiser = self.run, self.hooks, self.optimiser
        stop = run.steps if stop is None else stop
        run.model.train()
        solved = False
        if evaluate_first:
            metrics = self.evaluate()
            solved = self._judge(0, metrics)
            hooks.evaluated(0, metrics)
        for step in range(self.step, stop):
            if solved:
                self.stopped, stop = self.step, self.step
                break
            hooks.boundary(step)
            with hooks.section():
                if step in run.snapshot_steps:
                    hooks.snapshot(step)
                if self.diagnostics is not None and self.diagnostics.due(step):
                    hooks.diagnosed(step, self.diagnostics.measure(run, step))
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
                    metrics = self.evaluate()
                    solved = self._judge(done, metrics)
                    hooks.evaluated(done, metrics)
                hooks.advanced(loss)
        hooks.boundary(stop, last=True)
        if stop in run.snapshot_steps:
            with hooks.section():
                hooks.snapshot(stop)
