"""Gradient diagnostics: how noisy each estimator's gradient is, measured during training.

At a measured step (``[diagnostics] every``), with the parameters held where training has them,
``Diagnostics.measure`` draws two sets of R (``draws``) gradients of the cell's training objective,
each by calling the task's own ``train_step`` (so it follows whatever the task and the layer do,
several samples per instance included) and differentiating the objective it returns:

- *sampling*: the batch held fixed, the structure's sampling free. Every draw restores the task's
  state (``TaskRun.state_dict``) and calls ``train_step(step)``, so it sees the batch the step trains
  on; the global generators (which layers sample from) are seeded from the draw's own stream.
- *batch*: the sampling held fixed (every draw reseeds the global generators with the same value:
  common random numbers), the batch free: draw r calls ``train_step(step + r)`` from the task's
  state at ``step``, i.e. the batches of the next R steps, whether the task draws them from a
  stream it keeps (identity) or as a function of the step (sorting, attention).

Everything a draw touches is put back afterwards: every global generator (torch CPU and CUDA,
Python, NumPy), the task's state and the model's parameters and buffers (a layer's baseline, batch
norm statistics). Gradients are taken with ``torch.autograd.grad``, so ``.grad`` and the optimiser
are never touched. A cell's training metrics are therefore bit-identical with diagnostics on and
off (tested on CPU).

From the sampling draws, for the model's parameters (``all``) and the structure layer's own
(``layer``): the relative variance ``tr Cov[g] / ||E g||^2``, the signal-to-noise ratio in
Rainforth et al.'s (2018) per-parameter form, ``|E g_i| / std g_i``, averaged over the parameters
whose gradient varies at all (the norm form, ``||E g|| / sqrt(E||g - E g||^2)``, is
``1/sqrt(rel_var)`` up to R/(R-1), so it is not logged twice), and the mean pairwise cosine. The
split of the noise: ``var_sampling`` (``tr Cov`` over sampling) and ``var_batch`` (``tr Cov`` over
batches), and ``sampling_share``, the first over their sum.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from estimators.base import StructureLayer
from harness.errors import ConfigError
from harness.task import TaskRun
from reports.schema import DIAGNOSTICS_COST, GRAD_METRIC_PREFIX

__all__ = [
    "DIAGNOSTICS_KEYS",
    "Diagnose",
    "Diagnostics",
    "diagnose_config",
    "gradient_statistics",
    "structure_layer",
]

DIAGNOSTICS_KEYS = ("every", "draws")
_STREAM = 0x6772_6164  # "grad": keeps the diagnostics' seeds apart from every other stream


@dataclass(frozen=True)
class Diagnose:
    """The ``[diagnostics]`` table: measure every ``every`` steps (0: never) with ``draws`` draws."""

    every: int = 0
    draws: int = 8

    @property
    def on(self) -> bool:
        return self.every > 0

    def due(self, step: int) -> bool:
        return self.on and step % self.every == 0

    def __str__(self) -> str:
        return f"every={self.every} draws={self.draws}" if self.on else "off"


def diagnose_config(raw: Any) -> Diagnose:
    """The checked ``[diagnostics]`` table of a raw config; ``ConfigError`` names the bad key."""
    if raw is None:
        return Diagnose()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[diagnostics] must be a table, got {raw!r}")
    for key in raw:
        if key not in DIAGNOSTICS_KEYS:
            raise ConfigError(f"[diagnostics]: unknown key {key!r}; known: {', '.join(DIAGNOSTICS_KEYS)}")
    values = {**vars(Diagnose()), **raw}
    for key, least in (("every", 0), ("draws", 2)):
        value = values[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"[diagnostics] {key} = {value!r} must be an integer >= {least}")
    return Diagnose(**values)


def _seed(value: int) -> None:
    torch.manual_seed(value)  # seeds CUDA generators too
    random.seed(value)
    np.random.seed(value)


def _draw_seed(seed: int, step: int, draw: int) -> int:
    return int(np.random.SeedSequence([_STREAM, seed, step, draw]).generate_state(1)[0])


class _Saved:
    """The model's parameters and buffers and the task's state as they were, to put back."""

    def __init__(self, run: TaskRun) -> None:
        self.run = run
        self.model_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        self.task_state = copy.deepcopy(run.state_dict()) if run.state_dict is not None else None

    def model(self) -> None:
        """Parameters and buffers (a layer's baseline, batch-norm statistics) as they were."""
        self.run.model.load_state_dict(self.model_state)

    def task(self) -> None:
        """The task's data stream as it was (``TaskRun.load_state_dict``)."""
        if self.task_state is not None and self.run.load_state_dict is not None:
            self.run.load_state_dict(copy.deepcopy(self.task_state))


@contextlib.contextmanager
def _preserved(run: TaskRun) -> Iterator[_Saved]:
    """Everything a ``train_step`` may change, put back on exit: the model, the task's state and
    every global generator; yields the saved state, to put back between draws too."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    python, numpy = random.getstate(), np.random.get_state()
    saved = _Saved(run)
    try:
        with torch.random.fork_rng(devices=devices):
            yield saved
    finally:
        saved.model()
        saved.task()
        random.setstate(python)
        np.random.set_state(numpy)


def structure_layer(model: nn.Module) -> StructureLayer | None:
    """The model's structure layer (the model itself for a task whose model is the layer)."""
    return next((m for m in model.modules() if isinstance(m, StructureLayer)), None)


def _gradient(run: TaskRun, step: int, params: list[nn.Parameter]) -> torch.Tensor:
    """One estimate: the gradient of ``train_step(step)``'s objective, flat, in float64."""
    objective, _ = run.train_step(step)
    if not objective.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    flat = [
        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to("cpu", torch.float64)
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(flat)


def gradient_statistics(draws: torch.Tensor) -> dict[str, float]:
    """Statistics of R gradient estimates ``(R, d)``: ``rel_var``, ``snr``, ``cosine``, ``trace``
    (``tr Cov``, unbiased) and ``mean_norm``; a statistic that is undefined (a zero mean, no
    parameter that varies, all-zero draws) is left out rather than logged as inf or nan."""
    r = draws.shape[0]
    mean = draws.mean(0)
    dev = draws - mean
    var = (dev**2).sum(0) / (r - 1)  # (d,)
    trace, norm2 = float(var.sum()), float(mean @ mean)
    out = {"trace": trace, "mean_norm": math.sqrt(norm2)}
    if norm2 > 0:
        out["rel_var"] = trace / norm2
    varies = var > 0
    if bool(varies.any()):
        out["snr"] = float((mean.abs()[varies] / var[varies].sqrt()).mean())
    norms = draws.norm(dim=1)
    live = norms > 0
    if int(live.sum()) >= 2:
        unit = draws[live] / norms[live, None]
        cos = unit @ unit.T
        k = unit.shape[0]
        out["cosine"] = float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))
    return out


