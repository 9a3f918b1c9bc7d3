"""``sparsebench check-plugin``: a conformance suite for the estimators and tasks a plugin registers.

In the spirit of ``benchopt test``: everything the harness relies on is tried on tiny inputs, each
result one readable line, so a plugin author learns what breaks before a matrix does.

For an estimator, on a small spec of every structure kind (and of the kinds it does not claim):
registration fields and defaults, ``check(defaults)``, ``unsupported()`` agreeing with
``build()``; then for every layer it builds, on every device present: forward shapes, finite
gradients reaching its parameters (or the keys, scores and boxes it is fed; a permutation layer
with ``scores_per_item = n`` gets ``n`` scores per item), ``objective()`` per the
contract, a deterministic ``eval()``, registered tensors and a ``state_dict`` that rebuilds it;
finally a few real training steps on every built-in task it can serve (``Task.smoke`` sizes),
then the gradient diagnostics (``harness.run.diagnostics``) on that smoke cell, whose numbers the
check prints (the built-in gradient-study tasks among them give the study's numbers).
For a task: registration fields, ``check``, ``spec`` for each kind, and the same training steps
with every built-in estimator that serves it.

``check_plugin`` is what the command runs; ``check_estimator`` and ``check_task`` take objects,
for a plugin's own test suite (see ``harness.testing``).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from estimators.base import (
    Estimator,
    FullImageReadout,
    GlimpseLayer,
    GlimpseSpec,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    Spec,
    StructureLayer,
    Unsupported,
    repeat_samples,
    training_samples,
)
from estimators.params import kinds_problem, space_problems
from harness.errors import UsageError
from harness.matrix import choose_kind
from harness.plugins import DEFAULT_PLUGINS, NAME, REQUIRED_TASK_PARAMS, Registry
from harness.run.diagnostics import Diagnose, Diagnostics
from harness.run.loop import BadObjective, Diverged, Loop
from harness.task import CellSetup, Task, TaskRun

__all__ = ["PROBES", "Check", "Report", "check_estimator", "check_plugin", "check_task"]

PASS, FAIL, SKIP = "pass", "fail", "skip"
BATCH = 3
SMOKE_STEPS = 3
SMOKE_DIAGNOSE = Diagnose(every=1, draws=4)  # the gradient diagnostics after the smoke training
DIAGNOSED = ("rel_var", "snr", "cosine", "sampling_share")  # what the check prints of them
SAMPLES_FACTOR = 2  # the several-samples smoke check trains with twice the layer's own samples

#: The small specs every estimator is tried on: a spec per kind and the variants tasks ask for.
PROBES: tuple[Spec, ...] = (
    SparseMatrixSpec(in_shape=(4,), out_shape=(4,), k=4),
    SparseMatrixSpec(in_shape=(3, 4), out_shape=(2, 3), k=6),
    PermutationSpec(n=4, source="keys"),
    PermutationSpec(n=3, source="keys"),
    PermutationSpec(n=4, source="free"),
    GlimpseSpec(image_shape=(1, 16, 16), size=4, glimpses=2),
)


@dataclass(frozen=True)
class Check:
    """One result line: what was checked on which subject, and how it went."""

    subject: str  # "estimator straight_through", "task identity"
    name: str  # "permutation n=4 keys on cpu: gradients"
    outcome: str  # pass | fail | skip
    detail: str = ""

    def line(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"  {self.outcome.upper():4}  {self.name}{detail}"


@dataclass
class Report:
    """All checks of one plugin; ``ok`` when none failed and something was checked."""

    plugin: str
    source: str
    version: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == FAIL]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failures

    def header(self) -> str:
        return f"checking {self.plugin} ({self.source}; code {self.version})"

    def add(self, check: Check) -> list[str]:
        """Record a check; returns its line, after its subject's heading when that is new."""
        new_subject = not self.checks or self.checks[-1].subject != check.subject
        self.checks.append(check)
        return [check.subject, check.line()] if new_subject else [check.line()]

    def summary(self) -> str:
        counts = {o: sum(c.outcome == o for c in self.checks) for o in (PASS, FAIL, SKIP)}
        verdict = "conforms" if self.ok else "does NOT conform"
        return (
            f"{self.plugin} {verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, "
            f"{counts[SKIP]} skipped in {self.seconds:.1f} s"
        )

    def text(self) -> str:
        """The whole report as ``sparsebench check-plugin`` prints it."""
        lines, subject = [self.header()], None
        for check in self.checks:
            if check.subject != subject:
                subject = check.subject
                lines.append(subject)
            lines.append(check.line())
        return "\n".join([*lines, self.summary()])


class _Failed(Exception):
    """A check's own verdict (as opposed to an exception the plugin raised)."""


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame outside torch and the harness, to point at the bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/torch/" not in frame.filename and "/harness/plugins/conformance.py" not in frame.filename:
            return f" (at {Path(frame.filename).name}:{frame.lineno})"
    return ""


