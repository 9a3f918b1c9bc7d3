"""``sparsebench check-plugin`` and ``harness.testing``: a conforming plugin passes, and each way
an estimator or task can break the contract is one FAIL line that says what is wrong."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from estimators.base import (
    Estimator,
    GlimpseSpec,
    PermutationOutput,
    PermutationSpec,
    SparseMatrixSpec,
    StructureLayer,
    Unsupported,
    repeat_samples,
    training_samples,
)
from harness.cli import main
from harness.plugins.conformance import FAIL, PASS, check_estimator, check_task
from harness.task import Task, TaskRun
from harness.testing import assert_conforms

# ---- a conforming estimator, and ways to break it ----------------------------------------------


class Linear(StructureLayer):
    """A learned dense W (the contract at its simplest)."""

    def __init__(self, spec: SparseMatrixSpec):
        super().__init__()
        self.out_shape = spec.out_shape
        self.weight = nn.Parameter(torch.randn(math.prod(spec.out_shape), math.prod(spec.in_shape)))

    def forward(self, x):
        return (x.flatten(1) @ self.weight.T).view(x.shape[0], *self.out_shape)


class Sorter(StructureLayer):
    """Hard ascending sort forward, a softmax over ranks backward (good enough to be correct)."""

    def __init__(self, spec: PermutationSpec, descending: bool = False, soft_eval: bool = False):
        super().__init__()
        self.n, self.descending, self.soft_eval = spec.n, descending, soft_eval

    def forward(self, keys):
        order = keys.argsort(-1, descending=self.descending)
        hard = nn.functional.one_hot(order, self.n).to(keys.dtype)  # (b, n, n)
        soft = (-(keys.sort(-1).values[..., :, None] - keys[..., None, :]) ** 2).softmax(-1)
        if not self.training and not self.soft_eval:
            return PermutationOutput([hard])
        return PermutationOutput([hard + soft - soft.detach()])


class Good(Estimator):
    name = "good"
    description = "a conforming test estimator"
    kinds = frozenset({"sparse_matrix", "permutation"})
    defaults = {"tau": 1.0}

    def unsupported(self, spec, params=None):
        if isinstance(spec, PermutationSpec) and spec.source != "keys":
            return "good sorts keys only"
        return super().unsupported(spec, params)

    def build(self, spec, params):
        if reason := self.unsupported(spec, params):
            raise Unsupported(reason)
        return Linear(spec) if isinstance(spec, SparseMatrixSpec) else Sorter(spec)


def _variant(**overrides) -> Estimator:
    return type("Broken", (Good,), overrides)()


def _layer(base: type[StructureLayer], **methods) -> type[StructureLayer]:
    return type(f"Broken{base.__name__}", (base,), methods)


def _build_with(layer_cls):
    def build(self, spec, params):
        if reason := self.unsupported(spec, params):
            raise Unsupported(reason)
        return layer_cls(spec) if isinstance(spec, SparseMatrixSpec) else Sorter(spec)
    return build


def _plain_tensor_init(self, spec):
    Linear.__init__(self, spec)
    self.mask = torch.ones(3)


def _unused_init(self, spec):
    Linear.__init__(self, spec)
    self.unused = nn.Parameter(torch.zeros(2))


def _random_buffer_init(self, spec):
    Linear.__init__(self, spec)
    self.register_buffer("scale", torch.rand(()) + 0.5, persistent=False)


def _samples_init(samples):
    def init(self, spec):
        Linear.__init__(self, spec)
        self.samples = samples
    return init


def _grouped_sum(self, loss):
    return loss.view(self.samples, -1).mean(1).sum()  # the samples summed, not averaged


def _eval_by_row(self, x):
    out = Linear.forward(self, x)
    return out if self.training or x.shape[0] <= 3 else out * 2  # copies answer otherwise


BROKEN = {
    "lying-unsupported": (
        _variant(build=lambda self, spec, params: (_ for _ in ()).throw(Unsupported("not today"))
                 if isinstance(spec, SparseMatrixSpec) and len(spec.in_shape) > 1
                 else Good.build(self, spec, params)),
        "sparse_matrix (3, 4)->(2, 3) k=6: build: unsupported() returned None but build() raised "
        "Unsupported(not today)",
    ),
    "builds-despite-its-reason": (
        _variant(unsupported=lambda self, spec, params=None: "never 2-D"
                 if isinstance(spec, SparseMatrixSpec) and len(spec.in_shape) > 1 else
                 Good.unsupported(self, spec, params),
                 build=lambda self, spec, params: Linear(spec) if isinstance(spec, SparseMatrixSpec)
                 else Sorter(spec)),
        "unsupported() says 'never 2-D' but build() returned a layer",
    ),
    "a-crash-instead-of-unsupported": (
        _variant(unsupported=lambda self, spec, params=None: "keys only"
                 if isinstance(spec, PermutationSpec) and spec.source != "keys" else
                 Estimator.unsupported(self, spec, params),
                 build=lambda self, spec, params: Linear(spec) if isinstance(spec, SparseMatrixSpec)
                 else Sorter(spec) if spec.source == "keys" else 1 / 0),
        "permutation n=4 free: build: build() raised ZeroDivisionError: division by zero",
    ),
    "summed-objective": (
        _variant(build=_build_with(_layer(Linear, objective=lambda self, loss: loss.sum()))),
        "d objective / d per_sample_loss is [1.0, 1.0, 1.0], not 1/(S b) each",
    ),
    "noisy-eval": (
        _variant(build=_build_with(_layer(Linear, forward=lambda self, x: Linear.forward(self, x)
                                          + 0.1 * torch.randn(1)))),
        "two eval() forwards of one input differ: eval() must be deterministic",
    ),
    "eval-not-linear": (
        _variant(build=_build_with(_layer(Linear, forward=lambda self, x: Linear.forward(self, x) + 1))),
        "eval() forward is not linear in x (the contract is y = W x)",
    ),
    "plain-tensor": (
        _variant(build=_build_with(_layer(Linear, __init__=_plain_tensor_init))),
        "plain tensor attribute(s) mask: register them",
    ),
    "unused-parameter": (
        _variant(build=_build_with(_layer(Linear, __init__=_unused_init))),
        "parameter(s) unused received no gradient",
    ),
    "state-outside-state-dict": (
        _variant(build=_build_with(_layer(Linear, __init__=_random_buffer_init, forward=lambda self, x:
                                          Linear.forward(self, x) * self.scale))),
        "a fresh build loaded with state_dict() computes something else in eval()",
    ),
    "wrong-shape": (
        _variant(build=_build_with(_layer(Linear, forward=lambda self, x: Linear.forward(self, x)[:, :1]))),
        "forward gave shape (3, 1), not (3, 4)",
    ),
    "descending-sort": (
        _variant(build=lambda self, spec, params: Linear(spec) if isinstance(spec, SparseMatrixSpec)
                 else Sorter(spec, descending=True)),
        "eval() permutation does not sort the keys ascending",
    ),
    "soft-eval": (
        _variant(build=lambda self, spec, params: Linear(spec) if isinstance(spec, SparseMatrixSpec)
                 else Sorter(spec, soft_eval=True)),
        "eval() matrices are not hard permutations",
    ),
    "claims-a-kind-it-never-serves": (
        _variant(kinds=frozenset({"sparse_matrix", "permutation", "glimpse"}),
                 unsupported=lambda self, spec, params=None: "not really"
                 if isinstance(spec, GlimpseSpec) else Good.unsupported(self, spec, params)),
        "glimpse: served: claims glimpse but serves none of its probe specs",
    ),
    "samples-not-an-int": (
        _variant(build=_build_with(_layer(Linear, __init__=_samples_init(0)))),
        "Linear.samples = 0: the training samples per instance must be an int >= 1",
    ),
    "samples-summed": (
        _variant(build=_build_with(_layer(Linear, __init__=_samples_init(2), objective=_grouped_sum))),
        "not 1/(S b) each",
    ),
    "samples-change-eval": (
        _variant(build=_build_with(_layer(Linear, __init__=_samples_init(2), forward=_eval_by_row))),
        "eval() of the batch repeated 2 times differs from eval() of one copy",
    ),
    "bad-name": (_variant(name="My Estimator"), "name 'My Estimator' must be a lower-case identifier"),
    "default-outside-its-choices": (
        _variant(defaults={"mode": "fast"}, choices={"mode": ("exact", "sampled")}),
        "default mode = 'fast' is not among its choices",
    ),
    "rejects-its-own-defaults": (
        _variant(check=lambda self, params: (_ for _ in ()).throw(ValueError("tau = 1.0 is too hot"))),
        "check(defaults): ValueError: tau = 1.0 is too hot",
    ),
}


def test_a_conforming_estimator_passes_every_check():
    checks = check_estimator(Good())
    assert [c.line() for c in checks if c.outcome == FAIL] == []
    names = {c.name for c in checks}
    assert {"registration", "check(defaults)", "sparse_matrix (4,)->(4,) k=4 on cpu: train",
            "permutation n=4 keys on cpu: eval", "permutation n=4 free: build",
            "glimpse 2x4x4 of (1, 16, 16): build (kind not claimed)"} <= names


@pytest.mark.parametrize(("est", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_each_contract_breach_is_a_failure_that_says_what(est, message):
    failures = [f"{c.name}: {c.detail}" for c in check_estimator(est) if c.outcome == FAIL]
    assert any(message in line for line in failures), failures


def test_several_samples_per_instance_conform():
    est = _variant(build=_build_with(_layer(Linear, __init__=_samples_init(3))))
    checks = check_estimator(est)
    assert [c.line() for c in checks if c.outcome == FAIL] == []
    train = next(c for c in checks if c.name == "sparse_matrix (4,)->(4,) k=4 on cpu: train")
    assert train.detail.startswith("S = 3 samples x b = 3: forward (9, 4)")
    ev = next(c for c in checks if c.name == "sparse_matrix (4,)->(4,) k=4 on cpu: eval")
    assert "S = 3 copies agree" in ev.detail


def test_assert_conforms_raises_with_the_whole_report():
    pattern = r"(?s)estimator good.*FAIL.*not 1/\(S b\) each.*does NOT conform"
    with pytest.raises(AssertionError, match=pattern):
        assert_conforms(BROKEN["summed-objective"][0], train=False)
    report = assert_conforms(Good(), train=False)
    assert report.ok and "good conforms" in report.summary()


# ---- the command -------------------------------------------------------------------------------

GOOD_PLUGIN = """
import torch
from torch import nn
from estimators.base import Estimator, StructureLayer, Unsupported, hookimpl