class Diagnostics:
    """Measures a cell's gradients at the steps its ``Diagnose`` makes due; ``seed`` is the cell's,
    so the measurements themselves are a function of the cell too."""

    def __init__(self, config: Diagnose, seed: int) -> None:
        self.config, self.seed = config, seed

    def due(self, step: int) -> bool:
        return self.config.due(step)

    def measure(self, run: TaskRun, step: int) -> dict[str, float]:
        """``grad/<group>/<statistic>`` for the groups ``all`` and ``layer``, and the cost."""
        started = time.perf_counter()
        params = [p for p in run.model.parameters() if p.requires_grad]
        layer = structure_layer(run.model)
        own = {id(p) for p in layer.parameters()} if layer is not None else set()
        mask = torch.cat([torch.full((p.numel(),), id(p) in own) for p in params]) if params else None
        draws = self.config.draws
        with _preserved(run) as saved:
            sampling = []
            for r in range(draws):  # the step's batch, fresh sampling
                saved.model()
                saved.task()
                _seed(_draw_seed(self.seed, step, r))
                sampling.append(_gradient(run, step, params))
            saved.task()  # then the batches of steps step .. step + R - 1, the same sampling
            fixed = _draw_seed(self.seed, step, draws)
            batches = []
            for r in range(draws):
                saved.model()
                _seed(fixed)
                batches.append(_gradient(run, step + r, params))
        metrics: dict[str, float] = {}
        if params:
            a, b = torch.stack(sampling), torch.stack(batches)
            groups: dict[str, Any] = {"all": slice(None)}
            if mask is not None and bool(mask.any()):
                groups["layer"] = mask
            for name, cols in groups.items():
                stats = gradient_statistics(a[:, cols])
                noise = gradient_statistics(b[:, cols])["trace"]
                stats |= {"var_sampling": stats.pop("trace"), "var_batch": noise}
                total = stats["var_sampling"] + noise
                if total > 0:
                    stats["sampling_share"] = stats["var_sampling"] / total
                prefix = f"{GRAD_METRIC_PREFIX}{name}/"
                metrics |= {prefix + k: v for k, v in stats.items() if math.isfinite(v)}
        metrics[DIAGNOSTICS_COST] = time.perf_counter() - started
        return metrics