def _run(subject: str, name: str, fn: Callable[[], str | None]) -> Check:
    """Run one check; its return value is the detail of a pass, ``_Failed`` a failure, and any
    other exception a failure that names the exception and where it was raised."""
    try:
        return Check(subject, name, PASS, fn() or "")
    except _Failed as e:
        return Check(subject, name, FAIL, str(e))
    except Exception as e:
        return Check(subject, name, FAIL, f"{type(e).__name__}: {e}{_where(e)}")


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _label(spec: Spec) -> str:
    if isinstance(spec, SparseMatrixSpec):
        return f"sparse_matrix {spec.in_shape}->{spec.out_shape} k={spec.k}"
    if isinstance(spec, PermutationSpec):
        return f"permutation n={spec.n} {spec.source}"
    return f"glimpse {spec.glimpses}x{spec.size}x{spec.size} of {spec.image_shape}"


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Fixed randomness that does not disturb the caller's generators (a test suite's, say)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---- registration -------------------------------------------------------------------------------


def _json_like(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_json_like(v) for v in value)


def _params_problems(owner: Task | Estimator) -> list[str]:
    problems = []
    defaults, choices = owner.defaults, owner.choices
    if not isinstance(defaults, Mapping):
        return [f"defaults must be a mapping, got {type(defaults).__name__}"]
    for key, value in defaults.items():
        if not _json_like(value):
            problems.append(f"default {key} = {value!r} is not a bool, number, string or list")
    for key, allowed in choices.items():
        if key not in defaults:
            problems.append(f"choices names {key!r}, which is not among the defaults")
        elif defaults[key] not in allowed:
            problems.append(f"default {key} = {defaults[key]!r} is not among its choices {allowed!r}")
    return problems + space_problems(owner)


def _registration_problems(plugin: Estimator | Task) -> list[str]:
    """What estimators and tasks share: a usable name, a description, parameters that check."""
    problems = _params_problems(plugin)
    kinds = kinds_problem(plugin.kinds)
    if kinds:
        problems.append(kinds)
    if not NAME.fullmatch(getattr(plugin, "name", "") or ""):
        problems.insert(0, f"name {getattr(plugin, 'name', None)!r} must be a lower-case identifier")
    if not plugin.description:
        problems.append("description is empty (it is the line `sparsebench list` shows)")
    return problems


def _estimator_registration(est: Estimator) -> str:
    problems = _registration_problems(est)
    if problems:
        raise _Failed("; ".join(problems))
    return f"kinds {', '.join(sorted(est.kinds))}; {len(est.defaults)} parameters"


def _task_registration(task: Task) -> str:
    problems = _registration_problems(task)
    missing = [k for k in (*REQUIRED_TASK_PARAMS, task.size_key) if k not in task.defaults]
    if missing:
        problems.append(f"defaults lack {', '.join(missing)}")
    if not task.primary_metric.startswith("test/"):
        problems.append(f"primary_metric {task.primary_metric!r} must be a test/ metric")
    if not task.select_metric.startswith("val/"):
        problems.append(f"select_metric {task.select_metric!r} must be a val/ metric")
    unknown = sorted(set(task.smoke) - set(task.defaults))
    if unknown:
        problems.append(f"smoke sets {', '.join(unknown)}, which are not among the defaults")
    if problems:
        raise _Failed("; ".join(problems))
    return f"kinds {', '.join(task.kinds)}; {len(task.defaults)} parameters"