class Linear(StructureLayer):
    def __init__(self, spec):
        super().__init__()
        self.out_shape = spec.out_shape
        n_in = int(torch.tensor(spec.in_shape).prod())
        n_out = int(torch.tensor(spec.out_shape).prod())
        self.weight = nn.Parameter(torch.eye(n_out, n_in))

    def forward(self, x):
        return (x.flatten(1) @ self.weight.T).view(x.shape[0], *self.out_shape)

class Plain(Estimator):
    name = "plain"
    description = "a dense W, for the check-plugin tests"
    kinds = frozenset({"sparse_matrix"})

    def build(self, spec, params):
        if reason := self.unsupported(spec, params):
            raise Unsupported(reason)
        return Linear(spec)

@hookimpl
def register_estimators(register):
    register(Plain())
"""


def test_check_plugin_passes_a_conforming_plugin(plugin_dir, home, capsys):
    plugin_dir("sb_plain", GOOD_PLUGIN)
    assert main(["check-plugin", "--plugin", "sb_plain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("checking sb_plain (module sb_plain; code module sb_plain src:")
    assert out[1] == "estimator plain"
    assert "  PASS  sparse_matrix (4,)->(4,) k=4 on cpu: eval: deterministic, linear in x" in out
    assert any(line.startswith("  PASS  train on identity: sparse_matrix, 3 steps, test/mse") for line in out)
    assert any(line.startswith("  SKIP  train on sorting: n/a: plain builds sparse_matrix") for line in out)
    # the gradient diagnostics of the smoke cell, printed for the plugin's author
    trained = next(line for line in out if line.startswith("  PASS  train on identity:"))
    assert "; gradients (4 draws): " in trained  # all zero here: the plain layer starts exact
    assert any(line.startswith("  PASS  train on study_matrix: sparse_matrix, 1 steps, test/var ")
               for line in out)  # the gradient study, at no cost to the plugin's author
    # sorting, attention, study_permutation and study_glimpse: n/a for a sparse_matrix estimator
    assert out[-1].startswith("sb_plain conforms: ") and ", 0 failed, 4 skipped in " in out[-1]


def test_check_plugin_fails_a_broken_plugin_with_exit_1(third_party, home, capsys):
    # the test plugin's estimators ignore the spec's shapes, and two of them blow up after 3 calls
    assert main(["check-plugin", "scaled", "--plugin", third_party]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  sparse_matrix (3, 4)->(2, 3) k=6 on cpu: train: forward gave shape (3, 3, 4), " \
           "not (3, 2, 3)" in out
    assert "  FAIL  permutation n=4 keys: build (kind not claimed): unsupported() says \"scaled " \
           "builds ['sparse_matrix'], not permutation\" but build() returned a layer" in out
    assert "  FAIL  train on identity: RuntimeError: boom from the test estimator (at " \
           "sb_third_party.py:" in out
    assert "  FAIL  sparse_matrix (4,)->(4,) k=4 on cpu: eval: eval() output is not finite" in out
    assert "  FAIL  train on identity: evaluate() gave no finite val/mse: {'val/mse': nan" in out
    assert out.strip().splitlines()[-1].startswith("sb_third_party does NOT conform: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "no plugin, task or estimator named 'nosuch'"),
        ([], "check-plugin: name the plugin to check"),
    ],
)
def test_check_plugin_usage_errors_exit_2(home, capsys, args, message):
    assert main(["check-plugin", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_check_plugin_of_a_built_in_estimator(capsys):
    assert main(["check-plugin", "gumbel_sinkhorn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("checking estimators.plugins.gumbel_sinkhorn (built-in; code sparsebench ")
    assert "  PASS  train on sorting: permutation, 3 steps" in out


# ---- tasks -------------------------------------------------------------------------------------


class Echo(Task):
    """Learn W x = x on a fixed eval set: a tiny third-party task."""

    name = "echo"
    description = "learn the identity on 4 numbers"
    kinds = ("sparse_matrix",)
    primary_metric = "test/mse"
    select_metric = "val/mse"
    defaults = {"n": 4, "steps": 50, "eval_every": 10, "lr": 0.05, "batch_size": 8}
    smoke = {"steps": 2, "eval_every": 2}

    def spec(self, kind, params):
        return SparseMatrixSpec((params["n"],), (params["n"],), k=params["n"])

    def eval_data(self, params):
        return torch.randn(16, params["n"], generator=torch.Generator().manual_seed(0))

    def repeat(self, x, samples):
        return repeat_samples(x, samples)

    def setup(self, cell):
        layer, n = cell.layer, cell.params["n"]

        def train_step(step):
            x = torch.randn(cell.params["batch_size"], n)
            x = self.repeat(x, training_samples(layer))  # the layer's samples per instance
            per_sample = ((layer(x) - x) ** 2).mean(1)
            return layer.objective(per_sample), {"train/mse": per_sample.mean().item()}

        def evaluate():
            x_eval = self.eval_data(cell.params)
            mse = ((layer(x_eval) - x_eval) ** 2).mean().item()
            return {"val/mse": mse, "test/mse": mse}

        return TaskRun(layer, cell.params["steps"], cell.params["eval_every"], train_step, evaluate)


class IgnoresSamples(Echo):
    def repeat(self, x, samples):
        return x  # one row per instance, whatever the layer asked for


class InstanceMajor(Echo):
    def repeat(self, x, samples):
        return x.repeat_interleave(samples, dim=0)  # copies of an instance side by side


class FreshEvalData(Echo):
    def eval_data(self, params):
        return torch.randn(16, params["n"])  # a new eval set each evaluation: nothing repeats


def test_a_conforming_task_trains_with_every_estimator_that_serves_it():
    checks = check_task(Echo(), [Good()])
    assert [c.line() for c in checks if c.outcome == FAIL] == []
    train = next(c for c in checks if c.name == "train with good")
    assert train.outcome == PASS and "sparse_matrix, 2 steps, test/mse" in train.detail
    samples = next(c for c in checks if c.name == "several samples per instance")
    assert samples.outcome == PASS
    assert samples.detail.startswith("good: samples 1 -> 2 feeds the layer 8 -> 16 sample-major rows")


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (FreshEvalData(), "evaluate() twice gave different metrics"),
        (type("T", (Echo,), {"smoke": {"stpes": 2}})(), "smoke sets stpes, which are not among the defaults"),
        (type("T", (Echo,), {"primary_metric": "loss"})(), "primary_metric 'loss' must be a test/ metric"),
        (type("T", (Echo,), {"select_metric": "test/mse"})(),
         "select_metric 'test/mse' must be a val/ metric"),
        (type("T", (Echo,), {"spec": lambda self, kind, p: PermutationSpec(4, "keys")})(),
         "spec('sparse_matrix') returned PermutationSpec"),
        (IgnoresSamples(), "with samples = 2 the layer got 8 rows, with samples = 1 8"),
        (InstanceMajor(), "the layer's input rows are not sample-major copies of the batch"),
    ],
    ids=["evaluate-does-not-repeat", "smoke-typo", "primary-metric", "select-metric",
         "spec-of-the-wrong-kind", "ignores-samples", "instance-major"],
)
def test_task_contract_breaches(task, message):
    failures = [f"{c.name}: {c.detail}" for c in check_task(task, [Good()]) if c.outcome == FAIL]
    assert any(message in line for line in failures), failures


@pytest.mark.parametrize("task_name", ["identity", "attention", "sorting"])
def test_every_built_in_task_passes_the_several_samples_smoke_check(task_name):
    """Each task repeats its instances sample-major for a layer with samples > 1 (rloo's 4, then
    8) and evaluates exactly as with one sample."""
    from harness.plugins import load

    registry = load([])
    checks = check_task(registry.task(task_name), [registry.estimator("rloo")])
    samples = next(c for c in checks if c.name == "several samples per instance")
    assert samples.outcome == PASS, samples.detail
    assert samples.detail.startswith("rloo: samples 4 -> 8 feeds the layer")
    assert [c.line() for c in checks if c.outcome == FAIL] == []