# ---- one layer ----------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """A batch of ``BATCH`` inputs for a spec's layer; ``repeated(S)`` is what a task feeds a layer
    with ``samples = S`` in training (every instance ``S`` times, sample-major)."""

    args: tuple[Any, ...]
    differentiable: torch.Tensor | None  # keys, scores or boxes, whose gradient must be finite and nonzero

    keys: torch.Tensor | None = None  # the keys a permutation must sort ascending in eval()

    def repeated(self, samples: int) -> tuple[Any, ...]:
        return tuple(
            repeat_samples(a, samples) if isinstance(a, torch.Tensor) else a * samples
            for a in self.args
        )

    @staticmethod
    def make(spec: Spec, device: torch.device, scores_per_item: int = 1) -> _Inputs:
        gen = torch.Generator().manual_seed(1)
        if isinstance(spec, SparseMatrixSpec):
            x = torch.randn(BATCH, *spec.in_shape, generator=gen).to(device)
            return _Inputs((x,), None)
        if isinstance(spec, PermutationSpec):
            if spec.source == "free":
                return _Inputs((BATCH,), None)
            # distinct keys, well apart: the hard sort in eval() is unambiguous
            keys = torch.stack([torch.randperm(spec.n, generator=gen) for _ in range(BATCH)]).float()
            keys = (keys + 0.1 * torch.rand(keys.shape, generator=gen)).to(device)
            if scores_per_item == 1:
                keys.requires_grad_()
                return _Inputs((keys,), keys, keys)
            # one score per output position, peaked at each item's rank: item j at position k
            # scores -(rank_j - k)^2, so the best assignment sorts the keys
            ranks = keys.argsort(-1).argsort(-1).float()  # (b, n)
            positions = torch.arange(spec.n, device=device, dtype=torch.float32)
            scores = -(ranks.unsqueeze(-1) - positions).pow(2)  # (b, n, n)
            scores.requires_grad_()
            return _Inputs((scores,), scores, keys)
        c, h, w = spec.image_shape
        images = torch.rand(BATCH, c, h, w, generator=gen).to(device)
        boxes = (0.5 * torch.randn(BATCH, spec.glimpses, 4, generator=gen)).to(device).requires_grad_()
        return _Inputs((images, boxes), boxes)


def _expected_shape(spec: Spec, rows: int = BATCH) -> tuple[int, ...]:
    if isinstance(spec, SparseMatrixSpec):
        return (rows, *spec.out_shape)
    if isinstance(spec, PermutationSpec):
        return (rows, spec.n, spec.n)
    c = spec.image_shape[0]
    return (rows, spec.glimpses, c, spec.size, spec.size)


def _output_tensor(spec: Spec, out: Any, rows: int = BATCH) -> torch.Tensor:
    """The forward output as one tensor of the contract's shape (a permutation's matrix), with
    ``rows`` instances (``S * b`` in training)."""
    if isinstance(spec, PermutationSpec):
        if not isinstance(out, PermutationOutput):
            raise _Failed(f"forward returned {type(out).__name__}, not a PermutationOutput")
        if not out.steps:
            raise _Failed("PermutationOutput.steps is empty")
        for i, step in enumerate(out.steps):
            if tuple(step.shape) != _expected_shape(spec, rows):
                raise _Failed(
                    f"steps[{i}] has shape {tuple(step.shape)}, not {_expected_shape(spec, rows)}"
                )
        return out.matrix
    if not isinstance(out, torch.Tensor):
        raise _Failed(f"forward returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != _expected_shape(spec, rows):
        raise _Failed(f"forward gave shape {tuple(out.shape)}, not {_expected_shape(spec, rows)}")
    return out


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A per-instance loss ``(b,)`` against a fixed random target."""
    target = torch.rand(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    return ((out - target) ** 2).flatten(1).mean(1)


def _unregistered_tensors(layer: torch.nn.Module) -> list[str]:
    found = []
    for prefix, module in layer.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                found.append(f"{prefix}.{key}" if prefix else key)
    return found


class _LayerChecks:
    """The behavioural checks of one built layer on one device."""

    def __init__(self, est: Estimator, spec: Spec, params: Mapping[str, Any], device: torch.device):
        self.est, self.spec, self.params, self.device = est, spec, params, device

    def build(self, seed: int = 0) -> StructureLayer:
        with _seeded(seed):
            return self.est.build(self.spec, dict(self.params)).to(self.device)

    def registered(self) -> str:
        plain = _unregistered_tensors(self.build())
        if plain:
            raise _Failed(
                f"plain tensor attribute(s) {', '.join(plain)}: register them (nn.Parameter or "
                "register_buffer) so that .to(device) moves them and state_dict() saves them"
            )
        return "every tensor is a parameter or buffer"

    def train_pass(self) -> str:
        """Two training steps' worth of forward, ``objective`` and backward, on the batch repeated
        for the layer's ``samples`` as a task repeats it."""
        layer = self.build().train()
        inputs = _Inputs.make(self.spec, self.device, layer.scores_per_item)
        samples = _samples_of(layer)
        rows = samples * BATCH
        for _ in range(2):
            with _seeded(3):
                out = _output_tensor(self.spec, layer(*inputs.repeated(samples)), rows)
            if out.device.type != self.device.type:
                raise _Failed(f"forward output is on {out.device}, the layer on {self.device}")
            if not torch.isfinite(out).all():
                raise _Failed("forward output is not finite")
            # the task's own network, through which a loss always carries gradient (a sampled
            # structure alone may not: score-function estimators learn through objective())
            task_weight = torch.ones((), device=self.device, requires_grad=True)
            per_sample = _loss(out) * task_weight
            objective = layer.objective(per_sample)
            if not isinstance(objective, torch.Tensor) or objective.dim() != 0:
                raise _Failed(f"objective() returned {objective!r}, not a 0-dim tensor")
            if not torch.isfinite(objective):
                raise _Failed(f"objective() is {objective.item()}")
            if not objective.requires_grad:
                raise _Failed("objective() carries no gradient")
            (d_loss,) = torch.autograd.grad(objective, per_sample, retain_graph=True)
            if not torch.allclose(d_loss, torch.full_like(d_loss, 1 / rows), atol=1e-6):
                raise _Failed(
                    f"d objective / d per_sample_loss is {d_loss.tolist()}, not 1/(S b) each: "
                    "extra terms must use the detached loss"
                )
            objective.backward()
        self._gradients(layer, inputs)
        snapshot = layer.snapshot()
        if not isinstance(snapshot, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in snapshot.items()
        ):
            raise _Failed("snapshot() must return a dict of name -> tensor")
        reached = "the inputs" if inputs.differentiable is not None else "the parameters"
        shown = f"S = {samples} samples x b = {BATCH}: " if samples > 1 else ""
        return f"{shown}forward {tuple(out.shape)}; objective a scalar, mean-like in the " \
            f"losses; finite gradients reach {reached}"

    def _gradients(self, layer: StructureLayer, inputs: _Inputs) -> None:
        trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
        missing = [n for n, p in trainable.items() if p.grad is None]
        if missing:
            raise _Failed(f"parameter(s) {', '.join(missing)} received no gradient")
        grads = [p.grad for p in trainable.values()]
        if inputs.differentiable is not None:
            if inputs.differentiable.grad is None:
                raise _Failed("no gradient reaches the input keys/boxes")
            grads.append(inputs.differentiable.grad)
        if not all(torch.isfinite(g).all() for g in grads):
            raise _Failed("a gradient is not finite")
        if not any(bool(g.abs().sum() > 0) for g in grads):
            raise _Failed("every gradient is zero: nothing would learn")

    def eval_pass(self) -> str:
        layer = self.build().eval()
        inputs = _Inputs.make(self.spec, self.device, layer.scores_per_item)
        with torch.no_grad():
            with _seeded(4):
                first = _output_tensor(self.spec, layer(*inputs.args))
            with _seeded(5):
                second = _output_tensor(self.spec, layer(*inputs.args))
        if not torch.isfinite(first).all():
            raise _Failed("eval() output is not finite")
        if not torch.equal(first, second):
            raise _Failed("two eval() forwards of one input differ: eval() must be deterministic")
        detail = "deterministic"
        samples = _samples_of(layer.train())
        layer.eval()
        if samples > 1:
            detail += self._samples_in_eval(layer, inputs, samples, first)
        if isinstance(self.spec, PermutationSpec):
            detail += self._hard_permutation(first, inputs)
        if isinstance(self.spec, SparseMatrixSpec):
            detail += self._linear(layer, inputs.args[0])
        return detail

    def _samples_in_eval(
        self, layer: StructureLayer, inputs: _Inputs, samples: int, single: torch.Tensor
    ) -> str:
        """``samples`` > 1 changes nothing in ``eval()``: every copy of a repeated batch gets the
        one deterministic answer of its instance."""
        with torch.no_grad(), _seeded(4):
            out = _output_tensor(self.spec, layer(*inputs.repeated(samples)), samples * BATCH)
        if not torch.equal(out, repeat_samples(single, samples)):
            raise _Failed(
                f"eval() of the batch repeated {samples} times differs from eval() of one copy: "
                "evaluation must be one deterministic answer per instance"
            )
        return f", S = {samples} copies agree"

    def _hard_permutation(self, matrix: torch.Tensor, inputs: _Inputs) -> str:
        binary = ((matrix == 0) | (matrix == 1)).all()
        ones = torch.ones(matrix.shape[:-1], device=matrix.device, dtype=matrix.dtype)
        if not (binary and torch.equal(matrix.sum(-1), ones) and torch.equal(matrix.sum(-2), ones)):
            raise _Failed("eval() matrices are not hard permutations")
        if inputs.keys is None:
            return ", hard permutations"
        keys = inputs.keys.detach()
        ordered = (matrix @ keys.unsqueeze(-1)).squeeze(-1)  # (b, n)
        if not (ordered[:, 1:] >= ordered[:, :-1]).all():
            raise _Failed("eval() permutation does not sort the keys ascending")
        return ", hard permutations that sort the keys ascending"

    def _linear(self, layer: StructureLayer, x: torch.Tensor) -> str:
        """The task reads W from basis vectors: ``eval()`` must compute ``W x``, per instance."""
        gen = torch.Generator().manual_seed(6)
        y = torch.randn(x.shape, generator=gen).to(x.device)
        with torch.no_grad():
            together = layer(x + 2 * y)
            apart = layer(x) + 2 * layer(y)
            alone = layer(x[:1])
        if not all(torch.isfinite(t).all() for t in (together, apart, alone)):
            raise _Failed("eval() output is not finite")
        scale = together.abs().max().clamp(min=1.0)
        if not torch.allclose(together, apart, atol=1e-4 * float(scale)):
            raise _Failed("eval() forward is not linear in x (the contract is y = W x)")
        if not torch.allclose(alone[0], layer(x)[0], atol=1e-5 * float(scale)):
            raise _Failed("eval() output of an instance depends on the rest of the batch")
        return ", linear in x"

    def state(self) -> str:
        trained = self.build(seed=0).train()
        inputs = _Inputs.make(self.spec, self.device, trained.scores_per_item)
        samples = _samples_of(trained)
        with _seeded(8):  # one plain SGD step, so that parameters and buffers leave their start
            out = _output_tensor(self.spec, trained(*inputs.repeated(samples)), samples * BATCH)
        task_weight = torch.ones((), device=self.device, requires_grad=True)
        trained.objective(_loss(out) * task_weight).backward()
        with torch.no_grad():
            for param in trained.parameters():
                if param.grad is not None:
                    param -= 0.1 * param.grad
        fresh = self.build(seed=7)
        fresh.load_state_dict(trained.state_dict())
        trained.eval()
        fresh.eval()
        with torch.no_grad():
            a = _output_tensor(self.spec, trained(*inputs.args))
            b = _output_tensor(self.spec, fresh(*inputs.args))
        if not torch.equal(a, b):
            raise _Failed(
                "a fresh build loaded with state_dict() computes something else in eval(): keep "
                "all state in parameters and buffers (checkpoints resume from it)"
            )
        return "a fresh build loaded from it computes the same"


def _samples_of(layer: StructureLayer) -> int:
    """The layer's ``samples`` in training; ``_Failed`` naming it when it is no int >= 1."""
    try:
        return training_samples(layer)
    except ValueError as e:
        raise _Failed(str(e)) from e


def _probe(est: Estimator, spec: Spec, params: Mapping[str, Any]) -> tuple[str | None, Any]:
    """(``unsupported``'s reason, ``build``'s layer or exception) for one spec."""
    reason = est.unsupported(spec, dict(params))
    try:
        with _seeded():
            return reason, est.build(spec, dict(params))
    except Exception as e:
        return reason, e


def _agreement(est: Estimator, spec: Spec, reason: str | None, built: Any) -> str:
    claimed = spec.kind in est.kinds
    if isinstance(built, Unsupported):
        if reason is None:
            raise _Failed(
                f"unsupported() returned None but build() raised Unsupported({built}); say it up "
                "front so the matrix shows n/a before anything runs"
            )
        return f"n/a, as unsupported() says: {reason}"
    if isinstance(built, Exception):
        if reason is not None or not claimed:
            raise _Failed(
                f"build() raised {type(built).__name__}: {built}{_where(built)}; "
                "a spec it cannot serve must raise Unsupported"
            )
        raise _Failed(f"build() raised {type(built).__name__}: {built}{_where(built)}")
    if reason is not None:
        raise _Failed(f"unsupported() says {reason!r} but build() returned a layer")
    if not claimed:
        raise _Failed(f"build() served a {spec.kind} spec, a kind missing from kinds")
    if not isinstance(built, StructureLayer):
        raise _Failed(f"build() returned {type(built).__name__}, not a StructureLayer")
    if isinstance(spec, GlimpseSpec) and not isinstance(built, (GlimpseLayer, FullImageReadout)):
        raise _Failed(
            f"{type(built).__name__} must subclass estimators.base.GlimpseLayer (the box geometry "
            "tasks read) or be a FullImageReadout"
        )
    return f"{type(built).__name__}, as unsupported() says"


def _estimator_layer_checks(est: Estimator, params: Mapping[str, Any]) -> Iterator[Check]:
    subject = f"estimator {est.name}"
    served: dict[str, int] = {kind: 0 for kind in est.kinds}
    for spec in PROBES:
        label = _label(spec)
        try:
            reason, built = _probe(est, spec, params)
        except Exception as e:
            yield Check(subject, f"{label}: unsupported()", FAIL, f"{type(e).__name__}: {e}{_where(e)}")
            continue
        if spec.kind not in est.kinds:
            yield _run(subject, f"{label}: build (kind not claimed)", lambda s=spec, r=reason, b=built: (
                _agreement(est, s, r, b)
            ))
            continue
        agreement = _run(subject, f"{label}: build",
                         lambda s=spec, r=reason, b=built: _agreement(est, s, r, b))
        yield agreement
        if agreement.outcome == FAIL or reason is not None:
            continue
        served[spec.kind] += 1
        if isinstance(built, FullImageReadout):
            continue  # no glimpse: the task classifies from its own features
        for device in _devices():
            layer = _LayerChecks(est, spec, params, device)
            where = f"{label} on {device.type}"
            yield _run(subject, f"{where}: tensors", layer.registered)
            yield _run(subject, f"{where}: train", layer.train_pass)
            yield _run(subject, f"{where}: eval", layer.eval_pass)
            yield _run(subject, f"{where}: state_dict", layer.state)
    for kind, count in served.items():
        if not count:
            probes = ", ".join(_label(s) for s in PROBES if s.kind == kind)
            yield Check(subject, f"{kind}: served", FAIL,
                        f"claims {kind} but serves none of its probe specs ({probes})")


# ---- a few real training steps ------------------------------------------------------------------


def _smoke_params(task: Task) -> dict[str, Any]:
    params = {**task.defaults, **task.smoke}
    if not task.smoke:  # no smoke sizes declared: defaults, a few steps
        params.update(steps=SMOKE_STEPS, eval_every=SMOKE_STEPS)
    return params


def _smoke_cell(task: Task, est: Estimator) -> tuple[dict[str, Any], dict[str, Any], str, Spec]:
    """The smoke cell of ``task`` with ``est``: its parameters, the estimator's, the kind and the
    spec; ``_Skipped`` (n/a) when the estimator serves none of the task's kinds."""
    params = _smoke_params(task)
    est_params = dict(est.defaults)
    kind, spec, reason = choose_kind(task, est, params, est_params)
    if kind is None:
        raise _Skipped(f"n/a: {reason}")
    return params, est_params, kind, spec


def _train(task: Task, est: Estimator, cache: Path) -> str:
    """A few optimiser steps of one cell at the task's smoke sizes, on the CPU, as the runner
    takes them; then ``evaluate`` twice (it must repeat itself) and the artifacts once."""
    params, est_params, kind, spec = _smoke_cell(task, est)
    device = torch.device("cpu")
    with _seeded(0):
        try:
            layer = est.build(spec, est_params)
        except Unsupported as e:
            raise _Failed(f"unsupported() returned None but build() raised Unsupported({e})") from e
        try:
            run = task.setup(CellSetup(params, layer, kind, device, 0, cache, spec))
        except Unsupported as e:
            raise _Skipped(f"n/a at setup: {e}") from e
        run.model.to(device)
        loop = Loop(run, params["lr"])  # the runner's loop, with none of the runner's hooks
        steps = min(run.steps, SMOKE_STEPS) if run.steps else SMOKE_STEPS
        try:
            loop.train(stop=steps, evaluate_first=False)
            results = [loop.evaluate(), loop.evaluate()]
        except BadObjective as e:
            raise _Failed(str(e)) from e
        except Diverged as e:
            if e.during == "evaluate":
                raise _Failed(f"evaluate() gave no finite {e.key}: {e.values}") from e
            bad = {k.removeprefix("train/") if k == "train/objective" else k: v
                   for k, v in e.values.items() if not math.isfinite(v)}
            raise _Failed(f"step {e.step}: not finite: {bad}") from e
        if run.write_artifacts is not None:
            with tempfile.TemporaryDirectory() as out:
                run.write_artifacts(steps, Path(out))
    first, second = results
    metric = task.primary_metric
    for key in (metric, task.select_metric):
        if key not in first or not math.isfinite(first[key]):
            raise _Failed(f"evaluate() gave no finite {key}: {first}")
    if first != second:
        raise _Failed(f"evaluate() twice gave different metrics: {first} then {second}")
    return f"{kind}, {steps} steps, {metric} {first[metric]:.4g}, evaluate() repeats; {_diagnose(run, steps)}"


def _diagnose(run: TaskRun, step: int) -> str:
    """The gradient diagnostics at the trained smoke cell, as a plugin author reads them."""
    try:
        with _seeded(0):
            found = Diagnostics(SMOKE_DIAGNOSE, 0).measure(run, step)
    except Exception as e:
        why = f"{type(e).__name__}: {e}{_where(e)}"
        raise _Failed(f"gradient diagnostics (train_step({step}) called again): {why}") from e
    shown = [f"{name} {found[f'grad/all/{name}']:.3g}" for name in DIAGNOSED if f"grad/all/{name}" in found]
    cost = found["time/diagnostics_s"]
    return f"gradients ({SMOKE_DIAGNOSE.draws} draws): {', '.join(shown) or 'all zero'} ({cost:.2f} s)"


class _Skipped(Exception):
    """A training check that does not apply (an n/a pair)."""


class _Recorder:
    """What a layer saw: the rows of every forward's first argument (a batch, or the batch size of
    a free permutation), that argument, and the length of every ``objective`` input."""

    def __init__(self, layer: StructureLayer) -> None:
        self.rows: list[int] = []
        self.firsts: list[Any] = []
        self.losses: list[int] = []
        layer.register_forward_pre_hook(self._forward)
        objective = layer.objective

        def recorded(per_sample_loss: torch.Tensor) -> torch.Tensor:
            self.losses.append(int(per_sample_loss.shape[0]))
            return objective(per_sample_loss)

        layer.objective = recorded  # type: ignore[method-assign]  # a probe on this instance only

    def _forward(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        first = args[0] if args else None
        self.firsts.append(first)
        self.rows.append(int(first.shape[0]) if isinstance(first, torch.Tensor) else int(first or 0))


def _sample_major(first: Any, samples: int) -> bool:
    """Whether a forward's first argument holds ``samples`` equal copies of one batch, sample-major."""
    if not isinstance(first, torch.Tensor):
        return True  # a batch size: nothing to compare
    copies = first.detach().reshape(samples, -1, *first.shape[1:])
    return all(torch.equal(copies[s], copies[0]) for s in range(1, samples))


def _samples_smoke(task: Task, est: Estimator, cache: Path) -> str:
    """One training step with the layer's ``samples`` as built (S) and doubled (2S), on the CPU: the
    task must feed the layer twice the rows, as sample-major copies, hand ``objective`` one loss
    per row, and evaluate exactly as before (evaluation ignores ``samples``)."""
    params, est_params, kind, spec = _smoke_cell(task, est)
    device = torch.device("cpu")
    seen: dict[int, _Recorder] = {}
    metrics: dict[int, dict[str, float]] = {}
    base = 0
    for factor in (1, SAMPLES_FACTOR):
        with _seeded(0):
            layer = est.build(spec, est_params)
            base = _samples_of(layer.train())
            layer.samples = base * factor
            run = task.setup(CellSetup(params, layer, kind, device, 0, cache, spec))
            run.model.to(device).train()
            recorder = seen[factor] = _Recorder(layer)
            objective, _ = run.train_step(0)
            if not isinstance(objective, torch.Tensor) or objective.dim() != 0:
                raise _Failed(f"train_step returned objective {objective!r}, not a 0-dim tensor")
            if not torch.isfinite(objective):
                raise _Failed(f"train_step's objective is {objective.item()} with samples = {base * factor}")
            objective.backward()
            trained = len(recorder.rows)
            metrics[factor] = Loop(run, params["lr"]).evaluate()
            recorder.rows, recorder.firsts = recorder.rows[:trained], recorder.firsts[:trained]
    single, double = seen[1], seen[SAMPLES_FACTOR]
    if not single.rows or len(single.rows) != len(double.rows):
        raise _Failed(f"train_step ran the layer {len(single.rows)} and {len(double.rows)} times")
    for one, two in zip(single.rows, double.rows, strict=True):
        if two != SAMPLES_FACTOR * one:
            raise _Failed(
                f"with samples = {base * SAMPLES_FACTOR} the layer got {two} rows, with samples = "
                f"{base} {one}: a task repeats every instance `samples` times "
                "(estimators.base.repeat_samples)"
            )
    if not all(_sample_major(f, base * SAMPLES_FACTOR) for f in double.firsts):
        raise _Failed("the layer's input rows are not sample-major copies of the batch")
    if double.losses != double.rows[-1:]:
        raise _Failed(
            f"objective() got losses of lengths {double.losses}, not one per row of the layer's "
            f"last training forward ({double.rows[-1]})"
        )
    if metrics[1] != metrics[SAMPLES_FACTOR]:
        raise _Failed(
            f"evaluate() differs with samples = {base * SAMPLES_FACTOR}: {metrics[SAMPLES_FACTOR]} "
            f"against {metrics[1]}; evaluation is one deterministic pass per instance"
        )
    b = single.rows[-1] // base
    return (
        f"{est.name}: samples {base} -> {base * SAMPLES_FACTOR} feeds the layer "
        f"{single.rows[-1]} -> {double.rows[-1]} sample-major rows (b = {b}), one loss each; "
        "evaluate() unchanged"
    )


def _training_checks(subject: str, pairs: Iterable[tuple[str, Task, Estimator]]) -> Iterator[Check]:
    with tempfile.TemporaryDirectory(prefix="sparsebench-check-") as cache:
        for label, task, est in pairs:
            started = time.perf_counter()
            try:
                detail = _train(task, est, Path(cache))
                outcome = PASS
            except _Skipped as e:
                detail, outcome = str(e), SKIP
            except _Failed as e:
                detail, outcome = str(e), FAIL
            except Exception as e:
                detail, outcome = f"{type(e).__name__}: {e}{_where(e)}", FAIL
            if outcome == PASS:
                detail += f" ({time.perf_counter() - started:.1f} s)"
            yield Check(subject, label, outcome, detail)


# ---- entry points -------------------------------------------------------------------------------


def check_estimator(est: Estimator, tasks: Iterable[Task] = ()) -> list[Check]:
    """Every check of one estimator; training runs on ``tasks`` (none: only the layer checks)."""
    return list(_estimator_checks(est, tasks))


def check_task(task: Task, estimators: Iterable[Estimator] = ()) -> list[Check]:
    """Every check of one task; training runs with each of ``estimators`` that serves it."""
    return list(_task_checks(task, estimators))


def _estimator_checks(est: Estimator, tasks: Iterable[Task]) -> Iterator[Check]:
    subject = f"estimator {getattr(est, 'name', type(est).__name__)}"
    registration = _run(subject, "registration", lambda: _estimator_registration(est))
    yield registration
    if registration.outcome == FAIL:
        return
    params = dict(est.defaults)
    yield _run(subject, "check(defaults)", lambda: est.check(dict(params)) or "accepts")
    yield from _estimator_layer_checks(est, params)
    yield from _training_checks(subject, ((f"train on {t.name}", t, est) for t in tasks))


def _task_checks(task: Task, estimators: Iterable[Estimator]) -> Iterator[Check]:
    subject = f"task {getattr(task, 'name', type(task).__name__)}"
    registration = _run(subject, "registration", lambda: _task_registration(task))
    yield registration
    if registration.outcome == FAIL:
        return
    params = _smoke_params(task)

    def check_params() -> str:
        for which, values in (("defaults", dict(task.defaults)), ("smoke sizes", params)):
            try:
                task.check(values)
            except (ValueError, UsageError) as e:
                raise _Failed(f"check() rejects its own {which}: {e}") from e
        return "accepts its defaults and smoke sizes"

    def specs() -> str:
        found = []
        for kind in task.kinds:
            spec = task.spec(kind, params)
            if getattr(spec, "kind", None) != kind:
                raise _Failed(f"spec({kind!r}) returned {spec!r}, not a {kind} spec")
            found.append(_label(spec))
        return "; ".join(found)

    yield _run(subject, "check()", check_params)
    yield _run(subject, "spec() for each kind", specs)
    yield from _samples_checks(subject, task, estimators)
    yield from _training_checks(subject, ((f"train with {e.name}", task, e) for e in estimators))


def _samples_checks(subject: str, task: Task, estimators: Iterable[Estimator]) -> Iterator[Check]:
    """The several-samples smoke check, with the first of ``estimators`` that serves the task."""
    with tempfile.TemporaryDirectory(prefix="sparsebench-check-") as cache:
        for est in estimators:
            try:
                detail = _samples_smoke(task, est, Path(cache))
            except _Skipped:
                continue
            except _Failed as e:
                yield Check(subject, "several samples per instance", FAIL, str(e))
            except Exception as e:
                yield Check(subject, "several samples per instance", FAIL,
                            f"{type(e).__name__}: {e}{_where(e)}")
            else:
                yield Check(subject, "several samples per instance", PASS, detail)
            return


def _resolve(registry: Registry, name: str) -> str:
    """A plugin name, or the plugin of a task, estimator or distribution of that name."""
    if name in registry.plugins:
        return name
    for table in (registry.estimators, registry.tasks):
        if name in table:
            return table[name].plugin
    for plugin, source in registry.plugins.items():
        if source.partition(" ")[0] == name:
            return plugin
    if name in registry.disabled:
        raise UsageError(f"plugin {name!r} is switched off (-p no:{name} or $SPARSEBENCH_DISABLE_PLUGINS)")
    known = ", ".join(p for p in registry.plugins if p not in DEFAULT_PLUGINS) or "none installed"
    raise UsageError(
        f"no plugin, task or estimator named {name!r}; third-party plugins: {known} "
        "(built-ins are listed by `sparsebench plugins`)"
    )


def check_plugin(
    registry: Registry, name: str, echo: Callable[[str], None] | None = None
) -> Report:
    """Check everything plugin ``name`` registered (``name`` may also be one of its estimators or
    tasks, or its distribution). Training uses the built-in tasks and estimators and the plugin's
    own. ``echo`` receives each line as soon as its check is done."""
    plugin = _resolve(registry, name)
    started = time.perf_counter()
    report = Report(plugin, registry.plugins[plugin], registry.version(plugin))
    say = echo or (lambda line: None)
    say(report.header())
    own_tasks = [r.obj for r in registry.tasks.values() if r.plugin == plugin]
    own_ests = [r.obj for r in registry.estimators.values() if r.plugin == plugin]
    tasks = [*own_tasks, *(r.obj for r in registry.tasks.values() if r.plugin in DEFAULT_PLUGINS)]
    ests = [*own_ests, *(r.obj for r in registry.estimators.values() if r.plugin in DEFAULT_PLUGINS)]
    checks = [_estimator_checks(est, list(dict.fromkeys(tasks))) for est in own_ests]
    checks += [_task_checks(task, list(dict.fromkeys(ests))) for task in own_tasks]
    checks.append(_figure_checks(registry, plugin))
    for check in (c for group in checks for c in group):
        for line in report.add(check):
            say(line)
    if not report.checks:
        for line in report.add(Check(f"plugin {plugin}", "registers something", FAIL,
                                     "it registers no task, estimator or figure")):
            say(line)
    report.seconds = time.perf_counter() - started
    say(report.summary())
    return report


def _figure_checks(registry: Registry, plugin: str) -> Iterator[Check]:
    for reg in (r for r in registry.figures if r.plugin == plugin):
        fig = reg.obj
        subject = f"figure {getattr(fig, 'name', fig)}"
        ok = getattr(fig, "task", None) in registry.tasks and callable(getattr(fig, "draw", None))
        detail = f"draws {fig.task} runs" if ok else "needs a registered task and a draw(ctx) function"
        yield Check(subject, "registration", PASS if ok else FAIL, detail)
